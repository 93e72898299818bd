"""LM Studio's models folder: ``<home>/models/<publisher>/<repo>/<file>.gguf``.

The home is found as LM Studio's own tools do (``findLMStudioHome`` in lmstudio-js, see
docs/stores.md): the path in ``~/.lmstudio-home-pointer``, else ``~/.cache/lm-studio`` when it
exists, else ``~/.lmstudio``.
"""

from __future__ import annotations

import os

from .._errors import AmbiguousModelError
from .files import ResolvedModel, group_shards, is_model_file

__all__ = ["find", "home", "list_models"]


def home() -> str:
    pointer = os.path.expanduser("~/.lmstudio-home-pointer")
    try:
        with open(pointer, encoding="utf-8") as f:
            target = f.read().strip()
        if target:
            return target
    except OSError:
        pass
    legacy = os.path.expanduser("~/.cache/lm-studio")
    return legacy if os.path.isdir(legacy) else os.path.expanduser("~/.lmstudio")


def _models(folder: str, root: str) -> list:

    try:
        files = [os.path.join(folder, e) for e in os.listdir(folder) if is_model_file(e)]
    except OSError:
        return []
    return [ResolvedModel("", "lmstudio", os.path.relpath(p[0], root), p) for p in group_shards(files)]


def find(name: str):
    root = os.path.join(home(), "models")
    parts = name.split("/")
    if len(parts) not in (2, 3) or not all(parts) or any(p in (".", "..") for p in parts) or ":" in name:
        return None, ["lmstudio (not a PUBLISHER/REPO[/FILE] name)"]
    folder = os.path.join(root, parts[0], parts[1])
    models = _models(folder, root)
    if len(parts) == 3:
        want = parts[2].lower()
        models = [m for m in models if any(os.path.basename(p).lower() in (want, want + ".gguf") for p in m.paths)]
    if len(models) > 1:
        names = ", ".join(os.path.basename(m.paths[0]) for m in models)
        raise AmbiguousModelError(f"LM Studio folder {folder} holds {len(models)} models ({names}): add /FILE", name)
    if models:
        return models[0], []
    return None, [f"lmstudio {folder}"]


def list_models() -> list:
    root = os.path.join(home(), "models")
    out = []
    try:
        publishers = sorted(os.listdir(root))
    except OSError:
        return []
    for publisher in publishers:
        try:
            repos = sorted(os.listdir(os.path.join(root, publisher)))
        except OSError:
            continue
        for repo in repos:
            out += _models(os.path.join(root, publisher, repo), root)
    return out
