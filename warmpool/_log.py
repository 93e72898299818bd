"""warmpool's logger: loguru, imported on first use and disabled until an application asks.

A library should not print into its host's stderr unasked (loguru's own advice for
libraries), so ``warmpool`` logs are disabled at first use; the CLI enables them, and an
engine can with ``loguru.logger.enable("warmpool")``.  Importing loguru costs tens of ms, so it
is deferred until something is logged: ``read_layout`` at engine start never pays it.
"""

from __future__ import annotations

__all__ = ["enable_cli_logging", "logger"]


class _LazyLogger:
    def __getattr__(self, name: str):
        from loguru import logger as real

        if not getattr(real, "_warmpool_configured", False):
            real.disable("warmpool")
            real._warmpool_configured = True
        globals()["logger"] = real  # later lookups through the module get loguru directly
        return getattr(real, name)


logger = _LazyLogger()


def enable_cli_logging(verbose: bool) -> None:
    """Decisions and fallbacks to stderr: INFO with -v, warnings otherwise."""
    import sys

    from loguru import logger as real

    real.remove()
    real.add(sys.stderr, level="INFO" if verbose else "WARNING", format="warmpool: {message}")
    real.enable("warmpool")
    real._warmpool_configured = True
