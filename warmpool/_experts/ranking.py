"""Which experts an engine uses, learned from the page cache alone: no root, no engine help.

What a sample sees (docs/experts.md): for each expert, how many pages of its largest slice are
in the page cache now (cachestat(2), or mincore(2) where cachestat is unavailable).  Under memory
pressure the kernel's LRU keeps what was used recently and often, so

* the time average of a slice's resident fraction rises with how often it is used, and
* a slice whose resident pages went up since the last sample was read again (a refault:
  only a reader brings pages back), which tells the warm-but-evicted experts apart from the
  cold ones that stay out.

score = EMA(resident fraction) + EMA(risen fraction), each in [0, 1] per sample; the EMAs start
at zero and are divided by the weight their samples have (bias-corrected), so that a score is
an average whether it rests on ten samples or a thousand.  Without
pressure everything stays resident, every score tends to 1 and the ranking carries no
information (nor does it need to: everything fits).  Slices a keeper holds (mlock or a
touched mapping) are always resident whatever the engine does: ``sample(held=...)`` leaves
their scores as they were instead of learning from that.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from .. import _platform
from .slices import ExpertSlice

__all__ = ["NOISE", "Ranker"]

Key = tuple[int, int]  # (layer, expert)
MIN_PAGES = 64  # pages sampled per expert at least, where its slices have that many
# A score at or below this is no evidence of use: a slice seen resident once in fifty samples,
# or a page shared with a used neighbour.  Nothing is held on it, nor swapped for it.
NOISE = 0.02


def _interior(start: int, end: int, page: int) -> tuple[int, int]:
    """The pages a slice has to itself: its boundary pages are shared with the neighbouring
    experts (slices are not page aligned), whose reads would count as this one's.  A slice
    shorter than that keeps its rounded-out pages."""
    lo, hi = -(-start // page) * page, end // page * page
    if hi <= lo:
        lo, hi = start // page * page, -(-end // page) * page
    return lo, hi - lo


class Ranker:
    """Per-(layer, expert) hotness from residency samples of the expert slices.

    ``half_life``: samples after which an observation weighs half (use that shifts is followed
    within a few half-lives).  ``max_slices``: at most this many slices per ``sample`` call, in
    round-robin order (bounds one pass's cost; the default samples all of them).
    """

    def __init__(self, slices: Iterable[ExpertSlice], *, half_life: float = 128.0, max_slices: int | None = None,
                 page_size: int = _platform.PAGE_SIZE) -> None:
        self.slices: tuple[ExpertSlice, ...] = tuple(slices)
        self.keys: tuple[Key, ...] = tuple((s.layer, s.expert) for s in self.slices)
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._alpha = 1.0 - 0.5 ** (1.0 / half_life)
        self.max_slices = max_slices or len(self.slices)
        # Per file: (slice index, offset, length) of every sampled interior range, in file order.
        self._ranges: dict[int, list[tuple[int, int, int]]] = {}
        self._pages = [0] * len(self.slices)
        for i, s in enumerate(self.slices):
            # The engine reads an expert's tensors (gate, up, down) together, so one of them
            # carries the signal: the largest, at a third of the syscalls, and more only while the
            # expert has fewer than MIN_PAGES pages sampled (a fraction of a few pages is noise).
            for file, start, end in sorted(s.ranges, key=lambda r: r[1] - r[2]):
                offset, length = _interior(start, end, page_size)
                self._ranges.setdefault(file, []).append((i, offset, length))
                self._pages[i] += length // page_size
                if self._pages[i] >= MIN_PAGES:
                    break
        for ranges in self._ranges.values():
            ranges.sort(key=lambda r: r[1])  # file order: the mincore fallback spans them
        self._page_size = page_size
        n = len(self.slices)
        self._resident = [0.0] * n  # EMA of the resident fraction
        self._risen = [0.0] * n  # EMA of the fraction that became resident since the last sample
        # The share of each EMA that rests on samples rather than on its zero start: scores are
        # the EMAs over it, so that a slice sampled 12 times and one sampled 40 times (a held
        # expert's score stands while the others go on) are on one scale.
        self._weight = [0.0] * n
        self._last: list[int | None] = [None] * n  # resident pages at the last sample
        self._peak = [0] * n  # the most resident pages a sample has seen
        # Per pass, newest last: (pages that came back after a sample had seen them resident and
        # a later one had seen them gone, i.e. read again after an eviction; pages sampled).  A
        # first read (the engine's load) is not one, so this tells an engine that loses what it
        # uses from one whose reads fit (``refault_share``).
        self._refaults: deque[tuple[int, int]] = deque(maxlen=64)
        self._cursor = 0
        self.passes = 0
        self.first_sample: float | None = None  # time.time() of the first and the last pass
        self.last_sample: float | None = None
        self.last_pass_seconds: float | None = None  # CPU seconds the last pass cost this process
        self.method: str | None = None  # "cachestat" or "mincore", once a pass ran

    # -- sampling -----------------------------------------------------------------------

    def sample(self, fds: Sequence[int] | Mapping[int, int], *, held: Iterable[Key] = ()) -> None:
        """One pass: the residency of the next ``max_slices`` slices (all by default).

        ``fds[file]`` is an open descriptor of the layout's file ``file``.  Slices in ``held``
        are skipped: their pages stay resident for the holder's sake, so they say nothing
        about the engine, and their last score stands."""
        cpu = time.process_time()
        n = len(self.slices)
        if not n:
            return
        count = min(self.max_slices, n)
        chosen = {(self._cursor + k) % n for k in range(count)}
        self._cursor = (self._cursor + count) % n
        skip = {self._index[k] for k in held if k in self._index}
        resident = [0] * n
        for file, ranges in self._ranges.items():
            todo = [(i, off, length) for i, off, length in ranges if i in chosen and i not in skip]
            for (i, _, _), pages in zip(todo, self._resident_pages(fds[file], todo)):
                resident[i] += pages
        a = self._alpha
        refaulted = sampled = 0
        for i in chosen - skip:
            sampled += self._pages[i]
            pages = self._pages[i] or 1
            fraction = resident[i] / pages
            last = self._last[i]
            risen = 0.0 if last is None else max(0, resident[i] - last) / pages
            if last is not None:
                refaulted += min(max(0, resident[i] - last), max(0, self._peak[i] - last))
            self._peak[i] = max(self._peak[i], resident[i])
            self._resident[i] += a * (fraction - self._resident[i])
            self._risen[i] += a * (risen - self._risen[i])
            self._weight[i] += a * (1.0 - self._weight[i])
            self._last[i] = resident[i]
        self._refaults.append((refaulted, sampled))
        self.passes += 1
        now = time.time()
        self.first_sample = self.first_sample or now
        self.last_sample = now
        self.last_pass_seconds = time.process_time() - cpu

    def _resident_pages(self, fd: int, todo: list[tuple[int, int, int]]) -> list[int]:
        counts = _platform.cache_counts(fd, [(off, length) for _, off, length in todo])
        if counts is not None:
            self.method = "cachestat"
            return [c[0] for c in counts]
        # mincore fallback: one vector over the span of the ranges (the platform maps it in
        # windows), counted per range, rather than a mapping per slice.
        self.method = "mincore"
        if not todo:
            return []
        page = self._page_size
        lo = min(off for _, off, _ in todo)
        vector = _platform.resident_pages(fd, lo, max(off + length for _, off, length in todo) - lo)
        return [vector[(off - lo) // page:(off + length - lo) // page].count(1) for _, off, length in todo]

    # -- what was learned ---------------------------------------------------------------

    def refault_share(self, passes: int) -> float:
        """The share of the sampled pages read again after an eviction over the last ``passes``
        passes (fewer if fewer were taken; 0.0 before any)."""
        recent = list(self._refaults)[-passes:] if passes > 0 else []
        sampled = sum(n for _, n in recent)
        return sum(r for r, _ in recent) / sampled if sampled else 0.0

    def scores(self) -> dict[Key, float]:
        """(layer, expert) -> score in [0, 2]: higher is hotter; 0.0 for a slice never sampled."""
        return {k: (self._resident[i] + self._risen[i]) / self._weight[i] if self._weight[i] else 0.0
                for i, k in enumerate(self.keys)}

    def ranking(self) -> list[Key]:
        """Every (layer, expert), hottest first (ties: layer, then expert)."""
        scores = self.scores()
        return sorted(self.keys, key=lambda k: (-scores[k], k))

    def stable_top(self, n: int, held: Iterable[Key] = (), margin: float = 0.25) -> list[Key]:
        """The ``n`` hottest, hottest first, with hysteresis: a held slice stays unless the
        newcomer that would take its place scores more than ``(1 + margin)`` times as much
        (plus a small constant, so near-zero noise moves nothing).  Membership then changes
        when use shifts, not when two neighbours' scores cross back and forth."""
        scores = self.scores()
        order = self.ranking()
        top = order[:max(n, 0)]
        members = set(top)
        held = [k for k in dict.fromkeys(held) if k in scores]
        leaving = sorted((k for k in held if k not in members), key=lambda k: (-scores[k], k))
        newcomers = sorted((k for k in top if k not in set(held)), key=lambda k: (scores[k], k))
        for old, new in zip(leaving, newcomers):
            if scores[new] > scores[old] * (1 + margin) + NOISE:
                break  # the weakest remaining newcomer clearly beats the strongest leaver
            members.discard(new)
            members.add(old)
        return sorted(members, key=lambda k: (-scores[k], k))

    # -- profiles -----------------------------------------------------------------------

    def from_profile(self, profile) -> Ranker:
        """Start from a profile's scores (keys the model lacks are ignored); returns self.

        The scores weigh as the samples the profile rests on (``profile.samples``, at least one):
        this run's samples then move them as they would have moved the run that wrote it."""
        weight = 1.0 - (1.0 - self._alpha) ** max(int(profile.samples or 0), 1)
        for key, score in profile.scores.items():
            i = self._index.get(key)
            if i is not None and math.isfinite(score):
                self._resident[i] = min(max(score, 0.0), 2.0) * weight
                self._risen[i] = 0.0
                self._weight[i] = weight
        return self

    def to_profile(self, model):
        """The profile of what was learned, for the model ``model`` (profile.ModelIdentity)."""
        from .profile import Profile

        span = None if self.first_sample is None else self.last_sample - self.first_sample
        return Profile(model=model, scores=self.scores(), samples=self.passes, seconds=span,
                       created=time.time(), method=self.method)
