"""The shared-memory progress segment a warm reports through.

The coordinator creates and unlinks one POSIX shared-memory object per warm; workers
store their running byte totals in it; any process in any language maps it read-only to
follow the warm.  The layout is a wire format (docs/progress-protocol.md, which also says
why no locks are needed); the ``struct`` formats below are its one source in Python.

The object itself (naming, creation, mapping, unlinking) is ``shm``'s.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time
from typing import TYPE_CHECKING, NamedTuple, Sequence

from warmpool._errors import CancelledError, ProgressError
from warmpool._platform import pid_alive
from warmpool._progress.shm import (
    create_object,
    is_unnamed,
    map_object,
    os_error,
    posix_name,
    unlink_object,
)

if TYPE_CHECKING:  # any object with these fields will do
    from warmpool._plan import Chunk

__all__ = ["ProgressSegment", "ProgressSnapshot", "ProgressView", "WorkerCounter"]

_MAGIC = b"WARMPOOL"
_VERSION = 1
# Little-endian, no implicit padding ('<').  Field offsets: docs/progress-protocol.md.
# magic, version, header_size, state, n_workers, n_chunks, n_layers,
# total_bytes, start_time_ns, end_time_ns, coordinator_pid, reserved
_HEADER = struct.Struct("<8sIIIIIIQQQII")
# file_index, state, 3 pad, layer_lo, layer_hi, offset, length
_CHUNK = struct.Struct("<IB3xiiQQ")
_U64 = struct.Struct("<Q")  # a worker counter
_STATE_AT = 16
_END_TIME_AT = 48
_CHUNK_STATE_AT = 4  # within one chunk entry

_RUN_STATES = ("starting", "running", "done", "failed", "cancelled", "skipped")
_CHUNK_STATES = ("pending", "running", "done", "failed", "skipped")
_TERMINAL = frozenset(_RUN_STATES[2:])
_READY_CODES = frozenset((_CHUNK_STATES.index("done"), _CHUNK_STATES.index("skipped")))

_LITTLE = sys.byteorder == "little"
_STOPS = (CancelledError, KeyboardInterrupt, SystemExit)  # settle as "cancelled", see _settle


class ProgressSnapshot(NamedTuple):
    """One reading of a segment's header and worker counters."""

    done_bytes: int
    total_bytes: int
    state: str
    n_workers: int
    start_time_ns: int
    end_time_ns: int
    coordinator_pid: int

    @property
    def finished(self) -> bool:
        """True once the warm reached a terminal state (done, failed, cancelled, skipped)."""
        return self.state in _TERMINAL


class _Layout(NamedTuple):
    header_size: int
    n_workers: int
    n_chunks: int
    n_layers: int


def _read_layout(mm: mmap.mmap, name: str) -> _Layout:
    """Validate magic, version and sizes, so a foreign or truncated object never crashes us."""
    magic, version, header_size, _, n_workers, n_chunks, n_layers, *_ = _HEADER.unpack_from(mm)
    if magic != _MAGIC:
        why = "not initialised yet (retry)" if magic == bytes(8) else "bad magic"
        raise ProgressError(f"not a warmpool progress segment: {why}", name)
    if version != _VERSION:
        raise ProgressError(f"protocol version {version}; this reader knows {_VERSION}", name)
    if header_size < _HEADER.size or header_size % 8:
        raise ProgressError(f"bad header_size {header_size}", name)
    needed = header_size + _U64.size * n_workers + _CHUNK.size * n_chunks
    if needed > len(mm):
        raise ProgressError(f"truncated: {len(mm)} bytes, its layout needs {needed}", name)
    return _Layout(header_size, n_workers, n_chunks, n_layers)


def _attach(name: str, writable: bool) -> tuple[str, mmap.mmap, _Layout]:
    name = name if is_unnamed(name) else posix_name(name)
    mm = map_object(name, writable, _HEADER.size)
    try:
        return name, mm, _read_layout(mm, name)
    except BaseException:
        mm.close()
        raise


def _native(value: int, size: int) -> int:
    """The native integer whose bytes are ``value`` little-endian, the layout's order."""
    return value if _LITTLE else int.from_bytes(value.to_bytes(size, "little"), sys.byteorder)


class _Stores:
    """Stores of changing fields that a concurrent reader can never see half done.

    Not ``struct.pack_into``: CPython zero-fills the target before packing into it, so a
    reader could catch a counter or the state at 0 (test_readers_never_see_a_torn_counter
    did).  A native-typed memoryview item assignment is one fixed-size memcpy: one store.
    """

    def __init__(self, mm: mmap.mmap) -> None:
        whole = memoryview(mm)[: len(mm) // 8 * 8]  # cast() wants whole items
        self._u32 = whole.cast("I")
        self._u64 = whole.cast("Q")
        whole.release()

    def u32(self, offset: int, value: int) -> None:
        self._u32[offset // 4] = _native(value, 4)

    def u64(self, offset: int, value: int) -> None:
        self._u64[offset // 8] = _native(value, 8)

    def release(self) -> None:  # before mmap.close(), which refuses while views exist
        self._u32.release()
        self._u64.release()


class _Mapped:
    """A mapped, validated segment: what the coordinator and the readers both read."""

    def __init__(self, name: str, mm: mmap.mmap, layout: _Layout) -> None:
        self._name = name
        self._mm = mm
        self._layout = layout
        self._counters = struct.Struct(f"<{layout.n_workers}Q")
        self._chunks_at = layout.header_size + _U64.size * layout.n_workers
        self._by_layer: dict[int, tuple[int, ...]] = {}

    @property
    def name(self) -> str:
        """The POSIX name, leading slash included (what shm_open(3) takes)."""
        return self._name

    @property
    def n_layers(self) -> int:
        """Block count; layer keys run from -1 (input) to n_layers (output)."""
        return self._layout.n_layers

    @property
    def n_chunks(self) -> int:
        return self._layout.n_chunks

    def _buf(self) -> mmap.mmap:
        if self._mm.closed:
            raise ProgressError("segment is closed", self._name)
        return self._mm

    def snapshot(self) -> ProgressSnapshot:
        mm = self._buf()
        header = _HEADER.unpack_from(mm)  # state before counters: see the protocol doc
        return ProgressSnapshot(
            done_bytes=sum(self._counters.unpack_from(mm, self._layout.header_size)),
            total_bytes=header[7],
            state=self._state_name(_RUN_STATES, header[3]),
            n_workers=self._layout.n_workers,
            start_time_ns=header[8],
            end_time_ns=header[9],
            coordinator_pid=header[10],
        )

    def chunk_states(self) -> list[str]:
        mm = self._buf()
        at, step = self._chunks_at + _CHUNK_STATE_AT, _CHUNK.size
        return [self._state_name(_CHUNK_STATES, mm[at + i * step]) for i in range(self.n_chunks)]

    def layer_ready(self, layer: int) -> bool:
        """True iff every chunk whose [layer_lo, layer_hi] holds ``layer`` is done or skipped."""
        mm = self._buf()
        return all(mm[at] in _READY_CODES for at in self._state_offsets(layer))

    def _state_offsets(self, layer: int) -> tuple[int, ...]:
        # Layer ranges never change after create(), so each layer's list is built once.
        if layer in self._by_layer:
            return self._by_layer[layer]
        if not -1 <= layer <= self.n_layers:
            raise ProgressError(f"layer key {layer} outside -1..{self.n_layers}", self._name)
        found = []
        end = self._chunks_at + self.n_chunks * _CHUNK.size
        for at in range(self._chunks_at, end, _CHUNK.size):
            _, _, lo, hi, _, _ = _CHUNK.unpack_from(self._mm, at)
            if lo <= layer <= hi:
                found.append(at + _CHUNK_STATE_AT)
        self._by_layer[layer] = offsets = tuple(found)
        return offsets

    def _state_name(self, names: tuple[str, ...], code: int) -> str:
        if code >= len(names):
            raise ProgressError(f"unknown state code {code}", self._name)
        return names[code]

    def close(self) -> None:
        """Unmap; idempotent.  Never unlinks."""
        self._mm.close()


def _pack_image(
    total_bytes: int, n_workers: int, chunks: Sequence[Chunk], n_layers: int
) -> bytearray:
    """The whole segment with its magic left zero (create() writes the magic last)."""
    try:
        header = _HEADER.pack(
            bytes(8), _VERSION, _HEADER.size, _RUN_STATES.index("starting"),
            n_workers, len(chunks), n_layers, total_bytes, time.time_ns(), 0, os.getpid(), 0,
        )  # fmt: skip
        at = _HEADER.size + _U64.size * n_workers
        image = bytearray(at + _CHUNK.size * len(chunks))
        image[: _HEADER.size] = header
        for c in chunks:
            _CHUNK.pack_into(image, at, c.file, 0, c.layer_lo, c.layer_hi, c.offset, c.length)
            at += _CHUNK.size
    except struct.error as e:
        raise ProgressError(f"a value does not fit the progress layout: {e}") from None
    return image


def _state_code(names: tuple[str, ...], state: str) -> int:
    try:
        return names.index(state)
    except ValueError:
        raise ProgressError(f"unknown state {state!r}; expected {'|'.join(names)}") from None


class ProgressSegment(_Mapped):
    """The coordinator's side: creates, writes header state and chunk states, unlinks."""

    _unlinked = False

    def __init__(self, name: str, mm: mmap.mmap, layout: _Layout, fd: int | None = None) -> None:
        super().__init__(name, mm, layout)
        self._stores = _Stores(mm)
        self._fd = fd  # an unnamed segment's memfd, handed to the workers; None when named

    @classmethod
    def create(
        cls, total_bytes: int, n_workers: int, chunks: Sequence[Chunk], n_layers: int,
        require_name: bool = False,
    ) -> ProgressSegment:
        """A new segment, named in /dev/shm where possible; ``require_name``: only a named one
        (an unnamed one, ``memfd:FD``, serves this process and its workers alone)."""
        image = _pack_image(total_bytes, n_workers, tuple(chunks), n_layers)
        name, mm, fd = create_object(len(image), require_name=require_name)
        mm[:] = image
        # Magic last: a reader that lists /dev/shm early sees "not initialised", never junk.
        mm[: len(_MAGIC)] = _MAGIC
        return cls(name, mm, _read_layout(mm, name), fd)

    @property
    def named(self) -> bool:
        """Whether other processes can attach by name (False: /dev/shm was unusable)."""
        return not is_unnamed(self._name)

    @property
    def shared_fds(self) -> tuple[int, ...]:
        """The fds a worker must inherit to attach (an unnamed segment's), else ()."""
        return () if self._fd is None else (self._fd,)

    def set_state(self, state: str) -> None:
        """Set the warm's state; a terminal one also stamps end_time_ns (stored first)."""
        code = _state_code(_RUN_STATES, state)
        self._buf()
        if state in _TERMINAL:
            self._stores.u64(_END_TIME_AT, time.time_ns())
        self._stores.u32(_STATE_AT, code)

    def set_chunk_state(self, index: int, state: str) -> None:
        code = _state_code(_CHUNK_STATES, state)
        if not 0 <= index < self.n_chunks:
            raise ProgressError(f"chunk index {index} outside 0..{self.n_chunks - 1}", self._name)
        self._buf()[self._chunks_at + index * _CHUNK.size + _CHUNK_STATE_AT] = code

    def close(self) -> None:
        """Unmap; idempotent.  Does not unlink (the context manager does)."""
        self._stores.release()
        super().close()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def unlink(self) -> None:
        """Remove the name; readers already mapped keep their view.  Idempotent."""
        if self._unlinked or not self.named:
            return
        try:
            unlink_object(self._name)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise os_error(self._name, "unlink", e) from None
        self._unlinked = True

    def __enter__(self) -> ProgressSegment:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            self._settle(exc_type)
            self.unlink()
        finally:
            self.close()

    def _settle(self, exc_type: type[BaseException] | None) -> None:
        """The one rule for how an unfinished warm ends: a stop someone asked for is
        "cancelled" (``cancel()``/``should_stop``, Ctrl-C, and SIGTERM, which the CLI raises
        as SystemExit), anything else "failed".  Readers mapped before the unlink keep the
        last state they can see: never leave them a "running" that will not move again."""
        if self._mm.closed or self.snapshot().finished:
            return
        stopped = exc_type is not None and issubclass(exc_type, _STOPS)
        self.set_state("cancelled" if stopped else "failed")


class WorkerCounter:
    """One worker's done_bytes slot, of which it is the only writer.  Never unlinks."""

    def __init__(self, name: str, mm: mmap.mmap, at: int) -> None:
        self._name = name
        self._mm = mm
        self._stores = _Stores(mm)
        self._at = at
        # A replacement worker in the same slot carries on from its predecessor's
        # total, so done_bytes never goes backwards.
        self._total: int = _U64.unpack_from(mm, at)[0]

    @classmethod
    def attach(cls, name: str, slot: int) -> WorkerCounter:
        name, mm, layout = _attach(name, writable=True)
        if not 0 <= slot < layout.n_workers:
            mm.close()
            raise ProgressError(f"worker slot {slot} outside 0..{layout.n_workers - 1}", name)
        return cls(name, mm, layout.header_size + _U64.size * slot)

    @property
    def done_bytes(self) -> int:
        return self._total

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` more as done (found resident or just faulted in)."""
        if nbytes < 0:
            raise ProgressError(f"negative byte count {nbytes}", self._name)
        if self._mm.closed:
            raise ProgressError("counter is closed", self._name)
        self._total += nbytes
        self._stores.u64(self._at, self._total)

    def close(self) -> None:
        self._stores.release()
        self._mm.close()


class ProgressView(_Mapped):
    """A read-only view from any process; it survives the coordinator's unlink."""

    @classmethod
    def attach(cls, name: str) -> ProgressView:
        return cls(*_attach(name, writable=False))

    def abandoned(self) -> bool:
        """Not finished, and its coordinator is gone (killed before it could unlink).

        A recycled pid reads as alive; a coordinator in another pid namespace cannot be
        checked from here.
        """
        snap = self.snapshot()
        return not snap.finished and not pid_alive(snap.coordinator_pid)

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
