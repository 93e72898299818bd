"""Test-only GGUF files: a small valid one with every value type, files with one field patched
or a key of the wrong type, and a map of every header field by name.

The product's writer (``warmpool.example``) makes realistic MoE models; the files here exist
to break the parser.  ``write_small_gguf`` writes, with gguf-py's ``GGUFWriter``, a TINY-like
qwen3moe file (two layers, tokenizer arrays, ``split.*`` keys) that also holds every metadata
value type and a nested array.  It is ~20 KB, so an unmutated tensor table still fits the file
and mutations can reach "ok" as well as every error path.  ``map_fields`` locates every header
field with ``gguf.GGUFReader`` (the independent oracle), so tests and the fuzzer patch *named*
fields ("tokenizer.ggml.tokens/array_len") instead of hard-coded offsets.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = ["Span", "find_span", "map_fields", "patch_field", "write_small_gguf", "write_with_strings"]

N_LAYERS, HIDDEN, VOCAB = 2, 32, 64


class Span(NamedTuple):
    what: str  # "GGUF.kv_count/value", "<key>/key_len", "<key>/item_len", "tensor:<name>/offset", ...
    offset: int
    size: int
    is_int: bool  # one integer (a count, length, type code, dimension or offset)


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


def write_with_strings(path: str | os.PathLike[str], strings: dict[str, str]) -> Path:
    """A well-formed GGUF of one 8-float tensor whose metadata holds ``strings``: any key, typed
    string, so a key the parser reads as a number can be given the wrong type."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    for key, value in strings.items():
        writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", np.zeros(8, np.float32))
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


def patch_field(data: bytes, span: Span, value: int, byte_order: str = "<") -> bytes:
    """``data`` with the integer field ``span`` set to ``value``."""
    out = bytearray(data)
    struct.pack_into(byte_order + {1: "B", 2: "H", 4: "I", 8: "Q"}[span.size], out, span.offset, value)
    return bytes(out)
