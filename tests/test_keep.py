"""The keeper in-process (``warmpool.Keeper``): real page cache, real worker processes, real
reclaim out of its mapping, a real replaced file.  The command is in test_keep_cli.py.

Each test works on a private copy of the test model, so evicting it disturbs no other test.
"""

from __future__ import annotations

import os
import time

import pytest
from conftest import evict_file, page_out, resident_fraction

from warmpool import Keeper, _platform, evict, plan_model
from warmpool.example import TINY, write_moe_gguf

pytestmark = pytest.mark.pagecache

INTERVAL = 0.5


def _fraction_within(path, deadline_s: float, want: float = 0.99) -> tuple[float, float]:
    """(fraction, seconds) once ``path`` is ``want`` resident, or at the deadline."""
    start = time.monotonic()
    while True:
        fraction = resident_fraction(path)
        elapsed = time.monotonic() - start
        if fraction >= want or elapsed >= deadline_s:
            return fraction, elapsed
        time.sleep(0.02)


def _events() -> tuple[list[dict], callable]:
    seen: list[dict] = []
    return seen, seen.append


# -- in-process keeper --------------------------------------------------------------------


def test_evicted_pages_back_within_two_intervals(private_model):
    evict_file(private_model)
    events, on_event = _events()
    with Keeper([private_model], interval=INTERVAL, hold="none", on_event=on_event) as keeper:
        assert keeper.wait_warm(30)
        assert resident_fraction(private_model) >= 0.99
        for k in (1, 2):  # twice: the keeper keeps at it, not once
            assert evict(private_model) < 0.05 * os.path.getsize(private_model)
            assert resident_fraction(private_model) < 0.05
            fraction, took = _fraction_within(private_model, 2 * INTERVAL)
            assert fraction >= 0.99, f"{fraction:.1%} resident {took:.2f} s after the eviction"
            deadline = time.monotonic() + INTERVAL
            while keeper.status()[0]["rewarms_total"] < k and time.monotonic() < deadline:
                time.sleep(0.02)  # the pages are back; the keeper is finishing its books
        row = keeper.status()[0]
    assert row["rewarms_total"] >= 2
    assert row["bytes_rewarmed_total"] >= 2 * 0.95 * row["bytes_selected"]
    assert [e["event"] for e in events][:2] == ["started", "warmed"]
    assert "rewarmed" in {e["event"] for e in events} and events[-1]["event"] == "stopped"


def test_reclaimed_from_the_held_mapping_comes_back(private_model):
    """The default hold: the kernel reclaims pages out of the keeper's own mapping (MADV_PAGEOUT
    unmaps and frees them, as reclaim does); the keeper reads them in and maps them again."""
    with Keeper([private_model], interval=INTERVAL) as keeper:
        assert keeper.wait_warm(30)
        assert evict(private_model) > 0.99 * os.path.getsize(private_model) - 8192  # mapped: DONTNEED spares them
        for _, _, held in keeper.models[0].held:
            page_out(held.address, held.length)
        assert resident_fraction(private_model) < 0.5
        fraction, took = _fraction_within(private_model, 2 * INTERVAL)
        assert fraction >= 0.99, f"{fraction:.1%} resident {took:.2f} s after the reclaim"
        mapped = b"".join(held.resident() for _, _, held in keeper.models[0].held)
        assert mapped.count(1) >= 0.99 * len(mapped)


def test_replaced_and_deleted_model_file(private_model, tmp_path):
    events, on_event = _events()
    replacement = tmp_path / "new.gguf"
    write_moe_gguf(replacement, TINY, seed=7)
    new_selected = plan_model(replacement).bytes_planned
    with Keeper([private_model], interval=INTERVAL, on_event=on_event) as keeper:
        assert keeper.wait_warm(30)
        old_selected = keeper.status()[0]["bytes_selected"]
        assert old_selected != new_selected
        os.unlink(private_model)  # deleted (an engine upgrade removes the old file first)
        deadline = time.monotonic() + 4 * INTERVAL
        while keeper.status()[0]["state"] != "missing" and time.monotonic() < deadline:
            time.sleep(0.05)
        row = keeper.status()[0]
        assert row["state"] == "missing" and row["bytes_resident"] is None and not keeper.ready()
        os.replace(replacement, private_model)  # the new file appears under the same name
        deadline = time.monotonic() + 6 * INTERVAL
        while not keeper.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        row = keeper.status()[0]
        assert keeper.ready() and row["bytes_selected"] == new_selected, row
        assert keeper._thread.is_alive()
    replaced = [e for e in events if e["event"] == "replaced"]
    assert replaced[0]["deleted"] and not replaced[0]["replanned"]
    assert replaced[-1]["replanned"] and replaced[-1]["bytes_selected"] == new_selected
    assert not [e for e in events if e["event"] == "error"]


def test_budget_holds_what_fits_and_is_not_ready(private_model):
    """A budget smaller than the selection: hold the part that fits (without a profile, the
    dense tensors while it learns which experts are read), say so, keep that part resident,
    /ready false (the selection is not)."""
    evict_file(private_model)
    events, on_event = _events()
    budget = 8 << 20
    with Keeper([private_model], interval=INTERVAL, hold="none", budget=budget, on_event=on_event,
                min_resident=0.99) as keeper:
        assert keeper.wait_warm(30)
        time.sleep(3 * INTERVAL)
        row = keeper.status()[0]
        assert not keeper.ready()
        assert row["bytes_kept"] <= budget < row["bytes_selected"]
        assert row["bytes_resident"] >= row["bytes_kept"] * 0.9  # less: the VM's background reclaim
        assert row["resident_fraction"] is not None and row["resident_fraction"] < 0.5
        assert row["experts_total"] and row["experts_held"] == 0  # nothing learned yet: no reader ran
    partial = [e for e in events if e["event"] == "partial"]
    assert partial and partial[0]["bytes_kept"] == row["bytes_kept"] and "--budget" in partial[0]["reason"], events


def test_engine_adapter_keeps_what_it_warmed(private_model):
    from engine_adapter import start_warmup

    evict_file(private_model)
    events, on_event = _events()
    with start_warmup(private_model, cpu_moe=True) as warmup:
        with warmup.keep(interval=INTERVAL, hold="none", on_event=on_event) as keeper:
            assert warmup.result is not None and warmup.result.bytes_warmed > 0
            assert keeper.wait_warm(30) and keeper.ready()
            selected = keeper.status()[0]["bytes_selected"]
            assert selected == warmup.result.bytes_selected  # the same selection (--cpu-moe)
            warmed = next(e for e in events if e["event"] == "warmed")
            assert warmed["bytes_warmed"] == 0  # the warm-up had read it all already
            assert evict(private_model, cpu_moe=True) < 0.05 * selected
            deadline = time.monotonic() + 2 * INTERVAL
            while not keeper.status()[0]["rewarms_total"] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert keeper.ready() and keeper.status()[0]["rewarms_total"] == 1, keeper.status()
            assert resident_fraction(private_model) > 0.5  # the experts are most of the file
    assert any(e["event"] == "rewarmed" for e in events)


def test_without_a_profile_it_learns_stands_aside_while_the_engine_fits_then_holds_what_it_rereads(
        private_model, monkeypatch):
    """No profile: the keeper holds the dense part alone while it samples; an "engine" reads the
    experts of the last layers.  While they stay resident (what it reads fits), the learned
    keeper holds no experts and says so ("aside").  Once the engine loses them and reads them
    again (refaults), one re-ranking takes in what fits, those experts, more than a bounded step
    could."""
    from warmpool._keep import keeper as keeper_mod
    from warmpool._keep.hot import CHURN_MIN

    monkeypatch.setattr(keeper_mod, "SAMPLE_PERIOD", 0.1)  # learn in a second or two, not in 20
    monkeypatch.setattr(keeper_mod, "LEARN_CPU_SHARE", 1.0)
    monkeypatch.setattr(keeper_mod, "SAMPLE_CPU_SHARE", 1.0)
    monkeypatch.setattr(keeper_mod, "LEARN_PASSES", 6)
    monkeypatch.setattr(keeper_mod, "LEARN_SECONDS", 1.0)
    monkeypatch.setattr(keeper_mod, "SHED_IDLE_CORES", 0.0)  # drop whatever the CI's other tests do with the CPUs
    from warmpool import _api

    priorities = []  # of every warm the keeper runs, in order (the real warm runs)
    real_warm = _api.warm
    monkeypatch.setattr(_api, "warm", lambda *a, **k: (priorities.append(k.get("priority")), real_warm(*a, **k))[1])
    plan = plan_model(private_model, n_gpu_layers=99, cpu_moe=True)
    evict_file(private_model)
    events, on_event = _events()
    with Keeper([private_model], interval=0.2, hold="touch", budget=plan.bytes_planned // 3, on_event=on_event,
                n_gpu_layers=99, cpu_moe=True) as keeper:
        assert keeper.wait_warm(30)
        model = keeper.models[0]
        hot = model.hot
        assert hot.provisional and model.experts == []  # learning: the dense part alone
        warms_before_fill = len(priorities)
        room = plan.bytes_planned // 3 - hot.dense_bytes
        fits = room // hot.nbytes(next(iter(hot.slices)))
        wanted = sorted(hot.slices, reverse=True)[:fits]  # the "engine" reads the last layers' experts
        ranges = [(start, end - start) for key in wanted for _, start, end in hot.slices[key].ranges]
        fd = os.open(private_model, os.O_RDONLY)
        try:
            # The keeper's warm read whole 2 MiB folios, past the dense part into experts: drop
            # those, so that only what the "engine" reads looks used.
            for slice_ in hot.slices.values():
                _platform.evict_ranges(fd, [(start, end - start) for _, start, end in slice_.ranges])
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead into the neighbours

            def engine(until: str, lose: bool) -> None:
                deadline = time.monotonic() + 20
                while not any(e["event"] == until for e in events) and time.monotonic() < deadline:
                    for start, length in ranges:
                        os.pread(fd, length, start)
                    time.sleep(0.15)
                    if lose:  # memory pressure took them: the next token reads them again
                        _platform.evict_ranges(fd, ranges)
                        time.sleep(0.15)

            engine("aside", lose=False)
            aside = next((e for e in events if e["event"] == "aside"), None)
            held_while_fitting = list(model.experts)
            shed_while_learning = model.sheds_total  # nothing dropped before it holds experts
            engine("reranked", lose=True)
            deadline = time.monotonic() + 10  # then it drops the read-ahead the engine left (every 0.25 s)
            while model.sheds_total == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.close(fd)
        reranked = next((e for e in events if e["event"] == "reranked"), None)
        held = list(model.experts)
        shed_after_fill = model.sheds_total
    assert aside is not None and held_while_fitting == [], [e["event"] for e in events]
    assert shed_while_learning == 0 and shed_after_fill > 0, (shed_while_learning, shed_after_fill)
    # The fill read the experts beside a running engine: its workers at priority idle.
    assert priorities[warms_before_fill:warms_before_fill + 1] == ["idle"], priorities
    assert reranked is not None, [e["event"] for e in events]
    assert reranked["experts_added"] > 2 * CHURN_MIN and reranked["experts_dropped"] == 0
    # What it holds now is what was read (a page shared with a neighbour can lift one more).
    assert len(set(held) & set(wanted)) >= 0.9 * len(wanted)
