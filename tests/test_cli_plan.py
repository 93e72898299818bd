"""``warmpool plan``: the JSON contract, the human table, exit codes, ``python -m warmpool``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from warmpool import Selection, main, make_plan, read_layout
from warmpool._select import CATEGORIES

REPO = Path(__file__).resolve().parents[1]


def plan_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.count("\n") == 1  # one JSON object on one line
    return json.loads(out)


def test_json_contract(test_model, capsys):
    summary = plan_json(capsys, str(test_model))
    layout = read_layout(test_model)
    plan = make_plan(layout)
    assert summary["files"] == [{"path": str(test_model), "size": test_model.stat().st_size}]
    assert summary["tensors_total"] == len(layout.tensors) == summary["tensors_selected"]
    assert summary["tensor_bytes_total"] == sum(t.nbytes for t in layout.tensors) == summary["tensor_bytes_selected"]
    assert summary["chunks"] == len(plan.chunks) == len(summary["chunk_table"])
    # one meaning of bytes_selected in every --json: the selection's whole pages, as warm reports them
    assert summary["bytes_selected"] == sum(c["length"] for c in summary["chunk_table"]) == plan.bytes_planned
    assert summary["architecture"] == "qwen3moe" and summary["n_layers"] == layout.n_layers
    assert set(summary["categories"]) == set(CATEGORIES)
    assert sum(row["tensor_bytes_total"] for row in summary["categories"].values()) == summary["tensor_bytes_total"]
    assert summary["chunk_table"][0] == plan.chunks[0]._asdict()


def test_json_follows_the_selection(test_model, capsys):
    summary = plan_json(capsys, str(test_model), "-ngl", "99", "--cpu-moe", "--chunk-size", "1M")
    plan = make_plan(read_layout(test_model), Selection(n_gpu_layers=99, cpu_moe=True), 1 << 20)
    assert summary["tensors_selected"] == len(plan.selected) == 1 + 3 * plan.n_layers  # token_embd + experts
    assert summary["tensor_bytes_selected"] == plan.bytes_selected < summary["tensor_bytes_total"]
    assert summary["bytes_selected"] == plan.bytes_planned
    assert summary["chunks"] == len(plan.chunks)
    assert summary["chunk_size"] == 1 << 20
    experts = summary["categories"]["experts"]
    assert experts["tensors_selected"] == experts["tensors_total"] == 3 * plan.n_layers
    assert summary["categories"]["attention"]["tensors_selected"] == 0
    assert summary["selection"] == "-ngl 99 --cpu-moe"  # as written


def test_json_split_model(split_model, tiny_model, capsys):
    summary = plan_json(capsys, str(split_model[2]))
    assert [f["path"] for f in summary["files"]] == [str(p) for p in split_model]
    assert summary["tensor_bytes_total"] == read_layout(tiny_model).nbytes
    assert {c["file"] for c in summary["chunk_table"]} == {0, 1, 2}


def test_human_output(test_model, capsys):
    assert main(["plan", str(test_model), "-ngl", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"model      {test_model}"
    assert "qwen3moe, 8 layers" in lines[1]
    assert lines[2] == "selection  -ngl 1"
    header = next(i for i, line in enumerate(lines) if line.startswith("category"))
    rows = {line[:18].strip(): line[18:].split() for line in lines[header + 1 :] if line[:18].strip()}
    assert {"experts", "attention", "dense FFN", "embeddings/output", "total"} <= set(rows)
    assert rows["experts"][:3] == ["24", "/", "24"]
    assert rows["embeddings/output"][:3] == ["1", "/", "3"]  # output + output_norm offloaded
    assert rows["total"][:3] == ["97", "/", "99"]
    assert lines[-1].startswith("plan       ") and "chunks" in lines[-1]


def test_python_dash_m(test_model):
    proc = subprocess.run([sys.executable, "-m", "warmpool", "plan", str(test_model), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tensors_total"] == 99


@pytest.mark.parametrize(
    "argv, code",
    [
        (["plan", "{model}"], 0),
        (["plan", "{model}", "--json", "-ngl", "-1"], 0),
        (["plan", "{missing}"], 1),
        (["plan", "{model}", "-ot", "(=CPU"], 1),
        (["plan"], 1),  # no model and no --example: a WarmpoolError, reported in one line
        (["plan", "{model}", "--no-such-flag"], 2),
        (["plan", "{model}", "-ot", "no-equals-sign"], 2),
        (["plan", "{model}", "--chunk-size", "lots"], 2),
        (["no-such-command"], 2),
        ([], 2),
    ],
)
def test_exit_codes(test_model, tmp_path, capsys, argv, code):
    argv = [a.format(model=test_model, missing=tmp_path / "missing.gguf") for a in argv]
    assert main(argv) == code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if code == 1:
        assert err.startswith("warmpool: ") and err.count("\n") == 1 and out == ""
    if code == 2:
        assert "usage:" in err


def test_exit_codes_through_the_interpreter(tmp_path):
    """The process exit status, not just main()'s return value."""
    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "warmpool", *argv], capture_output=True, text=True, cwd=REPO, timeout=60)

    missing = run("plan", str(tmp_path / "missing.gguf"))
    assert missing.returncode == 1
    assert missing.stderr == f"warmpool: {tmp_path / 'missing.gguf'}: no such file\n"
    assert run("plan", "--bogus").returncode == 2
