"""One evict for the API, the CLI, tests and tools, on a file system that cannot fsync.

squashfs has no fsync operation: fdatasync answers EINVAL.  The model is put in a real
squashfs image, loop-mounted read-only (root, squashfs-tools' ``mksquashfs``); where that is
not possible the test says why and skips.  Nothing here mocks the kernel.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import resident_fraction

import warmpool
from warmpool import _platform

ROOT = Path(__file__).resolve().parents[1]


def squashfs_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "mounting a squashfs image needs root"
    if shutil.which("mksquashfs") is None:
        return "mksquashfs not found (Debian package squashfs-tools)"
    with open("/proc/filesystems") as f:
        if "squashfs" not in f.read().split():
            return "this kernel has no squashfs"
    return None


@pytest.fixture
def squashfs_model(tiny_model, tmp_path) -> Path:
    why = squashfs_unavailable()
    if why:
        pytest.skip(why)
    source, image, mountpoint = tmp_path / "src", tmp_path / "model.squashfs", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    shutil.copyfile(tiny_model, source / "model.gguf")
    subprocess.run(["mksquashfs", str(source), str(image), "-noappend", "-quiet", "-no-progress"],
                   check=True, capture_output=True)
    mounted = subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(image), str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount the squashfs image here: {mounted.stderr.strip()}")
    try:
        yield mountpoint / "model.gguf"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def fdatasync_errno(path: Path) -> int | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
    return None


@pytest.mark.pagecache
def test_evict_on_a_file_system_without_fsync(squashfs_model):
    # The case itself: this file system refuses fdatasync (else the test would prove nothing).
    assert fdatasync_errno(squashfs_model) == errno.EINVAL

    warmpool.warm(squashfs_model)
    assert resident_fraction(squashfs_model) >= 0.99
    left = warmpool.evict(squashfs_model)  # the API (the selection: every tensor, not the header)
    assert left == 0
    # residency() walks the header again: the page it shares with the first tensor comes back
    assert warmpool.residency(squashfs_model).bytes_resident <= _platform.PAGE_SIZE

    warmpool.warm(squashfs_model)
    done = subprocess.run([sys.executable, "-m", "warmpool", "evict", str(squashfs_model)],  # the CLI
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout.startswith("evicted ") and "0 B still resident" in done.stdout

    warmpool.warm(squashfs_model)
    _platform.evict_file(squashfs_model)  # what tests and tools call: the whole file
    assert resident_fraction(squashfs_model) == 0.0


def test_evict_file_names_a_missing_file(tmp_path):
    with pytest.raises(warmpool.PlatformError, match=r"missing\.gguf: cannot open: No such file"):
        _platform.evict_file(tmp_path / "missing.gguf")
