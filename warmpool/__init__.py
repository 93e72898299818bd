"""warmpool: warm the page cache with the parts of a GGUF model an engine keeps on the CPU.

Pipeline, one module each: ``_layout`` (tensor table, via ``_header``) -> ``_select``
(llama.cpp's placement rules) -> ``_plan`` (page-aligned, byte-balanced chunks) -> ``_policy``
(RAM budget) -> ``_pool``/``_worker`` (processes faulting pages in, through ``_platform``) ->
``_progress`` (shared-memory counters) -> ``commands``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._errors import (
    AmbiguousModelError,
    CancelledError,
    FileChangedError,
    LayoutError,
    ModelNotFoundError,
    PlatformError,
    ProgressError,
    SelectionError,
    WarmError,
    WarmpoolError,
    WorkerDiedError,
)

# The rest is imported on first use (PEP 562): an engine's first ``read_layout`` and every
# worker process (which imports ``warmpool._worker``, and so this package) would otherwise pay
# for the CLI, the policy and the warm engine they never use (docs/bench/pool.md).
_LAZY = {
    "main": ".commands",
    "ModelFile": "._layout", "ModelLayout": "._layout", "TensorInfo": "._layout", "read_layout": "._layout",
    "DEFAULT_CHUNK_SIZE": "._plan", "Chunk": "._plan", "Plan": "._plan", "make_plan": "._plan",
    "Keeper": "._keep",
    "ProgressView": "._progress",
    "Selection": "._select", "parse_overrides": "._select",
    "ResolvedModel": "._stores", "resolve_model": "._stores", "resolve_models": "._stores",
    "FileResidency": "._warm", "LayerResidency": "._warm", "Residency": "._warm", "residency_hidden": "._warm", "WarmResult": "._warm", "evict": "._warm",
    "plan_model": "._warm", "residency": "._warm", "warm": "._warm",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from ._layout import ModelFile, ModelLayout, TensorInfo, read_layout
    from ._keep import Keeper
    from ._plan import DEFAULT_CHUNK_SIZE, Chunk, Plan, make_plan
    from ._progress import ProgressView
    from ._select import Selection, parse_overrides
    from ._stores import ResolvedModel, resolve_model, resolve_models
    from ._warm import (
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
    "ProgressError",
    "ProgressView",
    "Residency",
    "ResolvedModel",
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
    "parse_overrides",
    "plan_model",
    "read_layout",
    "residency",
    "residency_hidden",
    "resolve_model",
    "resolve_models",
    "warm",
]

__version__ = "0.1.0"
