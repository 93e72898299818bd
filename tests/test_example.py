"""The synthetic qwen3moe generator: layout, splits, the cached example, atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest

from warmpool import example as _example
from warmpool._errors import WarmpoolError
from warmpool.example import (
    TINY,
    _writer,
    example_model,
    model_nbytes,
    shape_for_size,
    write_moe_gguf,
)

LAYER_TENSORS = (
    ("attn_norm", "F32"),
    ("attn_q", "F16"),
    ("attn_k", "F16"),
    ("attn_v", "F16"),
    ("attn_output", "F16"),
    ("attn_q_norm", "F32"),
    ("attn_k_norm", "F32"),
    ("ffn_norm", "F32"),
    ("ffn_gate_inp", "F32"),
    ("ffn_gate_exps", "Q8_0"),
    ("ffn_up_exps", "Q8_0"),
    ("ffn_down_exps", "Q8_0"),
)


def expected_tensors(shape: _example.MoeShape) -> list[tuple[str, str]]:
    layers = range(shape.n_layers)
    blocks = [(f"blk.{i}.{name}.weight", kind) for i in layers for name, kind in LAYER_TENSORS]
    output = [("output_norm.weight", "F32"), ("output.weight", "F16")]
    return [("token_embd.weight", "F16"), *blocks, *output]


def tensor_table(paths: list[Path]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (type, GGUF dims, data) over every file, failing on a name seen twice."""
    table: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for path in paths:
        for t in gguf.GGUFReader(path).tensors:
            assert t.name not in table
            dims = tuple(int(d) for d in t.shape)
            table[t.name] = (t.tensor_type.name, dims, t.data.tobytes())
    return table


def field(reader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    (path,) = write_moe_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", TINY)
    return path


def test_tiny_reads_back_with_the_expected_tensors(tiny: Path) -> None:
    reader = gguf.GGUFReader(tiny)
    assert [(t.name, t.tensor_type.name) for t in reader.tensors] == expected_tensors(TINY)
    assert tiny.stat().st_size == model_nbytes(TINY)
    e, fe, h = TINY.n_experts, TINY.expert_ff, TINY.hidden
    experts = [t for t in reader.tensors if t.name.endswith("_exps.weight")]
    assert len(experts) == 3 * TINY.n_layers
    for t in experts:
        # GGUF dims are innermost first: gate/up [H, FE, E], down [FE, H, E].
        dims = (fe, h, e) if "down" in t.name else (h, fe, e)
        assert tuple(int(d) for d in t.shape) == dims
        assert t.n_bytes == e * fe * h // 32 * 34  # Q8_0: 34 bytes per 32 weights


def test_metadata_is_what_llama_cpp_needs(tiny: Path) -> None:
    reader = gguf.GGUFReader(tiny)
    assert field(reader, "general.architecture") == "qwen3moe"
    assert field(reader, "qwen3moe.block_count") == TINY.n_layers
    assert field(reader, "qwen3moe.expert_count") == TINY.n_experts
    assert field(reader, "qwen3moe.expert_feed_forward_length") == TINY.expert_ff
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(set(tokens)) == TINY.vocab
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[258] == "<0xFF>"
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:]) == {1}
    ids = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos")]
    assert ids == [0, 1, 2]


def test_tensor_data_is_random_finite_and_seeded(tiny: Path, tmp_path: Path) -> None:
    down = next(t for t in gguf.GGUFReader(tiny).tensors if t.name == "blk.0.ffn_down_exps.weight")
    blocks = np.asarray(down.data).reshape(-1, 34)
    scales = blocks[:, :2].copy().view(np.float16)
    assert np.isfinite(scales).all() and (scales > 0).all()
    pages = np.asarray(down.data).reshape(-1)[: len(blocks) * 34 // 4096 * 4096].reshape(-1, 4096)
    assert pages.any(axis=1).all()  # no zero page a filesystem could store as a hole

    (same,) = write_moe_gguf(tmp_path / "same.gguf", TINY)
    (other,) = write_moe_gguf(tmp_path / "other.gguf", TINY, seed=1)
    assert same.read_bytes() == tiny.read_bytes()
    assert other.read_bytes() != tiny.read_bytes()


def test_split_shards_hold_the_same_tensors(tiny: Path, tmp_path: Path) -> None:
    shards = write_moe_gguf(tmp_path / "model.gguf", TINY, split_shards=3)
    assert [p.name for p in shards] == [f"model-0000{k}-of-00003.gguf" for k in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path)) == [p.name for p in shards]  # no scratch left behind
    n_tensors = len(expected_tensors(TINY))
    for number, path in enumerate(shards):
        reader = gguf.GGUFReader(path)
        assert len(reader.tensors) > 0
        assert field(reader, "split.no") == number
        assert field(reader, "split.count") == 3
        assert field(reader, "split.tensors.count") == n_tensors
    assert tensor_table(shards) == tensor_table([tiny])


@pytest.mark.parametrize("split_shards", [0, -1, 10_000])
def test_impossible_split_is_refused(tmp_path: Path, split_shards: int) -> None:
    with pytest.raises(WarmpoolError):
        write_moe_gguf(tmp_path / "x.gguf", TINY, split_shards=split_shards)
    assert os.listdir(tmp_path) == []


def test_one_shard_is_the_unsplit_file(tiny: Path, tmp_path: Path) -> None:
    (path,) = write_moe_gguf(tmp_path / "one.gguf", TINY, split_shards=1)
    assert path.read_bytes() == tiny.read_bytes()


def test_invalid_shape_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WarmpoolError, match="multiples of 32"):
        write_moe_gguf(tmp_path / "x.gguf", TINY._replace(hidden=100))


def failing_after(monkeypatch: pytest.MonkeyPatch, n_tensors: int) -> None:
    """Make the generator die (as on Ctrl-C or a full disk) after writing ``n_tensors``."""
    real = _writer._tensor_data
    written = [0]

    def tensor_data(tensor, rng):
        if written[0] == n_tensors:
            written[0] = 0  # the next write fails at the same point
            raise KeyboardInterrupt
        written[0] += 1
        return real(tensor, rng)

    monkeypatch.setattr(_writer, "_tensor_data", tensor_data)


def test_interrupted_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing_after(monkeypatch, 20)
    with pytest.raises(KeyboardInterrupt):
        write_moe_gguf(tmp_path / "model.gguf", TINY, split_shards=2)
    with pytest.raises(KeyboardInterrupt):
        write_moe_gguf(tmp_path / "model.gguf", TINY)
    assert os.listdir(tmp_path) == []


def test_interrupted_rewrite_keeps_the_old_file(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(tiny.read_bytes())
    failing_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        write_moe_gguf(path, TINY, seed=7)
    assert path.read_bytes() == tiny.read_bytes()
    assert os.listdir(tmp_path) == ["model.gguf"]


def test_write_error_is_a_warmpool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(WarmpoolError, match="cannot create"):
        write_moe_gguf(blocker / "model.gguf", TINY)


@pytest.fixture
def tiny_example(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """example_model() writing TINY instead of the 300 MB EXAMPLE; records each write."""
    monkeypatch.setattr(_example, "EXAMPLE", TINY)
    writes: list[Path] = []
    real = _example.write_moe_gguf

    def recording_write(path, shape, **kwargs):
        writes.append(Path(path))
        return real(path, shape, **kwargs)

    monkeypatch.setattr(_example, "write_moe_gguf", recording_write)
    return writes


def test_example_model_is_generated_once(tmp_path: Path, tiny_example: list[Path]) -> None:
    path = example_model(tmp_path)
    assert path.parent == tmp_path and path.stat().st_size == model_nbytes(TINY)
    mtime = path.stat().st_mtime_ns
    assert example_model(tmp_path) == path
    assert path.stat().st_mtime_ns == mtime and len(tiny_example) == 1


def test_example_model_replaces_a_file_of_the_wrong_size(tmp_path: Path, tiny_example) -> None:
    path = example_model(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(1000)
    assert example_model(tmp_path).stat().st_size == model_nbytes(TINY)
    assert len(tiny_example) == 2


def test_example_model_removes_scratch_of_a_killed_writer(tmp_path: Path, tiny_example) -> None:
    stale = tmp_path / f".{_example.EXAMPLE_FILENAME}.k1ll3d.tmp"
    stale.mkdir()
    (stale / _example.EXAMPLE_FILENAME).write_bytes(b"GGUF half")
    example_model(tmp_path)
    assert not stale.exists()


def test_example_model_cache_dir_precedence(tmp_path: Path, monkeypatch, tiny_example) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("WARMPOOL_CACHE", raising=False)
    assert example_model().parent == tmp_path / "xdg" / "warmpool"
    monkeypatch.setenv("WARMPOOL_CACHE", str(tmp_path / "env"))
    assert example_model().parent == tmp_path / "env"
    assert example_model(tmp_path / "arg").parent == tmp_path / "arg"


def test_racing_callers_write_the_example_once(tmp_path: Path, tiny_example: list[Path]) -> None:
    results: list[Path] = []
    def call() -> None:
        results.append(example_model(tmp_path))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(tiny_example) == 1  # flock holds the others until the file exists


def test_shape_for_size_scales_the_layer_count() -> None:
    for target in (500_000_000, 1_700_000_000, 4_000_000_000):
        shape = shape_for_size(target)
        one, two = (model_nbytes(shape._replace(n_layers=n)) for n in (1, 2))
        per_layer = two - one
        assert abs(model_nbytes(shape) - target) <= per_layer / 2 + 1
    assert shape_for_size("4GB") == shape_for_size(4_000_000_000)  # _units.parse_size's rules
    assert shape_for_size("2G") == shape_for_size("2GiB") == shape_for_size(2 * 1024**3)
    assert shape_for_size(1).n_layers == 1
    with pytest.raises(WarmpoolError):
        shape_for_size("lots")


def test_module_import_is_stdlib_only() -> None:
    code = "import sys, warmpool.example; sys.exit(bool({'numpy', 'gguf'} & set(sys.modules)))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_llama_cpp_loads_and_generates(tiny: Path) -> None:
    import llama_cpp  # a test dependency: its absence is a failure, not a skip
    llm = llama_cpp.Llama(model_path=str(tiny), n_ctx=64, verbose=False)
    out = llm("hello", max_tokens=4)
    assert out["usage"]["completion_tokens"] >= 1
