"""warmpool's logger: loguru, imported only when a message will actually be shown.

Importing loguru costs ~80 ms here (it pulls in asyncio), more than everything else a warm of
an already-resident model does, so:

* In the CLI, messages below the chosen level (INFO without ``-v``) are dropped before loguru
  is imported; a warning, or ``-v``, imports and configures it.
* In a library host (an engine), warmpool logs through loguru, disabled for "warmpool" at
  first use as loguru advises for libraries; enable with ``loguru.logger.enable("warmpool")``.
"""

from __future__ import annotations

import sys

__all__ = ["enable_cli_logging", "logger"]

_LEVELS = {"trace": 5, "debug": 10, "info": 20, "success": 25, "warning": 30, "error": 40, "critical": 50}
_cli_threshold: int | None = None  # set by the CLI; None in a library host


def _loguru():
    from loguru import logger as real

    if not getattr(real, "_warmpool_configured", False):
        if _cli_threshold is None:
            real.disable("warmpool")
        else:
            real.remove()
            level = "INFO" if _cli_threshold <= _LEVELS["info"] else "WARNING"
            real.add(sys.stderr, level=level, format="warmpool: {message}")
            real.enable("warmpool")
        real._warmpool_configured = True
    return real


def _drop(*args, **kwargs) -> None:
    return None


class _LazyLogger:
    """Stands in for loguru's logger until a message needs it."""

    def __getattr__(self, name: str):
        if _cli_threshold is not None and _LEVELS.get(name, 100) < _cli_threshold:
            return _drop
        return getattr(_loguru(), name)


logger = _LazyLogger()


def enable_cli_logging(verbose: bool) -> None:
    """Decisions and fallbacks to stderr: INFO with -v, warnings otherwise."""
    global _cli_threshold
    _cli_threshold = _LEVELS["info"] if verbose else _LEVELS["warning"]
    if verbose:
        _loguru()
