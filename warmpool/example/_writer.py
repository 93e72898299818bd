"""Writing the synthetic models: streamed tensor by tensor, atomically, optionally split.

Stacked expert tensors are raw Q8_0 so that, as in a real MoE, experts hold most of the bytes.
Data is seeded random, never zeros: filesystems may store zero pages as holes or deduplicate
them, and page-cache measurements would lie.  Tensors are generated and written one at a time
after the header, so a multi-GB model needs about one tensor of memory; files are written
under a unique scratch name and moved into place with ``os.replace``, so an interruption never
leaves a half file behind.  numpy and gguf are imported inside the functions that need them.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import shutil
import tempfile
from pathlib import Path

from warmpool._errors import PlatformError, WarmpoolError
from warmpool._gguf.ggml import GGML_TYPES

from ._model import (
    _ARCH,
    _F16,
    _Q8_0,
    TEST,
    MoeShape,
    _check_shape,
    _metadata,
    _Tensor,
    _tensors,
)

__all__ = ["write_moe_gguf"]


def _shard_starts(tensors: list[_Tensor], n_shards: int) -> set[int]:
    """Indexes of the tensors that open shards 2..N, cutting at even shares of the bytes."""
    if not 1 <= n_shards <= len(tensors):
        raise WarmpoolError(f"split_shards must be between 1 and {len(tensors)}, got {n_shards}")
    before = [0, *itertools.accumulate(t.nbytes for t in tensors)]  # bytes before tensor i
    starts: list[int] = [0]
    for k in range(1, n_shards):
        wanted = bisect.bisect_left(before, before[-1] * k / n_shards)
        # Keep every shard non-empty and leave one tensor for each shard still to come.
        starts.append(min(max(wanted, starts[-1] + 1), len(tensors) - (n_shards - k)))
    return set(starts[1:])


def _tensor_data(tensor: _Tensor, rng):  # -> numpy.ndarray
    import numpy as np

    fan_in = tensor.shape[-1]
    if tensor.ggml_type == _Q8_0:
        # A Q8_0 block is an f16 scale then 32 int8 quants.  Random bytes give the quants; the
        # scale makes the weights' std about 1/sqrt(fan_in) (uniform int8 has std ~74) so that
        # llama.cpp's activations stay finite through every layer.
        q8 = GGML_TYPES[_Q8_0]
        n_blocks = math.prod(tensor.shape) // q8.block_size
        raw = rng.bit_generator.random_raw(-(-n_blocks * q8.type_size // 8)).view(np.uint8)
        blocks = raw[: n_blocks * q8.type_size].reshape(n_blocks, q8.type_size)
        scale = np.float16(1.0 / (74.0 * math.sqrt(fan_in)))
        blocks[:, :2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
        return blocks.reshape(tensor.data_shape)
    values = rng.standard_normal(tensor.shape, dtype=np.float32)
    if len(tensor.shape) == 1:  # RMS-norm weights: near one
        return (1.0 + 0.01 * values).astype(np.float32)
    dtype = np.float16 if tensor.ggml_type == _F16 else np.float32
    return (values / math.sqrt(fan_in)).astype(dtype)


def _new_writer(path: Path, shape: MoeShape, tensors: list[_Tensor], n_shards: int):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, _ARCH)
    for kv in _metadata(shape)[1:]:  # the writer already added general.architecture
        sub_type = None if kv.sub_type is None else gguf.GGUFValueType(kv.sub_type)
        writer.add_key_value(kv.key, kv.value, gguf.GGUFValueType(kv.vtype), sub_type)
    starts = _shard_starts(tensors, n_shards)
    for index, tensor in enumerate(tensors):
        # gguf-py splits by a tensor count or byte limit, not into N shards: steer its own rule
        # tensor by tensor ("a shard already holding >= 1 tensor is full" opens the next one).
        writer.split_max_tensors = 1 if index in starts else 0
        # Float types go as numpy floats of their width, block-quantized ones as raw bytes.
        t = GGML_TYPES[tensor.ggml_type]
        raw = gguf.GGMLQuantizationType(tensor.ggml_type) if t.block_size > 1 else None
        dtype = np.dtype(np.uint8) if raw is not None else np.dtype(f"<f{t.type_size}")
        writer.add_tensor_info(tensor.name, tensor.data_shape, dtype, tensor.nbytes, raw)
    writer.split_max_tensors = 0
    return writer


def _shard_names(path: Path, n_shards: int) -> list[Path]:
    # llama.cpp's naming (llama_split_path), which is also gguf-py's SHARD_NAME_FORMAT.
    if n_shards == 1:
        return [path]
    names = (f"{path.stem}-{k:05d}-of-{n_shards:05d}.gguf" for k in range(1, n_shards + 1))
    return [path.with_name(name) for name in names]


def _stream(writer, tensors: list[_Tensor], seed: int) -> None:
    """Header, metadata and tensor table first, then each tensor generated as it is written."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:  # write_tensor_data takes the tensors in add_tensor_info order
        writer.write_tensor_data(_tensor_data(tensor, rng))


def write_moe_gguf(
    path: str | os.PathLike[str],
    shape: MoeShape = TEST,
    *,
    seed: int = 0,
    split_shards: int | None = None,
) -> list[Path]:
    """Write a synthetic qwen3moe model; return the written file(s), shards in order.

    ``split_shards=N`` (N >= 2) writes ``<stem>-0000K-of-0000N.gguf`` shards next to ``path``
    carrying ``split.no`` / ``split.count`` / ``split.tensors.count``; None or 1 writes ``path``.
    The same ``shape`` and ``seed`` always give the same bytes.
    """
    final = Path(path)
    _check_shape(shape)
    tensors = list(_tensors(shape))
    n_shards = 1 if split_shards is None else split_shards
    names = _shard_names(final, n_shards)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # A unique private directory on the same filesystem: os.replace is then an atomic rename,
        # and two processes generating the same file never write into each other's bytes.
        scratch = Path(tempfile.mkdtemp(".tmp", f".{final.name}.", final.parent))
    except OSError as exc:
        raise PlatformError(f"cannot create the model's directory: {exc}", final) from exc
    try:
        writer = _new_writer(scratch / final.name, shape, tensors, n_shards)
        try:
            _stream(writer, tensors, seed)
        finally:
            writer.close()
        for name in names:
            os.replace(scratch / name.name, name)
    except OSError as exc:
        raise PlatformError(f"cannot write the model: {exc}", final) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return names
