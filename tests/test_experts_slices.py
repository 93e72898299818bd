"""Expert slices: each (layer, expert)'s byte ranges, checked against gguf-py's reading of the
same file (the stacked tensor's data, indexed by expert), and ``plan --experts``."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest

from warmpool import LayoutError, Selection, main, make_plan, read_layout
from warmpool._experts.slices import expert_slices, n_experts
from warmpool.example import TINY


def test_slices_are_gguf_pys_experts(tiny_model):
    from gguf import GGUFReader

    layout = read_layout(tiny_model)
    slices = expert_slices(layout)
    assert n_experts(layout) == TINY.n_experts
    assert len(slices) == TINY.n_layers * TINY.n_experts
    assert [(s.layer, s.expert) for s in slices] == [(i, e) for i in range(TINY.n_layers) for e in range(TINY.n_experts)]
    oracle = {t.name: t for t in GGUFReader(tiny_model).tensors}
    data = tiny_model.read_bytes()
    checked = 0
    for s in slices:
        stacked = sorted(n for n in oracle if n.startswith(f"blk.{s.layer}.") and "_exps." in n)
        assert len(s.ranges) == len(stacked) == 3
        for (file, start, end), name in zip(sorted(s.ranges, key=lambda r: r[1]), sorted(stacked, key=lambda n: oracle[n].data_offset)):
            assert file == 0
            expert = oracle[name].data[s.expert]  # numpy: the outermost axis is ggml's last, the expert
            assert data[start:end] == expert.tobytes()
            checked += 1
    assert checked == 3 * len(slices)
    # Slices of one tensor tile it exactly: no gaps, no overlap.
    gate = sorted(r for s in slices if s.layer == 0 for r in s.ranges[:1])
    assert all(a[2] == b[1] for a, b in pairwise(gate))


def test_selection_limits_the_slices(tiny_model):
    layout = read_layout(tiny_model)
    plan = make_plan(layout, Selection(n_gpu_layers=99, n_cpu_moe=2))
    slices = expert_slices(layout, {t.name for t in plan.selected})
    assert {s.layer for s in slices} == {0, 1}


def test_split_model_slices_name_their_shard(split_model, tiny_model):
    whole = expert_slices(read_layout(tiny_model))
    split = expert_slices(read_layout(split_model[0]))
    assert [(s.layer, s.expert, s.nbytes) for s in split] == [(s.layer, s.expert, s.nbytes) for s in whole]
    assert len({f for s in split for f, _, _ in s.ranges}) > 1


def test_expert_count_that_disagrees_with_the_shape_is_a_layout_error(tiny_model):
    layout = read_layout(tiny_model)
    wrong = layout._replace(metadata={**layout.metadata, "qwen3moe.expert_count": TINY.n_experts * 2})
    with pytest.raises(LayoutError, match="last dimension is not the expert count 16"):
        expert_slices(wrong)
    no_key = layout._replace(metadata={k: v for k, v in layout.metadata.items() if k != "qwen3moe.expert_count"})
    assert n_experts(no_key) == TINY.n_experts  # the tensors' last dimension
    assert expert_slices(no_key) == expert_slices(layout)


def test_plan_experts_json_lists_every_slice(tiny_model, capsys):
    assert main(["plan", str(tiny_model), "--experts", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    slices = expert_slices(read_layout(tiny_model))
    assert out["n_experts"] == TINY.n_experts
    assert [(d["layer"], d["expert"], [tuple(r) for r in d["ranges"]]) for d in out["expert_slices"]] == \
        [(s.layer, s.expert, list(s.ranges)) for s in slices]


def test_plan_experts_human_table(tiny_model, capsys):
    assert main(["plan", str(tiny_model), "--experts"]) == 0
    out = capsys.readouterr().out
    assert f"{TINY.n_layers * TINY.n_experts} expert slices in {TINY.n_layers} layers" in out
    assert out.count("ffn_down_exps.weight") == TINY.n_layers


def test_plan_experts_on_a_dense_model_is_one_line(gemma_model, capsys):
    assert main(["plan", str(gemma_model), "--experts"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "no stacked expert tensors" in err and str(gemma_model) in err
