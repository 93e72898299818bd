"""Each (layer, expert)'s byte ranges in a MoE model's stacked expert tensors.

llama.cpp stores the experts of a layer stacked in one tensor per projection
(``blk.N.ffn_{gate,up,down,gate_up}_{ch,}exps``, src/llama-model.cpp ``create_tensor`` with
shape ``{n_embd, n_ff_exp, n_expert}`` or ``{n_ff_exp, n_embd, n_expert}``).  ggml's dimension
order puts ``ne0`` fastest (ggml.h: ``nb[0] = type size``, ``nb[i] = nb[i-1] * ne[i-1]``, with
``nb[1]`` a whole row of blocks for quantized types), so the last dimension, the expert, is the
slowest: expert ``e`` is the contiguous range ``[offset + e*S, offset + (e+1)*S)``,
``S = nbytes // n_expert``, whole rows (quantization blocks never straddle two experts).
docs/experts.md.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import NamedTuple

from .._errors import LayoutError
from .._gguf.layout import ModelLayout, TensorInfo

__all__ = ["EXPERT_TENSOR", "ExpertSlice", "expert_slices", "expert_tensors", "n_experts"]

# The stacked-expert names llama.cpp's --cpu-moe matches (_select.EXPERTS_PATTERN), anchored to
# a layer: the router (ffn_gate_inp) and the shared expert (*_shexp) are not per-expert slices.
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_(ch|)exps\.")


class ExpertSlice(NamedTuple):
    layer: int
    expert: int
    ranges: tuple[tuple[int, int, int], ...]  # (file index, start byte, end byte) per stacked tensor

    @property
    def nbytes(self) -> int:
        return sum(end - start for _, start, end in self.ranges)


def expert_tensors(layout: ModelLayout) -> list[TensorInfo]:
    """The stacked expert tensors of the model, in table order."""
    return [t for t in layout.tensors if t.layer is not None and EXPERT_TENSOR.match(t.name)]


def _declared(layout: ModelLayout) -> int | None:
    value = layout.metadata.get(f"{layout.architecture}.expert_count")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def n_experts(layout: ModelLayout) -> int:
    """Experts per layer: ``{arch}.expert_count``, else the stacked tensors' last dimension;
    0 for a model without stacked expert tensors."""
    tensors = expert_tensors(layout)
    if not tensors:
        return 0
    return _declared(layout) or max(t.shape[-1] for t in tensors if t.shape)


def _slice_size(t: TensorInfo, n: int, path: str) -> int:
    if not t.shape or t.shape[-1] != n:
        raise LayoutError(f"expert tensor {t.name} has shape {list(t.shape)}: its last dimension is not the "
                          f"expert count {n}", path)
    if t.nbytes % n:
        raise LayoutError(f"expert tensor {t.name} holds {t.nbytes} bytes, not a multiple of its {n} experts", path)
    return t.nbytes // n


def expert_slices(layout: ModelLayout, selected_names: Collection[str] | None = None) -> tuple[ExpertSlice, ...]:
    """Every (layer, expert)'s byte ranges, by layer then expert; each slice lists its range in
    every stacked tensor of its layer (of ``selected_names`` only, when given).  Empty for a
    model without stacked expert tensors; LayoutError where a tensor cannot be cut evenly."""
    n = n_experts(layout)
    path = layout.files[0].path if layout.files else None
    by_layer: dict[int, list[tuple[TensorInfo, int]]] = {}
    for t in expert_tensors(layout):
        if selected_names is None or t.name in selected_names:
            by_layer.setdefault(t.layer, []).append((t, _slice_size(t, n, path)))
    slices = []
    for layer in sorted(by_layer):
        tensors = by_layer[layer]
        for e in range(n):
            ranges = tuple((t.file, t.offset + e * size, t.offset + (e + 1) * size) for t, size in tensors)
            slices.append(ExpertSlice(layer, e, ranges))
    return tuple(slices)
