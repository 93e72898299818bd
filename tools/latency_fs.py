"""Read-only FUSE passthrough that sleeps a fixed latency in every read request.

It stands in for latency-bound storage (network block devices, NFS, object-store mounts) in
``tools/bench_warm.py --latency-ms``: on such storage one reader waits on every request, so
concurrency pays, which a local disk does not show (docs/design.md, "Worker processes").

Command line (root or a user allowed to mount FUSE; needs Debian ``fuse3`` and PyPI ``mfusepy``)::

    python tools/latency_fs.py SOURCE_DIR MOUNTPOINT --latency-ms 5 [--threads 64]
        [--read-ahead-kb KB] [--stats] [--foreground]
    fusermount3 -u MOUNTPOINT          # or SIGTERM / SIGINT to a --foreground server

From Python (the benchmark)::

    with mounted(src_dir, latency_ms=2) as mnt:   # a fresh temporary mountpoint
        ...  # read mnt / "model.gguf"; raises FuseUnavailable (one line) if FUSE is missing

How it is mounted, and why:
- ``kernel_cache``: the kernel keeps a file's cached pages when it is reopened (without it every
  open drops them and residency through the mount reads 0). POSIX_FADV_DONTNEED still evicts.
- multithreaded (``max_threads``) with ``max_background`` raised to ``--threads``: readahead
  requests are "background" requests, of which the kernel otherwise keeps only 12 in flight;
  ``time.sleep`` releases the GIL, so ``--threads`` requests can wait their latency at once.
- ``--read-ahead-kb`` sets the FUSE bdi's read_ahead_kb (kernel default for FUSE: 128 KiB).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["FuseUnavailable", "LatencyPassthrough", "fuse_unavailable_reason", "main", "mounted"]

_ONE_DAY_S = 86400
_MOUNT_TIMEOUT_S = 10.0
_STAT_KEYS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_blksize")
_STATVFS_KEYS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                 "f_favail", "f_namemax")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class FuseUnavailable(RuntimeError):
    """FUSE cannot be used here; ``str()`` is one line saying what is missing."""


class LatencyPassthrough:
    """mfusepy operations: a read-only view of ``root``; each read sleeps ``latency_s`` first."""

    use_ns = True  # mfusepy: st_*time values are integer nanoseconds

    def __init__(self, root: str, latency_s: float, threads: int = 64,
                 read_ahead_kb: int | None = None, mountpoint: str = "", stats: bool = False) -> None:
        self.root = os.path.realpath(root)
        self.latency_s = latency_s
        self.threads = threads
        self._read_ahead_kb = read_ahead_kb
        self._mountpoint = mountpoint
        self._stats = stats
        self._lock = threading.Lock()
        self._in_flight = self.peak_in_flight = self.reads = self.max_read = 0
        self.served = False  # set once the kernel connected: later libfuse errors mean "stopped"

    def _real(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def init_with_config(self, conn: Any, config: Any) -> None:
        # Readahead reads are "background" requests: the kernel keeps at most max_background
        # (default 12) of them in flight. libfuse 3.14's fuse_main takes no option for it.
        self.served = True
        conn.max_background = self.threads
        conn.congestion_threshold = max(1, self.threads * 3 // 4)
        if self._read_ahead_kb is not None:  # the bdi exists only once the mount is live
            threading.Thread(target=self._set_read_ahead, daemon=True).start()

    def _set_read_ahead(self) -> None:
        deadline = time.monotonic() + _MOUNT_TIMEOUT_S
        while not os.path.ismount(self._mountpoint) and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            Path(bdi_dir(self._mountpoint), "read_ahead_kb").write_text(f"{self._read_ahead_kb}\n")
        except OSError as exc:
            print(f"latency_fs: cannot set read_ahead_kb: {exc}", file=sys.stderr)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        st = os.stat(self._real(path))
        attrs = {key: getattr(st, key) for key in _STAT_KEYS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def open(self, path: str, flags: int) -> int:
        if flags & _WRITE_FLAGS:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return os.open(self._real(path), os.O_RDONLY)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        if self._stats:
            self._count(1, size)
        try:
            time.sleep(self.latency_s)  # releases the GIL: other requests sleep meanwhile
            return os.pread(fh, size, offset)
        finally:
            if self._stats:
                self._count(-1, 0)

    def _count(self, delta: int, size: int) -> None:
        with self._lock:
            self._in_flight += delta
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            self.reads += delta > 0
            self.max_read = max(self.max_read, size)

    def release(self, path: str | None, fh: int) -> None:
        os.close(fh)

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._real(path))
        return {key: getattr(sv, key) for key in _STATVFS_KEYS}

    def destroy(self, path: str) -> None:
        if self._stats:
            print(f"latency_fs: {self.reads} reads, largest request {self.max_read} bytes, "
                  f"peak in flight {self.peak_in_flight}", file=sys.stderr)


def bdi_dir(mountpoint: str | os.PathLike[str]) -> str:
    """The sysfs directory of the mount's backing device info (``read_ahead_kb`` lives there)."""
    dev = os.stat(mountpoint).st_dev
    return f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}"


def fuse_unavailable_reason() -> str | None:
    """One line naming what is missing for FUSE mounts here, or None if all is present."""
    if not os.path.exists("/dev/fuse"):
        return "FUSE unavailable: /dev/fuse is missing (kernel module or container device)"
    if shutil.which("fusermount3") is None:
        return "FUSE unavailable: fusermount3 not found (apt-get install fuse3)"
    if importlib.util.find_spec("mfusepy") is None:
        return "FUSE unavailable: Python package mfusepy not installed (pip install mfusepy)"
    return None


def fuse_options(threads: int) -> dict[str, Any]:
    """Mount and libfuse options: read-only, kernel cache kept, ``threads`` requests in flight."""
    # kernel_cache: open() keeps cached pages (auto_cache, off by default, would drop them on
    # a changed mtime); the attr/entry timeouts spare a getattr round trip per open.
    return dict(ro=True, fsname="latency_fs", subtype="latency_fs", kernel_cache=True,
                attr_timeout=_ONE_DAY_S, entry_timeout=_ONE_DAY_S,
                max_threads=threads, max_idle_threads=threads)


def serve(args: argparse.Namespace) -> None:
    """Mount and serve until unmounted or signalled (libfuse handles SIGTERM, SIGINT, SIGHUP)."""
    reason = fuse_unavailable_reason()
    if reason is None and not os.path.isdir(args.source):
        reason = f"{args.source}: not a directory"
    if reason:
        raise SystemExit(f"latency_fs: {reason}")
    import mfusepy  # noqa: PLC0415 - loads libfuse; only the server process needs it

    ops = LatencyPassthrough(args.source, args.latency_ms / 1000, args.threads, args.read_ahead_kb,
                             os.path.abspath(args.mountpoint), args.stats)
    try:
        mfusepy.FUSE(ops, args.mountpoint, foreground=args.foreground, nothreads=False,
                     **fuse_options(args.threads))
    except RuntimeError as exc:  # libfuse's exit code; a signal ends a live loop with 8
        if not ops.served:
            raise SystemExit(f"latency_fs: libfuse failed to mount (code {exc})") from None


def unmount(mountpoint: str | os.PathLike[str]) -> bool:
    """Unmount; lazily (``-uz``) if a file is still open on it. True if not left lazily."""
    for flags in ("-u", "-uz"):
        if not os.path.ismount(mountpoint):
            return flags == "-u"
        subprocess.run(["fusermount3", flags, os.fspath(mountpoint)], capture_output=True, check=False)
    return False


def _stop(server: subprocess.Popen[bytes], grace_s: float) -> None:
    """Give the server ``grace_s`` to exit by itself, then SIGTERM, then SIGKILL."""
    for wait_s, escalate in ((grace_s, server.terminate), (5.0, server.kill)):
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(wait_s)
            return
        escalate()
    server.wait()


def _wait_for_mount(server: subprocess.Popen[bytes], mnt: Path, log: Path) -> None:
    deadline = time.monotonic() + _MOUNT_TIMEOUT_S
    while not os.path.ismount(mnt):
        if server.poll() is not None or time.monotonic() > deadline:
            lines = log.read_text(errors="replace").strip().splitlines() or ["no output"]
            raise FuseUnavailable(f"FUSE unavailable: latency_fs did not mount: {lines[-1]}")
        time.sleep(0.02)


@contextlib.contextmanager
def mounted(source_dir: str | os.PathLike[str], latency_ms: float, *, threads: int = 64,
            read_ahead_kb: int | None = None) -> Iterator[Path]:
    """Serve ``source_dir`` with ``latency_ms`` per read at a fresh mountpoint, for the block.

    The server is this script in a subprocess; the mount, the server and the temporary
    directory are gone afterwards, however the block is left.
    """
    if not os.path.isdir(source_dir):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fspath(source_dir))
    reason = fuse_unavailable_reason()
    if reason:
        raise FuseUnavailable(reason)
    tmp = Path(tempfile.mkdtemp(prefix="latency_fs."))
    mnt, log = tmp / "mnt", tmp / "server.log"
    mnt.mkdir()
    cmd = [sys.executable, os.path.abspath(__file__), os.fspath(source_dir), os.fspath(mnt),
           "--latency-ms", str(latency_ms), "--threads", str(threads), "--foreground"]
    if read_ahead_kb is not None:
        cmd += ["--read-ahead-kb", str(read_ahead_kb)]
    try:
        with open(log, "wb") as log_file:
            server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                      stderr=subprocess.STDOUT)
        try:
            _wait_for_mount(server, mnt, log)
            yield mnt
        finally:
            # A lazy unmount leaves the connection alive while a file is open: the server
            # would wait for it, so it is told to stop at once.
            _stop(server, grace_s=5.0 if unmount(mnt) else 0.0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="directory to serve, read-only")
    parser.add_argument("mountpoint")
    parser.add_argument("--latency-ms", type=float, required=True, help="sleep per read request")
    parser.add_argument("--threads", type=int, default=64, help="requests served at once")
    parser.add_argument("--read-ahead-kb", type=int, help="set the mount's read_ahead_kb (root)")
    parser.add_argument("--stats", action="store_true", help="print read statistics on unmount")
    parser.add_argument("--foreground", action="store_true", help="do not daemonize")
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
