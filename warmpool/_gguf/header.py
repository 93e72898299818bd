"""Walk one GGUF file's header with struct-level reads: the first stage of the pipeline.

Layout (little-endian, or big-endian for files converted for s390x; gguf-py reads both):
magic ``GGUF``, version u32 (2 or 3), tensor_count u64, kv_count u64, the KV pairs, then one
tensor info per tensor, then the data section at the next multiple of ``general.alignment``.

Two rules shape this module:

* **Never touch tensor data.**  The header is read with ``os.pread`` on an fd advised
  ``POSIX_FADV_RANDOM`` (no readahead past what is asked), and the buffer only ever grows by
  bytes that are *known* to belong to the header: what the next field needs, or a lower
  bound derived from counts already parsed (``n`` more strings are at least ``8 n`` bytes).
  So the pages of the data section stay exactly as cold as they were.
* **Never trust a count.**  Every count and length is checked against the bytes left in the
  file before it is used, so a corrupt header costs a ``LayoutError``, not gigabytes of RAM
  or a loop of 2^60 iterations.  Token strings are skipped, not decoded (gguf-py's reader
  builds a numpy array per token: seconds on a 262k vocabulary, docs/design.md).
"""

from __future__ import annotations

import os
import stat
import struct
from typing import NamedTuple

from .._errors import LayoutError
from .ggml import GGML_TYPES, tensor_nbytes

__all__ = ["FileHeader", "RawTensor", "read_header"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4  # ggml.h: tensors have at most 4 dimensions
DEFAULT_ALIGNMENT = 32  # gguf.h: GGUF_DEFAULT_ALIGNMENT

# GGUF value types -> (struct code, size); 8 = string, 9 = array are variable length.
SCALAR_TYPES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (0-dim tensor)
MAX_READ_AHEAD = 4 << 20  # bytes read on a lower bound: a multi-MB header (a 262k vocabulary) in a few reads
MAX_ARRAY_DEPTH = 4  # arrays of arrays exist in the spec; deeper nesting is corruption


class RawTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute offset in the file
    nbytes: int


class FileHeader(NamedTuple):
    path: str
    size: int
    version: int
    byte_order: str  # "little" or "big"
    alignment: int
    data_offset: int
    metadata: dict  # scalar and string KVs; arrays are recorded by their length only
    tensors: tuple[RawTensor, ...]


class _Reader:
    """A cursor over the header that reads more of the file only when a field needs it."""

    def __init__(self, fd: int, path: str, size: int, order: str) -> None:
        self.fd, self.path, self.size = fd, path, size
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # file offset of the cursor
        self.tail = 0  # header bytes known to follow the item being parsed
        self.set_order(order)

    def set_order(self, order: str) -> None:
        prefix = "<" if order == "little" else ">"
        self.order = order
        self.u32 = struct.Struct(prefix + "I").unpack_from
        self.u64 = struct.Struct(prefix + "Q").unpack_from
        self.prefix = prefix

    def fail(self, what: str) -> LayoutError:
        return LayoutError(what, self.path)

    def left(self) -> int:
        return self.size - self.pos

    def ensure(self, n: int, lower_bound: int = 0) -> int:
        """Make n bytes at the cursor available; return their index in buf.

        ``lower_bound`` (bytes the current item still has at least) plus ``tail`` (what the
        items after it take at least) is read at once: few preads, none into tensor data.
        """
        start = self.pos - self.base
        if start + n <= len(self.buf):
            return start
        if self.pos + n > self.size:
            raise self.fail(f"truncated header: {n} bytes needed at offset {self.pos}, file has {self.size}")
        # The bounds come from counts not yet verified: a corrupt tensor count that still passes
        # `count` would otherwise read (and hold) the whole file, tensor data included.
        want = min(max(n, lower_bound) + self.tail, max(n, MAX_READ_AHEAD), self.size - self.pos)
        data = os.pread(self.fd, want, self.pos)
        if len(data) < n:
            raise self.fail(f"file shrank while reading its header at offset {self.pos}")
        self.buf, self.base = data, self.pos
        return 0

    def take(self, fmt: str):
        fmt = self.prefix + fmt  # standard sizes, no native padding ("IQ" is 12 bytes)
        s = struct.calcsize(fmt)
        i = self.ensure(s)
        self.pos += s
        return struct.unpack_from(fmt, self.buf, i)

    def count(self, what: str, min_each: int) -> int:
        (n,) = self.take("Q")
        if n * min_each > self.left():
            raise self.fail(f"absurd {what} {n} at offset {self.pos - 8}: the file has {self.left()} bytes left")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"{what} length", 1)
        i = self.ensure(n)
        self.pos += n
        try:
            return self.buf[i : i + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {self.pos - n} is not UTF-8") from None

    def skip_strings(self, n: int) -> None:
        """Skip n strings: the hot loop of a parse (Gemma-3's 262,144 tokens are ~90% of it).

        Four strings per iteration of the loop docs/design.md ("The header walk") describes:
        fewer instructions than one per iteration.  A length running past the buffer raises struct.error
        (or OverflowError once a corrupt length near 2^64 pushes ``off`` past ssize_t); the
        broken group is then redone one string at a time and the buffer refilled from there.
        """
        u64 = self.u64
        while n:
            i = self.ensure(8, 8 * n)
            buf, off, mark, groups = self.buf, i, i, 0
            try:
                for groups in range(n >> 2):  # noqa: B007 - `groups` done says where to resume
                    mark = off
                    off += 8 + u64(buf, off)[0]
                    off += 8 + u64(buf, off)[0]
                    off += 8 + u64(buf, off)[0]
                    off += 8 + u64(buf, off)[0]
                groups, mark = n >> 2, off
            except (struct.error, OverflowError):
                pass
            n, off = n - 4 * groups, mark
            try:  # at most a few strings: the rest of a broken group, or the last n % 4
                while n:
                    off += 8 + u64(buf, off)[0]
                    n -= 1
            except (struct.error, OverflowError):  # past the buffer: refill at this string
                pass
            self.pos = self.base + off
            if self.pos > self.size:
                raise self.fail(f"truncated or corrupt string array ending past offset {min(self.pos, self.size)}")


def _skip_value(r: _Reader, vtype: int, depth: int = 0):
    """Read a KV value: scalars and strings are returned, arrays skipped (length returned)."""
    if vtype in SCALAR_TYPES:
        return r.take(SCALAR_TYPES[vtype])[0]
    if vtype == STRING:
        return r.string("string value")
    if vtype != ARRAY:
        raise r.fail(f"unknown value type {vtype} at offset {r.pos - 4}")
    if depth >= MAX_ARRAY_DEPTH:
        raise r.fail(f"arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {r.pos}")
    (etype,) = r.take("I")
    if etype in SCALAR_TYPES:
        size = struct.calcsize("<" + SCALAR_TYPES[etype])
        n = r.count("array length", size)
        r.pos += n * size
    elif etype == STRING:
        n = r.count("string array length", 8)
        r.skip_strings(n)
    elif etype == ARRAY:
        n = r.count("array length", 4 + 8)
        for _ in range(n):
            _skip_value(r, ARRAY, depth + 1)
    else:
        raise r.fail(f"unknown array element type {etype} at offset {r.pos - 4}")
    return n


def _read_preamble(r: _Reader) -> tuple[int, int, int]:
    (magic,) = r.take("4s")
    if magic != GGUF_MAGIC:
        raise r.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    i = r.ensure(4)
    raw = r.buf[i : i + 4]
    version = int.from_bytes(raw, "little")
    if version not in SUPPORTED_VERSIONS and int.from_bytes(raw, "big") in SUPPORTED_VERSIONS:
        r.set_order("big")  # a big-endian GGUF: every later field is big-endian too
        version = int.from_bytes(raw, "big")
    r.pos += 4
    if version not in SUPPORTED_VERSIONS:
        raise r.fail(f"unsupported GGUF version {version} (warmpool reads versions 2 and 3)")
    n_tensors = r.count("tensor count", MIN_TENSOR_INFO_BYTES)
    n_kv = r.count("metadata count", MIN_KV_BYTES)
    return version, n_tensors, n_kv


def _read_metadata(r: _Reader, n_kv: int, n_tensors: int) -> dict:
    metadata: dict = {}
    for i in range(n_kv):
        r.tail = (n_kv - i - 1) * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES
        key = r.string("metadata key")
        (vtype,) = r.take("I")
        metadata[key] = _skip_value(r, vtype)
    return metadata


def _read_tensor_info(r: _Reader, remaining: int) -> tuple[str, tuple[int, ...], int, int]:
    r.tail = (remaining - 1) * MIN_TENSOR_INFO_BYTES
    name = r.string("tensor name")
    (n_dims,) = r.take("I")
    if n_dims > GGML_MAX_DIMS:
        raise r.fail(f"tensor {name!r} has {n_dims} dimensions (ggml allows {GGML_MAX_DIMS})")
    shape = r.take(f"{n_dims}Q") if n_dims else ()
    ggml_type, offset = r.take("IQ")
    return name, tuple(shape), ggml_type, offset


def _tensor_bytes(r: _Reader, name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    info = GGML_TYPES.get(ggml_type)
    if info is None:
        raise r.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
    n_elements = 1
    for dim in shape:
        n_elements *= dim
        if n_elements > r.size * info.block_size:  # cannot fit: stop before the product explodes
            raise r.fail(f"tensor {name!r} of shape {list(shape)} cannot fit in a {r.size}-byte file")
    nbytes = tensor_nbytes(info, n_elements)
    if nbytes is None:
        raise r.fail(f"tensor {name!r}: {n_elements} elements are not whole {info.name} blocks of {info.block_size}")
    return nbytes


def _alignment(r: _Reader, metadata: dict) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment {alignment!r} is not a power of two")
    return alignment


def _read_tensors(r: _Reader, n_tensors: int, alignment: int) -> tuple[int, tuple[RawTensor, ...]]:
    infos = [_read_tensor_info(r, n_tensors - i) for i in range(n_tensors)]
    data_offset = -(-r.pos // alignment) * alignment
    tensors, seen = [], set()
    for name, shape, ggml_type, rel in infos:
        if name in seen:
            raise r.fail(f"duplicate tensor name {name!r}")
        seen.add(name)
        nbytes = _tensor_bytes(r, name, shape, ggml_type)
        if rel % alignment:
            raise r.fail(f"tensor {name!r} offset {rel} is not a multiple of the alignment {alignment}")
        start = data_offset + rel
        if start + nbytes > r.size:
            raise r.fail(f"tensor {name!r} data ends at byte {start + nbytes}, past the end of the file ({r.size})")
        tensors.append(RawTensor(name, shape, ggml_type, start, nbytes))
    return data_offset, tuple(tensors)


def read_header(path: str) -> FileHeader:
    """Parse one GGUF file's header; raise LayoutError naming the file on any defect."""
    try:
        st = os.stat(path)  # before open: opening a FIFO would block
        if stat.S_ISDIR(st.st_mode):
            raise LayoutError("is a directory, not a GGUF file", path)
        if not stat.S_ISREG(st.st_mode):
            raise LayoutError("is not a regular file", path)
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise LayoutError("no such file", path) from None
    except OSError as e:
        raise LayoutError(f"cannot open: {e.strerror}", path) from None
    except ValueError as e:  # os.stat refuses a path with a NUL byte ("embedded null byte")
        raise LayoutError(f"invalid path: {e}", path) from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise LayoutError("empty file", path)
        if hasattr(os, "posix_fadvise"):  # no readahead past the header (see module doc)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        r = _Reader(fd, path, size, "little")
        version, n_tensors, n_kv = _read_preamble(r)
        metadata = _read_metadata(r, n_kv, n_tensors)
        alignment = _alignment(r, metadata)
        data_offset, tensors = _read_tensors(r, n_tensors, alignment)
        return FileHeader(path, size, version, r.order, alignment, data_offset, metadata, tensors)
    except OSError as e:
        raise LayoutError(f"read failed: {e.strerror}", path) from None
    finally:
        os.close(fd)
