"""`warmpool run [MODEL] -- ENGINE ARGS`: the engine starts at once as a child with warmpool's
stdio, its exit status (or 128 + signal) passes through, SIGINT/SIGTERM/SIGHUP are passed on,
warmpool's own failures leave the engine running, and the real llama-cpp-python server answers
/v1/completions on 127.0.0.1 while warmpool warms (and keeps) its model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ENGINE = r"""
import signal, sys, time
codes = {signal.SIGINT: 20, signal.SIGTERM: 21, signal.SIGHUP: 22}
for sig, code in codes.items():
    signal.signal(sig, lambda s, f: sys.exit(codes[s]))
print("engine ready", flush=True)
time.sleep(60)
sys.exit(1)
"""


def _start(*argv: str, **kw) -> subprocess.Popen:
    # A session of its own: a failing test ends warmpool and the engine together (killpg).
    return subprocess.Popen([sys.executable, "-m", "warmpool", "run", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def test_exit_status_passes_through(tiny_model):
    assert _start(str(tiny_model), "--", "sh", "-c", "exit 7").wait(60) == 7
    assert _start(str(tiny_model), "--", "sh", "-c", "kill -KILL $$").wait(60) == 128 + signal.SIGKILL


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 20), (signal.SIGTERM, 21), (signal.SIGHUP, 22)])
def test_signals_are_passed_on(tiny_model, tmp_path, sig, code):
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    run = _start(str(tiny_model), "--", sys.executable, str(script))
    assert run.stdout.readline() == "engine ready\n"  # the engine's stdout is warmpool's
    run.send_signal(sig)
    assert run.wait(30) == code  # the engine's own exit status, after its handler ran


def test_no_model_exits_2_before_starting_anything(tmp_path):
    marker = tmp_path / "started"
    run = _start("--", "sh", "-c", f"touch {marker}")
    assert run.wait(60) == 2
    assert "no model in the engine command line" in run.stderr.read()
    assert not marker.exists()
    assert _start(str(tmp_path)).wait(60) == 2  # and no engine command line at all


def test_warmpools_failure_is_reported_once_and_the_engine_runs_on(tmp_path):
    run = _start("nosuchmodel:1b", "--", "sh", "-c", "sleep 1; echo engine finished")
    assert run.wait(60) == 0
    assert run.stdout.read() == "engine finished\n"
    err = run.stderr.read()
    assert err.count("the engine keeps running") == 1 and "nosuchmodel:1b: no such file" in err


@contextlib.contextmanager
def _running(*argv: str):
    """``warmpool run ARGV`` with its stderr collected; killed if the test fails before it ends."""
    run = _start(*argv)
    err = _Lines(run.stderr)
    try:
        yield run, err
    finally:
        try:
            os.killpg(run.pid, signal.SIGKILL)  # warmpool, the engine and any worker left
        except ProcessLookupError:
            pass
        run.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Lines(threading.Thread):
    """Collect a pipe's lines as they come."""

    def __init__(self, pipe) -> None:
        super().__init__(daemon=True)
        self.pipe, self.lines = pipe, []
        self.start()

    def run(self) -> None:
        for line in self.pipe:
            self.lines.append(line)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines) if line.startswith('{"event"')]


def _complete(port: int, deadline: float) -> dict:
    body = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
    while True:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


@pytest.mark.slow
def test_real_llama_cpp_python_server(test_model, tmp_path):
    from warmpool import evict, residency

    model = tmp_path / "model.gguf"
    shutil.copyfile(test_model, model)  # a private copy: evicted here without racing other tests
    evict(model)
    assert residency(model).resident_fraction < 0.5
    port = _free_port()
    with _running("--json", "--", sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                  "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "256") as (run, err):
        answer = _complete(port, time.monotonic() + 120)
        assert answer["object"] == "text_completion" and answer["choices"][0]["finish_reason"] in ("length", "stop")
        deadline = time.monotonic() + 60
        while not any(e["event"] in ("warmed", "started") for e in err.events()) and time.monotonic() < deadline:
            time.sleep(0.1)
        events = err.events()
        assert any(e["event"] in ("warmed", "started") for e in events), "".join(err.lines)[-2000:]
        assert residency(model).resident_fraction > 0.99
        assert _complete(port, time.monotonic() + 30)["choices"]  # still answering while warmpool keeps
        run.send_signal(signal.SIGTERM)
        status = run.wait(60)
    # uvicorn shuts down cleanly on SIGTERM, then ends by the signal: 128 + 15, passed through.
    assert status in (0, 128 + signal.SIGTERM), "".join(err.lines)[-2000:]
    err.join(10)
    assert "Application shutdown complete" in "".join(err.lines)
    with pytest.raises(OSError):
        _complete(port, time.monotonic())  # the server is gone with warmpool


@pytest.mark.slow
def test_real_server_kept_with_listen(test_model, tmp_path):
    model = tmp_path / "model.gguf"
    shutil.copyfile(test_model, model)
    port, status_port = _free_port(), _free_port()
    with _running("--json", "--interval", "1", "--listen", f"127.0.0.1:{status_port}", "--", sys.executable, "-m",
                  "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "256") as (run, err):
        _complete(port, time.monotonic() + 120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/status", timeout=5) as response:
            rows = json.loads(response.read())["models"]
        assert rows and rows[0]["resident_fraction"] > 0.99
        assert _complete(port, time.monotonic() + 30)["choices"]
        run.send_signal(signal.SIGINT)
        status = run.wait(60)
    assert status in (0, 128 + signal.SIGINT), "".join(err.lines)[-2000:]
    assert any(e["event"] == "stopped" for e in err.events())
    assert Path(model).exists()


COUNTER = r"""
import signal, sys, time
seen = []
signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
print("engine ready", flush=True)
while not seen:
    time.sleep(0.02)
time.sleep(1.0)  # a forwarded copy would arrive in this time
sys.exit(30 + len(seen))
"""


def test_terminal_ctrl_c_reaches_the_engine_once(tiny_model, tmp_path):
    """Ctrl-C on a terminal signals the whole foreground process group (si_code SI_KERNEL): the
    engine has it already, so warmpool must not send a second one (llama-server quits hard on
    the second).  A real pseudo-terminal, warmpool its session leader, ^C written to it."""
    import fcntl
    import pty
    import termios

    script = tmp_path / "engine.py"
    script.write_text(COUNTER)
    master, slave = pty.openpty()
    run = subprocess.Popen([sys.executable, "-m", "warmpool", "run", str(tiny_model), "--", sys.executable, str(script)],
                           stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                           preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"engine ready" not in seen and time.monotonic() < deadline:
            seen += os.read(master, 4096)
        assert b"engine ready" in seen
        os.write(master, b"\x03")  # the terminal's interrupt character: SIGINT to the foreground group
        assert run.wait(30) == 31, seen  # exactly one SIGINT reached the engine
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        os.close(master)


# What the engine's start waits on: warmpool's argument parsing, nothing of its pipeline.
SPAWN_PROBE = r"""
import subprocess, sys
def spawn(self, *args, **kwargs):
    print(" ".join(sorted(m for m in sys.modules if m.startswith("warmpool"))), flush=True)
    import os
    os._exit(0)
subprocess.Popen.__init__ = spawn
from warmpool.commands import main
main(["run", "--", "engine", "-m", sys.argv[1]])
"""
# The layout walk, the plan, the platform layer, the keeper, the services' log: with them the
# spawn came 31-44 ms after the interpreter's start here, without them 11 ms (docs/beside-engine.md).
HEAVY = ("warmpool._platform", "warmpool._plan", "warmpool._gguf", "warmpool._keep", "warmpool._api",
         "warmpool._stores", "warmpool._progress", "warmpool.commands._logs")


def test_the_engine_is_spawned_before_warmpool_imports_its_pipeline(tiny_model):
    out = subprocess.run([sys.executable, "-c", SPAWN_PROBE, str(tiny_model)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.split()
    assert "warmpool._engine.child" in loaded, loaded  # the probe did stop at the spawn
    assert not [m for m in loaded if m.startswith(HEAVY)], loaded


def test_engine_that_cannot_start(tiny_model):
    run = _start(str(tiny_model), "--", "/nonexistent/llama-server", "-m", str(tiny_model))
    assert run.wait(60) == 1
    assert run.stderr.read() == "warmpool: /nonexistent/llama-server: cannot start the engine: No such file or directory\n"


def test_no_mmap_engine_is_warmed_once_not_kept(tiny_model, tmp_path):
    """An engine that copies the model into its own memory: warmed for its load, no keeper.
    (The program only stands in for llama-server's command line; it reads nothing.)"""
    engine = tmp_path / "llama-server"
    engine.write_text("#!/bin/sh\nsleep 2\n")
    engine.chmod(0o755)
    run = _start("--json", "--", str(engine), "-m", str(tiny_model), "-ngl", "2", "--no-mmap")
    assert run.wait(60) == 0
    err = run.stderr.read()
    assert "warming helps its load only, keeping it warm does not help" in err
    assert "it is not kept" in err
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith('{"event"')]
    assert events == ["warmed"]


def test_an_engine_still_starting_gets_its_model_warmed_first(private_model, tmp_path):
    """The engine (a stand-in that reads nothing for its first seconds, as a Python server
    importing) is not reading when warmpool looks: the first warm runs its pool at once, under
    ``run``'s blocked signals, and ends (the pool's fork server still reaps its workers)."""
    from conftest import evict_file

    evict_file(private_model)
    run = _start("-m", str(private_model), "--json", "--", sys.executable, "-c", "import time; time.sleep(6)")
    try:
        assert run.wait(60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    err = run.stderr.read()
    warmed = [json.loads(line) for line in err.splitlines() if line.startswith('{"event": "warmed"')]
    assert len(warmed) == 1, err
    assert "warmed first" in warmed[0]["reason"] and warmed[0]["workers"] >= 1, warmed[0]
    assert warmed[0]["bytes_warmed"] >= 0.99 * warmed[0]["bytes_selected"] and warmed[0]["resident_fraction"] == 1.0
