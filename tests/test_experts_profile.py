"""The expert profile (docs/profile.md) and the warm order it gives: round trip, bad profiles,
plan order, and a real warm under a budget only the hottest experts fit into."""

from __future__ import annotations

import json
import logging
import os
import random

import pytest
from conftest import evict_file
from test_warm import reclaimed_pages

import warmpool
from warmpool import ProfileError, _platform, main, read_layout
from warmpool._experts.profile import (
    Profile,
    check_profile,
    model_identity,
    read_profile,
    write_profile,
)
from warmpool._experts.slices import expert_slices
from warmpool._plan import PAGE_SIZE, contiguous_runs


def a_profile(model, seed: int = 0) -> Profile:
    layout = read_layout(model)
    rng = random.Random(seed)
    scores = {(s.layer, s.expert): rng.random() * 2 for s in expert_slices(layout)}
    return Profile(model_identity(layout), scores, samples=17, seconds=3.25, created=1_800_000_000.5, method="cachestat")


def test_round_trip_is_exact(tiny_model, tmp_path):
    profile = a_profile(tiny_model)
    path = tmp_path / "p.json"
    write_profile(path, profile)
    assert read_profile(path) == profile
    data = json.loads(path.read_text())
    assert data["format"] == "warmpool-expert-profile" and data["version"] == "1.0"
    scores = [row["score"] for row in data["experts"]]
    assert scores == sorted(scores, reverse=True)  # hottest first
    assert os.listdir(tmp_path) == ["p.json"]  # the temporary file was renamed, nothing left


def test_readers_ignore_unknown_fields_and_accept_a_newer_minor(tiny_model, tmp_path):
    profile = a_profile(tiny_model)
    path = tmp_path / "p.json"
    write_profile(path, profile)
    data = json.loads(path.read_text())
    data.update(version="1.7", future={"x": 1})
    data["experts"][0]["future"] = True
    path.write_text(json.dumps(data))
    assert read_profile(path) == profile._replace(version="1.7")


@pytest.mark.parametrize("text, why", [
    ("{not json", "not JSON"),
    ('{"format": "something else"}', "format"),
    ('{"format": "warmpool-expert-profile", "version": "2.0"}', "version '2.0'"),
    ('{"format": "warmpool-expert-profile", "version": "1.0", "model": {}}', "missing or of the wrong type"),
])
def test_bad_profiles_are_one_line_errors(tiny_model, tmp_path, capsys, text, why):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ProfileError, match=why):
        read_profile(path)
    assert main(["warm", str(tiny_model), "--profile", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and why.split()[0] in err and "Traceback" not in err


def test_a_profile_of_another_model_is_refused(tiny_model, test_model, tmp_path, capsys):
    path = tmp_path / "p.json"
    write_profile(path, a_profile(test_model))
    with pytest.raises(ProfileError, match="made for another model"):
        check_profile(read_profile(path), read_layout(tiny_model))
    assert main(["plan", str(tiny_model), "--profile", str(path)]) == 1
    assert "made for another model" in capsys.readouterr().err
    # The same model under another path (a moved copy) is the same model.
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(test_model.read_bytes())
    check_profile(read_profile(path), read_layout(copy))


def hottest(profile: Profile, n: int) -> list[tuple[int, int]]:
    return profile.order()[:n]


def test_plan_order_puts_the_hottest_experts_right_after_the_rest(test_model, tmp_path, capsys):
    profile = a_profile(test_model, seed=3)
    path = tmp_path / "p.json"
    write_profile(path, profile)
    plain = warmpool.plan_model(test_model, chunk_size=1 << 20)
    ordered = warmpool.plan_model(test_model, chunk_size=1 << 20, profile=path)
    assert contiguous_runs(ordered.chunks) == contiguous_runs(plain.chunks)  # the same pages, once each
    assert sum(c.length for c in ordered.chunks) == plain.bytes_planned
    assert all(c.offset % PAGE_SIZE == 0 and 0 < c.length <= ordered.chunk_size for c in ordered.chunks)
    slices = {(s.layer, s.expert): s for s in expert_slices(ordered.layout)}
    expert_pages = {p for s in slices.values() for _, a, b in s.ranges for p in range(a // PAGE_SIZE, -(-b // PAGE_SIZE))}

    def pages(chunk):
        return set(range(chunk.offset // PAGE_SIZE, (chunk.offset + chunk.length) // PAGE_SIZE))

    n_rest = next(i for i, c in enumerate(ordered.chunks) if pages(c) & expert_pages)
    assert not any(pages(c) & expert_pages for c in ordered.chunks[:n_rest])
    # Walk the expert chunks in order: they reach each expert in the profile's order.
    seen: list[tuple[int, int]] = []
    for c in ordered.chunks[n_rest:]:
        for key, s in slices.items():
            if key not in seen and any(a < c.offset + c.length and b > c.offset for _, a, b in s.ranges):
                interior = [(-(-a // PAGE_SIZE) * PAGE_SIZE, b // PAGE_SIZE * PAGE_SIZE) for _, a, b in s.ranges]
                if any(lo < c.offset + c.length and hi > c.offset for lo, hi in interior):
                    seen.append(key)
    assert seen[:20] == hottest(profile, 20)
    assert sorted(seen) == sorted(slices)
    # plan --json shows that order.
    assert main(["plan", str(test_model), "--chunk-size", "1M", "--profile", str(path), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["chunk_table"]
    assert [tuple(row.values()) for row in table] == [tuple(c) for c in ordered.chunks]


def interior_pages(expert) -> list[int]:
    """The pages an expert has to itself (its slices' boundary pages are shared)."""
    return [p for _, a, b in expert.ranges for p in range(-(-a // PAGE_SIZE), b // PAGE_SIZE)]


@pytest.mark.pagecache
def test_a_warm_with_a_small_budget_makes_the_hottest_experts_resident(private_model, tmp_path, capsys):
    profile = a_profile(private_model, seed=5)
    path = tmp_path / "p.json"
    write_profile(path, profile)
    ordered = warmpool.plan_model(private_model, profile=path)
    slices = {(s.layer, s.expert): s for s in expert_slices(ordered.layout)}
    top = hottest(profile, 8)
    top_pages = {p for k in top for _, a, b in slices[k].ranges for p in range(a // PAGE_SIZE, -(-b // PAGE_SIZE))}
    # The budget: every chunk up to the last one holding a page of the 8 hottest experts.
    last = max(i for i, c in enumerate(ordered.chunks)
               if top_pages & set(range(c.offset // PAGE_SIZE, (c.offset + c.length) // PAGE_SIZE)))
    budget = sum(c.length for c in ordered.chunks[:last + 1])
    assert budget < ordered.bytes_planned / 2
    evict_file(private_model)
    assert main(["warm", str(private_model), "--profile", str(path), "--budget", str(budget), "--workers", "1",
                 "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes_left_cold"] > 0

    fd = os.open(private_model, os.O_RDONLY)
    try:
        vector = _platform.resident_pages(fd, 0, 0)
        resident = {k: sum(vector[p] for p in interior_pages(slices[k])) for k in slices}
        fractions = {k: resident[k] / len(interior_pages(slices[k])) for k in slices}
    finally:
        os.close(fd)
    # A hot expert's page the VM's reclaim took after the warm read it counts as read
    # (test_warm.reclaimed_pages: its shadow entry).
    warmed = {k: (resident[k] + reclaimed_pages(private_model, interior_pages(slices[k]))) / len(interior_pages(slices[k]))
              for k in top}
    assert [warmed[k] for k in top] == [1.0] * len(top)
    others = [fractions[k] for k in profile.order()[len(top) * 2:]]  # past a margin for the next chunk
    assert sum(others) / len(others) < 0.25, f"the coldest experts are {sum(others) / len(others):.0%} resident"


@pytest.mark.pagecache
def test_start_warmup_with_a_foreign_profile_warns_and_warms_in_layer_order(private_model, tiny_model, tmp_path, caplog):
    from engine_adapter import start_warmup

    path = tmp_path / "p.json"
    write_profile(path, a_profile(tiny_model))
    evict_file(private_model)
    with caplog.at_level(logging.WARNING, logger="engine_adapter"):
        warmup = start_warmup(private_model, workers=1, profile=path)
        result = warmup.wait(60)
    assert warmup.error is None and result is not None and result.resident_fraction == 1.0
    assert isinstance(warmup.profile_error, ProfileError)
    assert any("ignoring the expert profile" in r.getMessage() and "another model" in r.getMessage() for r in caplog.records)


@pytest.mark.pagecache
def test_start_warmup_with_a_profile_warms_the_hottest_first(private_model, tmp_path):
    from engine_adapter import start_warmup

    profile = a_profile(private_model, seed=9)
    path = tmp_path / "p.json"
    write_profile(path, profile)
    ordered = warmpool.plan_model(private_model, profile=path)
    top = hottest(profile, 4)
    slices = {(s.layer, s.expert): s for s in expert_slices(ordered.layout)}
    top_pages = {p for k in top for _, a, b in slices[k].ranges for p in range(a // PAGE_SIZE, -(-b // PAGE_SIZE))}
    last = max(i for i, c in enumerate(ordered.chunks)
               if top_pages & set(range(c.offset // PAGE_SIZE, (c.offset + c.length) // PAGE_SIZE)))
    evict_file(private_model)
    warmup = start_warmup(private_model, workers=1, profile=path, budget=sum(c.length for c in ordered.chunks[:last + 1]))
    result = warmup.wait(60)
    assert warmup.error is None and warmup.profile_error is None and result.bytes_left_cold > 0
    fd = os.open(private_model, os.O_RDONLY)
    try:
        for key in top:
            for _, a, b in slices[key].ranges:
                whole = -(-b // PAGE_SIZE) * PAGE_SIZE - a // PAGE_SIZE * PAGE_SIZE  # whole pages
                assert _platform.resident_bytes(fd, a, b - a) == whole, key
    finally:
        os.close(fd)
