"""warmpool's one ggml type table against gguf-py's ``GGML_QUANT_SIZES``, the oracle.

``_ggml.GGML_TYPES`` is a copy so that the layout walk never imports gguf (and numpy); this
test is what keeps the copy honest: it fails when an entry differs, when gguf knows a type
we lack, or when we carry one gguf does not know.
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from warmpool._gguf.ggml import GGML_TYPES, GgmlType, tensor_nbytes


def test_every_gguf_type_is_in_our_table_with_the_same_sizes():
    theirs = {int(t): GgmlType(t.name, block, size) for t, (block, size) in GGML_QUANT_SIZES.items()}
    assert len(theirs) >= 30  # the oracle is really there
    missing = sorted(set(theirs) - set(GGML_TYPES))
    assert not missing, f"gguf knows ggml types warmpool lacks: {[theirs[c] for c in missing]}"
    differ = {code: (ours, theirs[code]) for code, ours in GGML_TYPES.items() if theirs.get(code) != ours}
    assert not differ, f"entries that differ from gguf (ours, gguf's): {differ}"


def test_every_code_is_a_gguf_type():
    for code, ours in GGML_TYPES.items():
        assert GGMLQuantizationType(code).name == ours.name


def test_tensor_nbytes_counts_whole_blocks_only():
    q8 = GGML_TYPES[GGMLQuantizationType.Q8_0]
    assert tensor_nbytes(q8, 64) == 2 * 34
    assert tensor_nbytes(q8, 65) is None
    assert tensor_nbytes(GGML_TYPES[GGMLQuantizationType.F16], 7) == 14
