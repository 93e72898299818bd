"""The warm, status and evict commands, through main() and as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import evict_file

from warmpool import main

pytestmark = [pytest.mark.pagecache, pytest.mark.xdist_group("pagecache")]

WARM_FIELDS = {"bytes_selected", "bytes_already_resident", "bytes_warmed", "seconds", "workers",
               "strategy", "resident_fraction", "skipped", "reason"}


def run_json(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_warm_json_then_status(pagecache_model, capsys):
    evict_file(pagecache_model)
    code, cold = run_json(capsys, "status", str(pagecache_model), "--json")
    assert code == 0 and cold["resident_fraction"] < 0.05
    assert main(["status", str(pagecache_model), "--min-resident", "0.99"]) == 3
    assert "selected resident" in capsys.readouterr().out

    code, result = run_json(capsys, "warm", str(pagecache_model), "--json", "--cpu-moe")
    assert code == 0 and WARM_FIELDS <= result.keys()
    assert result["resident_fraction"] >= 0.99 and not result["skipped"]

    code, status = run_json(capsys, "status", str(pagecache_model), "--json", "--cpu-moe")
    assert code == 0 and status["resident_fraction"] >= 0.99
    assert main(["status", str(pagecache_model), "--cpu-moe", "--min-resident", "0.99"]) == 0


def test_status_verbose_lists_layers(pagecache_model, capsys):
    assert main(["status", str(pagecache_model), "-v"]) == 0
    out = capsys.readouterr().out
    assert "blk.0" in out and "input" in out and "output" in out


def test_summary_line_and_evict(pagecache_model, capsys):
    evict_file(pagecache_model)
    assert main(["warm", str(pagecache_model), "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("warmed ") and line.endswith("100.0% resident"), line
    assert main(["evict", str(pagecache_model)]) == 0
    assert "evicted" in capsys.readouterr().out


def test_prefault_zero_cli(pagecache_model):
    env = dict(os.environ, WARMPOOL_PREFAULT="0")
    proc = subprocess.run([sys.executable, "-m", "warmpool", "warm", str(pagecache_model)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0
    assert "skipped: WARMPOOL_PREFAULT=0" in proc.stdout


@pytest.mark.parametrize("argv, code, message", [
    (["warm", "/nonexistent/model.gguf"], 1, "/nonexistent/model.gguf: no such file"),
    (["warm", "{model}", "--workers", "0"], 1, "--workers must be at least 1"),
    (["warm", "{model}", "--strategy", "bogus"], 2, "invalid choice"),
    (["warm", "{model}", "--budget", "lots"], 2, "not a size"),
    (["warm", "{model}", "--budget", "150%"], 2, "percentage"),
    (["status", "{model}", "--bogus"], 2, "unrecognized arguments"),
    # a module's name is no command: the error lists every command, not only that module's
    (["listing"], 2, "(choose from 'plan', 'warm', 'status', 'evict', 'progress', 'keep', 'list', 'run', 'fleet')"),
])
def test_bad_input(pagecache_model, argv, code, message):
    argv = [a.format(model=pagecache_model) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "warmpool", *argv], capture_output=True, text=True)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_logs_readably_only_with_verbose(tiny_model):
    """The CLI's own stderr handler: the policy's decision with -v, nothing without it."""
    def warm(*flags):
        return subprocess.run([sys.executable, "-m", "warmpool", *flags, "warm", str(tiny_model), "--quiet"],
                              capture_output=True, text=True, timeout=60)

    warm()  # resident from here on
    verbose, quiet = warm("-v"), warm()
    assert verbose.returncode == quiet.returncode == 0
    assert verbose.stderr == f"warmpool: {tiny_model}: the selection is already resident\n"
    assert quiet.stderr == ""


def test_example_with_json_prints_one_json_object(private_model, capsys, monkeypatch):
    """``--example`` evicts the example first and says so, except with ``--json``, whose output is
    one JSON object.  (The example is the small test model here: the built-in one is ~300 MB.)"""
    import warmpool.example

    monkeypatch.setattr(warmpool.example, "example_model", lambda: private_model)
    code, result = run_json(capsys, "warm", "--example", "--json", "--no-progress")
    evicted = result["bytes_already_resident"] < 0.01 * result["bytes_selected"]  # it evicted first, silently
    assert code == 0 and evicted and result["resident_fraction"] == 1.0, result
    main(["warm", "--example", "--no-progress"])
    assert capsys.readouterr().out.startswith(f"example    {private_model}\n")
