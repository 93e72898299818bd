"""Fuzzing warmpool's GGUF header walk: seeds, mutations drawn by Hypothesis, and the guards
around one parse.

``tests/test_fuzz_layout.py`` runs the strategy under pytest (2,000 examples in CI);
``tools/fuzz_layout.py`` runs it on demand (10,000) and counts the outcomes.  Mutations are
data (``Mutation``), drawn by Hypothesis, which shrinks a failure to the fewest edits; the tool
draws from the same strategy with shrinking off.  The seeds are ``gguf_files.write_small_gguf``
files, little- and big-endian.
"""

from __future__ import annotations

import os
import re
import signal
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from tests.helpers.gguf_files import Span, map_fields, patch_field, write_small_gguf

__all__ = ["FuzzFailure", "Mutation", "Seed", "apply_mutations", "fuzz_cases", "parse_outcome", "rewrite", "write_seeds"]

MAX_PEAK_BYTES = 50 << 20
# Values that sit on the parser's edges: tiny counts, type codes, sizes near the u32/u64 limits.
BOUNDARY_VALUES = (0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 32, 33, 255, 999, 2**16 - 1, 2**31 - 1,
                   2**32 - 1, 2**32, 2**60, 2**63 - 1, 2**63, 2**64 - 1)


class Seed(NamedTuple):
    data: bytes
    data_offset: int  # end of the header, where tensor data starts
    ints: tuple[Span, ...]  # the integer fields mutations may overwrite
    byte_order: str  # "<" or ">"


class Mutation(NamedTuple):
    kind: str  # "byte", "int", "truncate" or "delete"
    at: int  # byte offset ("byte", "truncate", "delete") or index into Seed.ints ("int")
    value: int  # the new byte or integer; bytes removed, for "delete"


class FuzzFailure(AssertionError):
    """Something other than a LayoutError came out of read_layout (or it hung, or ate memory)."""


def load_seed(path: str | os.PathLike[str]) -> Seed:
    data_offset, spans = map_fields(path)
    data = Path(path).read_bytes()
    order = ">" if data[4:8] in (b"\0\0\0\2", b"\0\0\0\3") else "<"
    return Seed(data, data_offset, tuple(s for s in spans if s.is_int and s.size in (2, 4, 8)), order)


def apply_mutations(seed: Seed, mutations: Sequence[Mutation]) -> bytes:
    data = bytearray(seed.data)
    for m in mutations:
        if m.kind == "byte" and m.at < len(data):
            data[m.at] = m.value & 0xFF
        elif m.kind == "int":
            span = seed.ints[m.at]
            if span.offset + span.size <= len(data):
                data = bytearray(patch_field(data, span, m.value & ((1 << 8 * span.size) - 1), seed.byte_order))
        elif m.kind == "truncate":
            del data[m.at :]
        elif m.kind == "delete":
            del data[m.at : m.at + m.value]
    return bytes(data)


def rewrite(fd: int, data: bytes) -> None:
    """Make the open file hold exactly ``data``.  In place: reopening with O_TRUNC made ext4
    flush the old blocks (its replace-by-truncate heuristic), ~3 ms an example here."""
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def fuzz_cases(seeds: Sequence[Seed]):
    """Hypothesis strategy of (seed index, mutations): mostly edits inside the header."""
    from hypothesis import strategies as st

    def for_seed(index: int):
        seed = seeds[index]
        header = st.integers(0, seed.data_offset - 1)
        mutation = st.one_of(
            st.builds(Mutation, st.just("byte"), header, st.integers(0, 255)),
            st.builds(Mutation, st.just("int"), st.integers(0, len(seed.ints) - 1),
                      st.one_of(st.sampled_from(BOUNDARY_VALUES), st.integers(0, 2**64 - 1))),
            st.builds(Mutation, st.just("truncate"), st.integers(0, len(seed.data)), st.just(0)),
            st.builds(Mutation, st.just("delete"), header, st.integers(1, 16)),
        )
        return st.tuples(st.just(index), st.lists(mutation, min_size=1, max_size=4))

    return st.one_of([for_seed(i) for i in range(len(seeds))])  # built once: flatmap rebuilds per draw


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout


def _message_class(message: str) -> str:
    """A LayoutError's message with the numbers and names taken out: its kind of defect."""
    unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)
    return re.sub(r"(?<![\w-])\d+(?!\w)", "N", unquoted)  # numbers, not the 8 of UTF-8 or 0000K


def parse_outcome(path: str, limit_s: float = 5.0) -> str:
    """``read_layout(path)`` once: "ok" or "LayoutError: <kind>"; FuzzFailure for anything else.

    The time guard is SIGALRM (so call this from the main thread); memory is Python's
    allocations as tracemalloc counts them, which is where a trusted count would show up.
    """
    from warmpool import LayoutError, read_layout

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        read_layout(path)
        outcome = "ok"
    except LayoutError as e:
        if e.path is None or "\n" in str(e):
            raise FuzzFailure(f"LayoutError without a path or over one line: {str(e)!r}") from e
        outcome = "LayoutError: " + _message_class(e.message)
    except _Timeout:
        raise FuzzFailure(f"read_layout ran past {limit_s} s") from None
    except Exception as e:
        raise FuzzFailure(f"{type(e).__name__} escaped read_layout: {e}") from e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if peak > MAX_PEAK_BYTES:
        raise FuzzFailure(f"read_layout allocated {peak} bytes at its peak")
    return outcome


def write_seeds(directory: Path) -> list[Seed]:
    """The little-endian seed (default alignment) and the big-endian one (alignment 64)."""
    little = write_small_gguf(directory / "seed-le.gguf")
    big = write_small_gguf(directory / "seed-be.gguf", alignment=64, big_endian=True)
    return [load_seed(little), load_seed(big)]


