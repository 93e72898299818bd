"""The RAM policy: memory figures are injected, never faked at the kernel level."""

from __future__ import annotations

import pytest
from conftest import evict_file

import warmpool
from warmpool._policy import MemoryFigures, decide

GiB = 2**30
BIG = MemoryFigures(total=64 * GiB, available=60 * GiB, cgroup_limit=None)


def test_fits():
    d = decide([GiB, GiB], env={}, memory=BIG)
    assert d.action == "warm" and d.chunks == (0, 1) and d.bytes_left_cold == 0
    assert "fits" in d.reason and "80% of physical RAM" in d.reason


def test_partial_warms_in_plan_order_up_to_budget():
    small = MemoryFigures(total=10 * GiB, available=10 * GiB, cgroup_limit=None)  # budget 8 GiB
    d = decide([3 * GiB, 3 * GiB, 3 * GiB, 3 * GiB], env={}, memory=small)
    assert d.action == "partial"
    assert d.chunks == (0, 1)  # the first layers, contiguous
    assert d.budget == 8 * GiB
    assert d.bytes_left_cold == 6 * GiB
    assert "6.00 GiB left cold" in d.reason


def test_cgroup_limit_is_the_ceiling():
    boxed = MemoryFigures(total=64 * GiB, available=60 * GiB, cgroup_limit=4 * GiB)
    d = decide([2 * GiB, 2 * GiB], env={}, memory=boxed)
    assert d.budget == int(4 * GiB * 0.8)
    assert d.chunks == (0,) and "cgroup memory.max" in d.reason


def test_available_memory_caps_the_budget():
    tight = MemoryFigures(total=64 * GiB, available=1 * GiB, cgroup_limit=None)
    d = decide([GiB // 2, GiB // 2, GiB // 2], env={}, memory=tight)
    assert d.budget == GiB and d.chunks == (0, 1) and "available memory" in d.reason


def test_resident_chunks_cost_nothing():
    small = MemoryFigures(total=10 * GiB, available=10 * GiB, cgroup_limit=None)
    d = decide([0, 7 * GiB, 0, 0], env={}, memory=small)
    assert d.action == "warm" and d.chunks == (1,)


def test_nothing_cold():
    d = decide([0, 0], env={}, memory=BIG)
    assert d.action == "none" and d.chunks == ()


@pytest.mark.parametrize("env, force", [({"WARMPOOL_PREFAULT": "1"}, False), ({}, True)])
def test_forced_ignores_budget(env, force):
    tiny = MemoryFigures(total=1 * GiB, available=GiB // 2, cgroup_limit=None)
    d = decide([4 * GiB, 4 * GiB], env=env, force=force, memory=tiny)
    assert d.action == "warm" and d.chunks == (0, 1) and d.budget is None


def test_prefault_zero_skips_even_when_forced_by_flag_absent():
    d = decide([GiB], env={"WARMPOOL_PREFAULT": "0"}, memory=BIG)
    assert d.action == "skip" and d.chunks == () and "WARMPOOL_PREFAULT=0" in d.reason


def test_explicit_budget():
    d = decide([GiB, GiB, GiB], env={}, budget=2 * GiB, memory=BIG)
    assert d.chunks == (0, 1) and d.bytes_left_cold == GiB


def test_budget_smaller_than_first_chunk_skips():
    d = decide([2 * GiB], env={}, budget=GiB, memory=BIG)
    assert d.action == "skip" and "left cold" in d.reason


@pytest.mark.pagecache
@pytest.mark.xdist_group("pagecache")
def test_partial_warm_leaves_the_tail_cold(pagecache_model):
    plan = warmpool.plan_model(pagecache_model)
    evict_file(pagecache_model)
    budget = plan.bytes_planned // 2
    result = warmpool.warm(pagecache_model, budget=budget, workers=2)
    assert not result.skipped
    assert 0.3 <= result.resident_fraction <= 0.55
    assert result.bytes_left_cold >= plan.bytes_planned - budget
    assert "left cold" in result.summary()
    layers = warmpool.residency(pagecache_model).layers
    assert layers[0].bytes_resident == layers[0].bytes_selected  # early layers first
    assert layers[-1].bytes_resident < layers[-1].bytes_selected


def test_prefault_zero_skips_a_real_warm(tiny_model, monkeypatch):
    monkeypatch.setenv("WARMPOOL_PREFAULT", "0")
    result = warmpool.warm(tiny_model)
    assert result.skipped and result.workers == 0 and "WARMPOOL_PREFAULT=0" in result.reason


def test_memory_figures_read_from_this_machine():
    from warmpool._policy import memory_figures

    m = memory_figures()
    assert 0 < m.available <= m.total
    assert m.cgroup_limit is None or 0 < m.cgroup_limit < 1 << 60


def test_page_cache_filling_a_cgroup_still_counts_as_available(tmp_path):
    """A cgroup at its limit with page cache (what any busy cgroup looks like) must not read as
    zero headroom: the kernel reclaims that cache at the next allocation."""
    import os
    import subprocess
    import sys

    from conftest import child_cgroup

    from warmpool import _platform

    limit = 192 << 20
    with child_cgroup(limit, "policy") as child:
        data = tmp_path / "cache.bin"
        data.write_bytes(os.urandom(1 << 20) * 300)  # 300 MiB: more than the limit
        _platform.evict_file(data)
        script = (f"import os\nopen({os.path.join(child, 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
                  f"with open({str(data)!r}, 'rb') as f:\n    while f.read(8 << 20): pass\n"
                  "from warmpool._policy import memory_figures\nprint(memory_figures().available)")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        available = int(out.stdout)
    assert available > limit // 4, f"{available} bytes available in a {limit}-byte cgroup full of page cache"


def test_physical_memory_agrees_with_psutil():
    """The policy reads /proc/meminfo itself (psutil's import cost a cold warm ~10 ms); the
    figures must be psutil's."""
    import psutil

    from warmpool import _platform

    ram = _platform.physical_memory()
    if ram is None:
        pytest.skip("no /proc/meminfo with MemAvailable here: the policy uses psutil")
    vm = psutil.virtual_memory()
    assert ram[0] == vm.total
    assert abs(ram[1] - vm.available) < 64 << 20  # read a moment apart
