"""warmpool's logger: the standard library's ``logging.getLogger("warmpool")``.

A library host (an engine) that configures no logging pays one level check per message: the
logger has a ``NullHandler``, so nothing reaches ``logging.lastResort`` either, and nothing
beyond the stdlib ``logging`` module is imported.  A host that wants the messages configures
the "warmpool" logger like any other (``logging.basicConfig(level=logging.INFO)``).

The CLI calls :func:`enable_cli_logging`: one stderr handler with a ``warmpool:`` prefix,
INFO with ``-v``, warnings otherwise (docs/design.md, "Import cost").
"""

from __future__ import annotations

import logging
import sys

__all__ = ["enable_cli_logging", "logger"]

logger = logging.getLogger("warmpool")
logger.addHandler(logging.NullHandler())

_cli_handler: logging.Handler | None = None


def enable_cli_logging(verbose: bool) -> None:
    """Decisions and fallbacks to stderr: INFO with -v, warnings otherwise (idempotent)."""
    global _cli_handler
    if _cli_handler is None:
        _cli_handler = logging.StreamHandler(sys.stderr)
        _cli_handler.setFormatter(logging.Formatter("warmpool: %(message)s"))
        logger.addHandler(_cli_handler)
        logger.propagate = False  # the CLI's own line only, whatever the root logger does
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
