"""The expert profile: which experts of which model were hot, as a versioned JSON file.

The schema, every field and the version rule are in docs/profile.md.  Readers accept any
``1.x`` and ignore fields they do not know; a writer bumps the minor version when it adds a
field and the major version when it changes or removes one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from typing import NamedTuple

from .._errors import ProfileError
from .._gguf.layout import ModelLayout
from .slices import n_experts

__all__ = ["FORMAT", "VERSION", "ModelIdentity", "Profile", "ProfileError", "check_profile", "model_identity",
           "read_profile", "write_profile"]

FORMAT = "warmpool-expert-profile"
VERSION = "1.0"


class ModelIdentity(NamedTuple):
    files: tuple[tuple[str, int], ...]  # (path, size in bytes) of each file (shard) of the model
    tensor_table_sha256: str  # of every tensor's name, shard, offset, size, type and shape
    architecture: str | None
    n_layers: int
    n_experts: int

    @property
    def path(self) -> str:
        return self.files[0][0]


class Profile(NamedTuple):
    model: ModelIdentity
    scores: dict[tuple[int, int], float]  # (layer, expert) -> score, higher is hotter
    samples: int  # sampling passes the scores rest on
    seconds: float | None  # wall time from the first pass to the last; None if unknown
    created: float  # Unix time the profile was made
    method: str | None = None  # "cachestat", "mincore", or None (unknown / not sampled)
    version: str = VERSION

    def order(self) -> list[tuple[int, int]]:
        """(layer, expert) hottest first (ties: layer, then expert)."""
        return sorted(self.scores, key=lambda k: (-self.scores[k], k))


def _table_hash(layout: ModelLayout) -> str:
    h = hashlib.sha256()
    for t in layout.tensors:
        h.update(f"{t.name}\0{t.file}\0{t.offset}\0{t.nbytes}\0{t.ggml_type}\0{','.join(map(str, t.shape))}\n".encode())
    return h.hexdigest()


def model_identity(layout: ModelLayout) -> ModelIdentity:
    """What a profile records of its model, from the layout alone (no tensor data is read)."""
    return ModelIdentity(tuple((f.path, f.size) for f in layout.files), _table_hash(layout),
                         layout.architecture, layout.n_layers, n_experts(layout))


def check_profile(profile: Profile, layout: ModelLayout, path: str | None = None) -> None:
    """ProfileError unless the profile was made for this model: same file sizes and the same
    tensor table (the path may differ: a moved or re-downloaded copy is the same model)."""
    mine = model_identity(layout)
    theirs = profile.model
    if theirs.tensor_table_sha256 != mine.tensor_table_sha256 or [s for _, s in theirs.files] != [s for _, s in mine.files]:
        raise ProfileError(f"made for another model ({theirs.path}, {sum(s for _, s in theirs.files)} bytes, "
                           f"tensor table {theirs.tensor_table_sha256[:12]}), not {mine.path} "
                           f"({sum(s for _, s in mine.files)} bytes, tensor table {mine.tensor_table_sha256[:12]})", path)


def to_json(profile: Profile) -> dict:
    m = profile.model
    return {
        "format": FORMAT,
        "version": profile.version,
        "created": profile.created,
        "model": {
            "files": [{"path": p, "size": s} for p, s in m.files],
            "tensor_table_sha256": m.tensor_table_sha256,
            "architecture": m.architecture,
            "n_layers": m.n_layers,
            "n_experts": m.n_experts,
        },
        "sampling": {"samples": profile.samples, "seconds": profile.seconds, "method": profile.method},
        "experts": [{"layer": layer, "expert": expert, "score": profile.scores[layer, expert]}
                    for layer, expert in profile.order()],
    }


def _bad(path, why: str) -> ProfileError:
    return ProfileError(f"not a usable expert profile: {why}", path)


def _int(value, what: str, path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(path, f"{what} is {value!r}, not a non-negative integer")
    return value


def from_json(data, path=None) -> Profile:
    """The profile a parsed JSON document holds; ProfileError naming what is wrong."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _bad(path, f"its \"format\" is not {FORMAT!r}")
    version = data.get("version")
    major = version.split(".")[0] if isinstance(version, str) else None
    if major != VERSION.split(".")[0]:
        raise _bad(path, f"version {version!r}; this warmpool reads {VERSION.split('.')[0]}.x")
    try:
        m, sampling = data["model"], data["sampling"]
        files = tuple((str(f["path"]), _int(f["size"], "a file size", path)) for f in m["files"])
        model = ModelIdentity(files, str(m["tensor_table_sha256"]), m.get("architecture"),
                              _int(m["n_layers"], "n_layers", path), _int(m["n_experts"], "n_experts", path))
        scores = {}
        for row in data["experts"]:
            key = (_int(row["layer"], "a layer", path), _int(row["expert"], "an expert", path))
            score = row["score"]
            if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
                raise _bad(path, f"expert {key} has score {score!r}")
            scores[key] = float(score)
        seconds = sampling.get("seconds")
        return Profile(model, scores, _int(sampling["samples"], "samples", path),
                       None if seconds is None else float(seconds), float(data["created"]),
                       sampling.get("method"), version)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _bad(path, f"a field is missing or of the wrong type ({type(e).__name__}: {e})") from None


def read_profile(path: str | os.PathLike[str]) -> Profile:
    """Read a profile; ProfileError (one line naming the file and the problem) if it cannot be used."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ProfileError(f"cannot read the profile: {e.strerror}", path) from None
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(path, f"not JSON ({e})") from None
    return from_json(data, path)


def write_profile(path: str | os.PathLike[str], profile: Profile) -> None:
    """Write atomically (a temporary file in the same directory, then rename): a reader or a
    crash never sees half a profile."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    doc = to_json(profile)
    # One line per expert: thousands of rows stay readable (and diffable) without a tool.
    rows = ",\n  ".join(json.dumps(row) for row in doc["experts"])
    text = json.dumps({**doc, "experts": []}, indent=1).replace('"experts": []', f'"experts": [\n  {rows}\n ]' if rows else '"experts": []') + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ProfileError(f"cannot write the profile: {e.strerror}", path) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ProfileError(f"cannot write the profile: {e.strerror}", path) from None
