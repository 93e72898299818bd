"""How the pool hands out chunks (``_pool.coordinator``): consecutive chunks that touch in the
file go to one worker as a run of up to ``RUN_BYTES``, in plan order, so that its faults stream
through them; near the end runs shrink to a fair share, and a worker that retires gives the
rest of its run back to the head of the queue."""

from __future__ import annotations

from warmpool._plan import Chunk
from warmpool._pool.coordinator import RUN_BYTES, _Coordinator

MIB = 1 << 20


class _Conn:
    """The worker's end of the channel, as far as handing out goes: what was sent."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)


class _Segment:
    def set_chunk_state(self, index: int, state: str) -> None:
        pass


class _Worker:
    def __init__(self, slot: int) -> None:
        self.slot, self.conn = slot, _Conn()


def _coordinator(spans, workers: int) -> _Coordinator:
    chunks = [Chunk(file, offset, length, 0, 0) for file, offset, length in spans]
    return _Coordinator(["a.gguf", "b.gguf"], chunks, range(len(chunks)), "populate", _Segment(), workers,
                        lambda: False)


def test_a_run_is_consecutive_chunks_that_touch_up_to_run_bytes():
    size = 16 * MIB
    chunks = [(0, i * size, size) for i in range(40)]
    c = _coordinator(chunks, workers=2)
    run = c._take_run()
    assert run == list(range(RUN_BYTES // size))
    assert c._take_run() == list(range(len(run), 2 * len(run)))


def test_a_run_ends_at_a_gap_or_another_file():
    size = 16 * MIB
    chunks = [(0, 0, size), (0, size, size), (0, 3 * size, size), (1, 4 * size, size), (1, 5 * size, size)]
    c = _coordinator(chunks, workers=1)
    assert c._take_run() == [0, 1]  # chunk 2 starts after a gap
    assert c._take_run() == [2]  # chunk 3 is in another file
    assert c._take_run() == [3, 4]


def test_near_the_end_a_run_is_a_fair_share_of_what_is_left():
    size = 8 * MIB
    chunks = [(0, i * size, size) for i in range(6)]
    c = _coordinator(chunks, workers=4)
    assert [len(c._take_run()) for _ in range(4)] == [1, 1, 1, 1]  # 6 chunks for 4 workers
    c = _coordinator(chunks, workers=2)
    assert c._take_run() == [0, 1, 2]  # half of 6


def test_a_worker_is_handed_its_run_in_order_and_a_retired_one_gives_back_the_rest():
    size = 16 * MIB
    chunks = [(0, i * size, size) for i in range(16)]
    c = _coordinator(chunks, workers=2)
    a, b = _Worker(0), _Worker(1)
    c._dispatch(a)
    c._dispatch(b)
    assert a.conn.sent == [0, 1] and b.conn.sent == [4, 5]  # two held at once, each from its run
    c.busy[a.slot].remove(0)
    c._dispatch(a)
    assert a.conn.sent == [0, 1, 2]
    c._retire(b)
    assert b.conn.sent == [4, 5, None]
    c.busy[a.slot].remove(1)
    c._dispatch(a)
    assert a.conn.sent == [0, 1, 2, 3]  # the last of a's run
    c.busy[a.slot].remove(2)
    c._dispatch(a)
    assert a.conn.sent[-1] == 6  # b's rest (6, 7) comes before chunk 8
    assert c.runs[a.slot] == [7, 8, 9]  # a run from there on, as from the queue
