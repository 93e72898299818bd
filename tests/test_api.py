"""The public surface: warmpool.__all__ is pinned, and every error survives pickling."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import warmpool
from warmpool import _errors

PUBLIC = [
    "AmbiguousModelError",
    "CancelledError",
    "Chunk",
    "DEFAULT_CHUNK_SIZE",
    "EngineArgsError",
    "EngineWatch",
    "FileChangedError",
    "FileResidency",
    "Keeper",
    "LayerResidency",
    "LayoutError",
    "ModelFile",
    "ModelLayout",
    "ModelNotFoundError",
    "Plan",
    "PlatformError",
    "ProfileError",
    "ProgressError",
    "ProgressView",
    "Residency",
    "ResolvedModel",
    "Selection",
    "SelectionError",
    "TensorInfo",
    "UsageError",
    "WarmError",
    "WarmResult",
    "WarmpoolError",
    "WorkerDiedError",
    "evict",
    "main",
    "make_plan",
    "parse_overrides",
    "plan_model",
    "read_layout",
    "residency",
    "residency_hidden",
    "resolve_model",
    "resolve_models",
    "warm",
    "watch_engine",
]

ERRORS = [getattr(_errors, name) for name in _errors.__all__]


def test_all_is_pinned_and_sorted():
    assert warmpool.__all__ == PUBLIC
    assert warmpool.__all__ == sorted(warmpool.__all__)


def test_lazy_map_and_type_checking_imports_agree():
    """The three lists of the lazy facade (``_LAZY``, the TYPE_CHECKING imports, ``__all__``) name
    the same objects in the same modules, as huggingface_hub's check_static_imports keeps them."""
    source = Path(warmpool.__file__).read_text()
    static: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for stmt in node.body:
                static.update({alias.name: "." * stmt.level + stmt.module for alias in stmt.names})
    assert static == warmpool._LAZY
    eager = {name for name in PUBLIC if name not in warmpool._LAZY}
    assert eager == set(_errors.__all__)  # only the exception tree is imported with the package
    assert set(warmpool._LAZY) | eager == set(PUBLIC)


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


def test_bare_import_loads_the_exception_tree_alone():
    """``import warmpool`` in an engine: the errors and the version, not even ``typing`` (13 ms
    of it); the rest loads on first use.  Run isolated, so that no ``site`` hook imports for it."""
    code = ("import sys; sys.path[:0] = sys.argv[1:]; before = set(sys.modules); import warmpool; "
            "print(sorted(m for m in set(sys.modules) - before if m.startswith('warmpool') or m == 'typing'))")
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, root], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert eval(proc.stdout) == ["warmpool", "warmpool._errors", "warmpool._version"], proc.stdout  # noqa: S307 - our own list literal


def test_layout_parse_imports_nothing_heavy(tiny_model):
    """read_layout is on every engine's start-up path: stdlib only (docs/design.md, "Import cost")."""
    code = ("import sys, warmpool; warmpool.read_layout(sys.argv[1]); "
            "print(sorted(m for m in ('numpy', 'gguf', 'loguru', 'tqdm', 'psutil') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def imported_modules(source: str) -> set[str]:
    """Every module an ``import``/``from ... import`` statement names, relative ones resolved
    inside engine_adapter; ``from pkg import name`` also counts ``pkg.name`` (a submodule?)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("engine_adapter." * bool(node.level)) + (node.module or "")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_engine_adapter_uses_only_public_warmpool():
    sources = sorted((Path(__file__).resolve().parents[1] / "engine_adapter").glob("*.py"))
    seen = set()
    for source in sources:
        modules = imported_modules(source.read_text())
        seen |= modules
        private = sorted(m for m in modules if m.split(".")[0] == "warmpool" and any(
            part.startswith("_") for part in m.split(".")[1:]))
        assert not private, f"{source.name} imports private warmpool modules: {private}"
    assert {"warmpool", "warmpool.ProgressView", "warmpool.parse_overrides"} <= seen  # it saw the real imports
    assert "warmpool._progress.segment" in imported_modules("from warmpool._progress.segment import ProgressView")  # and can fail


def test_warm_of_a_resident_model_imports_nothing_heavy(tiny_model):
    """An engine's warm of a model already in the cache: stdlib logging only, no loguru/asyncio/numpy."""
    warmpool.warm(tiny_model)  # resident before the fresh process looks
    code = ("import sys, warmpool; r = warmpool.warm(sys.argv[1]); "
            "print(r.workers, sorted(m for m in ('loguru', 'asyncio', 'numpy', 'gguf', 'tqdm', 'psutil', "
            "'multiprocessing') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    workers, heavy = proc.stdout.split(" ", 1)
    assert heavy.strip() == "[]", proc.stdout
    assert workers == "0", "the model was not resident: the check did not cover the no-pool path"
    assert proc.stderr == ""  # no handler configured: warmpool prints nothing
