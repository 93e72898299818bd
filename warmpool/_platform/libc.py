"""The libc calls every platform module shares: typed ctypes bindings (mmap, munmap, madvise,
mincore), page arithmetic, and the one way an OS failure becomes a ``PlatformError``.

Python's ``mmap`` module hides the raw address that madvise and mincore need, so the platform
layer maps files through libc itself; the bindings live here once, for the POSIX and Linux
backends, the mapped window and the keeper's held mapping.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from warmpool._errors import PlatformError

TYPE_CHECKING = False  # typing is not free to import; annotations are strings anyway
if TYPE_CHECKING:
    from typing import Callable, Iterator

PAGE_SIZE: int = mmap.PAGESIZE
# mincore(2) sets bit 0 for "resident"; the other bits are reserved (Linux) or carry
# extra state (macOS/BSD: referenced, modified...).  Keep bit 0 only.
_BIT0 = bytes(i & 1 for i in range(256))

_OFF_T = ctypes.c_int64
_MAP_FAILED = ctypes.c_void_p(-1).value


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # TypeError: Windows refuses CDLL(None)
        return None


_libc = _load_libc()


def _bind(name: str, restype: type | None, *argtypes: type) -> Callable[..., int] | None:
    """A typed libc function, or None where this libc lacks it."""
    fn = getattr(_libc, name, None) if _libc is not None else None
    if fn is not None:
        fn.restype = restype
        fn.argtypes = argtypes
    return fn


_P, _N, _INT = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
# mmap64 on 32-bit glibc takes a 64-bit off_t; on 64-bit systems it is mmap itself.
_MMAP_ARGS = (_P, _N, _INT, _INT, _INT, _OFF_T)
_mmap = _bind("mmap64", _P, *_MMAP_ARGS) or _bind("mmap", _P, *_MMAP_ARGS)
_munmap = _bind("munmap", _INT, _P, _N)
_madvise = _bind("madvise", _INT, _P, _N, _INT)
_mincore = _bind("mincore", _INT, _P, _N, _P)


def _round_down(n: int) -> int:
    return n - n % PAGE_SIZE


def _round_up(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE


def _failure(what: str, err: int | None = None, why: str = "") -> PlatformError:
    err = ctypes.get_errno() if err is None else err
    return PlatformError(f"{what} failed: {os.strerror(err)} (errno {err}){why}")


def _require(fn: Callable[..., int] | None, name: str) -> Callable[..., int]:
    if fn is None:
        raise PlatformError(f"{name} is not available on this OS")
    return fn


def _fstat(fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as exc:
        raise PlatformError(f"fstat failed: {exc.strerror}") from exc


def _page_span(fd: int, offset: int, length: int) -> tuple[int, int, int]:
    """``(start, stop, limit)``: the page-rounded range clipped at EOF, and how many
    of its bytes exist (the page holding EOF is only partly file)."""
    size = _fstat(fd).st_size
    end = size if length == 0 else min(offset + length, size)
    if end <= offset:
        return 0, 0, 0
    start, stop = _round_down(offset), _round_up(end)
    return start, stop, min(stop, size) - start


def _map_readonly(fd: int, offset: int, length: int) -> int:
    """Address of a fresh read-only shared mapping: its faults map the page-cache
    pages themselves, and mapping alone reads nothing."""
    address = _require(_mmap, "mmap")(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if address is None or address == _MAP_FAILED:
        raise _failure("mmap")
    return address


def _unmap(address: int, length: int) -> None:
    if _require(_munmap, "munmap")(address, length) != 0:
        raise _failure("munmap")


def page_runs(vector: bytes, value: int = 1) -> Iterator[tuple[int, int]]:
    """(first page, end page) of each run of ``value`` (1 resident, 0 not) in a mincore vector."""
    start = vector.find(value)
    while start != -1:
        end = vector.find(1 - value, start)
        end = len(vector) if end == -1 else end
        yield start, end
        start = vector.find(value, end)


def _mincore_into(address: int, length: int, out: bytearray, first_page: int) -> None:
    vector = (ctypes.c_ubyte * (_round_up(length) // PAGE_SIZE)).from_buffer(out, first_page)
    if _require(_mincore, "mincore")(address, length, ctypes.addressof(vector)) != 0:
        raise _failure("mincore")
