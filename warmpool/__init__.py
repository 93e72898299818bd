"""warmpool: warm the page cache with the parts of a GGUF model an engine keeps on the CPU.

The tree reads as the pipeline, then the services on it:

- ``_gguf`` (header walk, tensor table) -> ``_select`` (llama.cpp's placement rules) ->
  ``_plan`` (page-aligned, byte-balanced chunks) -> ``_policy`` (memory budget) -> ``_pool``
  (worker processes faulting pages in) -> ``_progress`` (shared-memory counters);
  ``_api`` composes them into ``warm``, ``residency``, ``evict``.  Every OS call goes through
  ``_platform``.
- Services: ``_keep`` (keep a model resident), ``_engine`` (engine command lines, ``run``),
  ``_stores`` (Ollama, Hugging Face, LM Studio names), ``fleet`` (a Ray cluster).
- ``commands`` (the CLI, one module per subcommand) and ``example`` (synthetic models).
"""

from __future__ import annotations

from ._errors import (
    AmbiguousModelError,
    CancelledError,
    EngineArgsError,
    FileChangedError,
    LayoutError,
    ModelNotFoundError,
    PlatformError,
    ProfileError,
    ProgressError,
    SelectionError,
    UsageError,
    WarmError,
    WarmpoolError,
    WorkerDiedError,
)
from ._version import __version__ as __version__  # re-exported: warmpool.__version__

# The rest is imported on first use (PEP 562): an engine's first ``read_layout`` and every
# worker process (which imports ``warmpool._pool.worker``, and so this package) would otherwise pay
# for the CLI, the policy and the warm engine they never use (docs/design.md, "Import cost").
_LAZY = {
    "main": ".commands",
    "ModelFile": "._gguf.layout", "ModelLayout": "._gguf.layout", "TensorInfo": "._gguf.layout", "read_layout": "._stores",
    "DEFAULT_CHUNK_SIZE": "._plan", "Chunk": "._plan", "Plan": "._plan", "make_plan": "._plan",
    "Keeper": "._keep.keeper",
    "EngineWatch": "._beside", "watch_engine": "._beside",
    "ProgressView": "._progress.segment",
    "Selection": "._select", "parse_overrides": "._select",
    "ResolvedModel": "._stores.resolve", "resolve_model": "._stores.resolve", "resolve_models": "._stores.resolve",
    "FileResidency": "._api", "LayerResidency": "._api", "Residency": "._api", "residency_hidden": "._api", "WarmResult": "._api", "evict": "._api",
    "plan_model": "._api", "residency": "._api", "warm": "._api",
}

# ``typing`` alone cost 13 ms of a bare ``import warmpool``; type checkers take this name as
# ``typing.TYPE_CHECKING`` (True for them), so the imports below stay visible to them.
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from ._api import (
        FileResidency,
        LayerResidency,
        Residency,
        WarmResult,
        evict,
        plan_model,
        residency,
        residency_hidden,
        warm,
    )
    from ._beside import EngineWatch, watch_engine
    from ._gguf.layout import ModelFile, ModelLayout, TensorInfo
    from ._keep.keeper import Keeper
    from ._plan import DEFAULT_CHUNK_SIZE, Chunk, Plan, make_plan
    from ._progress.segment import ProgressView
    from ._select import Selection, parse_overrides
    from ._stores import read_layout
    from ._stores.resolve import ResolvedModel, resolve_model, resolve_models
    from .commands import main


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'warmpool' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
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
