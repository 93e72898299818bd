"""What README promises after ``pip install .`` alone, in a fresh virtual environment: no test
extra, no optional extra (an install once missed prometheus-client, which README's own
``keep --listen`` needs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A venv with warmpool installed from a copy of the tree (pip builds from the copy)."""
    base = tmp_path_factory.mktemp("fresh")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", ".hypothesis"))
    venv.create(base / "venv", with_pip=True)
    bin_dir = base / "venv" / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(bin_dir / "pip"), "install", "-q", str(src)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return bin_dir


def _run(bin_dir: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(bin_dir / "warmpool"), *argv], capture_output=True, text=True, timeout=120,
                          env={**base, **(env or {})}, cwd=bin_dir)


@pytest.mark.slow
def test_readme_commands_work_after_a_plain_install(fresh, tiny_model, tmp_path):
    assert _run(fresh, "--version").stdout.startswith("warmpool ")
    imported = subprocess.run([str(fresh / "python"), "-c", "import warmpool, sys; print(warmpool.__file__)"],
                              capture_output=True, text=True, cwd=tmp_path)
    assert str(fresh.parent) in imported.stdout  # the installed copy, not this checkout

    flags = [str(tiny_model), "-ngl", "99", "--cpu-moe", "--json"]
    selected = {c: json.loads(_run(fresh, c, *flags).stdout)["bytes_selected"] for c in ("plan", "warm", "status")}
    assert len(set(selected.values())) == 1, selected

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keep = subprocess.Popen([str(fresh / "warmpool"), "keep", str(tiny_model), "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.monotonic() + 60, ""
        while time.monotonic() < deadline and "warmpool_resident_bytes" not in body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    body = response.read().decode()
            except OSError:
                assert keep.poll() is None, keep.stderr.read()
                time.sleep(0.2)
        assert "warmpool_resident_bytes" in body
    finally:
        keep.send_signal(signal.SIGTERM)
        keep.wait(timeout=10)
    assert keep.returncode == 0, keep.stderr.read()

    cache = tmp_path / "hub" / "models--org--tiny-GGUF"
    snapshot = cache / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "blobs").mkdir()
    shutil.copyfile(tiny_model, cache / "blobs" / "blob")
    (snapshot / "tiny-Q4_K_M.gguf").symlink_to("../../blobs/blob")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0" * 40)
    by_hf = _run(fresh, "plan", "-hf", "org/tiny-GGUF:Q4_K_M", "--json", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert by_hf.returncode == 0, by_hf.stderr
    assert json.loads(by_hf.stdout)["files"][0]["path"] == str(snapshot / "tiny-Q4_K_M.gguf")
