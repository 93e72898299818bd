"""Residency the kernel hides: a model owned by another uid, mode 0444, warmed by a process
without CAP_FOWNER / CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (docs/design.md).

Real parts only: the files are chowned to uid 65534, the warm runs as a subprocess under
``setpriv`` with those capabilities dropped (mincore then answers "all resident" for them), and
the truth is read afterwards from this test process, which may see it (root with CAP_FOWNER:
the owner-side view).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import evict_file

import warmpool

pytestmark = pytest.mark.pagecache

NOBODY = 65534
DROP = "-fowner,-dac_override,-dac_read_search"
SETPRIV = ["setpriv", f"--bounding-set={DROP}", f"--inh-caps={DROP}", "--"]
HIDDEN_TEXT = "residency hidden by the kernel (not the owner, not writable)"


def dropped(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run argv with the capabilities that would reveal another user's residency dropped."""
    return subprocess.run([*SETPRIV, *argv], capture_output=True, text=True, timeout=timeout)


def cli(*argv: str) -> subprocess.CompletedProcess:
    return dropped(sys.executable, "-m", "warmpool", *argv)


def hide(path) -> None:
    """Give the file to another uid, read-only for everyone: its residency is then hidden."""
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o444)


def owner_view(path) -> float:
    """The selection's resident fraction as a process that may see it measures it."""
    r = warmpool.residency(path)
    assert not r.residency_hidden, "the test process itself cannot see residency"
    return r.resident_fraction


def check_setup() -> None:
    """Skip (saying why) where the case cannot be built; never on warmpool's own verdict."""
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    if release < (5, 2):
        pytest.skip(f"Linux {os.uname().release} does not hide residency (can_do_mincore came in 5.2)")
    probe = dropped("true")
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop capabilities here: {probe.stderr.strip()}")


@pytest.fixture
def hidden_model(private_model):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop capabilities")
    try:
        hide(private_model)
    except PermissionError:
        pytest.skip("cannot chown a file to another uid here (not root / no CAP_CHOWN)")
    check_setup()
    yield private_model
    os.chmod(private_model, 0o644)  # let tmp_path clean-up remove it


def test_probe_matches_the_kernel_rule(hidden_model, tmp_path):
    """The probe says hidden exactly where can_do_mincore says no: the same file is visible to its
    owner's view (here) and to the capless process once it may write it."""
    assert not warmpool.residency_hidden(hidden_model)  # root with CAP_FOWNER: visible
    own = tmp_path / "own.bin"
    own.write_bytes(b"x" * 8192)
    script = "import sys, warmpool; print(*[warmpool.residency_hidden(p) for p in sys.argv[1:]])"
    assert dropped(sys.executable, "-c", script, str(hidden_model), str(own)).stdout.split() == ["True", "False"]
    os.chmod(hidden_model, 0o666)  # writable by all: file_permission(MAY_WRITE) succeeds
    assert dropped(sys.executable, "-c", script, str(hidden_model)).stdout.split() == ["False"]


def test_hidden_file_is_warmed_whole_and_reported_unknown(hidden_model):
    evict_file(hidden_model)
    assert owner_view(hidden_model) < 0.01
    run = cli("warm", str(hidden_model), "--json", "--no-progress")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["residency_hidden"] is True
    assert out["resident_fraction"] is None
    assert out["bytes_already_resident"] is None
    assert out["files"] == [{"path": str(hidden_model), "bytes_selected": out["bytes_selected"],
                             "bytes_resident": None, "hidden": True}]
    assert out["workers"] >= 1 and out["bytes_warmed"] == out["bytes_selected"]
    # The truth, from a process that may see it: every selected page was read.
    assert owner_view(hidden_model) >= 0.99


def test_hidden_file_text_says_why_and_what_reveals_it(hidden_model):
    evict_file(hidden_model)
    run = cli("warm", str(hidden_model), "--no-progress")
    assert run.returncode == 0, run.stderr
    assert HIDDEN_TEXT in run.stdout and "CAP_FOWNER" in run.stdout and "owner" in run.stdout
    assert "% resident" not in run.stdout and "already resident" not in run.stdout
    assert owner_view(hidden_model) >= 0.99


def test_status_exits_4_when_residency_is_hidden(hidden_model):
    evict_file(hidden_model)
    for extra in ([], ["--min-resident", "0.99"], ["--min-resident", "0"]):
        run = cli("status", str(hidden_model), *extra)
        assert run.returncode == 4, (extra, run.stdout, run.stderr)
        assert "residency cannot be observed" in run.stdout and HIDDEN_TEXT in run.stdout
    run = cli("status", str(hidden_model), "--json", "-v")
    assert run.returncode == 4
    out = json.loads(run.stdout)
    assert out["resident_fraction"] is None and out["bytes_resident"] is None and out["residency_hidden"] is True
    assert all(layer["bytes_resident"] is None for layer in out["layers"])
    # The same file, asked by a process that may see it: 0, not hidden.
    assert subprocess.run([sys.executable, "-m", "warmpool", "status", str(hidden_model)]).returncode == 0


def test_engine_adapter_follows_the_warm_on_a_hidden_file(hidden_model):
    evict_file(hidden_model)
    script = """
import sys
from engine_adapter import start_warmup
w = start_warmup(sys.argv[1])
r = w.wait(60)
p = w.progress()
assert w.error is None, w.error
assert r.residency_hidden and r.resident_fraction is None, r
assert p.state == "done" and p.done_bytes == p.total_bytes == r.bytes_selected, p
assert all(w.layer_ready(k) for k in range(-1, w.n_layers + 1))
print("ok")
"""
    run = dropped(sys.executable, "-c", script, str(hidden_model))
    assert run.stdout.strip() == "ok", run.stderr
    assert owner_view(hidden_model) >= 0.99


def test_split_model_mixing_hidden_and_visible_shards(split_model, tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop capabilities")
    shards = []
    for shard in split_model:
        shards.append(tmp_path / shard.name)
        shutil.copyfile(shard, shards[-1])
        os.chmod(shards[-1], 0o644)  # root's own and writable by it: visible
        with open(shards[-1], "rb+") as f:
            os.fsync(f.fileno())
    try:
        hide(shards[1])
    except PermissionError:
        pytest.skip("cannot chown a file to another uid here (not root / no CAP_CHOWN)")
    check_setup()
    try:
        for shard in shards:
            evict_file(shard)
        assert owner_view(shards[0]) < 0.05
        run = cli("warm", str(shards[0]), "--json", "--no-progress")
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert out["residency_hidden"] is True
        assert out["resident_fraction"] is None and out["bytes_already_resident"] is None
        files = out["files"]
        assert [f["path"] for f in files] == [str(s) for s in shards]
        assert [f["hidden"] for f in files] == [False, True, False]
        assert files[1]["bytes_resident"] is None
        for f in (files[0], files[2]):  # the visible shards are measured, and warm
            assert f["bytes_selected"] > 0 and f["bytes_resident"] >= 0.99 * f["bytes_selected"]
        assert owner_view(shards[0]) >= 0.99

        text = cli("warm", str(shards[0]), "--no-progress")
        assert f"{HIDDEN_TEXT} for {shards[1].name}" in text.stdout
        status = cli("status", str(shards[0]), "--json")
        assert status.returncode == 4
        out = json.loads(status.stdout)
        assert [f["hidden"] for f in out["files"]] == [False, True, False]
        assert out["files"][0]["bytes_resident"] >= 0.99 * out["files"][0]["bytes_selected"]
    finally:
        os.chmod(shards[1], 0o644)
