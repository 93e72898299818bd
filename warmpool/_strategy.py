"""The names of the ways a worker faults pages in: the one list that the API, the pool and the
CLI check against (what each does: ``_worker._ChunkWarmer``).  Kept apart from ``_worker`` so
that checking a name imports nothing heavy (``_worker`` pulls in multiprocessing)."""

from __future__ import annotations

from ._errors import WarmError

__all__ = ["STRATEGIES", "check_strategy"]

STRATEGIES = ("populate", "touch", "read", "willneed")


def check_strategy(strategy: str, *, allow_auto: bool) -> None:
    """Raise WarmError unless ``strategy`` is one of ``STRATEGIES`` (or ``auto``, where allowed)."""
    if strategy not in STRATEGIES and not (allow_auto and strategy == "auto"):
        names = ", ".join(("auto", *STRATEGIES) if allow_auto else STRATEGIES)
        raise WarmError(f"unknown strategy {strategy!r}: expected one of {names}")
