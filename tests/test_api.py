"""The public surface: warmpool.__all__ is pinned, and every error survives pickling."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import warmpool
from warmpool import _errors

PUBLIC = [
    "CancelledError",
    "Chunk",
    "DEFAULT_CHUNK_SIZE",
    "FileChangedError",
    "Keeper",
    "LayerResidency",
    "LayoutError",
    "ModelFile",
    "ModelLayout",
    "Plan",
    "PlatformError",
    "ProgressError",
    "Residency",
    "Selection",
    "SelectionError",
    "TensorInfo",
    "WarmError",
    "WarmResult",
    "WarmpoolError",
    "WorkerDiedError",
    "evict",
    "main",
    "make_plan",
    "plan_model",
    "read_layout",
    "residency",
    "warm",
]

ERRORS = [getattr(_errors, name) for name in _errors.__all__]


def test_all_is_pinned_and_sorted():
    assert warmpool.__all__ == PUBLIC
    assert warmpool.__all__ == sorted(warmpool.__all__)


def test_every_public_name_imports():
    namespace: dict = {}
    exec("from warmpool import *", namespace)  # noqa: S102 - what a star import really gives
    assert sorted(k for k in namespace if not k.startswith("__")) == PUBLIC
    for name in PUBLIC:
        assert getattr(warmpool, name) is namespace[name]


def test_every_error_is_public_and_a_warmpool_error():
    assert ERRORS and all(issubclass(cls, warmpool.WarmpoolError) for cls in ERRORS)
    assert {cls.__name__ for cls in ERRORS} <= set(PUBLIC)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("path", [None, "/models/a.gguf", Path("/models/b.gguf")], ids=["no-path", "str", "pathlike"])
def test_errors_pickle_with_message_and_path(cls, path):
    error = cls("tensor 'x' is odd", path)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert copy.message == "tensor 'x' is odd"
    assert copy.path == (None if path is None else str(path))
    assert str(copy) == str(error) == ("tensor 'x' is odd" if path is None else f"{path}: tensor 'x' is odd")
    assert copy.args == error.args


def test_layout_parse_imports_nothing_heavy(tiny_model):
    """read_layout is on every engine's start-up path: stdlib only (REFERENCE §7)."""
    code = ("import sys, warmpool; warmpool.read_layout(sys.argv[1]); "
            "print(sorted(m for m in ('numpy', 'gguf', 'loguru', 'tqdm', 'psutil') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
