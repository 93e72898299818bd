"""The issue-23 engine stand-in (tests/helpers/moe_engine.py): its expert byte ranges and its
router, which the over-RAM benchmark and the hot-expert ranking tests take as ground truth."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers.moe_engine import Router, expert_ranges, hottest, router_for, run_engine

from warmpool import read_layout
from warmpool.example import TINY, write_moe_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "tiny.gguf"
    write_moe_gguf(path, TINY)
    return path


def test_expert_ranges_split_each_stacked_tensor_into_equal_contiguous_slices(tiny):
    layout = read_layout(tiny)
    ranges = expert_ranges(layout)
    stacked = [t for t in layout.tensors if t.name.endswith("_exps.weight")]
    assert len(stacked) == 3 * TINY.n_layers
    assert set(ranges) == {(k, e) for k in range(TINY.n_layers) for e in range(TINY.n_experts)}
    for t in stacked:
        # Each expert's slice of this tensor, in expert order: they must tile the tensor exactly.
        slices = [next(r for r in ranges[(t.layer, e)] if t.offset <= r[1] < t.offset + t.nbytes)
                  for e in range(TINY.n_experts)]
        assert [(f, a) for f, a, _ in slices] == [(t.file, t.offset + e * t.nbytes // TINY.n_experts)
                                                 for e in range(TINY.n_experts)]
        assert {b - a for _, a, b in slices} == {t.nbytes // TINY.n_experts}
        assert slices[-1][2] == t.offset + t.nbytes
    # Nothing but expert bytes: the ranges add up to the stacked tensors, each byte once.
    covered = sorted((a, b) for rs in ranges.values() for _, a, b in rs)
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(covered))
    assert sum(b - a for a, b in covered) == sum(t.nbytes for t in stacked)


def test_router_draws_follow_its_popularity():
    router = Router(n_layers=4, n_experts=32, top_k=4, zipf_s=1.0, seed=7)
    counts = np.zeros((4, 32))
    for _ in range(3000):
        chosen = router.next_token()
        assert chosen.shape == (4, 4)
        assert all(len(set(row)) == 4 for row in chosen.tolist())  # distinct experts per layer
        np.add.at(counts, (np.arange(4)[:, None], chosen), 1)
    by_rank = np.take_along_axis(counts, router.rank_to_expert, axis=1)  # [layer, popularity rank]
    top, bottom = by_rank[:, :8].sum(axis=1), by_rank[:, -8:].sum(axis=1)
    assert (top > 4 * bottom).all(), (top, bottom)
    assert (top / counts.sum(axis=1) > 0.45).all()  # uniform routing would give the top quarter 0.25


def test_router_is_seeded_and_ranks_by_popularity():
    a, b = Router(3, 16, 2, 1.0, seed=1), Router(3, 16, 2, 1.0, seed=1)
    assert all((a.next_token() == b.next_token()).all() for _ in range(20))
    assert (Router(3, 16, 2, 1.0, seed=2).rank_to_expert != a.rank_to_expert).any()
    ranked = [a.popularity[k, e] for k, e in a.ranking()]
    assert ranked == sorted(ranked, reverse=True) and len(ranked) == 3 * 16
    # each layer's favourite first, in layer order
    assert a.ranking()[:3] == [(k, int(a.rank_to_expert[k, 0])) for k in range(3)]


def test_hottest_takes_the_ranking_in_order_up_to_the_budget(tiny):
    layout = read_layout(tiny)
    router, ranges = router_for(layout, seed=0), expert_ranges(layout)
    one = sum(b - a for _, a, b in ranges[(0, 0)])
    chosen = hottest(router, ranges, 5 * one + one // 2)
    assert chosen == [r for key in router.ranking()[:5] for r in ranges[key]]


def test_run_engine_measures_tokens_after_the_warmup(tiny):
    out = run_engine(str(tiny), seconds=0.3, warmup_s=0.1)
    assert out["warmup_tokens"] > 0 and len(out["token_s"]) > 0
    assert out["window_s"] >= 0.3
    assert out["bytes_per_token_needed"] > 0 and out["read_bytes"] >= 0
