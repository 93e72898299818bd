"""Fuzz warmpool's GGUF header walk: mutate small valid models, parse them, count the outcomes.

Command line (runs on demand; CI runs the 2,000-example version in tests/test_fuzz_layout.py)::

    python tools/fuzz_layout.py [--examples 10000] [--limit-s 5]

prints how many mutated files parsed ("ok") and how many raised each class of ``LayoutError``,
then the time taken; it exits 1 when anything else escaped ``read_layout`` (another exception,
a parse over ``--limit-s`` seconds, or one whose Python allocations peaked over 50 MB).

This file is the one home of the fuzzing code.  ``tests/test_fuzz_layout.py`` imports it for the
same strategy, and ``tests/test_layout_errors.py`` for ``write_small_gguf`` and ``map_fields``:

* ``write_small_gguf`` writes, with gguf-py's ``GGUFWriter``, a TINY-like qwen3moe file (two
  layers, tokenizer arrays, ``split.*`` keys) that also holds every metadata value type and a
  nested array.  It is ~20 KB, so an unmutated tensor table still fits the file and mutations
  can reach "ok" as well as every error path; little- and big-endian seeds are fuzzed.
* ``map_fields`` locates every header field with ``gguf.GGUFReader`` (the independent oracle),
  so mutations and the error table patch *named* fields instead of hard-coded offsets.
* Mutations are data (``Mutation``), drawn by Hypothesis, which shrinks a failure to the
  fewest edits; the tool draws from the same strategy with shrinking off.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import struct
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "FuzzFailure",
    "Mutation",
    "Seed",
    "Span",
    "apply_mutations",
    "find_span",
    "fuzz_cases",
    "load_seed",
    "main",
    "map_fields",
    "parse_outcome",
    "rewrite",
    "write_seeds",
    "write_small_gguf",
]

MAX_PEAK_BYTES = 50 << 20
# Values that sit on the parser's edges: tiny counts, type codes, sizes near the u32/u64 limits.
BOUNDARY_VALUES = (0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 32, 33, 255, 999, 2**16 - 1, 2**31 - 1,
                   2**32 - 1, 2**32, 2**60, 2**63 - 1, 2**63, 2**64 - 1)
N_LAYERS, HIDDEN, VOCAB = 2, 32, 64


class Span(NamedTuple):
    what: str  # "GGUF.kv_count/value", "<key>/key_len", "<key>/item_len", "tensor:<name>/offset", ...
    offset: int
    size: int
    is_int: bool  # one integer (a count, length, type code, dimension or offset)


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


def write_small_gguf(path: str | os.PathLike[str], *, alignment: int | None = None, big_endian: bool = False) -> Path:
    """A small valid GGUF: TINY's structure, every value type, seven tensors of three ggml types."""
    import gguf
    import numpy as np

    endianess = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(path, "qwen3moe", endianess=endianess)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(N_LAYERS)
    writer.add_name("warmpool small seed")
    values = gguf.GGUFValueType
    for code, value in ((values.UINT8, 200), (values.INT8, -3), (values.UINT16, 65000), (values.INT16, -300),
                        (values.UINT32, 4_000_000_000), (values.INT32, -5), (values.UINT64, 2**40),
                        (values.INT64, -(2**40)), (values.FLOAT32, 0.5), (values.FLOAT64, 0.25), (values.BOOL, True)):
        writer.add_key_value(f"warmpool.test.{code.name.lower()}", value, code)
    writer.add_array("warmpool.test.nested", [[1, 2], [3, 4, 5]])
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(VOCAB)])
    writer.add_array("tokenizer.ggml.scores", [-float(i) for i in range(VOCAB)])
    writer.add_array("tokenizer.ggml.token_type", [1] * VOCAB)
    writer.add_uint16("split.no", 0)
    writer.add_uint16("split.count", 1)
    rng = np.random.default_rng(0)
    tensors = [("token_embd.weight", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float16), None)]
    for layer in range(N_LAYERS):
        tensors.append((f"blk.{layer}.attn_q.weight", rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), None))
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
        experts = rng.integers(0, 256, (2, HIDDEN, HIDDEN // block * size), dtype=np.uint8)  # raw Q8_0 rows
        tensors.append((f"blk.{layer}.ffn_up_exps.weight", experts, gguf.GGMLQuantizationType.Q8_0))
    tensors.append(("output_norm.weight", np.ones(HIDDEN, np.float32), None))
    tensors.append(("output.weight", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float16), None))
    writer.add_int32("split.tensors.count", len(tensors))
    for name, array, raw_dtype in tensors:  # GGUFWriter byteswaps for a big-endian file itself
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _part_names(name: str, parts: list, is_tensor: bool) -> list[str]:
    """Roles of a GGUFReader field's parts; "*bytes" are string contents, "item" array values."""
    if is_tensor:
        return ["name_len", "name_bytes", "n_dims", "dims", "type", "offset"]
    if name.startswith("GGUF."):
        return ["value"]
    roles = ["key_len", "key_bytes", "type"]
    if parts[2][0] == 8:  # a string: length, bytes
        return roles + ["value_len", "value_bytes"]
    if parts[2][0] != 9:
        return roles + ["value"]
    items = len(parts) - 5
    if parts[3][0] == 8:  # an array of strings: (length, bytes) per item
        return roles + ["array_type", "array_len"] + ["item_len", "item_bytes"] * (items // 2)
    if parts[3][0] == 9:  # an array of arrays: every part is a type, a count or a value
        return roles + ["array_type", "array_len"] + ["nested"] * items
    return roles + ["array_type", "array_len"] + ["item"] * items


def map_fields(path: str | os.PathLike[str]) -> tuple[int, tuple[Span, ...]]:
    """(data offset, every header field in file order), as gguf.GGUFReader finds them."""
    import gguf

    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    spans = []
    fields = [(f, False) for f in reader.fields.values()] + [(t.field, True) for t in reader.tensors]
    for field, is_tensor in fields:
        prefix = f"tensor:{field.name}" if is_tensor else field.name
        for part, role in zip(field.parts, _part_names(field.name, field.parts, is_tensor)):
            offset = part.ctypes.data - base
            if role == "dims":  # one span per dimension (ne0 first)
                spans += [Span(f"{prefix}/dims[{k}]", offset + 8 * k, 8, True) for k in range(part.size)]
                continue
            is_int = part.dtype.kind in "ui" and part.size == 1 and not role.endswith(("bytes", "item"))
            spans.append(Span(f"{prefix}/{role}", offset, part.nbytes, is_int))
    spans.sort(key=lambda s: s.offset)
    return reader.data_offset, tuple(spans)


def find_span(spans: Sequence[Span], what: str) -> Span:
    """The first field named ``what`` (``KeyError`` when the file has none)."""
    for span in spans:
        if span.what == what:
            return span
    raise KeyError(what)


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
                code = {2: "H", 4: "I", 8: "Q"}[span.size]
                struct.pack_into(seed.byte_order + code, data, span.offset, m.value & ((1 << 8 * span.size) - 1))
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


def _run(examples: int, limit_s: float, directory: Path) -> tuple[collections.Counter, list[str]]:
    from hypothesis import HealthCheck, Phase, given, settings

    seeds = write_seeds(directory)
    target = str(directory / "mutated.gguf")
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    counts: collections.Counter = collections.Counter()
    failures: list[str] = []

    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz_cases(seeds))
    def one(case):
        index, mutations = case
        rewrite(fd, apply_mutations(seeds[index], mutations))
        try:
            counts[parse_outcome(target, limit_s)] += 1
        except FuzzFailure as e:
            counts["FAILURE"] += 1
            failures.append(f"{e} <- seed {index}, {mutations}")

    try:
        one()
    finally:
        os.close(fd)
    return counts, failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="mutated files to parse (default 10000)")
    parser.add_argument("--limit-s", type=float, default=5.0, help="longest one parse may take (default 5 s)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="warmpool-fuzz-") as directory:
        counts, failures = _run(args.examples, args.limit_s, Path(directory))
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    for outcome, n in counts.most_common():
        print(f"{n:8d}  {outcome}")
    print(f"{total} examples in {elapsed:.1f} s ({1e3 * elapsed / max(total, 1):.2f} ms each), "
          f"{len(failures)} failures")
    for failure in failures[:10]:
        print("FAILURE", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
