"""A keeper in a memory cgroup too small for its selection: it holds and locks what the room
leaves (the limit minus what others cannot give back minus --headroom), shrinks when the room
does, says so, and is never OOM-killed (docs/keep.md, "When the model does not fit").

Real processes in a real child memory cgroup (v1 memory.limit_in_bytes or v2 memory.max), as
tests/test_policy.py makes one; skipped with the reason where none can be made.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import child_cgroup, evict_file
from test_keep_cli import KeepProcess

from warmpool import _platform

pytestmark = pytest.mark.pagecache

MiB = 1 << 20
LIMIT = 80 * MiB  # less than the interpreter (~15-35 MiB anon), the 39 MiB selection and --headroom 32M
HOG = 16 * MiB  # what a second process in the cgroup then takes: the keeper must give it room


@pytest.fixture
def cgroup():
    with child_cgroup(LIMIT, "room") as child:
        yield child


def _oom_kills(child: str) -> int | None:
    for name in ("memory.oom_control", "memory.events"):
        try:
            with open(os.path.join(child, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return None


def _join(child: str) -> tuple[str, ...]:
    return ("sh", "-c", f'echo $$ > {child}/cgroup.procs && exec "$@"', "sh")


def _layer_order_profile(model, path) -> str:
    """A profile that ranks the experts in layer order: experts are then held from the start
    (without one the keeper holds the dense part alone while it learns)."""
    from warmpool import read_layout
    from warmpool._experts.profile import Profile, model_identity, write_profile
    from warmpool._experts.slices import expert_slices

    layout = read_layout(model)
    keys = [(s.layer, s.expert) for s in expert_slices(layout)]
    scores = {k: 2.0 - i / len(keys) for i, k in enumerate(keys)}
    write_profile(path, Profile(model_identity(layout), scores, samples=1, seconds=0.0, created=0.0))
    return str(path)


def test_lock_more_than_the_cgroup_holds_shrinks_and_is_not_killed(private_model, cgroup, tmp_path):
    evict_file(private_model)  # so the keeper's warm charges the pages to the child cgroup
    selected = os.path.getsize(private_model)
    profile = _layer_order_profile(private_model, tmp_path / "profile.json")
    keeper = KeepProcess(private_model, "--lock", "--headroom", "32M", "--interval", "0.5", "--profile", profile,
                         prefix=_join(cgroup))
    hog = None
    try:
        partial = keeper.wait_for("partial")
        assert "memory" in partial["reason"] and partial["bytes_kept"] < partial["bytes_selected"] <= selected
        locked = keeper.wait_for("locked")
        assert 0 < locked["bytes_locked"] <= partial["bytes_kept"] + _platform.PAGE_SIZE  # the page at EOF
        # A second process in the cgroup takes anonymous memory the keeper's locked pages would
        # have denied it: the keeper lets experts go instead of leaving the OOM killer a choice.
        # It takes it the way an engine does, a step at a time (a burst all at once is what the
        # headroom is for).
        hog = subprocess.Popen(_join(cgroup) + (sys.executable, "-c",
                               "import time\nb = []\n"
                               f"for _ in range({HOG // (2 * MiB)}):\n    b.append(bytearray({2 * MiB})); time.sleep(0.25)\n"
                               "print('ok', flush=True); time.sleep(60)"),
                               stdout=subprocess.PIPE, text=True)
        shrunk = keeper.wait_for("shrunk", timeout=20)
        assert shrunk["bytes_kept"] < shrunk["bytes_kept_before"] and "memory" in shrunk["reason"]
        assert shrunk["bytes_locked"] < locked["bytes_locked"]
        assert hog.stdout.readline().strip() == "ok"
        assert keeper.proc.poll() is None and hog.poll() is None
        code, _ = keeper.terminate(timeout=10)
        assert code == 0, keeper.stderr()
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        keeper.close()
    assert _oom_kills(cgroup) in (0, None)
