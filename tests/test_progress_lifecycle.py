"""The progress segment's lifecycle (unlink, settle, abandonment) and what a reader rejects."""
# ruff: noqa: F811 - the fixtures imported from test_progress are test parameters here

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_progress import (  # noqa: F401 - segment and shm_file are fixtures
    CHUNKS,
    REPO,
    SHM,
    TOTAL,
    needs_dev_shm,
    python_env,
    segment,
    shm_file,
)

from warmpool._errors import CancelledError, ProgressError, WorkerDiedError
from warmpool._progress import segment as _progress
from warmpool._progress import shm as _shm
from warmpool._progress.segment import ProgressSegment, ProgressView, WorkerCounter

# --- lifecycle ----------------------------------------------------------------------


@needs_dev_shm
def test_unlink_leaves_no_entry(segment):
    path = SHM + segment.name
    assert os.path.exists(path)
    segment.unlink()
    assert not os.path.exists(path)
    segment.unlink()  # idempotent
    with pytest.raises(ProgressError, match=r"not found \(finished or never started\)"):
        ProgressView.attach(segment.name)


@needs_dev_shm
def test_unlink_when_already_gone_does_not_raise(segment):
    os.unlink(SHM + segment.name)
    segment.unlink()


def test_reader_attached_before_unlink_sees_final_state(segment):
    view = ProgressView.attach(segment.name)
    segment.set_state("running")
    counter = WorkerCounter.attach(segment.name, 0)
    counter.add(TOTAL)
    segment.set_state("done")
    segment.unlink()
    segment.close()
    snap = view.snapshot()
    assert (snap.state, snap.done_bytes, snap.total_bytes) == ("done", TOTAL, TOTAL)
    assert snap.finished and not view.abandoned()
    counter.close()
    view.close()


@pytest.mark.parametrize(
    ("leave_with", "final"),
    [(None, "done"), (None, "failed"), (RuntimeError, "failed"), (KeyboardInterrupt, "cancelled"),
     (SystemExit, "cancelled"), (CancelledError, "cancelled"), (WorkerDiedError, "failed")],
)
def test_context_manager_settles_state_and_unlinks(leave_with, final):
    # Leaving without a terminal state, by an exception or by forgetting, must not strand
    # readers on a "running" that will never move.
    with pytest.raises(leave_with) if leave_with else contextlib.nullcontext():
        with ProgressSegment.create(1, 1, (), 0) as seg:
            view = ProgressView.attach(seg.name)
            seg.set_state("running")
            if leave_with:
                raise leave_with("stopped")
            if final == "done":
                seg.set_state("done")
    assert view.snapshot().state == final
    with pytest.raises(ProgressError, match="not found"):
        ProgressView.attach(seg.name)
    view.close()


@needs_dev_shm
def test_abandoned_after_coordinator_is_killed():
    code = (
        "import time\n"
        "from warmpool._progress.segment import ProgressSegment\n"
        "seg = ProgressSegment.create(10, 1, (), 0)\n"
        "seg.set_state('running')\n"
        "print(seg.name, flush=True)\n"
        "time.sleep(60)\n"
    )
    command = [sys.executable, "-c", code]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=python_env())
    name = proc.stdout.readline().strip()
    try:
        with ProgressView.attach(name) as view:
            assert not view.abandoned()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert view.abandoned()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        if name:
            os.unlink(SHM + name)


# --- what a reader rejects ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "/", "a/b", "/..", "x\0y"])
def test_malformed_names(name):
    with pytest.raises(ProgressError, match="name"):
        ProgressView.attach(name)


def test_missing_name():
    name = f"/warmpool-{os.getpid()}-missing"
    with pytest.raises(ProgressError, match=r"not found \(finished or never started\)") as err:
        ProgressView.attach(name)
    assert name in str(err.value)


def header_bytes(segment: ProgressSegment) -> bytes:
    return Path(SHM + segment.name).read_bytes()


@needs_dev_shm
@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b"NOTWARMP" + b[8:], "bad magic"),
        (lambda b: bytes(8) + b[8:], "not initialised"),
        (lambda b: b[:8] + (2).to_bytes(4, "little") + b[12:], "version 2"),
        (lambda b: b[:12] + (60).to_bytes(4, "little") + b[16:], "header_size"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[:64], "truncated"),
        (lambda b: b[:63], "truncated"),
        (lambda b: b"", "truncated"),
    ],
)
def test_foreign_or_truncated_objects(segment, shm_file, mangle, message):
    name = shm_file(mangle(header_bytes(segment)))
    for attach in (ProgressView.attach, lambda n: WorkerCounter.attach(n, 0)):
        with pytest.raises(ProgressError, match=message) as err:
            attach(name)
        assert name in str(err.value)


def grown_header(image: bytes) -> bytes:
    """``image`` as a later minor revision would write it: 8 more header bytes."""
    return image[:12] + (72).to_bytes(4, "little") + image[16:64] + b"\xab" * 8 + image[64:]


@needs_dev_shm
def test_readers_find_counters_at_header_size(segment, shm_file):
    counter = WorkerCounter.attach(segment.name, 2)
    counter.add(4096)
    counter.close()
    segment.set_chunk_state(2, "done")
    name = shm_file(grown_header(header_bytes(segment)))
    with ProgressView.attach(name) as view:
        assert view.snapshot() == segment.snapshot()
        assert view.chunk_states() == segment.chunk_states()
        assert [view.layer_ready(k) for k in range(-1, 5)] == [segment.layer_ready(k) for k in range(-1, 5)]


@needs_dev_shm
def test_mode_is_0600_whatever_the_umask():
    old = os.umask(0o277)
    try:
        with ProgressSegment.create(1, 1, (), 0) as seg:
            st = os.stat(SHM + seg.name)
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.getuid()
    finally:
        os.umask(old)


# --- without /dev/shm (the macOS path, exercised here through _posixshmem) -------------------


def test_posixshmem_fallback(monkeypatch):
    pytest.importorskip("_posixshmem")
    monkeypatch.setattr(_shm, "_SHM_DIR", "/nonexistent-shm-dir")
    with ProgressSegment.create(5, 1, CHUNKS, 4) as seg:
        counter = WorkerCounter.attach(seg.name, 0)
        counter.add(5)
        with ProgressView.attach(seg.name) as view:
            assert view.snapshot().done_bytes == 5
        counter.close()
    with pytest.raises(ProgressError, match="not found"):
        ProgressView.attach(seg.name)


def test_no_shared_memory_at_all(monkeypatch):
    monkeypatch.setattr(_shm, "_SHM_DIR", "/nonexistent-shm-dir")
    monkeypatch.setitem(sys.modules, "_posixshmem", None)
    with pytest.raises(ProgressError, match="no POSIX shared memory"):
        ProgressSegment.create(1, 1, (), 0, require_name=True)
    # Without a name to give out, an unnamed segment serves this process (and fd-passing workers).
    with ProgressSegment.create(5, 1, CHUNKS, 4) as seg:
        assert not seg.named and seg.name.startswith("memfd:") and seg.shared_fds
        counter = WorkerCounter.attach(seg.name, 0)
        counter.add(5)
        with ProgressView.attach(seg.name) as view:
            assert view.snapshot().done_bytes == 5
        counter.close()
        fd = seg.shared_fds[0]
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the segment: nothing left behind


# --- the C reader ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def c_reader(tmp_path_factory) -> str:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) on PATH")
    exe = str(tmp_path_factory.mktemp("c") / "progress_reader")
    base = [cc, "-std=c99", "-Wall", "-Wextra", "-O2", str(REPO / "tools/progress_reader.c"), "-o", exe]
    build = subprocess.run(base, capture_output=True, text=True)
    if build.returncode != 0:  # glibc < 2.34 keeps shm_open in librt
        build = subprocess.run([*base, "-lrt"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert build.stderr == "", f"warnings: {build.stderr}"
    return exe


def read_with_c(exe: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe, *args], capture_output=True, text=True)


def test_c_reader_agrees_with_python(c_reader, segment):
    segment.set_state("running")
    for slot, nbytes in ((1, 12_288), (2, 4096)):
        counter = WorkerCounter.attach(segment.name, slot)
        counter.add(nbytes)
        counter.close()
    for index, state in enumerate(["done", "skipped", "running", "done"]):
        segment.set_chunk_state(index, state)
    snap = segment.snapshot()
    run = read_with_c(c_reader, segment.name)
    assert (run.returncode, run.stderr) == (0, "")
    assert run.stdout == f"{snap.done_bytes} {snap.total_bytes} {snap.state}\n"
    for k in range(-1, segment.n_layers + 1):
        run = read_with_c(c_reader, segment.name.lstrip("/"), "--layer", str(k))
        word = "ready" if segment.layer_ready(k) else "not-ready"
        first = f"{snap.done_bytes} {snap.total_bytes} running"
        assert run.stdout.splitlines() == [first, f"layer {k} {word}"]
    segment.set_state("done")
    assert read_with_c(c_reader, segment.name).stdout.split()[2] == "done"


@needs_dev_shm
def test_c_reader_finds_counters_at_header_size(c_reader, segment, shm_file):
    counter = WorkerCounter.attach(segment.name, 1)
    counter.add(8192)
    counter.close()
    segment.set_chunk_state(2, "done")
    segment.set_chunk_state(3, "skipped")
    name = shm_file(grown_header(header_bytes(segment)))
    run = read_with_c(c_reader, name, "--layer", "4")
    assert run.stdout.splitlines() == [f"8192 {TOTAL} starting", "layer 4 ready"]


@needs_dev_shm
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("/warmpool-0-missing",), "not found (finished or never started)"),
        ((), "usage"),
        (("NAME", "--layer", "7"), "--layer"),
        (("NAME", "--layer", "x"), "--layer"),
        (("FOREIGN",), "bad magic"),
        (("TRUNCATED",), "truncated"),
    ],
)
def test_c_reader_errors(c_reader, segment, shm_file, args, message):
    names = {
        "NAME": segment.name,
        "FOREIGN": shm_file(b"NOTWARMP" + bytes(120)),
        "TRUNCATED": shm_file(header_bytes(segment)[:-8]),
    }
    run = read_with_c(c_reader, *(names.get(a, a) for a in args))
    assert run.returncode == 1
    assert message in run.stderr and run.stderr.count("\n") == 1


# --- the protocol document matches the code --------------------------------------------------


def doc_rows(doc: str, heading: str) -> list[tuple[int, int]]:
    """(offset, size) of each row of the table under ``heading``."""
    section = doc.split(heading, 1)[1].split("\n#", 1)[0]
    return [(int(off), int(size)) for off, size in re.findall(r"^\| (\d+) \| (\d+) \|", section, re.M)]


def struct_rows(layout: struct.Struct) -> list[tuple[int, int]]:
    """(offset, size) of each field of a '<' format whose fields each carry one code."""
    rows, offset = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", layout.format.lstrip("<")):
        size = struct.calcsize(f"<{count}{code}")
        rows.append((offset, size))
        offset += size
    return rows


@pytest.mark.parametrize(
    ("heading", "layout"), [("### Header", _progress._HEADER), ("### Chunk entry", _progress._CHUNK)]
)
def test_doc_offsets_match_struct_formats(heading, layout):
    doc = (REPO / "docs/progress-protocol.md").read_text()
    assert doc_rows(doc, heading) == struct_rows(layout)
