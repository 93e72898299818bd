"""The names of the ways a worker faults pages in, and of the CPU priorities it runs at: the
one list of each that the API, the pool and the CLI check against (what each strategy does:
``_worker._ChunkWarmer``; a priority: ``_platform.lower_priority``).  Kept apart from
``worker`` so that checking a name does not import the worker's platform and progress code."""

from __future__ import annotations

from .._errors import WarmError

__all__ = ["PRIORITIES", "STRATEGIES", "check_priority", "check_strategy"]

STRATEGIES = ("populate", "touch", "read", "willneed")
# "idle": the workers take only CPU time nothing else wants; for a warm beside an engine that is
# loading the same file, so the workers leave the engine its CPU (docs/design.md, "Worker processes").
PRIORITIES = ("normal", "idle")


def check_strategy(strategy: str, *, allow_auto: bool) -> None:
    """Raise WarmError unless ``strategy`` is one of ``STRATEGIES`` (or ``auto``, where allowed)."""
    if strategy not in STRATEGIES and not (allow_auto and strategy == "auto"):
        names = ", ".join(("auto", *STRATEGIES) if allow_auto else STRATEGIES)
        raise WarmError(f"unknown strategy {strategy!r}: expected one of {names}")


def check_priority(priority: str) -> None:
    """Raise WarmError unless ``priority`` is one of ``PRIORITIES``."""
    if priority not in PRIORITIES:
        raise WarmError(f"unknown priority {priority!r}: expected one of {', '.join(PRIORITIES)}")
