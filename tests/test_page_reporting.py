"""Free page reporting: whether this guest hands free memory back to its host, which makes an
engine's first read of idle pages slower under memory pressure (docs/keep.md), and which
``warmpool keep`` therefore names when it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import lines_until

from warmpool import _platform
from warmpool._platform.proc import PAGE_REPORTING_ORDER
from warmpool.commands.keep import _describe

ORDER = Path("/sys", PAGE_REPORTING_ORDER)
# /proc/buddyinfo's first line on x86-64: one count per order, 0 to 10
BUDDYINFO = "Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3\n"


def _sysfs(root: Path, order: str | None, features: str | None) -> tuple[str, str]:
    if order is not None:
        (root / PAGE_REPORTING_ORDER).parent.mkdir(parents=True)
        (root / PAGE_REPORTING_ORDER).write_text(order + "\n")
    if features is not None:
        device = root / "bus/virtio/drivers/virtio_balloon/virtio0"
        device.mkdir(parents=True)
        (device / "features").write_text(features + "\n")
    (root / "buddyinfo").write_text(BUDDYINFO)
    return str(root), str(root / "buddyinfo")


REPORTING = "0110010" + "0" * 57  # bits 1, 2 and 5: stats, deflate-on-oom, free page reporting


@pytest.mark.parametrize("order, features, expected", [
    ("9", REPORTING, 9),
    ("9", "0110000" + "0" * 57, None),  # a balloon without VIRTIO_BALLOON_F_REPORTING
    ("11", REPORTING, None),  # above the largest order buddyinfo has: nothing is reported
    ("9", None, None),  # no balloon device
    (None, REPORTING, None),  # a kernel without page reporting
])
def test_free_page_reporting_reads_the_kernels_files(tmp_path, order, features, expected):
    sysfs, buddyinfo = _sysfs(tmp_path, order, features)
    assert _platform.free_page_reporting(sysfs, buddyinfo) == expected


def test_free_page_reporting_follows_the_running_order(reporting_order):
    """On a guest that reports, raising the order above the largest block (what an operator
    does to switch reporting off) is seen at once, and so is restoring it."""
    before = _platform.free_page_reporting()
    if before is None:
        pytest.skip("this machine does not hand free pages back to a host (no reporting virtio balloon)")
    with reporting_order(exclusive=True):
        try:
            ORDER.write_text("11")
        except OSError as e:
            pytest.skip(f"cannot write {ORDER} ({e.strerror}; needs root)")
        try:
            assert _platform.free_page_reporting() is None
        finally:
            ORDER.write_text(str(before))
    assert _platform.free_page_reporting() == before


def test_keep_names_free_page_reporting_when_it_starts():
    started = {"event": "started", "models": ["m.gguf"], "interval": 10.0, "refresh": 1.0, "address": None}
    assert "free page reporting" not in _describe(started | {"free_page_reporting": None})
    note = _describe(started | {"free_page_reporting": 9}).splitlines()
    assert len(note) == 2 and "free page reporting, order 9" in note[1] and "does not prevent" in note[1]


def test_run_names_free_page_reporting_where_the_guest_reports(tiny_model, reporting_order):
    """`warmpool run` keeps beside the engine; its human output carries the keeper's note on a
    guest that reports free pages, and no note on one that does not.  The note comes with the
    keeper's start, before its first warm's line, so the engine runs until that line is seen."""
    with reporting_order():
        run = subprocess.Popen([sys.executable, "-m", "warmpool", "run", str(tiny_model), "--", "sleep", "60"],
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            seen = lines_until(run.stderr, lambda line: line.startswith("warmpool: warmed "))
        finally:
            os.killpg(run.pid, signal.SIGTERM)  # warmpool and the engine
            run.wait(timeout=30)
        order = _platform.free_page_reporting()
    text = "".join(seen)
    assert "warmpool: warmed " in text, text
    if order is None:
        assert "free page reporting" not in text
    else:
        assert f"warmpool: note: this VM hands free memory back to its host (free page reporting, order {order})" in text
