"""Model references: a path, a directory, or a name in Ollama's, Hugging Face's, llama.cpp's or
LM Studio's local store, resolved to the GGUF file(s) on disk.  Offline and read-only: nothing
is downloaded, no store is written to.

Forms (docs/stores.md has each store's layout and where it is documented):

- a path to a ``.gguf`` (any shard of a split model), or a directory (every model in it);
- ``ollama:NAME`` -- ``[HOST/][NAMESPACE/]MODEL[:TAG]`` as Ollama parses it;
- ``hf:ORG/REPO[:QUANT]`` or ``hf:ORG/REPO/FILE.gguf`` -- the Hugging Face cache (huggingface_hub's
  and llama.cpp's), then llama.cpp's older flat cache;
- ``lmstudio:PUBLISHER/REPO[/FILE]``;
- a bare name that is not an existing path: tried as Ollama, then Hugging Face, then LM Studio.

Each store module has ``find(name) -> (ResolvedModel | None, [where it looked])`` and
``list_models() -> [ResolvedModel]``.
"""

from __future__ import annotations

import os

from .._errors import AmbiguousModelError, ModelNotFoundError
from .._gguf.layout import shard_paths
from .files import ResolvedModel, is_model_file, models_in

__all__ = ["ResolvedModel", "is_model_file", "list_models", "model_file", "models_in", "resolve_model", "resolve_models"]

STORES = ("ollama", "hf", "lmstudio")  # the order a bare name is tried in


def _looks_like_path(ref: str) -> bool:
    """A reference meant as a file path: never looked up in a store (its error stays "no such file")."""
    return ref.startswith(("/", "./", "../", "~")) or ref.lower().endswith(".gguf") and ":" not in ref


def _from_path(ref: str, path: str) -> ResolvedModel:
    shards = shard_paths(path)
    return ResolvedModel(ref, "path", os.path.basename(path), tuple(shards) if len(shards) > 1 else (path,))


def _directory(text: str) -> bool:
    # A directory named like a model file is a path error for read_layout ("is a directory").
    return os.path.isdir(text) and not text.lower().endswith(".gguf")


def resolve_models(ref: str | os.PathLike[str]) -> list[ResolvedModel]:
    """Every model ``ref`` names: several for a directory, else one.  Raises ModelNotFoundError."""
    text = os.fspath(ref)
    if _directory(text):
        models = models_in(text)
        if not models:
            raise ModelNotFoundError("a directory with no .gguf model in it", text)
        return models
    return [resolve_model(ref)]


def resolve_model(ref: str | os.PathLike[str]) -> ResolvedModel:
    """The one model ``ref`` names.  Raises ModelNotFoundError (saying where it looked) or
    AmbiguousModelError (naming the candidates)."""
    return _resolve(ref, strict=True)


def model_file(ref: str | os.PathLike[str]) -> str:
    """The file to hand to read_layout for ``ref``.  A path is returned as it is, existing or
    not, so that read_layout reports what is wrong with it; only names are looked up."""
    return _resolve(ref, strict=False).paths[0]


def _resolve(ref: str | os.PathLike[str], strict: bool) -> ResolvedModel:
    text = os.fspath(ref)
    if text.startswith("~"):  # a shell would have expanded it; the Python API gets it as written
        text = os.path.expanduser(text)
    if os.path.isfile(text):
        return _from_path(text, text)
    if _directory(text):
        models = resolve_models(text)
        if len(models) > 1:
            names = ", ".join(m.name for m in models[:5]) + (", ..." if len(models) > 5 else "")
            raise AmbiguousModelError(f"a directory holding {len(models)} models ({names}): name one of them", text)
        return models[0]._replace(ref=text)
    if os.path.lexists(text) or not isinstance(ref, str) or _looks_like_path(text) or "\0" in text:
        if strict:
            raise ModelNotFoundError("no such file" if not os.path.lexists(text) else "not a regular file", text)
        return ResolvedModel(text, "path", os.path.basename(text), (text,))
    prefix, _, rest = text.partition(":")
    stores = (prefix,) if prefix in STORES and rest else STORES
    name = rest if prefix in STORES and rest else text
    looked: list[str] = []
    for store in stores:
        model, where = _store(store).find(name)
        if model is not None:
            return model._replace(ref=text)
        looked += where
    raise ModelNotFoundError(f"no such file, and no model of that name; looked in {'; '.join(looked) or 'no store'}", text)


def list_models() -> list[ResolvedModel]:
    """Every model in every known store (Ollama, the Hugging Face and llama.cpp caches, LM Studio)."""
    out: list[ResolvedModel] = []
    for store in STORES:
        out += _store(store).list_models()
    return out


def _store(name: str):
    import importlib

    return importlib.import_module(f".{name}", __package__)
