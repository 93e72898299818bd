"""The synthetic qwen3moe models' shape: hyper-parameters, tensors, metadata, exact file size.

Stdlib only (with warmpool's own GGUF tables): sizing a model, which ``example_model``'s reuse
check does on every run, needs neither numpy nor gguf.  What llama.cpp needs to load the
model is in docs/design.md ("Synthetic models llama.cpp loads").
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from typing import NamedTuple

from warmpool._errors import WarmpoolError
from warmpool._gguf.ggml import GGML_TYPES
from warmpool._gguf.header import ARRAY, SCALAR_TYPES, STRING
from warmpool._units import parse_size

__all__ = ["BENCH", "EXAMPLE", "MoeShape", "TEST", "TINY", "model_nbytes", "shape_for_size"]


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
BENCH = MoeShape(16, 64, 8, 1024, 512, 2048, 8, 2, 64, 1024, 4096)  # ~1.75 GB: the GB-scale benchmarks
_ARCH = "qwen3moe"
_ALIGNMENT = 32  # GGUF default general.alignment; gguf-py writes no key for it

# The ggml types the model uses (ids of ggml.h's enum ggml_type; sizes from warmpool._gguf.ggml).
_F32, _F16, _Q8_0 = 0, 1, 8

# GGUF metadata value types used here (docs/design.md, "GGUF layout"); sizes from _header's table.
_UINT32, _INT32, _FLOAT32, _BOOL = 4, 5, 6, 7
_STRING, _ARRAY = STRING, ARRAY

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
        t = GGML_TYPES[self.ggml_type]
        return math.prod(self.shape) // t.block_size * t.type_size

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of the array handed to gguf-py: raw Q8_0 goes as uint8 rows of whole blocks."""
        t = GGML_TYPES[self.ggml_type]
        return (*self.shape[:-1], self.shape[-1] // t.block_size * t.type_size) if t.block_size > 1 else self.shape

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
    """Every KV pair llama.cpp's qwen3moe loader and llama tokenizer need (docs/design.md)."""
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
    return struct.calcsize("<" + SCALAR_TYPES[vtype])


def _pad(n: int) -> int:
    return -(-n // _ALIGNMENT) * _ALIGNMENT


def _file_nbytes(kvs: list[_KeyValue], tensors: list[_Tensor]) -> int:
    """Exact size of one GGUF file as GGUFWriter lays it out (docs/design.md, "GGUF layout")."""
    header = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
    header += sum(8 + len(kv.key.encode()) + 4 + _value_nbytes(*kv[1:]) for kv in kvs)
    header += sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in tensors)
    return _pad(header) + sum(_pad(t.nbytes) for t in tensors)


def model_nbytes(shape: MoeShape) -> int:
    """Exact size in bytes of the unsplit file ``write_moe_gguf(path, shape)`` writes."""
    _check_shape(shape)
    return _file_nbytes(_metadata(shape), list(_tensors(shape)))

def shape_for_size(target_bytes: int | str) -> MoeShape:
    """BENCH's width with as many layers as bring the file closest to ``target_bytes``
    (bytes, or a size ``_units.parse_size`` reads: "1.7GB" is 1.7e9, "2G" 2 GiB)."""
    try:
        target = parse_size(target_bytes)
    except ValueError as e:
        raise WarmpoolError(str(e)) from None
    one, two = (model_nbytes(BENCH._replace(n_layers=n)) for n in (1, 2))
    per_layer, fixed = two - one, one - (two - one)
    return BENCH._replace(n_layers=max(1, round((target - fixed) / per_layer)))
