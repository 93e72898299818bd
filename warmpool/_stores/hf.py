"""The Hugging Face cache as huggingface_hub and llama.cpp's ``-hf`` use it, and llama.cpp's
older flat cache (docs/stores.md).

- Hub layout (``models--ORG--REPO/{refs/<branch>, snapshots/<commit>/<file> -> ../../blobs/<id>}``)
  under ``$LLAMA_CACHE`` (llama.cpp's ``common/hf-cache.cpp`` puts it first), then the hub cache
  huggingface_hub uses (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``,
  ``XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``).  The revision is the ``main``
  ref, else another ref, as ``get_cached_ref`` does; huggingface_hub's ``try_to_load_from_cache``
  gives the file and ``scan_cache_dir`` lists the cache.
- Flat layout of builds before the hub layout: ``<dir>/<ORG>_<REPO>_<FILE>`` (``/`` as ``_``),
  ``<dir>`` = ``$LLAMA_CACHE``, ``$XDG_CACHE_HOME/llama.cpp`` or ``~/.cache/llama.cpp``; the chosen
  file of a tag was cached as ``manifest=<ORG>_<REPO>=<TAG>.json`` (``ggufFile.rfilename``).

The file for ``ORG/REPO[:TAG]`` is chosen as ``common/download.cpp`` ``find_best_model`` does: the
first model file whose path contains TAG followed by ``.`` or ``-`` (any case), a split model by
its first shard; with no tag Q4_K_M, then Q8_0, then the first model file.  "First" is in sorted
path order (the hub API's order; llama.cpp offline walks the directory in the file system's order).
"""

from __future__ import annotations

import json
import os
import re

from .._errors import WarmpoolError
from .files import ResolvedModel, group_shards, is_model_file

__all__ = ["choose_file", "find", "flat_dir", "hub_dirs", "list_models", "split_ref"]

_REPO = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_COMMIT = re.compile(r"^[0-9a-fA-F]{40}$")


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return os.path.expanduser(value) if value else None


def hub_dirs() -> list[str]:
    """Hub-layout caches in the order they are searched (LLAMA_CACHE, then huggingface_hub's)."""
    hub = _env("HF_HUB_CACHE") or _env("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = _env("HF_HOME") or os.path.join(_env("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
        hub = os.path.join(home, "hub")
    dirs = [d for d in (_env("LLAMA_CACHE"), hub) if d]
    return list(dict.fromkeys(dirs))


def flat_dir() -> str:
    """llama.cpp's fs_get_cache_directory() (common/common.cpp)."""
    return _env("LLAMA_CACHE") or os.path.join(_env("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama.cpp")


def split_ref(name: str) -> tuple[str, str, str] | None:
    """``ORG/REPO[:TAG]`` or ``ORG/REPO/FILE.gguf`` -> (repo, tag, file), or None when not a repo id."""
    for host in ("hf.co/", "huggingface.co/"):  # Ollama's spelling of a Hub repository
        name = name[len(host):] if name.startswith(host) else name
    repo, _, tag = name.partition(":")
    parts = repo.split("/")
    file = ""
    if len(parts) > 2 and parts[-1].lower().endswith(".gguf") and not tag:
        repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    if not _REPO.match(repo) or ":" in tag:
        return None
    return repo, tag, file


def _shard(path: str) -> tuple[int, int]:
    m = re.search(r"-(\d{5})-of-(\d{5})\.gguf$", path, re.IGNORECASE)
    return (int(m[1]), int(m[2])) if m else (1, 1)


def choose_file(files: list[str], tag: str, hf_file: str = "") -> str | None:
    """llama.cpp's choice among a repository's files (paths relative to the snapshot)."""

    files = sorted(files)
    if hf_file:  # -hff: compared ignoring case (string_iequal)
        return next((f for f in files if f.lower() == hf_file.lower()), None)
    models = [f for f in files if is_model_file(f) and _shard(f)[0] == 1]
    for t in [tag] if tag else ["Q4_K_M", "Q8_0"]:
        pattern = re.compile(re.escape(t) + r"[.-]", re.IGNORECASE)
        hit = next((f for f in models if pattern.search(f)), None)
        if hit:
            return hit
    return models[0] if models and not tag else None


def _shards_of(files: list[str], chosen: str) -> list[str]:
    """download.cpp get_split_files(): every file with the chosen one's prefix and shard count."""
    no, count = _shard(chosen)
    if count <= 1:
        return [chosen]
    prefix = chosen[: -len(f"-{no:05d}-of-{count:05d}.gguf")]
    return sorted(f for f in files if _shard(f)[1] == count and f[: -len("-00000-of-00000.gguf")] == prefix)


def _cached_ref(repo_dir: str) -> str | None:
    """hf-cache.cpp get_cached_ref(): the ``main`` branch, else the first other valid ref."""
    refs = os.path.join(repo_dir, "refs")
    try:
        names = sorted(os.listdir(refs), key=lambda n: n != "main")
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(refs, name), encoding="utf-8") as f:
                commit = f.readline().strip()
        except OSError:
            continue
        if _COMMIT.match(commit) and os.path.isdir(os.path.join(repo_dir, "snapshots", commit)):
            return name
    return None


def _hub():
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - a declared dependency
        raise WarmpoolError("Hugging Face references need huggingface_hub (pip install huggingface-hub)") from None
    return huggingface_hub


def _repo_dir(cache: str, repo: str) -> str | None:
    from huggingface_hub.file_download import repo_folder_name

    exact = os.path.join(cache, repo_folder_name(repo_id=repo, repo_type="model"))
    if os.path.isdir(exact):
        return exact
    try:  # Hub repository ids are case-insensitive
        wanted = os.path.basename(exact).lower()
        return next((os.path.join(cache, e) for e in sorted(os.listdir(cache)) if e.lower() == wanted), None)
    except OSError:
        return None


def _find_hub(cache: str, repo: str, tag: str, hf_file: str):

    hub = _hub()
    repo_dir = _repo_dir(cache, repo)
    ref = _cached_ref(repo_dir) if repo_dir else None
    if ref is None:
        return None
    repo_id = os.path.basename(repo_dir)[len("models--"):].replace("--", "/")
    with open(os.path.join(repo_dir, "refs", ref), encoding="utf-8") as f:
        snapshot = os.path.join(repo_dir, "snapshots", f.readline().strip())
    files = []
    for root, dirs, names in os.walk(snapshot):
        dirs.sort()
        files += [os.path.relpath(os.path.join(root, n), snapshot).replace(os.sep, "/") for n in names]
    chosen = choose_file(files, tag, hf_file)
    if chosen is None:
        return None
    paths = []
    for rel in _shards_of(files, chosen):
        path = hub.try_to_load_from_cache(repo_id, rel, cache_dir=cache, revision=ref)
        if not isinstance(path, str):  # a dangling symlink (blob missing): not in the cache
            return None
        paths.append(path)
    return ResolvedModel("", "hf", f"{repo_id}/{chosen}", tuple(paths))


def _flat_manifest_file(cache: str, repo: str, tag: str) -> str | None:
    path = os.path.join(cache, f"manifest={repo}={tag or 'latest'}.json".replace("/", "_"))
    try:
        with open(path, encoding="utf-8") as f:
            return (json.load(f).get("ggufFile") or {}).get("rfilename")
    except (OSError, ValueError, AttributeError):
        return None


def _find_flat(cache: str, repo: str, tag: str, hf_file: str):

    prefix = repo.replace("/", "_") + "_"
    try:
        files = [e[len(prefix):] for e in os.listdir(cache) if e.startswith(prefix) and e.lower().endswith(".gguf")]
    except OSError:
        return None
    chosen = hf_file.replace("/", "_") if hf_file else None
    if not chosen:
        named = _flat_manifest_file(cache, repo, tag)
        chosen = named.replace("/", "_") if named else choose_file(files, tag)
    match = next((f for f in files if chosen and f.lower() == chosen.lower()), None)
    if match is None:
        return None
    paths = tuple(os.path.join(cache, prefix + f) for f in _shards_of(files, match))
    return ResolvedModel("", "llama.cpp-cache", f"{repo}/{match}", paths)


def find(name: str, hf_file: str = ""):
    parsed = split_ref(name)
    if parsed is None:
        return None, ["hf (not an ORG/REPO name)"]
    repo, tag, file = parsed
    hf_file = hf_file or file
    looked = []
    for cache in hub_dirs():
        model = _find_hub(cache, repo, tag, hf_file)
        if model:
            return model, looked
        looked.append(f"hf {cache}")
    model = _find_flat(flat_dir(), repo, tag, hf_file)
    if model:
        return model, looked
    looked.append(f"llama.cpp cache {flat_dir()}")
    return None, looked


def list_models() -> list:

    out = []
    for cache in hub_dirs():
        if not os.path.isdir(cache):
            continue
        info = _hub().scan_cache_dir(cache)
        for repo in sorted(info.repos, key=lambda r: r.repo_id):
            if repo.repo_type != "model":
                continue
            for rev in sorted(repo.revisions, key=lambda r: (not r.refs, "main" not in r.refs, r.commit_hash)):
                files = [str(f.file_path) for f in rev.files if is_model_file(f.file_name)]
                for paths in group_shards(files):
                    rel = os.path.relpath(paths[0], rev.snapshot_path).replace(os.sep, "/")
                    out.append(ResolvedModel("", "hf", f"{repo.repo_id}/{rel}", paths))
                break  # the revision a name resolves to (main, else another ref)
    cache = flat_dir()
    if os.path.isdir(cache):
        files = [os.path.join(cache, e) for e in sorted(os.listdir(cache)) if is_model_file(e) and "_" in e]
        out += [ResolvedModel("", "llama.cpp-cache", os.path.basename(p[0]), p) for p in group_shards(files)]
    return out
