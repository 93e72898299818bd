"""warmpool: warm the page cache with the parts of a GGUF model an engine keeps on the CPU.

Pipeline, one module each: ``_layout`` (tensor table, via ``_header``) -> ``_select``
(llama.cpp's placement rules) -> ``_plan`` (page-aligned, byte-balanced chunks) -> ``_policy``
(RAM budget) -> ``_pool``/``_worker`` (processes faulting pages in, through ``_platform``) ->
``_progress`` (shared-memory counters) -> ``_cli``.
"""

from __future__ import annotations

from ._errors import (
    CancelledError,
    FileChangedError,
    LayoutError,
    PlatformError,
    ProgressError,
    SelectionError,
    WarmError,
    WarmpoolError,
    WorkerDiedError,
)
from ._cli import main
from ._layout import ModelFile, ModelLayout, TensorInfo, read_layout
from ._plan import DEFAULT_CHUNK_SIZE, Chunk, Plan, make_plan
from ._select import Selection
from ._warm import LayerResidency, Residency, WarmResult, evict, plan_model, residency, warm

__all__ = [
    "CancelledError",
    "Chunk",
    "DEFAULT_CHUNK_SIZE",
    "FileChangedError",
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

__version__ = "0.1.0"
