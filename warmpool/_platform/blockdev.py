"""The block device under a file and its read-ahead setting (``queue/read_ahead_kb`` in sysfs).

Part of the platform layer (re-exported by ``_platform``).  A file's ``st_dev`` names its block
device as MAJ:MIN; ``/sys/dev/block/MAJ:MIN`` links to the device's sysfs directory, and a
partition has no ``queue`` of its own: its disk, the directory above, does.  Files on devices
without a block queue (tmpfs, FUSE, NFS, overlay's anonymous devices) have none: None.

The kernel copies the device's read-ahead into each ``struct file`` when it is opened
(``file_ra_state_init``, mm/readahead.c), so a new value applies to files opened after the
write, not to an engine that has the model open already.  docs/keep.md, "When the model does
not fit".
"""

from __future__ import annotations

import os
from typing import NamedTuple

from warmpool._errors import PlatformError
from warmpool._platform.proc import read_int

__all__ = ["ReadAhead", "read_ahead", "read_ahead_bytes", "set_read_ahead_kb"]

_SYS_DEV_BLOCK = "/sys/dev/block"


class ReadAhead(NamedTuple):
    device: str  # the disk's name (vda, nvme0n1, dm-0)
    path: str  # its queue/read_ahead_kb
    kb: int  # the value now


def read_ahead(st_dev: int, sys_dev_block: str = _SYS_DEV_BLOCK) -> ReadAhead | None:
    """The read-ahead of the block device holding files with this ``st_dev``, walking up from
    a partition to the disk that has ``queue/read_ahead_kb``; None where there is none."""
    try:
        here = os.path.realpath(f"{sys_dev_block}/{os.major(st_dev)}:{os.minor(st_dev)}")
    except (OSError, ValueError):
        return None
    for _ in range(3):  # the device itself, its disk; never further than the bus
        path = os.path.join(here, "queue", "read_ahead_kb")
        kb = read_int(path)
        if kb is not None:
            return ReadAhead(os.path.basename(here), path, kb)
        here = os.path.dirname(here)
    return None


_bytes_by_device: dict[int, int | None] = {}


def read_ahead_bytes(st_dev: int) -> int | None:
    """The read-ahead in bytes for files with this ``st_dev`` (cached per device until
    ``set_read_ahead_kb``): the backing device's ``bdi`` first, which FUSE and NFS (0:N, no
    block queue) have too, then the block device's queue; None where neither says."""
    if st_dev not in _bytes_by_device:
        kb = read_int(f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb")
        if kb is None:
            found = read_ahead(st_dev)
            kb = found.kb if found is not None else None
        _bytes_by_device[st_dev] = None if kb is None else kb * 1024
    return _bytes_by_device[st_dev]


def set_read_ahead_kb(path: str, kb: int) -> None:
    """Write ``kb`` to a ``queue/read_ahead_kb`` file; PlatformError (with the path) when the
    kernel refuses: not root, or sysfs mounted read-only (a container)."""
    try:
        with open(path, "w") as f:
            f.write(f"{int(kb)}\n")
    except OSError as e:
        raise PlatformError(f"cannot set read_ahead_kb: {e.strerror}", path) from None
    _bytes_by_device.clear()  # read_ahead_bytes() cached the old value
