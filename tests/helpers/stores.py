"""Model stores as their own tools write them, built from a model file on disk: an Ollama
models directory (``ollama pull``) and a Hugging Face hub cache (``hf_hub_download``,
llama.cpp's ``-hf``).  Files are hard links, so a store costs no copy of the model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["COMMIT", "link", "make_hub", "make_ollama", "sha256"]

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dst)  # same bytes and inode: no copy of the model
    return dst


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_ollama(models: Path, model: Path, host: str, namespace: str, name: str, tag: str) -> Path:
    """manifests/<host>/<namespace>/<model>/<tag> -> blobs/sha256-<hex>, as ``ollama pull`` writes."""
    digest = sha256(model)
    blob = models / "blobs" / f"sha256-{digest}"
    if not blob.exists():  # blobs are shared by the manifests that name them
        link(model, blob)
    config = models / "blobs" / ("sha256-" + "c" * 64)
    config.write_text('{"model_format":"gguf"}')
    template = models / "blobs" / ("sha256-" + "d" * 64)
    template.write_text("{{ .Prompt }}")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "c" * 64, "size": 23},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": model.stat().st_size},
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "d" * 64, "size": 13},
        ],
    }
    path = models / "manifests" / host / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return blob


def make_hub(cache: Path, repo: str, files: dict[str, Path], ref: str = "main") -> Path:
    """models--ORG--REPO/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<ref>},
    as huggingface_hub's hf_hub_download and llama.cpp's hf-cache write it."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    for rel, src in files.items():
        blob = root / "blobs" / sha256(src)
        if not blob.exists():
            link(src, blob)
        entry = snapshot / rel
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(os.path.relpath(blob, entry.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(COMMIT)
    return snapshot
