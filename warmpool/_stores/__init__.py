"""Model references: a path, a directory, or a name in a local model store, resolved once
where a request comes in (the API's entry points, the commands).

``files`` (what every store shares) <- ``ollama``, ``hf``, ``lmstudio`` (one store each) <-
``resolve`` (the order stores are tried in, and the errors).  docs/stores.md has each layout.

This module itself is the entry an engine's ``warmpool.read_layout`` takes: it imports the
header reader and nothing else until a name has to be looked up (docs/design.md, "Import cost").
"""

from __future__ import annotations

import os

from .._gguf import layout as _layout
from .._gguf.layout import ModelLayout

__all__ = ["model_file", "read_layout"]


def model_file(model: str | os.PathLike[str]) -> str:
    """The file to read for a model reference: an existing file as it is, else the store lookup
    (``resolve``), imported only then.  A path that does not exist is returned as it is,
    so that the layout reader says what is wrong with it."""
    if os.path.isfile(model):
        return os.fspath(model)
    from .resolve import model_file as lookup

    return lookup(model)


def read_layout(model: str | os.PathLike[str]) -> ModelLayout:
    """Read the tensor table of a GGUF model: a path (any shard of a split model names them all),
    a directory holding one model, or a store name (``ollama:``, ``hf:``, ``lmstudio:``)."""
    return _layout.read_layout(model_file(model))
