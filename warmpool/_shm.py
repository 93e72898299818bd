"""POSIX shared-memory objects: name, create, map, unlink (the progress segment's storage).

On Linux an object is a file under /dev/shm, which is exactly what glibc's shm_open(3) opens;
elsewhere CPython's ``_posixshmem`` wrapper is used.  Not ``multiprocessing.shared_memory``:
before Python 3.13 it registers even *attached* segments with the resource tracker, so a
worker or reader would unlink the segment (or warn about a leak) when it exits.
"""

from __future__ import annotations

import mmap
import os

from warmpool._errors import ProgressError

__all__ = ["create_object", "map_object", "os_error", "posix_name", "unlink_object"]

_SHM_DIR = "/dev/shm"
_NAME_TRIES = 8


def posix_name(name: str) -> str:
    """``/warmpool-...`` from a name given with or without its leading slash."""
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or "\0" in bare or bare in (".", ".."):
        raise ProgressError("not a shared-memory object name (one path component)", name)
    return "/" + bare


def _posixshmem(name: str):  # noqa: ANN202 - a module
    try:
        import _posixshmem  # CPython's shm_open/shm_unlink wrapper; absent on some builds
    except ImportError:
        msg = f"no {_SHM_DIR} and no _posixshmem: this system offers no POSIX shared memory"
        raise ProgressError(msg, name) from None
    return _posixshmem


def _open_object(name: str, flags: int, mode: int = 0o600) -> int:
    if os.path.isdir(_SHM_DIR):
        # glibc's shm_open(3) is exactly this open(2) under /dev/shm.
        return os.open(_SHM_DIR + name, flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    return _posixshmem(name).shm_open(name, flags, mode)


def unlink_object(name: str) -> None:
    if os.path.isdir(_SHM_DIR):
        os.unlink(_SHM_DIR + name)
    else:
        _posixshmem(name).shm_unlink(name)


def os_error(name: str, action: str, error: OSError) -> ProgressError:
    if isinstance(error, FileNotFoundError):
        return ProgressError("not found (finished or never started)", name)
    return ProgressError(f"cannot {action}: {error.strerror or error}", name)


def create_object(size: int) -> tuple[str, mmap.mmap]:
    """A fresh object of ``size`` zero bytes, mode 0600, mapped read-write."""
    for _ in range(_NAME_TRIES):
        name = f"/warmpool-{os.getpid()}-{os.urandom(4).hex()}"  # <= 31 chars: macOS limit
        try:
            fd = _open_object(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            continue
        except OSError as e:
            raise os_error(name, "create", e) from None
        try:
            if os.path.isdir(_SHM_DIR):
                os.fchmod(fd, 0o600)  # a umask could have taken the owner's bits
            os.ftruncate(fd, size)
            return name, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            unlink_object(name)
            raise os_error(name, "create", e) from None
        finally:
            os.close(fd)
    raise ProgressError(f"no unused name after {_NAME_TRIES} tries", _SHM_DIR)


def map_object(name: str, writable: bool, min_size: int) -> mmap.mmap:
    """Map an existing object whole; the fd is closed (the mapping outlives it)."""
    try:
        fd = _open_object(name, os.O_RDWR if writable else os.O_RDONLY)
    except OSError as e:
        raise os_error(name, "open", e) from None
    try:
        size = os.fstat(fd).st_size
        if size < min_size:
            raise ProgressError(f"truncated: {size} bytes, less than a header", name)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    except OSError as e:
        raise os_error(name, "map", e) from None
    finally:
        os.close(fd)
