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

__all__ = ["BUDGET_FRACTION", "Decision", "MemoryFigures", "decide", "memory_figures"]

BUDGET_FRACTION = 0.8
CGROUP = "/sys/fs/cgroup"


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


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded LONG_MAX


def _cgroup_files() -> tuple[str, str] | None:
    """(limit file, usage file) of this process's memory cgroup: v2, else v1."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and os.path.exists(f"{CGROUP}{path}/memory.max"):
            return f"{CGROUP}{path}/memory.max", f"{CGROUP}{path}/memory.current"
        if "memory" in controllers.split(","):
            base = f"{CGROUP}/memory{path}"
            return f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes"
    return None


def _inactive_file(cgroup_dir: str) -> int:
    """The cgroup's inactive file pages (memory.stat: v2 ``inactive_file``, v1 ``total_inactive_file``)."""
    try:
        with open(f"{cgroup_dir}/memory.stat") as f:
            stat = dict(line.split() for line in f if line.count(" ") == 1)
    except OSError:
        return 0
    return int(stat.get("total_inactive_file", stat.get("inactive_file", 0)))


def memory_figures() -> MemoryFigures:
    from . import _platform

    ram = _platform.physical_memory()
    if ram is None:  # no /proc/meminfo: psutil knows this platform's way
        import psutil

        vm = psutil.virtual_memory()
        ram = vm.total, vm.available
    total, available = ram
    files = _cgroup_files()
    limit = _read_int(files[0]) if files else None  # "max" (v2) reads as None
    limit = limit if limit is not None and limit < UNLIMITED else None
    if limit is not None:
        # A cgroup's usage counts its page cache, and a busy cgroup sits at its limit with cache
        # the kernel reclaims at the next allocation. Like MemAvailable (and kubelet's working
        # set), count the inactive file pages as available, or nothing is ever warmed there.
        usage = (_read_int(files[1]) or 0) - _inactive_file(os.path.dirname(files[1]))
        available = min(available, max(limit - usage, 0))
    return MemoryFigures(total, available, limit)


def _budget(memory: MemoryFigures, budget: int | None) -> tuple[int, str]:
    if budget is not None:
        return budget, f"--budget {budget / 2**30:.2f} GiB"
    ceiling = min(memory.total, memory.cgroup_limit or memory.total)
    where = "cgroup memory.max" if memory.cgroup_limit and memory.cgroup_limit < memory.total else "physical RAM"
    amount = min(int(ceiling * BUDGET_FRACTION), memory.available)
    limit_by = "available memory" if amount == memory.available else f"{BUDGET_FRACTION:.0%} of {where}"
    return amount, f"budget {amount / 2**30:.2f} GiB ({limit_by})"


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
        return Decision("warm", every, allowed, total_cold, 0, f"{total_cold / 2**30:.2f} GiB cold fits the {why}")
    chosen, spent = [], 0
    for i in every:
        if spent + cold[i] > allowed:
            break  # plan order: stop at the first chunk that does not fit, keep layers contiguous
        chosen.append(i)
        spent += cold[i]
    left = total_cold - spent
    return Decision("partial" if chosen else "skip", tuple(chosen), allowed, total_cold, left,
                    f"{total_cold / 2**30:.2f} GiB cold exceeds the {why}: "
                    f"{'warming the first ' + str(len(chosen)) + ' chunks in plan order, ' if chosen else ''}"
                    f"{left / 2**30:.2f} GiB left cold")
