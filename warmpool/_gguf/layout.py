"""The model's layout: every tensor of a GGUF model, across its split shards.

``read_layout`` is what engines call at start-up, so it only walks headers (see
``header``) and never touches tensor data.  A split model (llama.cpp's ``gguf-split``
names shards ``<name>-00001-of-00003.gguf``, 1-based, and stores ``split.no`` 0-based,
``split.count`` and ``split.tensors.count`` in each shard) is read as one layout whose
tensors name the shard they live in.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from .._errors import LayoutError
from .header import FileHeader, read_header

__all__ = ["ModelFile", "ModelLayout", "TensorInfo", "read_layout", "shard_paths"]

# llama.cpp common/common.cpp llama_split_path(): "%s-%05d-of-%05d.gguf"
SHARD_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
LAYER_NAME = re.compile(r"^blk\.(\d+)\.")


class ModelFile(NamedTuple):
    path: str
    size: int
    data_offset: int  # where this file's tensor data section starts


class TensorInfo(NamedTuple):
    name: str
    file: int  # index into ModelLayout.files
    offset: int  # absolute byte offset in that file
    nbytes: int
    ggml_type: int
    shape: tuple[int, ...]  # ne0 first, as GGUF stores it
    layer: int | None  # N for blk.N.*, None for token_embd, output, ...


class ModelLayout(NamedTuple):
    files: tuple[ModelFile, ...]
    tensors: tuple[TensorInfo, ...]
    architecture: str | None
    n_layers: int  # {arch}.block_count, or 1 + the highest blk.N seen when the key is absent
    version: int
    alignment: int
    metadata: dict  # the first file's scalar and string metadata

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors (not counting headers and padding)."""
        return sum(t.nbytes for t in self.tensors)


def shard_paths(path: str) -> list[str]:
    """The paths of every shard of the split model ``path`` belongs to ([path] if not split)."""
    m = SHARD_NAME.match(os.path.basename(path))
    if not m:
        return [path]
    count = int(m["count"])
    if not 1 <= int(m["no"]) <= count:
        raise LayoutError(f"shard number {int(m['no'])} is not within 1..{count}", path)
    folder = os.path.dirname(path)
    return [os.path.join(folder, f"{m['prefix']}-{k:05d}-of-{count:05d}.gguf") for k in range(1, count + 1)]


def _check_shard(header: FileHeader, index: int, count: int) -> None:
    split_no = header.metadata.get("split.no", 0 if count == 1 else None)
    split_count = header.metadata.get("split.count", 1 if count == 1 else None)
    if split_count != count or split_no != index:
        raise LayoutError(
            f"shard mismatch: file name says shard {index + 1} of {count}, "
            f"its header says split.no={split_no} split.count={split_count}",
            header.path,
        )


def _check_unsplit(header: FileHeader) -> None:
    # The split keys are whatever the file says: a str or float here must be a LayoutError,
    # not a TypeError from comparing or adding to it.
    count = header.metadata.get("split.count", 1)
    if not isinstance(count, int) or count > 1:
        raise LayoutError(
            f"its header says split.no={header.metadata.get('split.no')!r} split.count={count!r} (a shard of a "
            "split model) but its name is not <name>-0000K-of-0000N.gguf",
            header.path,
        )


def _read_headers(path: str) -> list[FileHeader]:
    paths = shard_paths(os.fspath(path))
    for p in paths if len(paths) > 1 else ():
        if not os.path.exists(p):
            raise LayoutError(f"missing shard {os.path.basename(p)} of a {len(paths)}-shard model", path)
    headers = [read_header(p) for p in paths]
    if len(paths) == 1:
        _check_unsplit(headers[0])
    for index, header in enumerate(headers):
        if len(headers) > 1:
            _check_shard(header, index, len(headers))
    return headers


def _layer_of(name: str) -> int | None:
    m = LAYER_NAME.match(name)
    return int(m.group(1)) if m else None


def _n_layers(metadata: dict, architecture: str | None, tensors: list[TensorInfo]) -> int:
    count = metadata.get(f"{architecture}.block_count")
    seen = max((t.layer for t in tensors if t.layer is not None), default=-1) + 1
    return count if isinstance(count, int) and count >= seen else seen


def read_layout(path: str | os.PathLike[str]) -> ModelLayout:
    """Read the tensor table of a GGUF model (any shard of a split model names them all).

    A path only: store names are resolved where a request comes in (``warmpool.read_layout``)."""
    headers = _read_headers(os.fspath(path))
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for index, header in enumerate(headers):
        for t in header.tensors:
            if t.name in seen:
                raise LayoutError(f"tensor {t.name!r} appears in more than one shard", header.path)
            seen.add(t.name)
            tensors.append(TensorInfo(t.name, index, t.offset, t.nbytes, t.ggml_type, t.shape, _layer_of(t.name)))
    first = headers[0].metadata
    expected = first.get("split.tensors.count")
    if len(headers) > 1 and expected is not None and expected != len(tensors):
        raise LayoutError(f"split.tensors.count is {expected} but the shards hold {len(tensors)} tensors", path)
    architecture = first.get("general.architecture")
    architecture = architecture if isinstance(architecture, str) else None
    return ModelLayout(
        files=tuple(ModelFile(h.path, h.size, h.data_offset) for h in headers),
        tensors=tuple(tensors),
        architecture=architecture,
        n_layers=_n_layers(first, architecture, tensors),
        version=headers[0].version,
        alignment=headers[0].alignment,
        metadata=first,
    )
