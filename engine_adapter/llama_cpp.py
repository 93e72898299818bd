"""llama-cpp-python with warmpool: start the warm, then construct ``Llama``.

    from engine_adapter.llama_cpp import load
    llm, warmup = load("model.gguf", n_gpu_layers=20, n_ctx=4096)

Why the warm starts first: on Linux llama.cpp maps the whole file with MAP_POPULATE
(docs/design.md, "What llama.cpp keeps on the CPU"), which faults the file in from one
thread while ``Llama()`` blocks (with ``use_mmap=False`` it reads the file into its own buffers,
also in order).  The warm runs beside it (``beside_engine=True``, docs/beside-engine.md): its
thread first only watches this process's own storage reads (``warmpool.watch_engine``), and
plans after (the plan's Python would otherwise run between the constructor's own steps); it
starts no worker where the engine reads at device speed (workers there only take CPU from it),
and where it reads slower (latency-bound storage) warms from the far end of the file, at idle
CPU priority (``start_warmup``'s default), so the workers and the engine's sweep meet once, in
the middle.

Which tensors the warm selects, from the keyword arguments ``Llama`` takes:

* ``n_gpu_layers`` (llama-cpp-python's default 0: all on the CPU; -1: every layer offloaded,
  only ``token_embd`` stays) with llama.cpp's own placement rule (``warmpool.Selection``).
* **No GPU backend, no offload**: a llama.cpp built without one (the PyPI sdist's default
  build) accepts ``n_gpu_layers > 0`` and keeps every tensor on the CPU anyway.  When
  ``llama_supports_gpu_offload()`` is False we therefore warm every tensor, whatever
  ``n_gpu_layers`` says: the flag is modelled as llama.cpp applies it, not as written.
* Tensor overrides: only when the installed ``Llama.__init__`` has a parameter for them
  (``tensor_buft_overrides`` or ``override_tensor``, as ``PATTERN=BUFT[,...]`` strings or
  (pattern, buft) pairs).  llama-cpp-python 0.3.36 has none: its ``**kwargs`` swallows such
  a keyword without applying it, so we ignore it too (with a ``UserWarning``) rather than warm a
  placement llama.cpp never uses.

llama_cpp is an optional extra (``pip install warmpool[llama]``) imported only here.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterable

from warmpool import parse_overrides

from ._warmup import Warmup, start_warmup

__all__ = ["OVERRIDE_KWARGS", "load", "selection_for"]

OVERRIDE_KWARGS = ("tensor_buft_overrides", "override_tensor")


def _llama_cpp():  # noqa: ANN202 - a module
    try:
        import llama_cpp
    except ImportError as e:
        from warmpool import PlatformError

        raise PlatformError(f"llama-cpp-python is not installed (pip install 'warmpool[llama]'): {e}") from None
    return llama_cpp


def _as_pairs(value: str | Iterable) -> tuple[tuple[str, str], ...]:
    """``"p=b,p=b"``, a list of such strings, or (pattern, buft) pairs -> ordered pairs."""
    if isinstance(value, str):
        return parse_overrides([value])
    items = list(value)
    if all(isinstance(item, str) for item in items):
        return parse_overrides(items)
    return tuple((str(pattern), str(buft)) for pattern, buft in items)


def selection_for(llama_kwargs: dict, *, gpu_offload: bool, accepted: Iterable[str]) -> dict:
    """The warm's selection flags for these ``Llama(**llama_kwargs)`` arguments (see module doc)."""
    if not gpu_offload:
        return {}  # a CPU-only build: every tensor stays on the CPU
    selection: dict = {"n_gpu_layers": int(llama_kwargs.get("n_gpu_layers", 0))}
    for name in OVERRIDE_KWARGS:
        value = llama_kwargs.get(name)
        if value is None:
            continue
        if name in accepted:
            selection["overrides"] = _as_pairs(value)
        else:
            warnings.warn(f"this llama-cpp-python's Llama has no {name!r} parameter and ignores it; "
                          "warmpool warms without it, as llama.cpp will place the tensors", stacklevel=3)
    return selection


def load(model_path: str | os.PathLike[str], *, warmup_options: dict | None = None, **llama_kwargs):
    """Start warming what ``Llama(model_path, **llama_kwargs)`` keeps on the CPU, then build it.

    Returns ``(llm, warmup)``.  ``warmup_options`` go to :func:`engine_adapter.start_warmup`
    (``workers``, ``strategy``, ``raise_errors``, ``chunk_size``...).  The warm keeps running
    in the background after ``Llama()`` returns (``warmup.wait()`` to join it); if the
    constructor raises, the warm is cancelled and the engine's own error propagates.
    """
    llama_cpp = _llama_cpp()
    accepted = inspect.signature(llama_cpp.Llama.__init__).parameters
    selection = selection_for(llama_kwargs, gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
                              accepted=accepted)
    # llama.cpp reads the whole file itself while Llama() runs, in this process: the warm
    # watches its reads and steps aside where it reads at device speed (docs/beside-engine.md).
    options = {"beside_engine": True, "engine_pid": os.getpid(), **(warmup_options or {})}
    warmup: Warmup = start_warmup(model_path, **selection, **options)
    try:
        llm = llama_cpp.Llama(os.fspath(model_path), **llama_kwargs)
    except BaseException:
        warmup.cancel()
        raise
    return llm, warmup
