"""One exception tree for everything warmpool raises::

    WarmpoolError
    ├── LayoutError           the file is not a GGUF warmpool can read
    ├── SelectionError        a placement flag is malformed
    ├── ModelNotFoundError    a reference names no file and no stored model
    ├── AmbiguousModelError   a reference names several models
    ├── EngineArgsError       an engine command line cannot be read
    ├── UsageError            a command line is incomplete (the CLI exits 2)
    ├── PlatformError         an OS call failed
    ├── ProgressError         a progress segment is missing, foreign or unknown
    └── WarmError             a warm could not complete
        ├── WorkerDiedError   a worker ended without reporting
        ├── FileChangedError  the model file changed under the warm
        └── CancelledError    the warm was cancelled

Every error is a :class:`WarmpoolError`.  Errors cross process boundaries (a worker
process reports a failure to the coordinator through a pipe), so each class pickles
with its message and the file it concerns intact: ``__reduce__`` rebuilds it from
``(message, path)`` instead of relying on ``Exception.args``.
"""

from __future__ import annotations

import os

__all__ = [
    "AmbiguousModelError",
    "CancelledError",
    "EngineArgsError",
    "FileChangedError",
    "LayoutError",
    "ModelNotFoundError",
    "PlatformError",
    "ProfileError",
    "ProgressError",
    "SelectionError",
    "UsageError",
    "WarmError",
    "WarmpoolError",
    "WorkerDiedError",
]


class WarmpoolError(Exception):
    """Base of every error warmpool raises; ``str()`` is one line naming the file."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def __reduce__(self):  # keep (message, path) across pickling
        return (type(self), (self.message, self.path))


class LayoutError(WarmpoolError):
    """The model file (or one of its shards) is not a GGUF warmpool can read."""


class SelectionError(WarmpoolError):
    """A selection flag is malformed (bad regex, negative layer count, ...)."""


class PlatformError(WarmpoolError):
    """An OS call failed in a way that is neither the file's fault nor the caller's."""


class ProfileError(WarmpoolError):
    """An expert profile is unreadable, of another format or major version, or of another model."""


class ProgressError(WarmpoolError):
    """A progress segment is missing, foreign or of an unknown version."""


class WarmError(WarmpoolError):
    """A warm could not complete."""


class WorkerDiedError(WarmError):
    """A worker process ended without reporting (SIGKILL, OOM killer, crash)."""


class FileChangedError(WarmError):
    """The model file was truncated or replaced while it was being warmed."""


class CancelledError(WarmError):
    """The warm was cancelled (``Warmup.cancel()``) before it finished."""


class ModelNotFoundError(WarmpoolError):
    """A model reference matched no file: no such path, and no store holds that name."""


class AmbiguousModelError(WarmpoolError):
    """A model reference names more than one model (a directory or repository holding several)."""


class EngineArgsError(WarmpoolError):
    """An engine's command line cannot be read (a flag without its value, a bad number)."""


class UsageError(WarmpoolError):
    """A command line is incomplete (the CLI exits 2, as for argparse's own usage errors)."""
