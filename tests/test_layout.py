"""read_layout against gguf-py's GGUFReader (the oracle), on real and synthetic files.

Covered: the real Gemma-3-270M file, the synthetic qwen3moe, GGUF v2, big-endian files, custom
alignments, split models read from any shard, layer numbers, and the rule that parsing never
touches the pages of the tensor data.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import gguf
import pytest
from conftest import evict_file

from tests.helpers.gguf_files import write_small_gguf
from warmpool import ModelFile, TensorInfo, read_layout
from warmpool._platform import PAGE_SIZE, resident_pages
from warmpool.example import TEST, TINY

Row = tuple[str, int, int, int, tuple[int, ...]]  # name, absolute offset, bytes, ggml type, shape


def oracle_rows(path: os.PathLike[str]) -> list[Row]:
    """Every tensor as GGUFReader sees it (ReaderTensor.data_offset is absolute in the file)."""
    reader = gguf.GGUFReader(path)
    return [(t.name, int(t.data_offset), int(t.n_bytes), int(t.tensor_type), tuple(int(d) for d in t.shape))
            for t in reader.tensors]


def our_rows(tensors: tuple[TensorInfo, ...] | list[TensorInfo]) -> list[Row]:
    return [(t.name, t.offset, t.nbytes, t.ggml_type, t.shape) for t in tensors]


def blk(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blk.") else None


def test_gemma_matches_gguf_reader(gemma_model):
    """The real file written by llama.cpp's converter: 236 tensors, 18 layers, 262k tokens."""
    layout = read_layout(gemma_model)
    assert our_rows(layout.tensors) == oracle_rows(gemma_model)  # ~16 s: GGUFReader, not us
    assert len(layout.tensors) == 236
    assert layout.files == (ModelFile(str(gemma_model), 253_113_024, layout.files[0].data_offset),)
    assert layout.architecture == "gemma3" and layout.n_layers == 18 == layout.metadata["gemma3.block_count"]
    assert {t.layer for t in layout.tensors} == {None, *range(18)}
    assert all(t.layer == blk(t.name) for t in layout.tensors)
    assert layout.version == 3 and layout.alignment == 32


def test_synthetic_matches_gguf_reader(test_model):
    layout = read_layout(test_model)
    assert our_rows(layout.tensors) == oracle_rows(test_model)
    assert layout.n_layers == TEST.n_layers == layout.metadata["qwen3moe.block_count"]
    assert layout.architecture == "qwen3moe"
    assert all(t.layer == blk(t.name) for t in layout.tensors)
    assert sorted({t.layer for t in layout.tensors if t.layer is not None}) == list(range(TEST.n_layers))
    assert layout.nbytes == sum(t.nbytes for t in layout.tensors)
    first = min(t.offset for t in layout.tensors)
    assert first == layout.files[0].data_offset and first % layout.alignment == 0


def test_accepts_str_and_pathlike(tiny_model):
    assert read_layout(str(tiny_model)) == read_layout(tiny_model)


@pytest.mark.parametrize("read_ahead", [1, 8, 13, 100, 300])
def test_any_read_size_parses_the_same(tiny_model, monkeypatch, read_ahead):
    """Tiny preads end the buffer anywhere, inside strings and string groups: the walk's
    refill path must resume exactly where it stopped."""
    from warmpool._gguf import header as _header

    expected = read_layout(tiny_model)
    monkeypatch.setattr(_header, "MAX_READ_AHEAD", read_ahead)
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(_header.os, "pread", lambda fd, n, offset: reads.append(n) or real_pread(fd, n, offset))
    assert read_layout(tiny_model) == expected
    assert len(reads) > 40  # the buffer really ran out many times


def test_version_2_reads_the_same(tiny_model, tmp_path):
    data = bytearray(tiny_model.read_bytes())
    assert struct.unpack_from("<I", data, 4) == (3,)
    struct.pack_into("<I", data, 4, 2)  # v2 differs from v3 only in what v1 had: same layout
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(data)
    old, new = read_layout(v2), read_layout(tiny_model)
    assert old.version == 2 and new.version == 3
    assert our_rows(old.tensors) == our_rows(new.tensors) == oracle_rows(v2)


@pytest.mark.parametrize("alignment", [None, 64, 4096])
@pytest.mark.parametrize("big_endian", [False, True], ids=["little", "big"])
def test_endianness_and_alignment(tmp_path, alignment, big_endian):
    path = write_small_gguf(tmp_path / "small.gguf", alignment=alignment, big_endian=big_endian)
    assert path.read_bytes()[4:8] == (b"\0\0\0\3" if big_endian else b"\3\0\0\0")
    layout = read_layout(path)
    assert our_rows(layout.tensors) == oracle_rows(path)
    expected = alignment or 32
    assert layout.alignment == expected
    assert layout.files[0].data_offset % expected == 0
    assert all(t.offset % expected == 0 for t in layout.tensors)
    assert layout.metadata["warmpool.test.uint64"] == 2**40  # big-endian scalars decoded as such
    assert layout.metadata["warmpool.test.int16"] == -300
    if alignment == 4096:  # the padding really moved the tensors
        assert len({t.offset % 4096 for t in layout.tensors}) == 1


def test_big_endian_same_tensors_as_little(tmp_path):
    little = read_layout(write_small_gguf(tmp_path / "le.gguf"))
    big = read_layout(write_small_gguf(tmp_path / "be.gguf", big_endian=True))
    assert our_rows(big.tensors) == our_rows(little.tensors)
    assert big.metadata == little.metadata


@pytest.mark.parametrize("shard", [0, 1, 2])
def test_split_model_from_any_shard(split_model, tiny_model, shard):
    layout = read_layout(split_model[shard])
    whole = read_layout(tiny_model)
    assert [f.path for f in layout.files] == [str(p) for p in split_model]
    assert [f.size for f in layout.files] == [p.stat().st_size for p in split_model]
    key = lambda t: (t.name, t.nbytes, t.ggml_type, t.shape, t.layer)  # noqa: E731
    assert sorted(map(key, layout.tensors)) == sorted(map(key, whole.tensors))
    assert layout.n_layers == whole.n_layers == TINY.n_layers
    assert layout.architecture == "qwen3moe"
    assert {t.file for t in layout.tensors} == {0, 1, 2}
    for index, path in enumerate(split_model):  # offsets are within each shard, as its own header says
        assert our_rows([t for t in layout.tensors if t.file == index]) == oracle_rows(path)


def test_unsplit_file_is_one_file(tiny_model):
    layout = read_layout(tiny_model)
    assert len(layout.files) == 1 and {t.file for t in layout.tensors} == {0}
    assert layout.files[0].size == tiny_model.stat().st_size


def private_copy(source: Path, tmp_path: Path) -> Path:
    path = tmp_path / source.name
    shutil.copyfile(source, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # DONTNEED drops only clean pages
    return path


@pytest.mark.pagecache
@pytest.mark.xdist_group("pagecache")
@pytest.mark.parametrize("model", ["gemma_model", "test_model"])
def test_parse_leaves_tensor_data_cold(request, tmp_path, model):
    """The header walk reads the header only: every page from the first page boundary after the
    header's end stays out of the page cache (readahead included: the fd is FADV_RANDOM)."""
    path = private_copy(request.getfixturevalue(model), tmp_path)
    size = path.stat().st_size
    evict_file(path)

    def resident(offset: int) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            return resident_pages(fd, offset, size - offset)
        finally:
            os.close(fd)

    assert resident(0).count(1) == 0  # the eviction worked: the check below can fail
    layout = read_layout(path)
    data_start = -(-layout.files[0].data_offset // PAGE_SIZE) * PAGE_SIZE
    assert data_start < size
    header = resident(0)[: data_start // PAGE_SIZE]
    assert header.count(1) > 0  # mincore sees what the parse read...
    cold = resident(data_start)
    assert cold.count(1) == 0, f"{cold.count(1)} of {len(cold)} tensor data pages made resident"
