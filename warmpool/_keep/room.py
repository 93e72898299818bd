"""How many bytes a keeper may hold (and lock) without starving the engine beside it.

Locked pages cannot be reclaimed (mm/mlock.c moves them to the unevictable list), and mapped
pages that are referenced every second are the last file pages reclaim takes.  In a memory
cgroup at its limit the engine's next fault must find reclaimable memory in the same cgroup;
when it cannot, the cgroup's OOM killer runs (mm/memcontrol.c ``mem_cgroup_out_of_memory``)
and picks the biggest task, which the keeper holding the locked pages is.  So the keeper holds
at most the cgroup's limit (and RAM) minus what others cannot give back (anonymous memory,
unevictable pages that are not ours) minus a headroom left for the engine's own page cache:
``HEADROOM_MIN`` or ``HEADROOM_FRACTION`` of the limit, whichever is larger (``--headroom``).
docs/keep.md, "When the model does not fit".
"""

from __future__ import annotations

from typing import NamedTuple

from .. import _platform
from .._units import format_bytes

__all__ = ["HEADROOM_FRACTION", "HEADROOM_MIN", "Room", "room"]

# 512 MiB is a few tokens' worth of misses for a large MoE read with 8 MiB read-ahead; 10% scales
# it for the big hosts where one token reads more.
HEADROOM_MIN = 512 << 20
HEADROOM_FRACTION = 0.10


class Room(NamedTuple):
    bytes: int | None  # most bytes the keeper may hold now; None: nothing known to limit it
    headroom: int | None  # what it leaves free for the engine
    why: str  # which limit decided, for messages


def room(ours_locked: int, headroom: int | None = None) -> Room:
    """The bytes the keeper may hold now, given the ``ours_locked`` bytes it has mlocked (they
    count against the cgroup and RAM already, and are given back by a shrink)."""
    limits: list[tuple[int, str]] = []
    ram = _platform.physical_memory()
    cgroup = _platform.cgroup_memory()
    ceiling = min([x for x in (ram and ram[0], cgroup and cgroup.limit) if x] or [0])
    if not ceiling:
        return Room(None, headroom, "no RAM or memory cgroup figures here")
    spare = headroom if headroom is not None else max(HEADROOM_MIN, int(ceiling * HEADROOM_FRACTION))
    if ram is not None:
        total, available = ram
        # MemAvailable leaves out mlocked pages (they are off the file LRU), ours among them.
        others = max(total - available - ours_locked, 0)
        limits.append((total - spare - others, f"RAM {format_bytes(total)}, {format_bytes(others)} not reclaimable"))
    if cgroup is not None and cgroup.limit is not None:
        # Ours are taken off the unevictable pages only: the kernel moves pages to that list
        # lazily (per-CPU batches), so right after an mlock it can count fewer than we locked.
        others = cgroup.anon + max(cgroup.unevictable - ours_locked, 0)
        limits.append((cgroup.limit - spare - others,
                       f"{cgroup.limit_file} {format_bytes(cgroup.limit)}, {format_bytes(others)} of it anonymous "
                       "or unevictable"))
    amount, why = min(limits)
    return Room(max(amount, 0), spare, f"{why}, {format_bytes(spare)} left for the engine")
