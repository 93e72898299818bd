"""One warm's lifetime: create its progress segment, run the pool, settle and unlink.

The segment is unlinked on every way out (success, error, Ctrl-C, a dead worker, cancel).
Readers that attached before keep a valid mapping and see the final state; ``linger`` keeps
the name for late readers of a detached warm (``warmpool warm --detach``) a little longer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .._plan import Plan
from .._progress.segment import ProgressSegment
from .coordinator import AUTO_MAX, PoolResult, run_pool

__all__ = ["run_warm"]


def run_warm(plan: Plan, paths: Sequence[str], chosen: Sequence[int], before: Sequence[int], strategy: str,
             workers: int | None, on_start: Callable[[str], None] | None, should_stop, linger: float = 0.0,
             require_name: bool = False, priority: str = "normal") -> PoolResult:
    total = sum(plan.chunks[i].length for i in chosen)
    # The segment's context manager settles every way out (cancelled or failed: one rule, in
    # ProgressSegment._settle), then unlinks and unmaps.
    with ProgressSegment.create(total, workers or AUTO_MAX, plan.chunks, plan.n_layers, require_name) as segment:
        for index, (chunk, resident) in enumerate(zip(plan.chunks, before)):
            if resident >= chunk.length:
                segment.set_chunk_state(index, "done")  # warm already: its layers are ready
        segment.set_state("running")
        if on_start:
            on_start(segment.name)
        outcome = run_pool(paths, plan.chunks, chosen, strategy, segment, workers, should_stop, priority)
        segment.set_state("done")
        if linger and segment.named:  # only a name can have late readers
            time.sleep(linger)
        return outcome
