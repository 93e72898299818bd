"""What every store shares: a resolved model, which ``.gguf`` files are models, split shards
grouped, and every model under a folder.  The store backends (``ollama``, ``hf``, ``lmstudio``)
and ``resolve`` import this module; it imports none of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["ResolvedModel", "group_shards", "is_model_file", "models_in"]


class ResolvedModel(NamedTuple):
    ref: str  # what the caller wrote
    store: str  # "path" | "ollama" | "hf" | "lmstudio" | "llama.cpp-cache"
    name: str  # the model's name in that store (a path's is its file name)
    paths: tuple[str, ...]  # every file of the model, first shard first; paths[0] goes to read_layout

    def describe(self) -> str:
        return f"{self.ref} -> {self.store} {self.name}: {self.paths[0]}"


# llama.cpp's common/download.cpp gguf_filename_is_model(): GGUF files in a model repository that
# are not the language model itself (projectors, importance matrices, draft heads).
_NOT_A_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


def is_model_file(name: str) -> bool:
    base = os.path.basename(name)
    return base.lower().endswith(".gguf") and not any(word in base for word in _NOT_A_MODEL)


def group_shards(files: Iterable[str]) -> list[tuple[str, ...]]:
    """Model files -> one tuple per model (a split model's shards together, in order), sorted."""
    models: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for path in files:
        m = _SHARD.match(os.path.basename(path))
        if m:
            key = (os.path.join(os.path.dirname(path), m["prefix"]), m["count"])
            models.setdefault(key, []).append((int(m["no"]), path))
        else:
            models[(path, "")] = [(1, path)]
    return sorted(tuple(p for _, p in sorted(shards)) for shards in models.values())


def models_in(directory: str) -> list[ResolvedModel]:
    """Every model under ``directory`` (recursively, symlinked folders not followed), shards grouped."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in files if is_model_file(f)]
    return [ResolvedModel(directory, "path", os.path.relpath(paths[0], directory), paths) for paths in group_shards(found)]
