"""Synthetic qwen3moe GGUF models that real llama.cpp loads and runs (docs/design.md).

Used by the README's built-in example (generated once into the user's cache), the tests'
fixtures and the GB-scale benchmarks in ``tools/``.  ``_model`` holds the shape (tensors,
metadata, exact size; stdlib only), ``_writer`` writes it (numpy and gguf, imported inside).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from warmpool._errors import PlatformError

from ._model import BENCH, EXAMPLE, TEST, TINY, MoeShape, model_nbytes, shape_for_size
from ._writer import write_moe_gguf

__all__ = [
    "BENCH",
    "EXAMPLE",
    "MoeShape",
    "TEST",
    "TINY",
    "example_model",
    "model_nbytes",
    "shape_for_size",
    "write_moe_gguf",
]

EXAMPLE_FILENAME = "warmpool-example-qwen3moe-v1.gguf"  # bump the version when EXAMPLE changes


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("WARMPOOL_CACHE"):
        return Path(os.environ["WARMPOOL_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "warmpool"


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def example_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The built-in example model (EXAMPLE shape, ~300 MB), generated on first use.

    Looked up in ``cache_dir``, else ``$WARMPOOL_CACHE``, ``$XDG_CACHE_HOME/warmpool`` or
    ``~/.cache/warmpool``.  A file of the expected size is reused without importing numpy or
    gguf; any other is regenerated.  Concurrent callers serialize on a lock file so the model
    is written once; the write itself is atomic even without the lock.
    """
    import fcntl

    directory = _cache_dir(cache_dir)
    path = directory / EXAMPLE_FILENAME
    expected = model_nbytes(EXAMPLE)
    if _has_size(path, expected):
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / (EXAMPLE_FILENAME + ".lock"), "a")  # noqa: SIM115 - held below
    except OSError as exc:
        raise PlatformError(f"cannot use the cache directory: {exc}", directory) from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not _has_size(path, expected):  # another process may have written it meanwhile
            # Under the lock no other example writer runs: scratch left here is from a killed one.
            for stale in directory.glob(f".{EXAMPLE_FILENAME}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            write_moe_gguf(path, EXAMPLE)
    return path
