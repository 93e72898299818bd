"""Real, bounded memory pressure for tools/keep_bench.py: a memory cgroup with a limit and a
co-tenant that streams through another large file inside it.

The bench process moves itself into a child of its own memory cgroup (cgroup v2
``memory.max`` where the memory controller is on the unified hierarchy, else v1
``memory.limit_in_bytes``), so everything it starts (the engine is the bench process itself,
``warmpool warm``/``keep`` and their workers, the co-tenant) is charged there and reclaim is
confined to it: the limit bounds the pressure, the machine never comes near OOM.  Page cache is
charged to the cgroup of the process that first reads a page in, so the model's pages (read by
the warm or the keeper, both inside) and the co-tenant's compete for the same limit and the
kernel's LRU reclaim decides which go (``shrink_folio_list()``; docs/keep.md).

    python tools/lib/mem_pressure.py --hog FILE --rate 128   # the co-tenant alone: read FILE in a loop
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

_V1 = Path("/sys/fs/cgroup/memory")
_V2 = Path("/sys/fs/cgroup")
STEP = 8 << 20


def own_cgroup() -> tuple[Path, str] | None:
    """(directory of this process's memory cgroup, limit file name) or None."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, rel in lines:
        if "memory" in controllers.split(",") and (_V1 / rel.lstrip("/")).is_dir():
            return _V1 / rel.lstrip("/"), "memory.limit_in_bytes"
    for hid, _, rel in lines:
        base = _V2 / rel.lstrip("/")
        controllers_file = base / "cgroup.controllers"
        if hid == "0" and controllers_file.exists() and "memory" in controllers_file.read_text().split():
            return base, "memory.max"
    return None


class MemoryCage:
    """A child memory cgroup with ``limit`` bytes that this process joins until ``close()``."""

    def __init__(self, limit: int) -> None:
        found = own_cgroup()
        if found is None:
            raise OSError("no memory cgroup controller found (neither v1 nor v2)")
        self.parent, limit_file = found
        if limit_file == "memory.max":  # v2: the child needs the controller enabled in the parent
            try:
                (self.parent / "cgroup.subtree_control").write_text("+memory")
            except OSError as e:
                raise OSError(f"cannot enable the memory controller under {self.parent}: {e}") from e
        self.path = self.parent / f"warmpool-keepbench-{os.getpid()}"
        self.path.mkdir()
        try:
            (self.path / limit_file).write_text(str(limit))
            self.limit = int((self.path / limit_file).read_text().split()[0])
            (self.path / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            self.path.rmdir()
            raise

    def limit_hits(self) -> int:
        """How many times a charge has hit the limit so far (each one makes the charging task
        reclaim): v1 ``memory.failcnt``, v2 the ``max`` count in ``memory.events``."""
        failcnt = self.path / "memory.failcnt"
        if failcnt.exists():
            return int(failcnt.read_text())
        for line in (self.path / "memory.events").read_text().splitlines():
            key, value = line.split()
            if key == "max":
                return int(value)
        return 0

    def usage(self) -> int | None:
        for name in ("memory.usage_in_bytes", "memory.current"):
            if (self.path / name).exists():
                return int((self.path / name).read_text())
        return None

    def close(self) -> None:
        (self.parent / "cgroup.procs").write_text(str(os.getpid()))
        for _ in range(50):  # the last children may still be leaving
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def make_file(path: Path, size: int) -> Path:
    """A file of ``size`` bytes of real (non-sparse) data, written once."""
    if not path.exists() or path.stat().st_size != size:
        block = bytes(range(256)) * (STEP // 256)
        with open(path, "wb") as f:
            for _ in range(size // STEP):
                f.write(block)
    return path


class Hog:
    """The co-tenant: ``python tools/lib/mem_pressure.py --hog FILE --rate MB/s`` in a child process."""

    def __init__(self, path: Path, rate_mb_s: float) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--hog", str(path), "--rate", str(rate_mb_s)])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _stream(path: str, rate_mb_s: float) -> None:
    """Read the file front to back, over and over, at about ``rate_mb_s`` MB/s (one buffer, no
    growing anonymous memory: all the pressure is page cache)."""
    buf = bytearray(STEP)
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    start, done = time.monotonic(), 0
    while True:
        for offset in range(0, size, STEP):
            done += os.preadv(fd, [buf], offset)
            ahead = done / (rate_mb_s * 1e6) - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hog", required=True)
    ap.add_argument("--rate", type=float, default=128)
    args = ap.parse_args()
    try:
        _stream(args.hog, args.rate)
    except KeyboardInterrupt:
        pass
