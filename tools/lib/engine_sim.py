"""A simulated CPU-MoE engine: the memory access pattern of decoding, no real inference.

It maps a GGUF file lazily (plain ``mmap``, no MAP_POPULATE, no pre-fault: the seed engine's
CPU-MoE path) and, per token: reads the token's embedding row; for every layer reads the
dense tensors (attention, norms, router), lets a seeded router pick the top-k of E experts
and reads every byte of the routed experts' slices of ``ffn_gate_exps``, ``ffn_up_exps`` and
``ffn_down_exps`` (expert ``e`` of a stacked ``[E, rows, cols]`` tensor is the contiguous
slice ``e * nbytes/E .. (e+1) * nbytes/E``); then the output layer.  "Reading" is a
memory-bound reduction over the bytes (numpy ``uint64`` sum), standing in for the mat-vec
an engine does over the same rows, so a warm request costs memory bandwidth and a cold one
costs page faults on top.  The same seed routes every request the same way, so the second
run of a request is its steady state.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from warmpool import read_layout

__all__ = ["Extent", "MoeEngine"]

_EXPERTS = re.compile(r"\.ffn_(gate|up|down)_exps\.weight$")


class Extent(NamedTuple):
    offset: int
    nbytes: int


class _Layer(NamedTuple):
    dense: tuple[Extent, ...]  # attention, norms, router: read whole every token
    experts: tuple[Extent, ...]  # gate, up, down stacked tensors
    n_experts: int


class MoeEngine:
    """Simulated CPU-MoE engine (access pattern only); see the module docstring."""

    def __init__(self, path: str | os.PathLike[str], *, seed: int = 0, skew: float = 0.0) -> None:
        layout = read_layout(path)
        if len(layout.files) != 1:
            raise SystemExit("engine_sim: split models are not supported")
        arch = layout.architecture
        self.top_k = int(layout.metadata[f"{arch}.expert_used_count"])
        self.n_layers = layout.n_layers
        self.seed = seed
        by_name = {t.name: t for t in layout.tensors}
        embd = by_name["token_embd.weight"]
        self.vocab = embd.shape[-1]
        self.embd = Extent(embd.offset, embd.nbytes // self.vocab)  # one row; offset of row 0
        self.output = tuple(Extent(t.offset, t.nbytes) for t in layout.tensors
                            if t.layer is None and t.name.startswith("output"))
        self.layers = tuple(self._layer(layout, k) for k in range(self.n_layers))
        # skew > 0: each expert gets router bias -skew * ln(1 + its rank), ranks a fixed random
        # permutation (rotated per layer), so a few experts are routed often and the rest rarely,
        # as real MoE routers do; 0 routes uniformly.
        ranks = np.random.default_rng(12345).permutation(max(layer.n_experts for layer in self.layers))
        self.bias = -skew * np.log1p(ranks) if skew else None
        self._fd = os.open(path, os.O_RDONLY)
        self._mm = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ)
        self._bytes = np.frombuffer(self._mm, dtype=np.uint8)

    @staticmethod
    def _layer(layout, k: int) -> _Layer:
        tensors = [t for t in layout.tensors if t.layer == k]
        experts = [t for t in tensors if _EXPERTS.search(t.name)]
        dense = tuple(Extent(t.offset, t.nbytes) for t in tensors if t not in experts)
        n_experts = experts[0].shape[-1]  # GGUF order: ne2 = E
        return _Layer(dense, tuple(Extent(t.offset, t.nbytes) for t in experts), n_experts)

    def _read(self, offset: int, nbytes: int) -> int:
        """Every byte of [offset, offset+nbytes), as a mat-vec over these rows would."""
        whole = nbytes - nbytes % 8
        return int(self._bytes[offset:offset + whole].view(np.uint64).sum()) + int(
            self._bytes[offset + whole:offset + nbytes].sum())

    def seed_prefault(self) -> int:
        """The seed's loop: the first and the last byte of every tensor (2 pages of each)."""
        tensors = [t for layer in self.layers for t in (*layer.dense, *layer.experts)]
        tensors += [Extent(self.embd.offset, self.embd.nbytes * self.vocab), *self.output]
        return sum(int(self._bytes[t.offset]) + int(self._bytes[t.offset + t.nbytes - 1]) for t in tensors)

    def request(self, n_tokens: int = 16, before_layer: Callable[[int], object] | None = None) -> int:
        """Decode ``n_tokens`` tokens; ``before_layer(k)`` is called before layer k of the first token
        (k = -1 input, 0..n-1 blocks, n output: warmpool's layer keys).  Returns a checksum."""
        rng = np.random.default_rng(self.seed)
        checksum = 0
        for token in range(n_tokens):
            wait = before_layer if token == 0 else None
            if wait:
                wait(-1)
            checksum += self._read(self.embd.offset + int(rng.integers(self.vocab)) * self.embd.nbytes, self.embd.nbytes)
            for k, layer in enumerate(self.layers):
                if wait:
                    wait(k)
                checksum += sum(self._read(*t) for t in layer.dense)
                logits = rng.standard_normal(layer.n_experts)
                if self.bias is not None:
                    logits += np.roll(self.bias[: layer.n_experts], k)  # another favourite per layer
                routed = np.argpartition(logits, -self.top_k)[-self.top_k:]
                for t in layer.experts:
                    step = t.nbytes // layer.n_experts
                    checksum += sum(self._read(t.offset + int(e) * step, step) for e in routed)
            if wait:
                wait(self.n_layers)
            checksum += sum(self._read(*t) for t in self.output)
        return checksum

    def close(self) -> None:
        del self._bytes
        self._mm.close()
        os.close(self._fd)

    def __enter__(self) -> MoeEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
