"""Synthetic qwen3moe GGUF models that real llama.cpp loads and runs (REFERENCE §5).

Used by the README's built-in example (generated once into the user's cache), the tests'
fixtures and the GB-scale benchmarks in ``tools/``.  Stacked expert tensors are raw Q8_0 so
that, as in a real MoE, experts hold most of the bytes.  Data is seeded random, never zeros:
filesystems may store zero pages as holes or deduplicate them, and page-cache measurements
would lie.  Tensors are generated and written one at a time after the header, so a multi-GB
model needs about one tensor of memory; files are written under a unique scratch name and
moved into place with ``os.replace``, so an interruption never leaves a half file behind.
Module level imports only the stdlib; numpy and gguf are imported inside the writer.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from warmpool._errors import PlatformError, WarmpoolError

__all__ = [
    "BENCH",
    "EXAMPLE",
    "MoeShape",
    "TEST",
    "TINY",
    "example_model",
    "model_nbytes",
    "shape_for_size",
    "write_moe_gguf",
]


class MoeShape(NamedTuple):
    """Hyper-parameters of a synthetic qwen3moe model (all sizes in elements)."""

    n_layers: int
    n_experts: int
    n_experts_used: int
    hidden: int
    expert_ff: int
    dense_ff: int  # qwen3moe.feed_forward_length: read by llama.cpp, unused by a pure-MoE block
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    context_length: int


# Q8_0 rows must be multiples of 32 elements, so hidden and expert_ff are multiples of 32.
TINY = MoeShape(4, 8, 2, 256, 128, 512, 4, 2, 64, 512, 2048)  # ~5.5 MB: fast unit tests
TEST = MoeShape(8, 16, 4, 512, 160, 1024, 4, 2, 64, 512, 2048)  # ~40 MB: page-cache tests
EXAMPLE = MoeShape(12, 32, 4, 768, 288, 1536, 8, 2, 64, 1024, 4096)  # ~300 MB: README example
BENCH = MoeShape(16, 64, 8, 1024, 512, 2048, 8, 2, 64, 1024, 4096)  # ~1.75 GB: REFERENCE §5

EXAMPLE_FILENAME = "warmpool-example-qwen3moe-v1.gguf"  # bump the version when EXAMPLE changes
_ARCH = "qwen3moe"
_ALIGNMENT = 32  # GGUF default general.alignment; gguf-py writes no key for it

# ggml type ids and (block elements, block bytes), as in gguf.GGML_QUANT_SIZES; kept here so
# that sizing a model (example_model's reuse check) needs neither numpy nor gguf.
_F32, _F16, _Q8_0 = 0, 1, 8
_TYPE_SIZES = {_F32: (1, 4), _F16: (1, 2), _Q8_0: (32, 34)}

# GGUF metadata value types (REFERENCE §3) and the fixed size of the scalar ones.
_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9
_SCALAR_NBYTES = {_UINT32: 4, _INT32: 4, _FLOAT32: 4, _BOOL: 1}

# llama (SentencePiece) token types, as in gguf.TokenType.
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_BYTE = 1, 2, 3, 6
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_N_FIXED_TOKENS = len(_SPECIAL_TOKENS) + 256


class _Tensor(NamedTuple):
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first); GGUF stores it reversed
    ggml_type: int

    @property
    def nbytes(self) -> int:
        block, block_bytes = _TYPE_SIZES[self.ggml_type]
        return math.prod(self.shape) // block * block_bytes

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of the array handed to gguf-py: raw Q8_0 goes as uint8 rows of whole blocks."""
        block, block_bytes = _TYPE_SIZES[self.ggml_type]
        return (*self.shape[:-1], self.shape[-1] // block * block_bytes) if block > 1 else self.shape


class _KeyValue(NamedTuple):
    key: str
    value: object
    vtype: int
    sub_type: int | None = None


def _check_shape(shape: MoeShape) -> None:
    problems = []
    if min(shape) < 1:
        problems.append("every dimension must be positive")
    if shape.hidden % 32 or shape.expert_ff % 32:
        problems.append("hidden and expert_ff must be multiples of 32 (one Q8_0 block)")
    if shape.n_experts_used > shape.n_experts:
        problems.append("n_experts_used exceeds n_experts")
    if shape.n_heads % shape.n_kv_heads:
        problems.append("n_heads must be a multiple of n_kv_heads (grouped-query attention)")
    if shape.vocab < _N_FIXED_TOKENS + len(_single_chars()):
        problems.append(f"vocab must be at least {_N_FIXED_TOKENS + len(_single_chars())}")
    if problems:
        raise WarmpoolError(f"invalid MoeShape {shape}: " + "; ".join(problems))


def _tensors(shape: MoeShape) -> Iterator[_Tensor]:
    """The tensors in file order: input layer, blk.0 .. blk.N-1, output layer."""
    h, e, fe = shape.hidden, shape.n_experts, shape.expert_ff
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    yield _Tensor("token_embd.weight", (shape.vocab, h), _F16)
    for i in range(shape.n_layers):
        blk = f"blk.{i}."
        yield _Tensor(blk + "attn_norm.weight", (h,), _F32)
        yield _Tensor(blk + "attn_q.weight", (q, h), _F16)
        yield _Tensor(blk + "attn_k.weight", (kv, h), _F16)
        yield _Tensor(blk + "attn_v.weight", (kv, h), _F16)
        yield _Tensor(blk + "attn_output.weight", (h, q), _F16)
        yield _Tensor(blk + "attn_q_norm.weight", (shape.head_dim,), _F32)
        yield _Tensor(blk + "attn_k_norm.weight", (shape.head_dim,), _F32)
        yield _Tensor(blk + "ffn_norm.weight", (h,), _F32)
        yield _Tensor(blk + "ffn_gate_inp.weight", (e, h), _F32)
        yield _Tensor(blk + "ffn_gate_exps.weight", (e, fe, h), _Q8_0)
        yield _Tensor(blk + "ffn_up_exps.weight", (e, fe, h), _Q8_0)
        yield _Tensor(blk + "ffn_down_exps.weight", (e, h, fe), _Q8_0)
    yield _Tensor("output_norm.weight", (h,), _F32)
    yield _Tensor("output.weight", (shape.vocab, h), _F16)


def _single_chars() -> list[str]:
    # "▁" is SentencePiece's word-boundary mark; with single letters any ASCII word tokenizes.
    return ["\u2581", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'"]


def _normal_tokens(count: int) -> list[str]:
    """``count`` distinct normal tokens: single characters, then "▁"-words and letter pairs."""
    tokens = _single_chars()
    letters = "abcdefghijklmnopqrstuvwxyz"
    for length in range(2, 6):
        for index in range(len(letters) ** length):
            if len(tokens) >= count:
                return tokens[:count]
            word = "".join(letters[(index // 26**k) % 26] for k in reversed(range(length)))
            tokens.append(("\u2581" + word) if index % 2 else word)
    return tokens[:count]


def _metadata(shape: MoeShape) -> list[_KeyValue]:
    """Every KV pair llama.cpp's qwen3moe loader and llama tokenizer need (REFERENCE §5)."""
    a = _ARCH
    normal = _normal_tokens(shape.vocab - _N_FIXED_TOKENS)
    tokens = [*_SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), *normal]
    types = [_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_CONTROL, *[_TOKEN_BYTE] * 256]
    types += [_TOKEN_NORMAL] * len(normal)
    # SentencePiece merges the pair whose result scores highest: shorter pieces score higher here.
    scores = [0.0] * _N_FIXED_TOKENS + [-float(i) for i in range(len(normal))]
    return [
        _KeyValue("general.architecture", a, _STRING),  # GGUFWriter adds this one itself
        _KeyValue("general.name", "warmpool synthetic qwen3moe", _STRING),
        _KeyValue(f"{a}.block_count", shape.n_layers, _UINT32),
        _KeyValue(f"{a}.context_length", shape.context_length, _UINT32),
        _KeyValue(f"{a}.embedding_length", shape.hidden, _UINT32),
        _KeyValue(f"{a}.feed_forward_length", shape.dense_ff, _UINT32),
        _KeyValue(f"{a}.attention.head_count", shape.n_heads, _UINT32),
        _KeyValue(f"{a}.attention.head_count_kv", shape.n_kv_heads, _UINT32),
        _KeyValue(f"{a}.attention.key_length", shape.head_dim, _UINT32),
        _KeyValue(f"{a}.attention.value_length", shape.head_dim, _UINT32),
        _KeyValue(f"{a}.rope.freq_base", 1_000_000.0, _FLOAT32),
        _KeyValue(f"{a}.attention.layer_norm_rms_epsilon", 1e-6, _FLOAT32),
        _KeyValue(f"{a}.expert_count", shape.n_experts, _UINT32),
        _KeyValue(f"{a}.expert_used_count", shape.n_experts_used, _UINT32),
        _KeyValue(f"{a}.expert_feed_forward_length", shape.expert_ff, _UINT32),
        _KeyValue("tokenizer.ggml.model", "llama", _STRING),
        _KeyValue("tokenizer.ggml.tokens", tokens, _ARRAY, _STRING),
        _KeyValue("tokenizer.ggml.scores", scores, _ARRAY, _FLOAT32),
        _KeyValue("tokenizer.ggml.token_type", types, _ARRAY, _INT32),
        _KeyValue("tokenizer.ggml.unknown_token_id", 0, _UINT32),
        _KeyValue("tokenizer.ggml.bos_token_id", 1, _UINT32),
        _KeyValue("tokenizer.ggml.eos_token_id", 2, _UINT32),
        _KeyValue("tokenizer.ggml.add_bos_token", True, _BOOL),
    ]


def _value_nbytes(value: object, vtype: int, sub_type: int | None) -> int:
    if vtype == _STRING:
        return 8 + len(str(value).encode())
    if vtype == _ARRAY:
        assert sub_type is not None and isinstance(value, list)
        return 4 + 8 + sum(_value_nbytes(item, sub_type, None) for item in value)
    return _SCALAR_NBYTES[vtype]


def _pad(n: int) -> int:
    return -(-n // _ALIGNMENT) * _ALIGNMENT


def _file_nbytes(kvs: list[_KeyValue], tensors: list[_Tensor]) -> int:
    """Exact size of one GGUF file as GGUFWriter lays it out (REFERENCE §3)."""
    header = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
    header += sum(8 + len(kv.key.encode()) + 4 + _value_nbytes(*kv[1:]) for kv in kvs)
    header += sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in tensors)
    return _pad(header) + sum(_pad(t.nbytes) for t in tensors)


def model_nbytes(shape: MoeShape) -> int:
    """Exact size in bytes of the unsplit file ``write_moe_gguf(path, shape)`` writes."""
    _check_shape(shape)
    return _file_nbytes(_metadata(shape), list(_tensors(shape)))


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)


def _parse_size(size: int | str) -> int:
    """``4_000_000_000``, ``"1.7G"`` / ``"1.7GB"`` (powers of 1000) or ``"2GiB"`` (of 1024)."""
    if isinstance(size, int):
        return size
    match = _SIZE_RE.fullmatch(size)
    if match is None:
        raise WarmpoolError(f"cannot parse size {size!r} (examples: 1.7G, 400MB, 2GiB)")
    number, unit, binary = match.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def shape_for_size(target_bytes: int | str) -> MoeShape:
    """BENCH's width with as many layers as bring the file closest to ``target_bytes``."""
    target = _parse_size(target_bytes)
    one, two = (model_nbytes(BENCH._replace(n_layers=n)) for n in (1, 2))
    per_layer, fixed = two - one, one - (two - one)
    return BENCH._replace(n_layers=max(1, round((target - fixed) / per_layer)))


def _shard_starts(tensors: list[_Tensor], n_shards: int) -> set[int]:
    """Indexes of the tensors that open shards 2..N, cutting at even shares of the bytes."""
    if not 1 <= n_shards <= len(tensors):
        raise WarmpoolError(f"split_shards must be between 1 and {len(tensors)}, got {n_shards}")
    before = [0, *itertools.accumulate(t.nbytes for t in tensors)]  # bytes before tensor i
    starts: list[int] = [0]
    for k in range(1, n_shards):
        wanted = bisect.bisect_left(before, before[-1] * k / n_shards)
        # Keep every shard non-empty and leave one tensor for each shard still to come.
        starts.append(min(max(wanted, starts[-1] + 1), len(tensors) - (n_shards - k)))
    return set(starts[1:])


def _tensor_data(tensor: _Tensor, rng):  # -> numpy.ndarray
    import numpy as np

    fan_in = tensor.shape[-1]
    if tensor.ggml_type == _Q8_0:
        # A Q8_0 block is an f16 scale then 32 int8 quants.  Random bytes give the quants; the
        # scale makes the weights' std about 1/sqrt(fan_in) (uniform int8 has std ~74) so that
        # llama.cpp's activations stay finite through every layer.
        n_blocks = math.prod(tensor.shape) // 32
        raw = rng.bit_generator.random_raw(-(-n_blocks * 34 // 8)).view(np.uint8)
        blocks = raw[: n_blocks * 34].reshape(n_blocks, 34)
        scale = np.float16(1.0 / (74.0 * math.sqrt(fan_in)))
        blocks[:, :2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
        return blocks.reshape(tensor.data_shape)
    values = rng.standard_normal(tensor.shape, dtype=np.float32)
    if len(tensor.shape) == 1:  # RMS-norm weights: near one
        return (1.0 + 0.01 * values).astype(np.float32)
    dtype = np.float16 if tensor.ggml_type == _F16 else np.float32
    return (values / math.sqrt(fan_in)).astype(dtype)


def _new_writer(path: Path, shape: MoeShape, tensors: list[_Tensor], n_shards: int):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, _ARCH)
    for kv in _metadata(shape)[1:]:  # the writer already added general.architecture
        sub_type = None if kv.sub_type is None else gguf.GGUFValueType(kv.sub_type)
        writer.add_key_value(kv.key, kv.value, gguf.GGUFValueType(kv.vtype), sub_type)
    starts = _shard_starts(tensors, n_shards)
    numpy_dtypes = {_F32: np.float32, _F16: np.float16, _Q8_0: np.uint8}
    for index, tensor in enumerate(tensors):
        # gguf-py splits by a tensor count or byte limit, not into N shards: steer its own rule
        # tensor by tensor ("a shard already holding >= 1 tensor is full" opens the next one).
        writer.split_max_tensors = 1 if index in starts else 0
        raw = gguf.GGMLQuantizationType(tensor.ggml_type) if tensor.ggml_type == _Q8_0 else None
        dtype = np.dtype(numpy_dtypes[tensor.ggml_type])
        writer.add_tensor_info(tensor.name, tensor.data_shape, dtype, tensor.nbytes, raw)
    writer.split_max_tensors = 0
    return writer


def _shard_names(path: Path, n_shards: int) -> list[Path]:
    # llama.cpp's naming (llama_split_path), which is also gguf-py's SHARD_NAME_FORMAT.
    if n_shards == 1:
        return [path]
    names = (f"{path.stem}-{k:05d}-of-{n_shards:05d}.gguf" for k in range(1, n_shards + 1))
    return [path.with_name(name) for name in names]


def _stream(writer, tensors: list[_Tensor], seed: int) -> None:
    """Header, metadata and tensor table first, then each tensor generated as it is written."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:  # write_tensor_data takes the tensors in add_tensor_info order
        writer.write_tensor_data(_tensor_data(tensor, rng))


def write_moe_gguf(
    path: str | os.PathLike[str],
    shape: MoeShape = TEST,
    *,
    seed: int = 0,
    split_shards: int | None = None,
) -> list[Path]:
    """Write a synthetic qwen3moe model; return the written file(s), shards in order.

    ``split_shards=N`` (N >= 2) writes ``<stem>-0000K-of-0000N.gguf`` shards next to ``path``
    carrying ``split.no`` / ``split.count`` / ``split.tensors.count``; None or 1 writes ``path``.
    The same ``shape`` and ``seed`` always give the same bytes.
    """
    final = Path(path)
    _check_shape(shape)
    tensors = list(_tensors(shape))
    n_shards = 1 if split_shards is None else split_shards
    names = _shard_names(final, n_shards)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # A unique private directory on the same filesystem: os.replace is then an atomic rename,
        # and two processes generating the same file never write into each other's bytes.
        scratch = Path(tempfile.mkdtemp(".tmp", f".{final.name}.", final.parent))
    except OSError as exc:
        raise PlatformError(f"cannot create the model's directory: {exc}", final) from exc
    try:
        writer = _new_writer(scratch / final.name, shape, tensors, n_shards)
        try:
            _stream(writer, tensors, seed)
        finally:
            writer.close()
        for name in names:
            os.replace(scratch / name.name, name)
    except OSError as exc:
        raise PlatformError(f"cannot write the model: {exc}", final) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return names


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("WARMPOOL_CACHE"):
        return Path(os.environ["WARMPOOL_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "warmpool"


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def example_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The built-in example model (EXAMPLE shape, ~300 MB), generated on first use.

    Looked up in ``cache_dir``, else ``$WARMPOOL_CACHE``, ``$XDG_CACHE_HOME/warmpool`` or
    ``~/.cache/warmpool``.  A file of the expected size is reused without importing numpy or
    gguf; any other is regenerated.  Concurrent callers serialize on a lock file so the model
    is written once; the write itself is atomic even without the lock.
    """
    import fcntl

    directory = _cache_dir(cache_dir)
    path = directory / EXAMPLE_FILENAME
    expected = model_nbytes(EXAMPLE)
    if _has_size(path, expected):
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / (EXAMPLE_FILENAME + ".lock"), "a")  # noqa: SIM115 - held below
    except OSError as exc:
        raise PlatformError(f"cannot use the cache directory: {exc}", directory) from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not _has_size(path, expected):  # another process may have written it meanwhile
            # Under the lock no other example writer runs: scratch left here is from a killed one.
            for stale in directory.glob(f".{EXAMPLE_FILENAME}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            write_moe_gguf(path, EXAMPLE)
    return path
