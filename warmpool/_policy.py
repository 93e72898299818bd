"""Whether to warm, and how much: every decision with its reason.

* ``WARMPOOL_PREFAULT=0`` skips (the engine asked for no warm), ``=1`` forces (no budget).
* The budget is 80% of the smaller of physical RAM and the cgroup's limit (v2 ``memory.max``,
  v1 ``memory.limit_in_bytes``; page
  cache is charged to the cgroup of the process that first reads a page, so inside a
  container the limit is the real ceiling), and never more than the memory available now:
  warming past it would only evict what we just read, or push the engine into reclaim.
* Only bytes not yet resident count against it: resident pages cost nothing.
* When the selection does not fit, warm in plan order up to the budget and say exactly what
  stays cold: the early layers an engine needs first are then warm, which beats the
  all-or-nothing skip that engines do today.

Memory figures are injected (``MemoryFigures``) by tests; ``memory_figures()`` reads them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from ._units import format_bytes

__all__ = ["BUDGET_FRACTION", "Decision", "MemoryFigures", "decide", "memory_figures"]

BUDGET_FRACTION = 0.8


class MemoryFigures(NamedTuple):
    total: int  # physical RAM
    available: int  # MemAvailable, lowered to the cgroup's headroom (limit - usage + inactive file) when smaller
    cgroup_limit: int | None  # cgroup v2 memory.max, None when unlimited or absent


class Decision(NamedTuple):
    action: str  # "warm", "partial", "skip" or "none" (nothing to do)
    chunks: tuple[int, ...]  # indices of the chunks to warm, in plan order
    budget: int | None  # bytes of cold pages allowed; None when forced
    bytes_cold: int  # cold bytes of the whole selection
    bytes_left_cold: int  # cold bytes this decision leaves cold
    reason: str


def memory_figures() -> MemoryFigures:
    from . import _platform

    ram = _platform.physical_memory()
    if ram is None:  # no /proc/meminfo: psutil knows this platform's way
        import psutil

        vm = psutil.virtual_memory()
        ram = vm.total, vm.available
    total, available = ram
    cgroup = _platform.cgroup_memory()
    limit = cgroup.limit if cgroup else None
    if limit is not None:
        # A cgroup's usage counts its page cache, and a busy cgroup sits at its limit with cache
        # the kernel reclaims at the next allocation. Like MemAvailable (and kubelet's working
        # set), count the inactive file pages as available, or nothing is ever warmed there.
        available = min(available, max(limit - (cgroup.usage - cgroup.inactive_file), 0))
    return MemoryFigures(total, available, limit)


def _budget(memory: MemoryFigures, budget: int | None) -> tuple[int, str]:
    if budget is not None:
        return budget, f"--budget {format_bytes(budget)}"
    ceiling = min(memory.total, memory.cgroup_limit or memory.total)
    where = "cgroup memory.max" if memory.cgroup_limit and memory.cgroup_limit < memory.total else "physical RAM"
    amount = min(int(ceiling * BUDGET_FRACTION), memory.available)
    limit_by = "available memory" if amount == memory.available else f"{BUDGET_FRACTION:.0%} of {where}"
    return amount, f"budget {format_bytes(amount)} ({limit_by})"


def decide(cold: Sequence[int], *, env: Mapping[str, str] | None = None, force: bool = False,
           budget: int | None = None, memory: MemoryFigures | None = None) -> Decision:
    """Choose the chunks to warm; ``cold[i]`` is the non-resident bytes of chunk i (plan order)."""
    env = os.environ if env is None else env
    total_cold = sum(cold)
    every = tuple(i for i, c in enumerate(cold) if c)
    prefault = env.get("WARMPOOL_PREFAULT", "").strip()
    if prefault == "0":
        return Decision("skip", (), None, total_cold, total_cold, "WARMPOOL_PREFAULT=0: warm skipped")
    if not total_cold:
        return Decision("none", (), None, 0, 0, "the selection is already resident")
    if force or prefault == "1":
        why = "--force" if force else "WARMPOOL_PREFAULT=1"
        return Decision("warm", every, None, total_cold, 0, f"{why}: warming everything, no budget")
    allowed, why = _budget(memory or memory_figures(), budget)
    if total_cold <= allowed:
        return Decision("warm", every, allowed, total_cold, 0, f"{format_bytes(total_cold)} cold fits the {why}")
    chosen, spent = [], 0
    for i in every:
        if spent + cold[i] > allowed:
            break  # plan order: stop at the first chunk that does not fit, keep layers contiguous
        chosen.append(i)
        spent += cold[i]
    left = total_cold - spent
    return Decision("partial" if chosen else "skip", tuple(chosen), allowed, total_cold, left,
                    f"{format_bytes(total_cold)} cold exceeds the {why}: "
                    f"{'warming the first ' + str(len(chosen)) + ' chunks in plan order, ' if chosen else ''}"
                    f"{format_bytes(left)} left cold")
