"""The kernel behaviour warmpool's platform layer relies on, measured on this machine.

On a fresh file of random bytes (``--size``, default 512 MiB, written and synced under
``--dir``), each evicted before its measurement:

* ``cachestat_ms`` / ``mincore_ms``: one residency query over the whole file (median of 9),
  ``_platform.cached_bytes`` (cachestat(2)) vs ``_platform.resident_bytes`` (mmap + mincore).
* ``willneed_resident``: bytes resident after one POSIX_FADV_WILLNEED over the whole file
  (waited 2 s): the kernel caps one hint (force_page_cache_ra in mm/readahead.c).
* ``prefetch_return_s`` / ``prefetch_resident_at_return``: ``_platform.prefetch`` (stepped
  WILLNEED) over the whole file: when the call returns, and how much had arrived by then.
* ``populate_outside`` / ``prefetch_populate_outside``: resident bytes outside a 64 MiB window
  in the middle after MADV_POPULATE_READ alone, and after prefetch then populate.

Prints one line per figure and one JSON object, with the load average.  Asserts nothing.

Command line::

    python tools/bench_platform.py [--size 512M] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512M", help="file size (default 512M)")
    parser.add_argument("--dir", default=None, help="where the file is written (default: the temp dir)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from warmpool import _platform
    from warmpool._units import parse_size

    size = parse_size(args.size)
    load_before = os.getloadavg()
    figures: dict = {"size": size, "readahead": None, "kernel": os.uname().release}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "data.bin"
        with open(path, "wb") as f:
            for _ in range(0, size, 8 * MiB):
                f.write(os.urandom(8 * MiB))
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            figures.update(size=size, readahead=_platform.readahead_size(fd))

            def timed(fn) -> float:
                runs = []
                for _ in range(9):
                    started = time.perf_counter()
                    fn()
                    runs.append((time.perf_counter() - started) * 1e3)
                return round(statistics.median(runs), 3)

            if _platform.cached_bytes(fd, 0, 0) is not None:
                figures["cachestat_ms"] = timed(lambda: _platform.cached_bytes(fd, 0, 0))
            figures["mincore_ms"] = timed(lambda: _platform.resident_bytes(fd, 0, 0))

            _platform.evict_ranges(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            time.sleep(2)
            figures["willneed_resident"] = _platform.resident_bytes(fd, 0, 0)

            _platform.evict_ranges(fd)
            started = time.perf_counter()
            _platform.prefetch(fd, 0, 0)
            figures["prefetch_return_s"] = round(time.perf_counter() - started, 3)
            figures["prefetch_resident_at_return"] = _platform.resident_bytes(fd, 0, 0)

            start, length = (size // 2) // MiB * MiB, 64 * MiB
            for key, hint in (("populate_outside", False), ("prefetch_populate_outside", True)):
                _platform.evict_ranges(fd)
                if hint:
                    _platform.prefetch(fd, start, length)
                with _platform.FileWindow(fd, start, length) as window:
                    window.populate(0, length)
                    inside = _platform.resident_bytes(fd, start, length)
                figures[key] = _platform.resident_bytes(fd, 0, 0) - inside
        finally:
            os.close(fd)
    figures.update(loadavg_before=load_before, loadavg_after=os.getloadavg())
    for key, value in figures.items():
        print(f"{key:28s} {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
