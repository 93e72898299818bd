"""Bad model files: every one raises LayoutError naming the file and the defect, never writes
the file, never allocates what a corrupt count claims, and the CLI reports it in one line.

Bad files are valid ones with one field patched.  The valid file is tests/helpers/gguf_files.py's
small GGUF (written by gguf-py's GGUFWriter); ``map_fields`` finds each field with gguf-py's
reader, so a case names the field it breaks ("tokenizer.ggml.tokens/array_len"), not an offset.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.helpers.gguf_files import (
    Span,
    find_span,
    map_fields,
    patch_field,
    write_small_gguf,
    write_with_strings,
)
from warmpool import LayoutError, main, read_layout

ALIGNMENT = 64  # the base file carries general.alignment, so its value can be broken too
HUGE = 2**60


class Base(NamedTuple):
    path: Path
    data: bytes
    spans: tuple[Span, ...]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    path = write_small_gguf(tmp_path_factory.mktemp("base") / "small.gguf", alignment=ALIGNMENT)
    _, spans = map_fields(path)
    return Base(path, path.read_bytes(), spans)


# --- building bad files ------------------------------------------------------------------------


def write(path: Path, data: bytes) -> tuple[Path, Path]:
    path.write_bytes(data)
    return path, path


def patched(tmp: Path, base: Base, what: str, value: int, *more: tuple[str, int]) -> tuple[Path, Path]:
    data = base.data
    for field, new in ((what, value), *more):
        data = patch_field(data, find_span(base.spans, field), new)
    return write(tmp / "bad.gguf", data)


def replaced(tmp: Path, base: Base, what: str, new: bytes) -> tuple[Path, Path]:
    span = find_span(base.spans, what)
    assert len(new) == span.size
    return write(tmp / "bad.gguf", base.data[: span.offset] + new + base.data[span.offset + span.size :])


def last_tensor(base: Base) -> tuple[str, int, int]:
    t = read_layout(base.path).tensors[-1]
    return t.name, t.offset, t.nbytes


def tensor_past_eof(tmp: Path, base: Base) -> tuple[Path, Path]:
    name, _, _ = last_tensor(base)
    beyond = -(-len(base.data) // ALIGNMENT) * ALIGNMENT  # relative offset: aligned, past the end
    return patched(tmp, base, f"tensor:{name}/offset", beyond)


def tensor_cut(tmp: Path, base: Base) -> tuple[Path, Path]:
    _, offset, nbytes = last_tensor(base)
    return write(tmp / "bad.gguf", base.data[: offset + nbytes - 1])


def directory(tmp: Path, base: Base) -> tuple[Path, Path]:
    (tmp / "dir.gguf").mkdir()
    return tmp / "dir.gguf", tmp / "dir.gguf"


def fifo(tmp: Path, base: Base) -> tuple[Path, Path]:
    os.mkfifo(tmp / "fifo.gguf")  # opening it would block: it must be refused before open
    return tmp / "fifo.gguf", tmp / "fifo.gguf"


def copy_shards(tmp: Path, shards: list[Path], names: list[str] | None = None) -> list[Path]:
    names = names or [s.name for s in shards]
    copies = [tmp / name for name in names]
    for shard, copy in zip(shards, copies):
        shutil.copyfile(shard, copy)
    return copies


def missing_shard(tmp: Path, shards: list[Path]) -> tuple[Path, Path]:
    copies = copy_shards(tmp, shards)
    copies[1].unlink()
    return copies[0], copies[0]


def swapped_shards(tmp: Path, shards: list[Path]) -> tuple[Path, Path]:
    names = [shards[0].name, shards[2].name, shards[1].name]
    copies = copy_shards(tmp, shards, names)
    return copies[0], copies[2]  # named shard 2, it holds shard 3 (split.no = 2)


def shard_key_patched(index: int, key: str, value: int) -> Callable[[Path, list[Path]], tuple[Path, Path]]:
    def build(tmp: Path, shards: list[Path]) -> tuple[Path, Path]:
        copies = copy_shards(tmp, shards)
        _, spans = map_fields(copies[index])
        copies[index].write_bytes(patch_field(copies[index].read_bytes(), find_span(spans, f"{key}/value"), value))
        return copies[0], copies[index]

    return build


def shard_out_of_range(tmp: Path, shards: list[Path]) -> tuple[Path, Path]:
    path = tmp / shards[0].name.replace("00001-of", "00004-of")
    shutil.copyfile(shards[0], path)
    return path, path


def shard_renamed(tmp: Path, shards: list[Path]) -> tuple[Path, Path]:
    path = tmp / "renamed.gguf"
    shutil.copyfile(shards[1], path)
    return path, path


def split_count_as_string(tmp: Path, shards: list[Path]) -> tuple[Path, Path]:
    """Well-formed GGUF, ill-typed key: once a TypeError escaped (str > int)."""
    path = write_with_strings(tmp / "typed.gguf", {"split.count": "3"})
    return path, path


# blk.0.ffn_up_exps.weight (Q8_0, 32-element blocks) reshaped to 31 x 1 x 1
EXPERTS_31 = ("tensor:blk.0.ffn_up_exps.weight/dims[0]", 31, *((f"tensor:blk.0.ffn_up_exps.weight/dims[{k}]", 1) for k in (1, 2)))


# (tmp dir, the base file or the split model's shards) -> (path read, path the error must name)
Builder = Callable[[Path, Any], tuple[Path, Path]]


def set_field(what: str, value: int, *more: tuple[str, int]) -> Builder:
    return lambda tmp, base: patched(tmp, base, what, value, *more)


def set_bytes(what: str, new: bytes) -> Builder:
    return lambda tmp, base: replaced(tmp, base, what, new)


class Case(NamedTuple):
    id: str
    build: Builder
    message: str  # regex searched in LayoutError.message


CASES = [
    Case("missing-path", lambda t, b: (t / "missing.gguf", t / "missing.gguf"), r"^no such file$"),
    Case("directory", directory, r"is a directory"),
    Case("fifo", fifo, r"is not a regular file"),
    Case("nul-in-path", lambda t, b: (Path(f"{t}/a\0b.gguf"), Path(f"{t}/a\0b.gguf")), r"invalid path"),
    Case("empty", lambda t, b: write(t / "empty.gguf", b""), r"^empty file$"),
    Case("wrong-magic", lambda t, b: write(t / "bad.gguf", b"GGML" + b.data[4:]), r"not a GGUF file"),
    Case("version-1", set_field("GGUF.version/value", 1), r"unsupported GGUF version 1 "),
    Case("version-4", set_field("GGUF.version/value", 4), r"unsupported GGUF version 4 "),
    Case("tensor-count", set_field("GGUF.tensor_count/value", HUGE), rf"absurd tensor count {HUGE}"),
    Case("kv-count", set_field("GGUF.kv_count/value", HUGE), rf"absurd metadata count {HUGE}"),
    Case("key-length", set_field("general.architecture/key_len", HUGE), r"absurd metadata key length"),
    Case("string-length", set_field("general.name/value_len", HUGE), r"absurd string value length"),
    Case("string-array-length", set_field("tokenizer.ggml.tokens/array_len", HUGE), r"absurd string array length"),
    Case("array-length", set_field("tokenizer.ggml.scores/array_len", HUGE), rf"absurd array length {HUGE}"),
    Case("nested-array-length", set_field("warmpool.test.nested/array_len", HUGE), r"absurd array length"),
    Case("tensor-name-length", set_field("tensor:output.weight/name_len", HUGE), r"absurd tensor name length"),
    # 2^63 - 1 once pushed the string walk's offset past ssize_t: an OverflowError escaped.
    Case("array-item-length", set_field("tokenizer.ggml.tokens/item_len", 2**63 - 1), r"string array"),
    Case("value-type", set_field("general.name/type", 99), r"unknown value type 99 at offset \d+"),
    Case("array-type", set_field("tokenizer.ggml.scores/array_type", 99), r"unknown array element type 99"),
    Case("key-not-utf8", set_bytes("general.name/key_bytes", b"\xff" * 12), r"metadata key at offset \d+ is not UTF-8"),
    Case("five-dims", set_field("tensor:blk.0.attn_q.weight/n_dims", 5), r"'blk.0.attn_q.weight' has 5 dimensions"),
    Case("ggml-type", set_field("tensor:blk.0.attn_q.weight/type", 999), r"'blk.0.attn_q.weight' has unknown ggml type 999"),
    Case("partial-block", set_field(*EXPERTS_31), r"31 elements are not whole Q8_0 blocks of 32"),
    Case("shape-too-big", set_field("tensor:token_embd.weight/dims[1]", 2**40), r"'token_embd.weight' of shape .* cannot fit"),
    Case("misaligned", set_field("tensor:blk.0.attn_q.weight/offset", 4096 + 1), rf"not a multiple of the alignment {ALIGNMENT}"),
    Case("data-past-eof", tensor_past_eof, r"'output.weight' data ends at byte \d+, past the end of the file"),
    Case("data-cut", tensor_cut, r"past the end of the file"),
    Case("duplicate-name", set_bytes("tensor:blk.1.attn_q.weight/name_bytes", b"blk.0.attn_q.weight"), r"duplicate tensor name 'blk.0.attn_q.weight'"),
    Case("alignment-48", set_field("general.alignment/value", 48), r"general.alignment 48 is not a power of two"),
    Case("alignment-0", set_field("general.alignment/value", 0), r"general.alignment 0 is not a power of two"),
]

# Split models: built from the session's 3-shard TINY model.
SPLIT_CASES = [
    Case("missing-shard", missing_shard, r"missing shard tiny-00002-of-00003.gguf of a 3-shard model"),
    Case("shards-swapped", swapped_shards, r"file name says shard 2 of 3, its header says split.no=2 split.count=3"),
    Case("split-count", shard_key_patched(1, "split.count", 4), r"file name says shard 2 of 3, its header says split.no=1 split.count=4"),
    Case("split-tensors-count", shard_key_patched(0, "split.tensors.count", 50), r"split.tensors.count is 50 but the shards hold \d+"),
    Case("shard-number", shard_out_of_range, r"shard number 4 is not within 1..3"),
    Case("shard-renamed", shard_renamed, r"split.no=1 split.count=3 .* its name is not <name>-0000K-of-0000N.gguf"),
    Case("split-count-str", split_count_as_string, r"split.count='3'"),
]


@pytest.fixture(params=CASES + SPLIT_CASES, ids=lambda c: c.id)
def bad(request, tmp_path, base) -> tuple[str, str, str]:
    """(path to read, path the error must name, expected message regex)."""
    case: Case = request.param
    source = request.getfixturevalue("split_model") if case in SPLIT_CASES else base
    path, named = case.build(tmp_path, source)
    return os.fspath(path), os.fspath(named), case.message


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every regular file: (mtime_ns, size, bytes)."""
    out = {}
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            st = entry.stat()
            out[entry.name] = (st.st_mtime_ns, st.st_size, Path(entry.path).read_bytes())
    return out


# --- the checks ----------------------------------------------------------------------------------


def test_raises_layout_error_naming_file_and_defect(bad, tmp_path):
    path, named, message = bad
    before = snapshot(tmp_path)
    with pytest.raises(LayoutError) as info:
        read_layout(path)
    e = info.value
    assert e.path == named
    assert re.search(message, e.message), e.message
    assert str(e) == f"{named}: {e.message}"
    assert "\n" not in str(e)
    assert snapshot(tmp_path) == before  # the model file is never written


def test_cli_reports_one_line(bad, capsys):
    path, named, _ = bad
    assert main(["plan", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"warmpool: {named}: ")
    assert "Traceback" not in err


def test_cli_verbose_adds_traceback(bad, capsys):
    path, named, _ = bad
    assert main(["plan", "-v", path]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "LayoutError" in err
    assert err.splitlines()[-1].startswith(f"warmpool: {named}: ")


def test_truncated_anywhere(tiny_model, tmp_path):
    """Cut the TINY model at every offset of its first 4 KiB and at sampled later ones."""
    data = tiny_model.read_bytes()
    layout = read_layout(tiny_model)
    last = max(t.offset + t.nbytes for t in layout.tensors)
    assert last == len(data)  # no trailing padding: every cut loses bytes a tensor needs
    header_end = layout.files[0].data_offset
    sampled = random.Random(0).sample(range(4096, len(data)), 300)
    cuts = sorted({*range(4096), *sampled, header_end - 1, header_end, header_end + 1, len(data) - 1}, reverse=True)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data)
    kinds = set()
    for cut in cuts:  # longest first: each cut is one ftruncate of the same file
        os.truncate(path, cut)
        before = os.stat(path)
        with pytest.raises(LayoutError) as info:
            read_layout(path)
        e = info.value
        assert e.path == str(path), cut
        assert re.search(r"truncated|past the end|bytes left|cannot fit|^empty file$", e.message), (cut, e.message)
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        kinds.add(re.sub(r"\d+", "N", e.message).split(":")[0])
    assert len(kinds) >= 3  # truncated fields, absurd counts, and missing tensor data were all hit


def peak_bytes_of_failing_parse(path) -> int:
    """Peak Python allocation of a read_layout that must raise LayoutError."""
    tracemalloc.start()
    try:
        with pytest.raises(LayoutError):
            read_layout(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "what",
    ["GGUF.tensor_count/value", "GGUF.kv_count/value", "general.name/value_len", "tokenizer.ggml.tokens/array_len",
     "tokenizer.ggml.scores/array_len", "tokenizer.ggml.tokens/item_len"],
)
def test_absurd_counts_allocate_nothing(base, tmp_path, what):
    path, _ = patched(tmp_path, base, what, HUGE)
    assert peak_bytes_of_failing_parse(path) < 10 << 20


@pytest.mark.parametrize("what, min_bytes", [("GGUF.tensor_count/value", 8 + 4 + 4 + 8), ("GGUF.kv_count/value", 8 + 4 + 1)])
def test_plausible_counts_do_not_read_the_file(test_model, tmp_path, what, min_bytes):
    """A count that passes the bytes-left check must still not pull the 40 MB of tensor data in.

    The parser reads ahead on lower bounds derived from counts: uncapped, this tensor count
    made it read (and hold) the whole file.
    """
    data = test_model.read_bytes()
    _, spans = map_fields(test_model)
    span = find_span(spans, what)
    path, _ = write(tmp_path / "plausible.gguf", patch_field(data, span, (len(data) - span.offset - 8) // min_bytes))
    assert peak_bytes_of_failing_parse(path) < 10 << 20
