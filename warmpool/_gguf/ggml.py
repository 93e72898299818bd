"""ggml tensor types: block size and bytes per block.

warmpool's one ggml type table (the layout walk, the example writer and the tools use it): a
copy of ``gguf.constants.GGML_QUANT_SIZES`` (gguf 0.19, ggml.h's ``enum ggml_type``).  It is
kept here rather than imported because ``import gguf`` pulls numpy, which would be most of the
layout parse that engines pay at start-up (docs/design.md, "Import cost").
tests/test_ggml.py checks it against gguf's table, so a new type in gguf shows up as a failing
test, not a wrong size.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["GGML_TYPES", "GgmlType", "tensor_nbytes"]


class GgmlType(NamedTuple):
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block


GGML_TYPES: dict[int, GgmlType] = {
    code: GgmlType(name, block, size)
    for code, (name, block, size) in {
        0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
        6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
        10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
        13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
        16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
        19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
        22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
        26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
        30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
        39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
    }.items()
}


def tensor_nbytes(ggml_type: GgmlType, n_elements: int) -> int | None:
    """Bytes of a tensor, or None when the element count is not whole blocks."""
    blocks, rest = divmod(n_elements, ggml_type.block_size)
    return None if rest else blocks * ggml_type.type_size
