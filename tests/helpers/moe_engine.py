"""An engine stand-in for models that do not fit in memory (issue 23): the page accesses of
CPU-MoE decoding with a skewed router, no arithmetic.

Per token, for every layer, it touches one byte per 4 KiB page of the layer's dense tensors
(attention, norms, router: every token needs them) and of the ``top_k`` experts the router
picks.  Touching one byte per page is enough: what is measured is whether the pages are
resident, and what the kernel reads when they are not.  The file is mapped read-only with a
plain ``mmap`` (no populate, no madvise), as llama.cpp maps it, so a missing page is a major
fault and the kernel's mmap read-around (the device's ``read_ahead_kb``) decides how much more
is read with it.

The router draws experts from a fixed Zipf popularity: popularity rank ``r`` (0 hottest) has
weight ``1 / (r + 1) ** zipf_s``, and per layer a fixed random permutation maps ranks to expert
ids, so every layer has other favourites.  Everything is seeded: two engines with the same
seed decode the same tokens, and ``Router.ranking()`` is the truth a learned ranking is scored
against.

A stacked expert tensor ``blk.N.ffn_{gate,up,down}_exps.weight`` has ggml dims
``[n_embd, n_ff, n_expert]`` (ne0 fastest), so expert ``e`` is the contiguous byte range
``[offset + e*S, offset + (e+1)*S)`` with ``S = nbytes / n_expert``.

    python -m tests.helpers.moe_engine run MODEL --seconds 40 --warmup 20   # one JSON line
    python -m tests.helpers.moe_engine hold MODEL --bytes 2.33G            # mlock the hottest
    python -m tests.helpers.moe_engine mass PROFILE MODEL --bytes 2.33G    # a learned ranking's worth

Stdlib and numpy only (plus warmpool's ``read_layout``).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import re
import signal
import sys
import time
from collections.abc import Iterable

import numpy as np

from warmpool import read_layout

__all__ = ["Router", "dense_ranges", "expert_ranges", "hottest", "ranking_mass", "router_for", "run_engine"]

PAGE = 4096
# Stacked (per-expert) tensors: gate, up, down, fused gate_up, and the "chexps" variants.
_STACKED = re.compile(r"\.ffn_(gate|up|down|gate_up)_(ch)?exps\.weight$")

Range = tuple[int, int, int]  # (file index, start, end): absolute byte offsets in that file


class Router:
    """Per-token expert choices from a fixed, seeded Zipf popularity (see the module docstring)."""

    def __init__(self, n_layers: int, n_experts: int, top_k: int, zipf_s: float = 1.0, seed: int = 0) -> None:
        if not 0 < top_k <= n_experts or n_layers < 1:
            raise ValueError(f"bad router shape: {n_layers} layers, top {top_k} of {n_experts} experts")
        self.n_layers, self.n_experts, self.top_k = n_layers, n_experts, top_k
        weights = 1.0 / np.arange(1, n_experts + 1) ** zipf_s
        rank_p = weights / weights.sum()
        perms = np.random.default_rng(seed)
        # rank_to_expert[layer, r] is the expert id of popularity rank r in that layer.
        self.rank_to_expert = np.stack([perms.permutation(n_experts) for _ in range(n_layers)])
        self.popularity = np.empty((n_layers, n_experts))  # [layer, expert]: its draw weight
        np.put_along_axis(self.popularity, self.rank_to_expert, rank_p[None, :], axis=1)
        self._log_p = np.log(self.popularity)
        # A stream of its own, so the token sequence does not depend on how the permutations were drawn.
        self._tokens = np.random.default_rng([seed, 1])

    def next_token(self) -> np.ndarray:
        """The experts of the next token: an int array [n_layers, top_k], distinct per layer.
        The top k of log p plus Gumbel noise are k draws without replacement, each in
        proportion to p (the Gumbel-top-k trick): all layers at once, no Python loop."""
        keys = self._log_p + self._tokens.gumbel(size=self._log_p.shape)
        return np.argpartition(keys, -self.top_k, axis=1)[:, -self.top_k:]

    def ranking(self) -> list[tuple[int, int]]:
        """Every (layer, expert), most popular first; equal popularity (the same rank in other
        layers) in layer order."""
        ranks = np.argsort(self.rank_to_expert, axis=1)  # [layer, expert] -> its rank
        layers, experts = np.indices(ranks.shape)
        order = np.lexsort((layers.ravel(), ranks.ravel()))
        return [(int(layers.flat[i]), int(experts.flat[i])) for i in order]


def router_for(layout, zipf_s: float = 1.0, seed: int = 0) -> Router:
    """A Router shaped like the model: its layers, experts and experts used per token."""
    arch = layout.architecture
    try:
        n_experts = int(layout.metadata[f"{arch}.expert_count"])
        top_k = int(layout.metadata[f"{arch}.expert_used_count"])
    except KeyError as e:
        raise ValueError(f"not an MoE model: no {e.args[0]} in its metadata") from None
    return Router(layout.n_layers, n_experts, top_k, zipf_s, seed)


def expert_ranges(layout) -> dict[tuple[int, int], list[Range]]:
    """{(layer, expert): [(file, start, end), ...]}: expert e's slice of each stacked tensor of
    its layer, in file order."""
    ranges: dict[tuple[int, int], list[Range]] = {}
    for t in layout.tensors:
        if t.layer is None or not _STACKED.search(t.name):
            continue
        n_experts = t.shape[-1]  # ne2
        if t.nbytes % n_experts:
            raise ValueError(f"{t.name}: {t.nbytes} bytes do not split into {n_experts} equal experts")
        size = t.nbytes // n_experts
        for e in range(n_experts):
            start = t.offset + e * size
            ranges.setdefault((t.layer, e), []).append((t.file, start, start + size))
    return ranges


def dense_ranges(layout) -> list[list[Range]]:
    """Per layer, the tensors every token reads: all of the layer's tensors but the experts."""
    dense: list[list[Range]] = [[] for _ in range(layout.n_layers)]
    for t in layout.tensors:
        if t.layer is not None and t.layer < layout.n_layers and not _STACKED.search(t.name):
            dense[t.layer].append((t.file, t.offset, t.offset + t.nbytes))
    return dense


def hottest(router: Router, ranges: dict[tuple[int, int], list[Range]], budget: int) -> list[Range]:
    """The truly hottest experts' ranges (by the router's popularity), as many as fit in
    ``budget`` bytes: the oracle a learned ranking can at best match."""
    chosen: list[Range] = []
    total = 0
    for key in router.ranking():
        size = _nbytes(ranges[key])
        if total + size > budget:
            break
        chosen += ranges[key]
        total += size
    return chosen


def _nbytes(ranges: list[Range]) -> int:
    return sum(end - start for _, start, end in ranges)


def _touch(view: np.ndarray, start: int, end: int) -> int:
    # One byte in every page of [start, end): the stride visits consecutive pages from start's,
    # and end - 1 covers the last page when the range is not page-aligned.
    return int(view[start:end:PAGE].sum()) + int(view[end - 1])


def _read_bytes() -> int:
    """Bytes this process made the kernel read from disk (page-cache misses and their read-ahead)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


class _Mapped:
    """Read-only plain mappings of a model's files (no populate, no madvise) as numpy views."""

    def __init__(self, paths: Iterable[str]) -> None:
        self._maps = []
        for path in paths:
            with open(path, "rb") as f:  # the mapping outlives the descriptor
                self._maps.append(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
        self.views = [np.frombuffer(m, dtype=np.uint8) for m in self._maps]

    def close(self) -> None:
        self.views = []
        for m in self._maps:
            m.close()


def _decode(views: list[np.ndarray], chosen: np.ndarray, dense: list[list[Range]],
            experts: dict[tuple[int, int], list[Range]]) -> int:
    """One token: every layer's dense tensors and its chosen experts, in layer order."""
    checksum = 0  # returned so the reads cannot be skipped
    for layer, picks in enumerate(chosen):
        for f, a, b in dense[layer]:
            checksum += _touch(views[f], a, b)
        for e in picks:
            for f, a, b in experts[(layer, int(e))]:
                checksum += _touch(views[f], a, b)
    return checksum


def run_engine(path: str, seconds: float, warmup_s: float, router: Router | None = None, *,
               zipf_s: float = 1.0, seed: int = 0) -> dict:
    """Decode tokens for ``warmup_s`` then ``seconds`` more, measuring only the second window.

    Returns ``token_s`` (each measured token's seconds), the window's length, tokens decoded in
    the warm-up, the disk bytes this process read in the window (/proc/self/io read_bytes, so
    read-ahead it caused counts and another process's reads do not), and the bytes a token
    needs.  A token runs to its end; the window closes at the first token end past ``seconds``.
    """
    layout = read_layout(path)
    router = router or router_for(layout, zipf_s, seed)
    experts = expert_ranges(layout)
    dense = dense_ranges(layout)
    mapped = _Mapped(f.path for f in layout.files)
    token_s: list[float] = []
    warmup_tokens = 0
    try:
        start = time.monotonic()
        measuring_from = read0 = None
        while True:
            t0 = time.monotonic()
            if measuring_from is None and t0 - start >= warmup_s:
                measuring_from, read0 = t0, _read_bytes()
            if measuring_from is not None and t0 - measuring_from >= seconds:
                break
            _decode(mapped.views, router.next_token(), dense, experts)
            if measuring_from is None:
                warmup_tokens += 1
            else:
                token_s.append(time.monotonic() - t0)
        read = _read_bytes() - read0
        window = time.monotonic() - measuring_from
    finally:
        mapped.close()
    need = sum(_nbytes(r) for r in dense) + sum(router.top_k * _nbytes(experts[(k, 0)]) for k in range(router.n_layers))
    return {"token_s": token_s, "window_s": window, "warmup_tokens": warmup_tokens, "read_bytes": read,
            "bytes_per_token_needed": need}


def _libc_mlock():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc.mlock


def hold(path: str, budget: int, zipf_s: float = 1.0, seed: int = 0) -> tuple[_Mapped, dict]:
    """mlock the truly hottest experts that fit in ``budget`` (faulting them in): the oracle of
    issue 23.  Returns the mappings (closing them unlocks) and what was locked."""
    layout = read_layout(path)
    ranges = hottest(router_for(layout, zipf_s, seed), expert_ranges(layout), budget)
    mapped = _Mapped(f.path for f in layout.files)
    mlock = _libc_mlock()
    locked = 0
    start = time.monotonic()
    for f, a, b in sorted(ranges):  # file order: the reads go in ascending offsets
        base = mapped.views[f].ctypes.data
        if mlock(base + a, b - a) != 0:
            err = ctypes.get_errno()
            return mapped, {"bytes_locked": locked, "ranges": len(ranges), "error": os.strerror(err),
                            "seconds": round(time.monotonic() - start, 2)}
        locked += b - a
    return mapped, {"bytes_locked": locked, "ranges": len(ranges), "seconds": round(time.monotonic() - start, 2)}


def _size(text: str) -> int:
    from warmpool._units import parse_size

    return parse_size(text)


def ranking_mass(path: str, scores: dict[tuple[int, int], float], budget: int, zipf_s: float = 1.0,
                 seed: int = 0) -> dict:
    """How good a learned ranking is for holding: the share of the router's expert picks that
    land on the experts it puts first, as many as fit in ``budget`` bytes (``mass``), beside the
    same share for the router's own ranking (``oracle_mass``, what ``hold`` locks)."""
    layout = read_layout(path)
    router = router_for(layout, zipf_s, seed)
    ranges = expert_ranges(layout)

    def mass(order) -> tuple[float, int]:
        total, share, n = 0, 0.0, 0
        for key in order:
            size = _nbytes(ranges[key])
            if total + size > budget:
                break
            total += size
            share += router.popularity[key] / router.n_layers
            n += 1
        return share, n

    learned, n = mass(sorted(ranges, key=lambda k: (-scores.get(k, 0.0), k)))
    oracle, _ = mass(router.ranking())
    return {"mass": round(float(learned), 4), "oracle_mass": round(float(oracle), 4), "experts": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.helpers.moe_engine", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="decode for --warmup then --seconds; print one JSON line")
    run.add_argument("--seconds", type=float, default=40)
    run.add_argument("--warmup", type=float, default=20)
    held = sub.add_parser("hold", help="mlock the hottest experts up to --bytes; print one JSON line; wait for SIGTERM")
    held.add_argument("--bytes", type=_size, required=True)
    scored = sub.add_parser("mass", help="score a warmpool expert profile against the router; print one JSON line")
    scored.add_argument("profile")
    scored.add_argument("--bytes", type=_size, required=True)
    for p in (run, held, scored):
        p.add_argument("model")
        p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of expert popularity (default 1.0)")
        p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not os.path.isfile(args.model):
        print(f"moe_engine: no such model file: {args.model}", file=sys.stderr)
        return 2
    if args.command == "mass":
        from warmpool._experts.profile import read_profile

        out = ranking_mass(args.model, read_profile(args.profile).scores, args.bytes, args.zipf, args.seed)
        print(json.dumps(out), flush=True)
        return 0
    if args.command == "run":
        out = run_engine(args.model, args.seconds, args.warmup, zipf_s=args.zipf, seed=args.seed)
        print(json.dumps(out), flush=True)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _mapped, out = hold(args.model, args.bytes, args.zipf, args.seed)  # held until this process ends
    print(json.dumps({"event": "locked", **out}), flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
