"""Which tensors an engine keeps on the CPU, with llama.cpp's own flag semantics.

The rules, and where llama.cpp defines them:

* **Layer placement** (``src/llama-model.cpp``, ``llama_model::load_tensors``):
  ``i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)``; layer slot ``il`` is on the CPU when
  ``il < i_gpu_start``.  Slot ``n_layer`` is the output layer (``output.weight``,
  ``output_norm.weight``), so it is the first to leave the CPU: ``-ngl 1`` offloads only it,
  ``-ngl n_layer + 1`` offloads every layer.  The input layer (``token_embd`` and the other
  tensors outside ``blk.N``) always stays on the CPU.  Without ``-ngl`` we model a CPU-only
  engine: everything is on the CPU.  A negative ``-ngl`` means "all layers" (llama-cpp-python's
  ``n_gpu_layers=-1``).
* **Tensor overrides** (``common/arg.cpp``, ``-ot/--override-tensor``, and
  ``llama_model_loader``'s ``tensor_buft_overrides``): ``PATTERN=BUFT`` pairs, comma separated,
  repeatable; each tensor name is tested with ``std::regex_search`` against the patterns in
  order and the first match decides.  A buffer type named ``CPU`` (or ``CPU_*``, e.g.
  ``CPU_REPACK``) keeps the tensor on the CPU, any other (``CUDA0``, ``Vulkan1``...) moves it off.
  Overrides win over layer placement.
* **MoE shortcuts** (``common/arg.cpp``): ``--cpu-moe`` adds the override
  ``\\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU`` (stacked experts only, not the router
  ``ffn_gate_inp`` nor the shared expert ``*_shexp``); ``--n-cpu-moe N`` adds
  ``blk\\.i\\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU`` for ``i`` in ``0..N-1``.  llama.cpp appends
  them to the same override list in command-line order; the Python API applies ``overrides``
  first, then the MoE shortcuts (the CLI keeps the order the flags were given in).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ._errors import SelectionError

__all__ = ["CATEGORIES", "Selection", "category", "moe_overrides", "parse_overrides"]

EXPERTS_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
CATEGORIES = ("experts", "attention", "dense FFN", "embeddings/output", "other")


def moe_overrides(cpu_moe: bool = False, n_cpu_moe: int = 0) -> tuple[tuple[str, str], ...]:
    """The overrides llama.cpp's --cpu-moe / --n-cpu-moe add to the list."""
    if n_cpu_moe < 0:
        raise SelectionError(f"--n-cpu-moe must be >= 0, got {n_cpu_moe}")
    rules = [(EXPERTS_PATTERN, "CPU")] if cpu_moe else []
    rules += [(rf"blk\.{i}{EXPERTS_PATTERN}", "CPU") for i in range(n_cpu_moe)]
    return tuple(rules)


def parse_overrides(values: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """Parse ``-ot`` values (``PATTERN=BUFT[,PATTERN=BUFT...]``) into ordered pairs."""
    pairs = []
    for value in values:
        for item in value.split(","):
            pattern, sep, buft = item.partition("=")  # llama.cpp splits at the first '='
            if not sep or not pattern or not buft:
                raise SelectionError(f"invalid tensor override {item!r}: expected PATTERN=BUFFER_TYPE")
            pairs.append((pattern, buft))
    return tuple(pairs)


def _compile(pairs: Sequence[tuple[str, str]]) -> tuple[tuple[re.Pattern[str], bool], ...]:
    compiled = []
    for pattern, buft in pairs:
        try:
            compiled.append((re.compile(pattern), buft.upper().startswith("CPU")))
        except re.error as e:
            raise SelectionError(f"invalid tensor override pattern {pattern!r}: {e}") from None
    return tuple(compiled)


def category(name: str) -> str:
    """The reporting category of a tensor (one of CATEGORIES)."""
    if re.search(r"_(ch|)exps\b", name):
        return "experts"
    if name.startswith("blk.") and ".attn_" in name:
        return "attention"
    if name.startswith("blk.") and ".ffn_" in name:
        return "dense FFN"
    if name.startswith(("token_embd", "output", "tok_embeddings", "pos_embd")):
        return "embeddings/output"
    return "other"


class Selection(NamedTuple):
    """llama.cpp's placement flags; ``keeps_on_cpu`` applies them to one tensor."""

    n_gpu_layers: int | None = None
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    overrides: tuple[tuple[str, str], ...] = ()  # (pattern, buffer type), in the order tried

    @property
    def rules(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.overrides) + moe_overrides(self.cpu_moe, self.n_cpu_moe)

    def validate(self) -> Selection:
        _compile(self.rules)
        return self

    def describe(self) -> str:
        parts = []
        if self.n_gpu_layers is not None:
            parts.append(f"-ngl {self.n_gpu_layers}")
        if self.cpu_moe:
            parts.append("--cpu-moe")
        if self.n_cpu_moe:
            parts.append(f"--n-cpu-moe {self.n_cpu_moe}")
        parts += [f"-ot {p}={b}" for p, b in self.overrides]
        return " ".join(parts) or "all tensors (CPU-only engine)"

    def cpu_filter(self, n_layers: int):
        """A predicate ``(name, layer) -> bool``: does the engine keep this tensor on the CPU?"""
        rules = _compile(self.rules)
        i_gpu_start = 0
        if self.n_gpu_layers is not None:
            offloaded = n_layers + 1 if self.n_gpu_layers < 0 else self.n_gpu_layers
            i_gpu_start = max(n_layers + 1 - offloaded, 0)

        def on_cpu(name: str, layer: int | None) -> bool:
            for pattern, cpu in rules:
                if pattern.search(name):
                    return cpu
            if self.n_gpu_layers is None:
                return True  # no GPU: the whole model is on the CPU
            if layer is not None:
                return layer < i_gpu_start
            if name.startswith("output"):  # the output layer's slot is n_layers
                return n_layers < i_gpu_start
            return True  # the input layer never leaves the CPU

        return on_cpu
