"""Ollama's local store: ``<models>/manifests/<host>/<namespace>/<model>/<tag>`` (JSON) names the
GGUF blob, ``<models>/blobs/sha256-<hex>``.

Read from Ollama's source (docs/stores.md): names are parsed as ``types/model/name.go``
``ParseName`` does, defaults ``registry.ollama.ai``/``library``/``latest``; the models directory
is ``$OLLAMA_MODELS`` (``envconfig.Models``, quotes and spaces trimmed) or ``~/.ollama/models``,
and the Linux service installs under ``/usr/share/ollama/.ollama/models``; the model is the layer
of media type ``application/vnd.ollama.image.model`` (``server/images.go``: the last one wins).
"""

from __future__ import annotations

import json
import os
import re

from .files import ResolvedModel

__all__ = ["find", "list_models", "models_dirs", "parse_name"]

SERVICE_MODELS = "/usr/share/ollama/.ollama/models"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
DEFAULTS = ("registry.ollama.ai", "library", "latest")
_DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
# types/model/name.go isValidPart(): first character alphanumeric or "_", then these.
_PART = {
    "host": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$"),
    "namespace": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$"),
    "model": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
    "tag": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
}


def models_dirs() -> list[str]:
    configured = os.environ.get("OLLAMA_MODELS", "").strip().strip("\"'")
    if configured:
        return [os.path.expanduser(configured)]
    return [os.path.expanduser(os.path.join("~", ".ollama", "models")), SERVICE_MODELS]


def parse_name(name: str) -> tuple[str, str, str, str] | None:
    """(host, namespace, model, tag) as Ollama's ParseName gives them, or None when not valid."""
    s, tag = name, ""
    if s.rfind(":") > s.rfind("/"):  # "/" cannot be in a tag, so a later ":" starts one
        s, _, tag = s.rpartition(":")
        tag = tag or "!"
    parts = s.split("/")
    if len(parts) > 3:  # host/namespace/model: anything before the last two "/" is the host
        parts = ["/".join(parts[:-2]), *parts[-2:]]
    # A part promised by a separator but empty ("a//b", "a:") is invalid, as in cutPromised().
    host, namespace, model = [None] * (3 - len(parts)) + [p or "!" for p in parts]
    host = host.split("://", 1)[-1] if host else host  # ParseNameBare drops a scheme
    full = (host or DEFAULTS[0], namespace or DEFAULTS[1], model, tag or DEFAULTS[2])
    if all(_PART[kind].match(part) for kind, part in zip(("host", "namespace", "model", "tag"), full)):
        return full
    return None


def _display(parts: tuple[str, str, str, str]) -> str:
    """types/model/name.go DisplayShortest: drop the default host (and namespace)."""
    host, namespace, model, tag = parts
    if host.lower() != DEFAULTS[0]:
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace.lower() != DEFAULTS[1]:
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


def _manifest_path(models: str, parts: tuple[str, ...]) -> str | None:
    """The manifest file, matching each path component exactly, else ignoring case (Ollama
    compares names with EqualFold)."""
    path = os.path.join(models, "manifests")
    for part in parts:
        exact = os.path.join(path, part)
        if os.path.exists(exact):
            path = exact
            continue
        try:
            match = [e for e in sorted(os.listdir(path)) if e.lower() == part.lower()]
        except OSError:
            return None
        if not match:
            return None
        path = os.path.join(path, match[0])
    return path if os.path.isfile(path) else None


def _blob(models: str, manifest: str) -> str | None:
    try:
        with open(manifest, encoding="utf-8") as f:
            layers = json.load(f).get("layers") or []
    except (OSError, ValueError, AttributeError):
        return None
    digests = [layer.get("digest", "") for layer in layers if isinstance(layer, dict) and layer.get("mediaType") == MODEL_MEDIA_TYPE]
    if not digests or not _DIGEST.match(digests[-1]):
        return None
    blob = os.path.join(models, "blobs", digests[-1].replace(":", "-"))
    return blob if os.path.isfile(blob) else None


def find(name: str):

    parts = parse_name(name)
    if parts is None:
        return None, ["ollama (not a valid Ollama name)"]
    looked = []
    for models in models_dirs():
        manifest = _manifest_path(models, parts)
        blob = _blob(models, manifest) if manifest else None
        if blob:  # named as stored (the match may have ignored case)
            stored = tuple(os.path.relpath(manifest, os.path.join(models, "manifests")).split(os.sep))
            return ResolvedModel(name, "ollama", _display(stored), (blob,)), looked
        looked.append(f"ollama {os.path.join(models, 'manifests', *parts)}")
    return None, looked


def list_models() -> list:

    out = []
    for models in models_dirs():
        root = os.path.join(models, "manifests")
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            rel = os.path.relpath(dirpath, root).split(os.sep)
            if len(rel) != 3:  # host/namespace/model, then one file per tag
                continue
            for tag in sorted(files):
                blob = _blob(models, os.path.join(dirpath, tag))
                if blob:
                    out.append(ResolvedModel("", "ollama", _display((*rel, tag)), (blob,)))
    return out
