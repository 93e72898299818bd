"""What every command shares: --version, whole help lines, and one meaning per JSON field."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import pytest

from warmpool.commands import COMMANDS, _commands


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "warmpool", *argv], capture_output=True, text=True, timeout=120)


def test_version_is_the_installed_distributions():
    got = _cli("--version")
    assert got.returncode == 0 and got.stdout == f"warmpool {version('warmpool')}\n"


def test_help_lists_each_command_with_a_whole_sentence():
    out = _cli("--help").stdout
    listing = " ".join(out.split("COMMAND\n", 1)[1].split("options:")[0].split())  # argparse wraps lines
    for command in _commands():
        line = command.__doc__.split("\n\n")[0]
        sentence = " ".join(line.split())
        sentence = sentence[: sentence.find(". ") + 1] if ". " in sentence else sentence
        assert sentence.endswith("."), (command.name, sentence)
        assert f"{command.name} {sentence}" in listing, (command.name, sentence)
    assert len(_commands()) == len(COMMANDS)


@pytest.mark.xdist_group("pagecache")
def test_bytes_selected_means_the_same_in_plan_warm_and_status(pagecache_model):
    """plan --json once counted tensor bytes and warm/status whole pages for the same selection."""
    flags = ["-ngl", "99", "--n-cpu-moe", "2", "--json"]
    plan = json.loads(_cli("plan", str(pagecache_model), *flags).stdout)
    warm = json.loads(_cli("warm", str(pagecache_model), *flags, "--no-progress").stdout)
    status = json.loads(_cli("status", str(pagecache_model), *flags).stdout)
    assert plan["bytes_selected"] == warm["bytes_selected"] == status["bytes_selected"]
    assert plan["bytes_selected"] == sum(c["length"] for c in json.loads(_cli("plan", str(pagecache_model), *flags).stdout)["chunk_table"])
    assert plan["tensor_bytes_selected"] < plan["bytes_selected"]  # tensors do not fill their first and last pages
    assert plan["selection"] == "-ngl 99 --n-cpu-moe 2"  # as written, not as two -ot regexes


def _json_lines(text: str) -> list[dict]:
    records = [json.loads(line) for line in text.splitlines()]  # every line: one JSON object, or this fails
    assert records and all({"time", "level", "service", "message"} <= r.keys() for r in records), text
    return records


def test_keep_logs_json_lines(tiny_model, tmp_path):
    import signal
    import time

    model = tmp_path / "m.gguf"
    model.write_bytes(tiny_model.read_bytes())
    proc = subprocess.Popen([sys.executable, "-m", "warmpool", "keep", str(model), "--interval", "0.2", "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline and not any('"event": "warmed"' in line for line in lines):
            lines.append(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    records = _json_lines("".join(lines) + out)
    assert proc.returncode == 0 and err == "", err
    assert {r["service"] for r in records} == {"keep"}
    warmed = next(r for r in records if r.get("event") == "warmed")
    assert warmed["level"] == "INFO" and warmed["model"] == str(model) and warmed["resident_fraction"] == 1.0
    assert [r["event"] for r in records][0] == "started" and records[-1]["event"] == "stopped"


def test_run_logs_json_lines(tiny_model):
    engine = [sys.executable, "-c", "import time; time.sleep(2)"]  # prints nothing: stderr is warmpool's alone
    proc = subprocess.run([sys.executable, "-m", "warmpool", "run", str(tiny_model), "--log-format", "json", "--", *engine],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    records = _json_lines(proc.stderr)
    assert {r["service"] for r in records} == {"run"}
    assert any(r.get("event") == "warmed" and r["bytes_selected"] > 0 for r in records), records


def test_import_warmpool_loads_its_errors_alone():
    """Inside an engine ``import warmpool`` costs its exception tree: no loguru, nothing new."""
    code = ("import sys; before = set(sys.modules); import warmpool; "
            "print(sorted(set(sys.modules) - before))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert eval(proc.stdout) == ["warmpool", "warmpool._errors", "warmpool._version"], proc.stdout  # noqa: S307 - our own list literal
