"""A keeper whose selection does not fit drops the read-ahead an engine did not ask for
(``KeptModel.shed``): every cached page of the model outside what it holds that no process maps.
Real page cache, a real process mapping part of the file, residency by mincore."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import evict_file

from warmpool import _platform, plan_model
from warmpool._keep.model import KeptModel

pytestmark = pytest.mark.pagecache

MiB = 1 << 20

# Maps [offset, offset + length) of FILE, reads a byte of each page, says so, waits for a line.
MAPPER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, int(sys.argv[3]), prot=mmap.PROT_READ, offset=int(sys.argv[2]))
sum(m[i] for i in range(0, len(m), 4096))
print("mapped", flush=True)
sys.stdin.readline()
"""


def test_shed_drops_what_nobody_maps_outside_the_held_part(private_model):
    plan = plan_model(private_model, chunk_size=MiB)
    size = plan.files[0].size
    held = tuple(c for c in plan.chunks if c.offset + c.length <= size // 3)
    assert held and len(held) < len(plan.chunks)
    held_end = max(c.offset + c.length for c in held)
    mapped = (size * 2 // 3) // MiB * MiB, 4 * MiB  # the "engine's" pages, outside what is held
    evict_file(private_model)
    with open(private_model, "rb") as f:  # every page cached, as the engine's read-ahead leaves them
        while f.read(8 * MiB):
            pass
    engine = subprocess.Popen([sys.executable, "-c", MAPPER, str(private_model), str(mapped[0]), str(mapped[1])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    fd = os.open(private_model, os.O_RDONLY)
    try:
        assert engine.stdout.readline().strip() == "mapped"
        model = KeptModel(plan, "m")
        model.fds, model.kept = [fd], plan._replace(chunks=held)
        model.shed()
        resident = _platform.resident_bytes
        assert sum(resident(fd, c.offset, c.length) for c in held) == sum(c.length for c in held)  # held: stays
        assert resident(fd, *mapped) == mapped[1]  # what the engine maps stays
        # The rest is gone, but for folios that straddle the edges of the two (kept whole).
        rest = [(held_end + 2 * MiB, mapped[0] - 2 * MiB), (mapped[0] + mapped[1] + 2 * MiB, size)]
        left = sum(resident(fd, a, b - a) for a, b in rest)
        assert left <= 0.01 * sum(b - a for a, b in rest), left
    finally:
        os.close(fd)
        engine.stdin.close()
        engine.wait(10)


def test_the_unheld_ranges_cover_the_files_outside_what_is_held(tiny_model):
    plan = plan_model(tiny_model, chunk_size=64 * 1024)
    model = KeptModel(plan, "m")
    held = plan.chunks[1::3]
    assert len(held) >= 3
    model.kept = plan._replace(chunks=held)
    size = plan.files[0].size
    covered = sorted([(c.offset, c.offset + c.length) for c in held] +
                     [(offset, offset + length) for _, offset, length in model.unheld_ranges()])
    # Held and unheld tile the file: no gap, no overlap.
    assert covered[0][0] == 0 and covered[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), covered


def test_no_drop_while_the_cpus_are_busy(tiny_model):
    """The drop is for an engine that waits on the disk: with every CPU busy (an engine that
    computes), the keeper's gate stays shut.  Real busy processes, /proc/stat."""
    import time

    from warmpool._keep.keeper import Keeper

    keeper = Keeper([tiny_model])  # not started: only its gate is asked
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)  # the hogs are running
        keeper._cpus_idle(time.monotonic())
        time.sleep(0.6)
        assert keeper._cpus_idle(time.monotonic()) is False
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
