"""POSIX shared-memory objects: name, create, map, unlink (the progress segment's storage).

On Linux an object is a file under /dev/shm, which is exactly what glibc's shm_open(3) opens;
elsewhere CPython's ``_posixshmem`` wrapper is used.  Not ``multiprocessing.shared_memory``:
before Python 3.13 it registers even *attached* segments with the resource tracker, so a
worker or reader would unlink the segment (or warn about a leak) when it exits.

An object's pages are allocated when it is created (posix_fallocate), never on first write:
on a full tmpfs a write through a mapping of a merely ``ftruncate``d object is a SIGBUS, which
would kill the CLI or the engine that warms.  Where /dev/shm is full, read-only or missing, an
unnamed object (memfd_create(2)) serves instead, unless the caller needs a name that another
process can look up.  Its reference is ``memfd:FD``: only this process and the workers it
hands that fd (``pass_fds``, same number) can map it.
"""

from __future__ import annotations

import mmap
import os
import sys
from typing import NamedTuple

from warmpool._errors import ProgressError

__all__ = ["SharedObject", "create_object", "is_unnamed", "map_object", "os_error", "posix_name", "unlink_object"]

_SHM_DIR = "/dev/shm"
_NAME_TRIES = 8
_UNNAMED = "memfd:"


class SharedObject(NamedTuple):
    name: str  # the POSIX name, or ``memfd:FD`` for an unnamed object
    mm: mmap.mmap  # mapped read-write
    fd: int | None  # an unnamed object's fd (the caller closes it), None for a named one


def is_unnamed(name: str) -> bool:
    return name.startswith(_UNNAMED)


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
        if sys.platform.startswith("linux") and not os.path.isdir(_SHM_DIR):
            return ProgressError(f"not found: this system has no {_SHM_DIR}, so no warm has a named segment", name)
        return ProgressError("not found (finished or never started)", name)
    return ProgressError(f"cannot {action}: {error.strerror or error}", name)


def create_object(size: int, *, require_name: bool = False) -> SharedObject:
    """A fresh object of ``size`` zero bytes, mode 0600, allocated and mapped read-write.

    Named under /dev/shm where that works; otherwise unnamed, or with ``require_name`` a
    ProgressError saying why there is no name.
    """
    try:
        return _create_named(size)
    except ProgressError as e:
        if require_name:
            raise
        named_error = e
    if not hasattr(os, "memfd_create"):
        raise named_error
    try:
        fd = os.memfd_create("warmpool-progress", os.MFD_CLOEXEC)
    except OSError as e:
        raise ProgressError(f"{named_error}; and memfd_create failed: {e.strerror}") from None
    try:
        return SharedObject(f"{_UNNAMED}{fd}", _allocate_and_map(fd, size), fd)
    except OSError as e:
        os.close(fd)
        raise ProgressError(f"{named_error}; and an unnamed one failed: {e.strerror}") from None


def _create_named(size: int) -> SharedObject:
    for _ in range(_NAME_TRIES):
        name = f"/warmpool-{os.getpid()}-{os.urandom(4).hex()}"  # <= 31 chars: macOS limit
        try:
            fd = _open_object(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            continue
        except OSError as e:
            raise _create_error(e) from None
        try:
            if os.path.isdir(_SHM_DIR):
                os.fchmod(fd, 0o600)  # a umask could have taken the owner's bits
            return SharedObject(name, _allocate_and_map(fd, size), None)
        except OSError as e:
            unlink_object(name)
            raise _create_error(e) from None
        finally:
            os.close(fd)
    raise ProgressError(f"no unused name after {_NAME_TRIES} tries", _SHM_DIR)


def _allocate_and_map(fd: int, size: int) -> mmap.mmap:
    os.ftruncate(fd, size)
    if hasattr(os, "posix_fallocate"):  # ENOSPC here, not SIGBUS at the first store
        os.posix_fallocate(fd, 0, size)
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def _create_error(error: OSError) -> ProgressError:
    return ProgressError(f"cannot create a named shared-memory object: {error.strerror or error}", _SHM_DIR)


def map_object(name: str, writable: bool, min_size: int) -> mmap.mmap:
    """Map an existing object whole; the fd is closed (the mapping outlives it).  An unnamed
    object is mapped from its fd, which stays open (it is its creator's)."""
    if is_unnamed(name):
        try:
            fd = os.dup(int(name[len(_UNNAMED):]))
        except (ValueError, OSError):
            raise ProgressError("an unnamed segment that this process does not hold", name) from None
    else:
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
