"""No SIGBUS when /dev/shm is full, read-only or missing: the warm falls back to an unnamed
progress segment; only what needs a name (``--detach``) fails, with one line saying why.

Each case runs real processes in a private mount namespace (``unshare -m``) whose /dev/shm is a
4 KiB tmpfs filled to the brim, that tmpfs remounted read-only, or gone (a bare tmpfs over /dev
holding only the device nodes the processes need).  The model file is evicted inside the
namespace first, so the warm really starts workers and writes to its segment.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.pagecache

SETUPS = {
    "full": "mount -t tmpfs -o size=4k tmpfs /dev/shm && head -c 4096 /dev/zero > /dev/shm/fill",
    "readonly": "mount -t tmpfs -o size=4k tmpfs /dev/shm && mount -o remount,ro /dev/shm",
    "missing": ("mkdir {tmp}/dev && mount --rbind /dev {tmp}/dev && mount -t tmpfs tmpfs /dev && "
                "for n in null zero random urandom; do touch /dev/$n && mount --bind {tmp}/dev/$n /dev/$n; done"),
}
CHECK = {  # proof that the namespace is as described before anything runs
    "full": "! sh -c 'echo x > /dev/shm/probe' 2>/dev/null",
    "readonly": "! touch /dev/shm/probe 2>/dev/null",
    "missing": "test ! -e /dev/shm",
}

ENGINE = """
import sys
from engine_adapter import start_warmup
w = start_warmup(sys.argv[1], workers=2, chunk_size=1 << 20)
r = w.wait(60)
p = w.progress()
assert w.error is None, w.error
assert r is not None and r.workers >= 1 and r.bytes_warmed > 0, r
assert r.resident_fraction >= 0.99, r
assert w.shm_name is None  # nothing another process could open
assert p.state == "done" and p.done_bytes == p.total_bytes > 0, p
assert all(w.layer_ready(k) for k in range(-1, w.n_layers + 1))
print("engine ok")
"""


@pytest.fixture(scope="module")
def namespaces_allowed() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here (needs CAP_SYS_ADMIN): {probe.stderr.strip()}")


def in_namespace(setup: str, tmp_path, *commands: str) -> subprocess.CompletedProcess:
    """Run the commands (one shell line each, stdout/stderr kept apart by markers) in a fresh
    mount namespace prepared by ``setup``."""
    lines = [SETUPS[setup].format(tmp=tmp_path), CHECK[setup] + " || { echo 'namespace not as described' >&2; exit 99; }"]
    for k, command in enumerate(commands):
        lines.append(f"echo '@@{k}'; echo '@@{k}' >&2; {command}; echo \"@@rc $?\"")
    return subprocess.run(["unshare", "-m", "sh", "-c", "\n".join(lines)], capture_output=True, text=True, timeout=120)


def split(text: str, n: int) -> list[str]:
    parts = [""] * n
    current = None
    for line in text.splitlines(keepends=True):
        if line.startswith("@@"):
            current = int(line[2:]) if line[2:].strip().isdigit() else current
        elif current is not None:
            parts[current] += line
    return parts


def py(*argv: str) -> str:
    return " ".join(shlex.quote(a) for a in (sys.executable, *argv))


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_warm_succeeds_and_only_detach_fails(setup, private_model, tmp_path, namespaces_allowed):
    model = str(private_model)
    evict = py("-m", "warmpool", "evict", model) + " >/dev/null"
    run = in_namespace(
        setup, tmp_path,
        f"{evict}; {py('-m', 'warmpool', 'warm', model, '--json', '--workers', '2', '--chunk-size', '1M')}",
        f"{evict}; {py('-c', ENGINE, model)}",
        f"{evict}; {py('-m', 'warmpool', 'warm', model, '--detach')}",
        py("-m", "warmpool", "progress", "/warmpool-1-00000000"),
    )
    assert run.returncode == 0 and "namespace not as described" not in run.stderr, run.stderr
    out, err = split(run.stdout, 4), split(run.stderr, 4)
    codes = [int(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("@@rc")]

    # The CLI warm: no SIGBUS (135), a real warm, verified.
    assert codes[0] == 0, err[0]
    result = json.loads(out[0].splitlines()[0])
    assert result["workers"] >= 1 and result["bytes_warmed"] > 0 and result["resident_fraction"] >= 0.99
    assert "Traceback" not in err[0]

    # An engine that warms through the adapter lives, and its handle follows the warm.
    assert codes[1] == 0 and out[1].strip() == "engine ok", err[1]

    # --detach needs a name: one line, exit 1, saying why.
    assert codes[2] == 1, (out[2], err[2])
    assert out[2] == "" and len(err[2].strip().splitlines()) == 1, err[2]
    assert "cannot detach" in err[2] and "named" in err[2] and "/dev/shm" in err[2]

    # progress NAME: one line, exit 1.
    assert codes[3] == 1 and len(err[3].strip().splitlines()) == 1 and "Traceback" not in err[3], err[3]
