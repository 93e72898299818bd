"""Beside an engine that loads the model itself: start to first token with and without warmpool.

    python tools/lib/beside.py child VARIANT MODEL THREADS   # one in-process trial, one JSON line

Used by ``tools/bench_warm.py --beside``.  Two engines, each in paired rounds in an order rotated
from round to round, every run in fresh processes right after an eviction of the model:

* in process: plain ``llama_cpp.Llama(MODEL)`` against ``engine_adapter.llama_cpp.load(MODEL)``,
  both with ``n_threads`` = every core (engines set their thread count to the machine's cores;
  a warm that helps only when the engine leaves a core idle does not help).  Timed from before
  the constructor (``Llama()`` or ``load()``) to the first sampled token: the imports of
  llama_cpp and of engine_adapter (2 ms) are not in it, as a program imports them at its top.
* a server: ``python -m llama_cpp.server --model MODEL`` (and ``llama-server``) against the same
  command under ``warmpool run --``, and under a Python launcher that only execs it (the share
  of ``run``'s cost that is the interpreter's own start on this machine, not warmpool's).  Timed from spawn to the end of the first one-token completion; the
  client asks ``/v1/models`` every 20 ms until the server answers.  Then the same request
  twice more: the first request's time over the faster of those is "x steady".  Every request
  says ``cache_prompt: false``: llama-server then evaluates the whole prompt each time, as the
  first request does (with its prompt cache a repeat evaluates nothing new and "steady" measured
  3.5x faster than any first request could be).  llama_cpp.server ignores the field and reuses
  all but the prompt's last token: its "x steady" (~25x) compares the first computation with
  almost none and says nothing about the page cache.

llama-server (llama.cpp's own) is used where it is on PATH.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: tools/lib/beside.py
PROMPT = "Hello"
SERVER_TIMEOUT_S = 600.0


# -- one in-process trial (child) ---------------------------------------------------------------


def child(variant: str, path: str, threads: int) -> None:
    import llama_cpp

    kwargs = dict(n_ctx=512, seed=1, verbose=False, n_threads=threads, n_threads_batch=threads)
    if variant != "plain":
        from engine_adapter.llama_cpp import load  # imported before the clock, as llama_cpp is for both
    t0 = time.perf_counter()
    warmup = None
    if variant == "plain":
        llm = llama_cpp.Llama(path, **kwargs)
    else:
        llm, warmup = load(path, **kwargs)
    loaded = time.perf_counter()
    llm.create_completion(PROMPT, max_tokens=1, temperature=0.0)
    first = time.perf_counter()
    out = dict(variant=variant, load_s=loaded - t0, start_to_first_token_s=first - t0)
    if warmup is not None:
        result = warmup.wait()
        out.update(warm_reason=result.reason if result else str(warmup.error),
                   warm_workers=result.workers if result else None,
                   warm_bytes_warmed=result.bytes_warmed if result else None)
    llm.close()
    print(json.dumps(out), flush=True)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def inprocess_trial(variant: str, path: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "child", variant, str(path), str(threads)], capture_output=True,
                         text=True, env=_env(), cwd=ROOT, timeout=SERVER_TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"trial {variant} failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- one server trial -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=SERVER_TIMEOUT_S) as response:
        return json.loads(response.read())


def server_argv(engine: str, path: Path, threads: int, port: int) -> list[str]:
    if engine == "llama-server":
        return ["llama-server", "-m", str(path), "-t", str(threads), "--port", str(port), "-c", "512"]
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--n_ctx", "512", "--port", str(port), "--host", "127.0.0.1"]


def server_trial(variant: str, engine: str, path: Path, threads: int) -> dict:
    port = _free_port()
    argv = server_argv(engine, path, threads, port)
    if variant == "run":
        argv = [sys.executable, "-m", "warmpool", "run", "--", *argv]
    elif variant == "python-exec":  # what any Python launcher costs here: start the interpreter, exec the engine
        argv = [sys.executable, "-c", "import os, sys; os.execvp(sys.argv[1], sys.argv[1:])", *argv]
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile()  # not a pipe: llama.cpp's load log would fill it and block the server
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                            env=_env(), cwd=ROOT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{engine} exited {proc.returncode}: {log.read().decode(errors='replace')[-800:]}")
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=1.0):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.02)
        ready = time.perf_counter()
        body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0.0, "cache_prompt": False}
        _post(base + "/v1/completions", body)
        first = time.perf_counter()
        steady = []
        for _ in range(2):
            s = time.perf_counter()
            _post(base + "/v1/completions", body)
            steady.append(time.perf_counter() - s)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    return dict(variant=variant, ready_s=ready - t0, start_to_first_token_s=first - t0,
                first_request_s=first - ready, steady_s=min(steady), x_steady=(first - ready) / min(steady))


# -- paired rounds ----------------------------------------------------------------------------------


def paired(path: Path, trials: dict[str, Callable[[], dict]], rounds: int, evict: Callable[[Path], object],
           log: Callable[[str], None]) -> dict:
    """``rounds`` rounds of every trial, rotated, each after ``evict``; medians and the paired ratio
    of each later trial over the first one ("plain"), with its 95% confidence interval."""
    from lib.measure import median_ci  # here: the child mode of this file runs without tools/ on its path

    names = list(trials)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            evict(path)
            run = trials[name]()
            run["load_1m"] = os.getloadavg()[0]
            runs[name].append(run)
            log(f"  round {r + 1}/{rounds} {name}: {run['start_to_first_token_s']:.3f} s " +
                " ".join(f"{k}={v}" for k, v in run.items() if k.startswith(("warm_", "x_steady"))))
    base = names[0]
    out = {"rounds": rounds, "runs": runs, "median_s": {}, "paired_ratio": {}}
    for n in names:
        out["median_s"][n] = statistics.median(r["start_to_first_token_s"] for r in runs[n])
        if n != base:
            ratios = [a["start_to_first_token_s"] / b["start_to_first_token_s"] for a, b in zip(runs[n], runs[base])]
            out["paired_ratio"][n] = {"median": statistics.median(ratios), "ci95": median_ci(ratios),
                                      "rounds": [round(x, 3) for x in ratios]}
        if "x_steady" in runs[n][0]:
            out.setdefault("x_steady", {})[n] = statistics.median(r["x_steady"] for r in runs[n])
    return out


def beside(path: Path, rounds: int, evict: Callable[[Path], object], log: Callable[[str], None],
           engines: tuple[str, ...] = ("inprocess", "server")) -> dict:
    """Both engines on ``path`` (in-process adapter and a server under ``warmpool run``)."""
    threads = os.cpu_count() or 1
    out = {"threads": threads}
    if "inprocess" in engines:
        log(f"beside: Llama() vs engine_adapter.llama_cpp.load, n_threads={threads}, {path}")
        out["adapter"] = paired(path, {"plain": lambda: inprocess_trial("plain", path, threads),
                                       "adapter": lambda: inprocess_trial("adapter", path, threads)}, rounds, evict, log)
    if "server" in engines:
        for engine in ("llama-server", "llama_cpp.server"):
            if engine == "llama-server" and not _which("llama-server"):
                out["llama-server"] = "unavailable (not on PATH)"
                continue
            log(f"beside: {engine} vs warmpool run -- {engine}, threads={threads}")
            out[engine] = paired(path, {"plain": lambda e=engine: server_trial("plain", e, path, threads),
                                        "run": lambda e=engine: server_trial("run", e, path, threads),
                                        "python-exec": lambda e=engine: server_trial("python-exec", e, path, threads)},
                                 rounds, evict, log)
    return out


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
