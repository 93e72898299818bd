"""llama.cpp's placement flags, applied to every tensor of the synthetic qwen3moe model.

Each case is a command line and the tensors llama.cpp would keep on the CPU for it, written as a
predicate over (name, layer) straight from llama.cpp's rules (src/llama-model.cpp, common/arg.cpp; docs/design.md):
``i_gpu_start = max(n_layer + 1 - ngl, 0)``, slot n_layer is the output layer, the input layer
never leaves the CPU, overrides (and the MoE shortcuts, which are overrides) win, first match first.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import pytest

from warmpool import Selection, SelectionError, main, make_plan, read_layout
from warmpool.commands import build_parser
from warmpool.commands._common import selection_from
from warmpool.example import TEST

N = TEST.n_layers  # 8
EXPERTS = re.compile(r"\.ffn_(up|down|gate)_exps\.")


def is_output(name: str) -> bool:
    return name in ("output.weight", "output_norm.weight")


def offloaded_from(ngl: int) -> Callable[[str, int | None], bool]:
    """CPU predicate of plain -ngl: layers below i_gpu_start, the input layer, maybe the output."""
    start = max(N + 1 - ngl, 0)
    return lambda name, layer: (layer < start) if layer is not None else (N < start if is_output(name) else True)


def experts_of(layers: range) -> Callable[[str, int | None], bool]:
    return lambda name, layer: bool(EXPERTS.search(name)) and layer in layers


def either(*predicates: Callable[[str, int | None], bool]) -> Callable[[str, int | None], bool]:
    return lambda name, layer: any(p(name, layer) for p in predicates)


def is_input(name: str, layer: int | None) -> bool:
    return layer is None and not is_output(name)


class Case(NamedTuple):
    id: str
    argv: list[str]
    on_cpu: Callable[[str, int | None], bool]


CASES = [
    Case("no-flags", [], lambda name, layer: True),
    Case("ngl-0", ["-ngl", "0"], lambda name, layer: True),
    Case("ngl-1", ["-ngl", "1"], lambda name, layer: not is_output(name)),
    Case("ngl-3", ["-ngl", "3"], offloaded_from(3)),
    Case("ngl-n", ["-ngl", str(N)], lambda name, layer: layer is None and not is_output(name) or layer == 0),
    Case("ngl-n+1", ["-ngl", str(N + 1)], is_input),
    Case("ngl-99", ["-ngl", "99"], is_input),
    Case("ngl-minus-1", ["-ngl", "-1"], is_input),
    Case("cpu-moe-alone", ["--cpu-moe"], lambda name, layer: True),  # no GPU: everything on the CPU
    Case("ngl-99-cpu-moe", ["-ngl", "99", "--cpu-moe"], either(is_input, experts_of(range(N)))),
    Case("ngl-99-n-cpu-moe-2", ["-ngl", "99", "--n-cpu-moe", "2"], either(is_input, experts_of(range(2)))),
    Case("ngl-3-n-cpu-moe-4", ["-ngl", "3", "--n-cpu-moe", "4"], either(offloaded_from(3), experts_of(range(4)))),
    Case("n-cpu-moe-beyond-n", ["-ngl", "99", "--n-cpu-moe", "50"], either(is_input, experts_of(range(N)))),
    Case("ot-cpu", ["-ngl", "99", "-ot", "attn_q=CPU"],  # a regex *search*: attn_q_norm matches too
         either(is_input, lambda name, layer: "attn_q" in name)),
    Case("ot-gpu", ["-ot", r"ffn_=CUDA0"], lambda name, layer: ".ffn_" not in name),
    Case("ot-cpu-layer", ["-ngl", "99", "-ot", r"blk\.1\.=CPU"], either(is_input, lambda n, layer: layer == 1)),
    Case("ot-comma-list", ["-ngl", "0", "-ot", r"blk\.0\.=CUDA0,output=Vulkan1"],  # attn_output matches too
         lambda name, layer: layer != 0 and "output" not in name),
    Case("ot-repeated", ["-ngl", "99", "-ot", r"blk\.2\.=CPU", "-ot", r"blk\.5\.attn=CPU"],
         either(is_input, lambda n, layer: layer == 2 or (layer == 5 and ".attn" in n))),
    Case("ot-first-match-gpu", ["-ngl", "0", "-ot", "exps=CUDA0,ffn_up=CPU"], lambda name, layer: "exps" not in name),
    Case("ot-first-match-cpu", ["-ngl", "99", "-ot", "ffn_up=CPU,exps=CUDA0"],
         either(is_input, lambda name, layer: "ffn_up_exps" in name)),
    # llama.cpp appends -ot and --cpu-moe to one override list in command-line order.
    Case("ot-then-cpu-moe", ["-ngl", "99", "-ot", "ffn_up_exps=CUDA0", "--cpu-moe"],
         either(is_input, lambda name, layer: bool(EXPERTS.search(name)) and "ffn_up_exps" not in name)),
    Case("cpu-moe-then-ot", ["-ngl", "99", "--cpu-moe", "-ot", "ffn_up_exps=CUDA0"], either(is_input, experts_of(range(N)))),
    Case("ot-overrides-ngl", ["-ngl", "0", "-ot", "token_embd=CUDA0"], lambda name, layer: name != "token_embd.weight"),
]


@pytest.fixture(scope="module")
def layout(test_model):
    layout = read_layout(test_model)
    assert layout.n_layers == N
    return layout


def selection_for(argv: list[str]) -> Selection:
    args = build_parser()[0].parse_args(["plan", "model.gguf", *argv])
    return selection_from(args)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_placement(layout, case):
    plan = make_plan(layout, selection_for(case.argv))
    expected = [t.name for t in layout.tensors if case.on_cpu(t.name, t.layer)]
    assert [t.name for t in plan.selected] == expected
    assert 0 < len(expected)


def test_cases_are_distinct(layout):
    """Each case selects something its neighbours do not (the table cannot pass by accident)."""
    sets = {c.id: frozenset(t.name for t in layout.tensors if c.on_cpu(t.name, t.layer)) for c in CASES}
    assert sets["ot-then-cpu-moe"] != sets["cpu-moe-then-ot"]
    assert sets["ot-first-match-gpu"] != sets["ngl-0"]
    assert len({sets[k] for k in ("ngl-0", "ngl-1", "ngl-3", "ngl-n", "ngl-n+1")}) == 5


def test_ngl_1_offloads_only_the_output_layer(layout):
    plan = make_plan(layout, Selection(n_gpu_layers=1))
    left = {t.name for t in layout.tensors} - {t.name for t in plan.selected}
    assert left == {"output.weight", "output_norm.weight"}


def test_cli_and_api_agree(layout):
    """The Python API applies overrides, then the MoE shortcuts (llama.cpp's order for -ot first)."""
    api = Selection(n_gpu_layers=99, cpu_moe=True, overrides=(("ffn_up_exps", "CUDA0"),))
    cli = selection_for(["-ngl", "99", "-ot", "ffn_up_exps=CUDA0", "--cpu-moe"])
    assert make_plan(layout, api).selected == make_plan(layout, cli).selected


# Names the synthetic model lacks but real MoE files have (llama.cpp: src/llama-arch.cpp).
MOE_NAMES = {
    "blk.0.ffn_gate_exps.weight": True,
    "blk.0.ffn_up_exps.weight": True,
    "blk.0.ffn_down_exps.weight": True,
    "blk.0.ffn_gate_up_exps.weight": True,
    "blk.0.ffn_up_chexps.weight": True,
    "blk.0.ffn_down_chexps.weight": True,
    "blk.0.ffn_gate_chexps.weight": True,
    "blk.0.ffn_down_exps.bias": True,  # llama.cpp's pattern is a search: biases of experts match
    "blk.0.ffn_gate_inp.weight": False,  # the router
    "blk.0.ffn_gate_inp_shexp.weight": False,
    "blk.0.ffn_up_shexp.weight": False,  # the shared expert
    "blk.0.ffn_down_shexp.weight": False,
    "blk.0.ffn_gate_shexp.weight": False,
    "blk.0.ffn_up.weight": False,  # a dense FFN
    "blk.0.exp_probs_b.bias": False,
    "blk.0.attn_q.weight": False,
}


def test_cpu_moe_names():
    """--cpu-moe with every layer offloaded: exactly the stacked experts stay."""
    on_cpu = Selection(n_gpu_layers=99, cpu_moe=True).cpu_filter(40)
    assert {name: on_cpu(name, 0) for name in MOE_NAMES} == MOE_NAMES


def test_n_cpu_moe_matches_whole_layer_numbers():
    """blk.1 must not match blk.10 / blk.11: llama.cpp's pattern is blk\\.1\\.ffn_..."""
    on_cpu = Selection(n_gpu_layers=99, n_cpu_moe=2).cpu_filter(40)
    chosen = {i for i in range(40) if on_cpu(f"blk.{i}.ffn_up_exps.weight", i)}
    assert chosen == {0, 1}
    assert not on_cpu("blk.1.ffn_up_shexp.weight", 1)


@pytest.mark.parametrize("ngl, n_layers, expected", [(None, 4, 6), (0, 4, 6), (1, 4, 5), (2, 4, 4), (5, 4, 1), (-1, 4, 1)])
def test_layer_slots(ngl, n_layers, expected):
    """cpu_filter alone: input, blk.0..3, output -> how many of the six slots stay on the CPU."""
    on_cpu = Selection(n_gpu_layers=ngl).cpu_filter(n_layers)
    slots = [("token_embd.weight", None), *((f"blk.{i}.attn_q.weight", i) for i in range(n_layers)), ("output.weight", None)]
    assert sum(on_cpu(name, layer) for name, layer in slots) == expected


def _empty_layout():
    from warmpool import ModelLayout

    return ModelLayout((), (), None, 0, 3, 32, {})


@pytest.mark.parametrize(
    "selection, message",
    [
        (Selection(overrides=(("(", "CPU"),)), r"invalid tensor override pattern '\('"),
        (Selection(overrides=(("[a-", "CUDA0"),)), r"invalid tensor override pattern"),
        (Selection(n_cpu_moe=-1), r"--n-cpu-moe must be >= 0"),
    ],
)
def test_invalid_selection_raises(selection, message):
    with pytest.raises(SelectionError, match=message):
        selection.validate()
    with pytest.raises(SelectionError, match=message):
        make_plan(_empty_layout(), selection)  # make_plan checks too, before any tensor


@pytest.mark.parametrize("value", ["attn_q", "=CPU", "attn_q=", "a=CPU,,b=CPU"])
def test_parse_overrides_rejects_malformed(value):
    from warmpool._select import parse_overrides

    with pytest.raises(SelectionError, match="expected PATTERN=BUFFER_TYPE"):
        parse_overrides([value])


def test_parse_overrides_splits_at_first_equals():
    from warmpool._select import parse_overrides

    assert parse_overrides(["a=b=CPU,c=CUDA0", "d=CPU"]) == (("a", "b=CPU"), ("c", "CUDA0"), ("d", "CPU"))


@pytest.mark.parametrize(
    "argv, code",
    [
        (["-ot", "attn_q"], 2),  # malformed value: a usage error
        (["-ot", "=CPU"], 2),
        (["--n-cpu-moe", "-1"], 2),
        (["-ngl", "many"], 2),
        (["-ot", "(=CPU"], 1),  # well-formed value, bad regex: bad input
        (["-ot", "[a-=CUDA0"], 1),
    ],
)
def test_cli_exit_codes(test_model, capsys, argv, code):
    assert main(["plan", str(test_model), *argv]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
