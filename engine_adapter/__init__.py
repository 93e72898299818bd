"""engine_adapter: let an inference engine start while warmpool warms its model.

``start_warmup(model, **selection)`` returns a :class:`Warmup` at once; the engine keeps
loading and calls ``wait_layer(k)`` before it first touches layer ``k``.  A policy skip or a
failure is reported through the handle (``result``, ``error``), never raised into the
engine's start-up unless ``raise_errors=True``.  ``engine_adapter.llama_cpp`` wires this
into llama-cpp-python (optional extra ``[llama]``; imported only when used).
"""

from __future__ import annotations

from ._warmup import Warmup, WarmupProgress, start_warmup

__all__ = ["Warmup", "WarmupProgress", "start_warmup"]
