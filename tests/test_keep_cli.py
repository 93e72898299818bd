"""``warmpool keep`` as a process: real HTTP over loopback, real signals, real privilege limits.

Each test works on a private copy of the test model (or a copy of its own), so evicting it
disturbs no other test.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import evict_file, lines_until

from warmpool import _platform, evict

pytestmark = pytest.mark.pagecache

INTERVAL = 0.5


# -- the command ------------------------------------------------------------------------


class KeepProcess:
    """``python -m warmpool keep ... --json`` with its events read as they come."""

    def __init__(self, *argv, prefix: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "warmpool", "keep", *map(str, argv), "--json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def wait_for(self, kind: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {kind!r} event in {timeout} s; stderr: {self.stderr()}") from None
            if event["event"] == kind:
                return event

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()

    def terminate(self, timeout: float = 3.0) -> tuple[int, float]:
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def keep_cli():
    started: list[KeepProcess] = []

    def start(*argv, **kw) -> KeepProcess:
        started.append(KeepProcess(*argv, **kw))
        return started[-1]

    yield start
    for k in started:
        k.close()


def _get(address: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_refresh_period_is_served(private_model, keep_cli):
    """/status and /metrics show the refresh period in effect once a pass has run: the asked
    one for a small model (one pass costs far less than the CPU cap's share of it)."""
    keeper = keep_cli(private_model, "--listen", "127.0.0.1:0", "--interval", INTERVAL, "--refresh", "0.3")
    address = keeper.wait_for("started")["address"]
    keeper.wait_for("warmed")
    deadline = time.monotonic() + 5
    while (status := json.loads(_get(address, "/status")[1]))["refresh_period_seconds"] is None:
        assert time.monotonic() < deadline, "no refresh pass within 5 s"
        time.sleep(0.1)
    assert status["refresh_seconds"] == 0.3 and status["refresh_period_seconds"] == 0.3
    assert _metric(_get(address, "/metrics")[1].decode(), "warmpool_refresh_period_seconds") == 0.3


def test_http_endpoints_and_sigterm(private_model, keep_cli, reporting_order):
    evict_file(private_model)
    with reporting_order():
        keeper = keep_cli(private_model, "--listen", "127.0.0.1:0", "--interval", INTERVAL, "--hold", "none")
        started = keeper.wait_for("started")
        assert started["free_page_reporting"] == _platform.free_page_reporting()  # docs/keep.md: a limit we cannot lift
    address = started["address"]
    keeper.wait_for("warmed")
    code, body = _get(address, "/ready")
    assert code == 200, body
    status = json.loads(_get(address, "/status")[1])
    row = status["models"][0]
    assert row["path"] == str(private_model) and row["resident_fraction"] >= 0.99
    assert {"path", "bytes_selected", "bytes_resident", "bytes_locked", "bytes_rewarmed_total",
            "rewarms_total", "resident_fraction"} <= row.keys()
    assert status["refresh_seconds"] == 0 and status["refresh_period_seconds"] is None  # --hold none: no refresh

    evict(private_model)  # behind its back: the next check re-warms and counts it
    rewarmed = keeper.wait_for("rewarmed", 4 * INTERVAL)
    time.sleep(0.1)
    metrics = _get(address, "/metrics")[1].decode()
    row = json.loads(_get(address, "/status")[1])["models"][0]
    assert row["rewarms_total"] >= 1 and row["bytes_rewarmed_total"] >= rewarmed["bytes_rewarmed"] > 0
    assert _metric(metrics, "warmpool_selected_bytes") == row["bytes_selected"]
    assert _metric(metrics, "warmpool_rewarms_total") == row["rewarms_total"]
    assert _metric(metrics, "warmpool_rewarmed_bytes_total") == row["bytes_rewarmed_total"]
    assert _metric(metrics, "warmpool_locked_bytes") == 0
    assert f'model="{private_model}"' in metrics
    assert _metric(metrics, "warmpool_check_seconds_count") >= 1
    assert "warmpool_refresh_period_seconds" not in metrics
    assert _get(address, "/nope")[0] == 404

    code, took = keeper.terminate()
    assert code == 0 and took < 3.0, (code, took, keeper.stderr())
    assert keeper.wait_for("stopped", 1)["event"] == "stopped"
    host, port = address.rsplit(":", 1)
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()
    _assert_nothing_left(keeper.proc.pid)


def _assert_nothing_left(pid: int) -> None:
    """No worker and no progress segment of keeper ``pid`` remain."""
    segments = [n for n in os.listdir("/dev/shm") if n.startswith(f"warmpool-{pid}-")]
    assert not segments
    workers = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if b"warmpool._pool.worker" in cmdline and f"warmpool-{pid}-".encode() in cmdline:
                workers.append(entry)
    assert not workers


def test_ready_503_below_min_resident(private_model, keep_cli):
    evict_file(private_model)
    keeper = keep_cli(private_model, "--listen", "127.0.0.1:0", "--interval", INTERVAL, "--hold", "none",
                      "--budget", "8M", "--min-resident", "0.99")
    address = keeper.wait_for("started")["address"]
    keeper.wait_for("warmed")
    code, body = _get(address, "/ready")
    row = json.loads(_get(address, "/status")[1])["models"][0]
    assert code == 503 and row["resident_fraction"] < 0.99, (body, row)
    # The budget holds part of the selection (docs/keep.md, "When the model does not fit").
    assert row["bytes_kept"] <= 8 << 20 < row["bytes_selected"], row
    assert keeper.terminate()[0] == 0


def test_sigterm_during_first_warm_leaves_nothing(tmp_path, test_model, keep_cli):
    """SIGTERM while the first warm's workers run: exit 0 within 3 s, no worker or segment."""
    model = tmp_path / "slow.gguf"
    shutil.copyfile(test_model, model)
    evict_file(model)
    # One worker reading 4 KiB at a time with readahead off: long enough to be caught mid-warm.
    keeper = keep_cli(model, "--interval", INTERVAL, "--strategy", "read", "--workers", "1", "--chunk-size", "4K")
    deadline = time.monotonic() + 20
    while not [n for n in os.listdir("/dev/shm") if n.startswith(f"warmpool-{keeper.proc.pid}-")]:
        assert time.monotonic() < deadline and keeper.proc.poll() is None, keeper.stderr()
        time.sleep(0.01)
    rss = _rss_anon_tree(keeper.proc.pid)  # the keeper and its worker, mid-warm
    assert 0 < rss <= 100 << 20, f"keeper + workers RssAnon {rss / 2**20:.1f} MiB"
    code, took = keeper.terminate()
    assert code == 0 and took < 3.0, (code, took, keeper.stderr())
    _assert_nothing_left(keeper.proc.pid)


def _rss_anon_tree(pid: int) -> int:
    import psutil

    total = 0
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        with open(f"/proc/{p.pid}/status") as f:
            total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    return total


def test_for_pid(private_model, keep_cli):
    engine = subprocess.Popen(["sleep", "60"])
    try:
        keeper = keep_cli(private_model, "--interval", "10", "--for-pid", engine.pid)
        keeper.wait_for("warmed")
        assert keeper.proc.poll() is None
        engine.kill()
        engine.wait()
        start = time.monotonic()
        assert keeper.proc.wait(5) == 0
        assert time.monotonic() - start < 2.0  # not a whole --interval of 10 s
        assert "exited" in keeper.wait_for("stopped", 1)["reason"]
    finally:
        engine.kill()
        engine.wait()


def _vm_locked(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmLck")


def _has_cap_ipc_lock() -> bool:
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(caps & (1 << 14))  # CAP_IPC_LOCK


def test_lock_as_root_locks_everything(private_model, keep_cli):
    if not _has_cap_ipc_lock():
        pytest.skip("needs CAP_IPC_LOCK (root): the unlimited lock cannot be tried here")
    keeper = keep_cli(private_model, "--lock", "--interval", INTERVAL, "--listen", "127.0.0.1:0")
    address = keeper.wait_for("started")["address"]
    locked = keeper.wait_for("locked")
    page = os.sysconf("SC_PAGE_SIZE")
    assert not locked.get("partial")
    assert locked["bytes_locked"] == -(-locked["bytes_selected"] // page) * page
    assert _vm_locked(keeper.proc.pid) == locked["bytes_locked"]
    row = json.loads(_get(address, "/status")[1])["models"][0]
    assert row["bytes_locked"] == locked["bytes_locked"]
    assert evict(private_model) > 0.99 * os.path.getsize(private_model) - 8192  # locked pages stay
    assert keeper.terminate()[0] == 0


def test_lock_without_cap_ipc_lock_is_partial_and_keeps_running(private_model, keep_cli):
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) not installed: cannot drop CAP_IPC_LOCK")
    import resource

    limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    if limit == resource.RLIM_INFINITY or limit >= os.path.getsize(private_model):
        pytest.skip(f"RLIMIT_MEMLOCK {limit} is not below the model's size: nothing partial to see")
    keeper = keep_cli(private_model, "--lock", "--interval", INTERVAL, "--listen", "127.0.0.1:0",
                      prefix=("setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--"))
    address = keeper.wait_for("started")["address"]
    locked = keeper.wait_for("locked")
    assert locked["partial"] and 0 < locked["bytes_locked"] <= limit
    assert locked["bytes_locked"] == _vm_locked(keeper.proc.pid) == locked["vm_locked"]
    assert "LimitMEMLOCK" in locked["fix"] and "IPC_LOCK" in locked["fix"]
    time.sleep(2 * INTERVAL)
    assert keeper.proc.poll() is None  # still running, still serving
    row = json.loads(_get(address, "/status")[1])["models"][0]
    assert row["bytes_locked"] == locked["bytes_locked"] and row["resident_fraction"] >= 0.99
    assert keeper.terminate()[0] == 0


def test_human_output_names_the_memlock_fix(private_model):
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) not installed: cannot drop CAP_IPC_LOCK")
    proc = subprocess.Popen(["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--",
                             sys.executable, "-m", "warmpool", "keep", str(private_model), "--lock"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = lines_until(proc.stdout, lambda line: " locked " in line)  # started (a note on some VMs), warmed, locked
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=5)  # stdout is the reader thread's; stderr holds a line at most
    assert proc.returncode == 0, proc.stderr.read()
    text = "".join(seen)
    assert "locked 8.00 MiB of" in text and "LimitMEMLOCK=" in text and "--ulimit memlock" in text, text


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["{model}", "--listen", "nonsense"], "--listen 'nonsense': expected HOST:PORT"),
    (["{model}", "--interval", "0"], "interval must be positive"),
    (["{model}", "--min-resident", "2"], "--min-resident must be in [0, 1]"),
    (["{model}", "--for-pid", "999999999"], "--for-pid 999999999: no such process"),
    ([], "no model given"),
])
def test_bad_input(private_model, argv, message):
    argv = [a.format(model=private_model) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "warmpool", "keep", *argv], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_port_taken_is_one_line(private_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "warmpool", "keep", str(private_model), "--listen", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "cannot bind" in proc.stderr and "Traceback" not in proc.stderr


def test_hidden_residency_is_null_and_not_ready(private_model, keep_cli):
    """A model the keeper neither owns nor may write: the kernel hides residency (cachestat
    EPERM, mincore all ones), so /status says null, /metrics has no resident series, /ready 503."""
    if not shutil.which("setpriv") or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to drop CAP_FOWNER/CAP_DAC_OVERRIDE")
    from warmpool import _platform

    if not _platform.supports_cachestat():
        pytest.skip("no cachestat(2) here: hidden residency is only detectable with it (or issue 8's helper)")
    os.chown(private_model, 65534, 65534)
    os.chmod(private_model, 0o444)
    keeper = keep_cli(private_model, "--listen", "127.0.0.1:0", "--interval", INTERVAL,
                      prefix=("setpriv", "--bounding-set=-fowner,-dac_override,-dac_read_search", "--"))
    address = keeper.wait_for("started")["address"]
    warmed = keeper.wait_for("warmed")
    assert warmed["resident_fraction"] is None
    time.sleep(2 * INTERVAL)
    row = json.loads(_get(address, "/status")[1])["models"][0]
    assert row["residency_hidden"] and row["bytes_resident"] is None and row["resident_fraction"] is None, row
    assert row["rewarms_total"] == 0  # nothing re-warmed on a guess
    assert _get(address, "/ready")[0] == 503
    metrics = _get(address, "/metrics")[1].decode()
    assert "warmpool_selected_bytes{" in metrics and "warmpool_resident_bytes{" not in metrics
    assert keeper.terminate()[0] == 0
