"""What a keeper holds when the selection does not fit: the dense CPU tensors, then the hottest
experts.

Every token needs the dense tensors (attention, norms, router, shared experts, embeddings); of
the stacked expert tensors only the experts the router picks.  With a skewed router a few
experts take most reads, so the bytes left after the dense part go to the experts the ranking
(``_experts.ranking.Ranker``, learned from residency samples or read from a profile) puts first.
Re-ranking swaps at most ``CHURN`` of the held experts per check, and the ranker's
``stable_top`` keeps an expert held until it has clearly fallen behind (hysteresis), so the
held set does not flap with sampling noise.  docs/keep.md, "When the model does not fit".
"""

from __future__ import annotations

from .._experts.ranking import NOISE
from .._plan import Chunk, Plan, page_span, plan_tensors

__all__ = ["CHURN", "HotExperts", "expert_chunks"]

# Most held experts swapped per check: a sixteenth (at least 4), so one noisy sample moves a few
# experts, not the set, while a real shift is followed within a few minutes at a 10 s interval.
CHURN = 1 / 16
CHURN_MIN = 4

Key = tuple[int, int]  # (layer, expert)


def expert_chunks(ranges, sizes, layer: int) -> tuple[Chunk, ...]:
    """An expert's byte ranges as page-aligned chunks (rounded out to whole pages, clipped at
    the end of the file): what is mapped, locked and measured for it."""
    out = []
    for file, start, end in ranges:
        lo, hi = page_span(start, end, sizes[file])
        out.append(Chunk(file, lo, hi - lo, layer, layer))
    return tuple(out)


class HotExperts:
    """The dense chunks of a plan, its experts as chunks, and a ranker of the experts; None
    from ``of`` for a plan without stacked expert tensors."""

    def __init__(self, plan: Plan, slices, ranker) -> None:
        from .._experts.slices import EXPERT_TENSOR

        self.ranker = ranker
        self.slices = {(s.layer, s.expert): s for s in slices}
        sizes = [f.size for f in plan.files]
        self._chunks = {k: expert_chunks(s.ranges, sizes, s.layer) for k, s in self.slices.items()}
        self._bytes = {k: sum(c.length for c in cs) for k, cs in self._chunks.items()}
        dense = [t for t in plan.selected if not EXPERT_TENSOR.match(t.name)]
        self.dense = plan_tensors(plan.layout, plan.selection, dense, plan.chunk_size).chunks
        self.dense_bytes = sum(c.length for c in self.dense)
        # True until the ranking is learned (no profile): the keeper holds no experts meanwhile,
        # and its first re-ranking fills the room whole, not CHURN at a time.
        self.provisional = True
        # Learned, but the engine lost nothing it reads since: no experts held (keeper.ASIDE_PASSES).
        self.aside = False

    @classmethod
    def of(cls, plan: Plan, profile=None) -> HotExperts | None:
        """The experts of the plan's selection with a fresh ranker (seeded from ``profile``, a
        read ``_experts.profile.Profile``, when given)."""
        from .._experts.ranking import Ranker
        from .._experts.slices import expert_slices

        slices = expert_slices(plan.layout, {t.name for t in plan.selected})
        if not slices:
            return None
        ranker = Ranker(slices)
        if profile is not None:
            ranker.from_profile(profile)
        hot = cls(plan, slices, ranker)
        hot.provisional = profile is None
        return hot

    @property
    def total(self) -> int:
        return len(self.slices)

    def chunks(self, key: Key) -> tuple[Chunk, ...]:
        return self._chunks[key]

    def nbytes(self, key: Key) -> int:
        return self._bytes[key]

    def fill(self, room: int) -> list[Key]:
        """The experts to hold first: in ranking order, while they fit in ``room`` bytes after
        the dense part, and only those with some evidence of use (score above ``NOISE``): an
        expert the engine never reads costs its bytes and the read that brings it in."""
        left, chosen, scores = room - self.dense_bytes, [], self.ranker.scores()
        for key in self.ranker.ranking():
            if scores[key] <= NOISE:
                break
            if self._bytes[key] <= left:
                chosen.append(key)
                left -= self._bytes[key]
        return chosen

    def rerank(self, room: int, held: list[Key], *, bounded: bool = True) -> tuple[list[Key], list[Key]]:
        """(add, drop): the experts to take in, hottest first, and the held ones to let go,
        coldest first, so that the held set follows the ranking within ``room`` bytes, at most
        ``CHURN`` of it per call (``bounded``; unbounded fills the room at once, once learned)."""
        held_set = set(held)
        left = room - self.dense_bytes - sum(self._bytes[k] for k in held)
        drop = self.over(-left, held) if left < 0 else []
        kept = held_set - set(drop)
        ranking = self.ranker.ranking()
        n, fits = 0, room - self.dense_bytes
        for key in ranking:  # how many of the hottest fit: the size of the top to keep
            fits -= self._bytes[key]
            if fits < 0:
                break
            n += 1
        top = set(self.ranker.stable_top(n, kept))
        scores = self.ranker.scores()
        wanted = [k for k in ranking if k in top and k not in kept and scores[k] > NOISE]
        leaving = [k for k in reversed(ranking) if k in kept and k not in top]
        limit = max(CHURN_MIN, int(len(held) * CHURN)) if bounded else len(wanted)
        left += sum(self._bytes[k] for k in drop)
        add: list[Key] = []
        for key in wanted[:limit]:
            while self._bytes[key] > left and leaving:
                gone = leaving.pop(0)
                drop.append(gone)
                left += self._bytes[gone]
            if self._bytes[key] > left:
                break
            add.append(key)
            left -= self._bytes[key]
        return add, drop

    def over(self, excess: int, held: list[Key]) -> list[Key]:
        """The coldest held experts whose bytes cover ``excess`` (a shrink)."""
        scores = self.ranker.scores()
        drop, freed = [], 0
        for key in sorted(held, key=lambda k: scores.get(k, 0.0)):
            if freed >= excess:
                break
            drop.append(key)
            freed += self._bytes[key]
        return drop

    def held_score_share(self, held: list[Key]) -> float | None:
        """The held experts' share of the ranker's summed scores: an estimate of the share of
        expert reads that find their expert held, as good as the scores are a measure of use
        (they are residency averages, not read counts, and a held expert's score stands as it
        was when it was taken in).  None before anything is learned."""
        scores = self.ranker.scores()
        total = sum(scores.values())
        if not total:
            return None
        return sum(scores.get(k, 0.0) for k in held) / total
