"""Issue 23's benchmark: a model that does not fit in memory, a skewed-router engine, and what
keeps (or fails to keep) its hot experts resident.

    python tools/overram_bench.py [--runs a,b,c,d,e,b',e'] [--limit 3.5G] [--warmup 20] [--seconds 40]
                                  [--keeper-args "--profile F"] [--low-readahead 128] [--model PATH]
                                  [--engine standin|llama] [-v]

The model is a ~6.95 GB synthetic qwen3moe (``warmpool.example``: 32 layers x 128 experts,
top-8, Q8_0), generated once into ``~/.cache/warmpool/bench/``.  The engine is
``tests/helpers/moe_engine.py``: per token it touches one byte per 4 KiB page of every layer's
dense tensors and of 8 of its 128 experts, drawn from a fixed, seeded Zipf(1.0) popularity
(~0.53 GB per token: 0.43 GB of experts, 0.10 GB dense) through a plain read-only mapping.

``--engine llama`` runs llama.cpp itself (llama-cpp-python, ``tools/lib/llama_decode.py``:
one token per ``eval``, 2 threads) instead of the stand-in: its router is the model's (random
weights), so there is no oracle and no "bytes needed per token".

Runs (each after evicting the model, in a fresh child of this process's v1 memory cgroup with
``memory.limit_in_bytes`` = --limit; everything of a run, the engine included, is started in it):

    a   resident: no limit, the model read whole first
    b   the engine alone
    c   beside ``warmpool keep MODEL --budget 2500M`` (+ --keeper-args)
    d   beside ``warmpool keep MODEL --budget 2500M --lock`` (+ --keeper-args)
    e   beside an oracle that mlocks the truly hottest experts (the router's own popularity) up to 2.33 GiB
    X'  run X with the device's read_ahead_kb set to --low-readahead (default 128)

The holder (keeper or oracle) is started first and the engine once it reports ready ("warmed",
"locked"); then the engine decodes --warmup seconds and is measured for --seconds more.  Per
run: p50/p99 seconds per token, tokens measured, disk bytes the engine read per token (its own
/proc/PID/io read_bytes over the measured window: its faults and the read-ahead they caused),
the holder's own disk reads over the same window, OOM kills (the cgroup's
``memory.oom_control`` oom_kill count and exit statuses -9), the cgroup's limit hits
(``memory.failcnt``) and peak, the keeper's peak RssAnon and CPU share, and the model's resident
fraction at the start and the end, the holder's events and re-rankings by the end, and, where
--keeper-args name a --profile, the learned ranking scored against the router (``ranking_mass``:
the share of its picks landing on the profile's first experts that fit in --oracle-bytes; the
oracle's in ``oracle_mass``).  A table with each run's p50 over the engine alone's (run b)
and over the oracle's at the same read-ahead, then one JSON line with everything.

The device's read_ahead_kb is machine-wide: it is restored on every way out (SIGTERM, SIGINT,
SIGHUP included; not SIGKILL).  The child cgroups are emptied and removed, the processes in them
killed.  The whole run holds ``flock /tmp/warmpool-bench.lock``, so no other benchmark or test
suite that takes it runs beside it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path[:0] = [str(ROOT), str(TOOLS)]

import numpy as np
from lib.measure import rss_anon_tree, synthetic_model
from lib.mem_pressure import own_cgroup
from lib.proc_stats import cpu_seconds, read_bytes

from warmpool import _platform, read_layout, residency
from warmpool._units import parse_size
from warmpool.example import BENCH

SHAPE = BENCH._replace(n_layers=32, n_experts=128)  # 1024 wide, top-8: 6.95 GB
MODEL_NAME = "overram-qwen3moe-32L-128E-v1.gguf"  # bump the version when SHAPE changes
LOCK_FILE = "/tmp/warmpool-bench.lock"
DEFAULT_RUNS = "a,b,c,d,e,b',e'"


class BenchError(Exception):
    """A problem with the setting or the input, shown as one line (a traceback with -v)."""


class _Stop(BaseException):
    """A signal asked us to stop: unwinds through every ``finally`` so the machine is restored."""


def _on_signal(signum, _frame):
    # Further signals are ignored, so they cannot cut the clean-up that this one starts short.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


# ---------------------------------------------------------------------------------------------
# The runs


class Run(NamedTuple):
    key: str  # "b", "e'", ...
    title: str
    holder: str | None  # None, "keep", "keep-lock", "oracle"
    limited: bool  # False: no memory limit (the resident reference)
    preread: bool  # read the whole model before the engine starts
    low_readahead: bool


_BASE = {
    "a": ("resident (no limit, pre-read)", None, False, True),
    "b": ("engine alone", None, True, False),
    "c": ("keep --budget {budget}{extra}", "keep", True, False),
    "d": ("keep --budget {budget} --lock{extra}", "keep-lock", True, False),
    "e": ("oracle: mlock hottest {oracle}", "oracle", True, False),
}


def parse_runs(text: str, budget: str, extra: str, oracle: str) -> list[Run]:
    runs = []
    for key in filter(None, (k.strip() for k in text.split(","))):
        base = key.rstrip("'")
        if base not in _BASE or len(key) - len(base) > 1:
            raise BenchError(f"unknown run {key!r}: choose from {', '.join(_BASE)}, each optionally with ' (low read-ahead)")
        title, holder, limited, preread = _BASE[base]
        title = title.format(budget=budget, extra=f" {extra}" if extra else "", oracle=oracle)
        runs.append(Run(key, title, holder, limited, preread, key.endswith("'")))
    if not runs:
        raise BenchError("--runs names no run")
    return runs


# ---------------------------------------------------------------------------------------------
# The machine: memory cgroups (v1), the device's read-ahead, the model's page cache


def own_memory_cgroup() -> Path:
    """This process's v1 memory cgroup directory (where the child cgroups go)."""
    found = own_cgroup()
    if found is None or found[1] != "memory.limit_in_bytes":
        raise BenchError("no cgroup v1 memory controller for this process (/proc/self/cgroup has no "
                         "memory line under /sys/fs/cgroup/memory); this bench needs one")
    return found[0]


class Cgroup:
    """A child memory cgroup, optionally limited; processes join it through ``argv()``."""

    def __init__(self, parent: Path, name: str, limit: int | None) -> None:
        self.path = parent / name
        try:
            self.path.mkdir()
            if limit is not None:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            raise BenchError(f"cannot make the memory cgroup {self.path}: {e.strerror}") from e
        self.limit = limit

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` started inside this cgroup from its first instruction: the shell writes its
        own pid into cgroup.procs, then execs (same pid), so all it allocates or reads is charged
        here."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def oom_kills(self) -> int:
        fields = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return int(fields.get("oom_kill", 0))  # the counter exists from Linux 4.13

    def stats(self) -> dict:
        return {"oom_kills": self.oom_kills(), "limit_hits": int(self._read("memory.failcnt")),
                "peak_bytes": int(self._read("memory.max_usage_in_bytes"))}

    def pids(self) -> list[int]:
        return [int(p) for p in self._read("cgroup.procs").split()]

    def destroy(self) -> None:
        """Kill what is left inside (only processes this bench started, and theirs), reclaim the
        cgroup's page cache and remove it."""
        for _ in range(100):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        try:
            (self.path / "memory.force_empty").write_text("0")
        except OSError:
            pass  # best effort: rmdir moves any remaining charge to the parent
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"warning: could not remove {self.path}", file=sys.stderr)


def read_ahead_file(path: Path) -> Path:
    """The ``queue/read_ahead_kb`` of the disk holding ``path`` (the walk warmpool's keeper uses)."""
    found = _platform.read_ahead(path.stat().st_dev)
    if found is None:
        raise BenchError(f"{path}: no queue/read_ahead_kb for its device (not on a block device?)")
    return Path(found.path)


class ReadAhead:
    """The device's read_ahead_kb, changed for a run and always restored (``restore``).

    Before the first change the original value is noted in NOTE_FILE, and the note removed once
    it is restored: a bench killed with SIGKILL (no handler runs) leaves the note, and the next
    run, under the bench lock, puts the value back before reading it as the original."""

    NOTE_FILE = Path("/tmp/warmpool-overram-readahead.json")

    def __init__(self, file: Path) -> None:
        self.file = file
        self.recovered = self._recover()
        self.original = int(self.file.read_text())
        self.current = self.original

    def _recover(self) -> int | None:
        try:
            note = json.loads(self.NOTE_FILE.read_text())
        except (OSError, ValueError):
            return None
        Path(note["file"]).write_text(str(note["original"]))
        self.NOTE_FILE.unlink()
        return note["original"]

    def set(self, kb: int) -> None:
        if kb == self.current:
            return
        if kb != self.original and not self.NOTE_FILE.exists():
            self.NOTE_FILE.write_text(json.dumps({"file": str(self.file), "original": self.original}))
        try:
            self.file.write_text(str(kb))
        except OSError as e:
            raise BenchError(f"cannot set {self.file} to {kb}: {e.strerror}") from e
        self.current = kb
        if kb == self.original:
            self.NOTE_FILE.unlink(missing_ok=True)

    def restore(self) -> None:
        self.set(self.original)


def evict(path: Path) -> float:
    """Drop the model's clean pages; returns the resident fraction left (mapped or locked pages
    stay, so anything above 0 means something still holds the file)."""
    _platform.evict_file(path)
    return resident(path)


def resident(path: Path) -> float:
    return residency(path).resident_fraction or 0.0


def bench_model(path: Path | None) -> Path:
    """The given model, or the default one, generated once (under a lock) into the cache."""
    if path is not None:
        if not path.is_file():
            raise BenchError(f"no such model file: {path}")
        return path
    return synthetic_model(SHAPE, MODEL_NAME, Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "warmpool" / "bench")


# ---------------------------------------------------------------------------------------------
# The processes of a run


class Child:
    """A process started in a cgroup whose stdout is JSON lines, read by a thread."""

    def __init__(self, name: str, argv: list[str], cgroup: Cgroup, log: Path) -> None:
        self.name = name
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(cgroup.argv(argv), stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                pass  # not ours: a library's print
        self.lines.put(None)  # end of output

    def wait_for(self, kinds: set[str], timeout: float) -> dict | None:
        """The first event of one of ``kinds``; None if the process ended or the time ran out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.lines.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                continue
            if event is None:
                return None
            self.events.append(event)
            if event.get("event") in kinds:
                return event
        return None

    def drain(self) -> list[dict]:
        """Every event printed so far and not yet taken, added to ``events`` (does not wait)."""
        while True:
            try:
                event = self.lines.get_nowait()
            except queue.Empty:
                return self.events
            if event is None:
                self.lines.put(None)  # keep the end mark for last_line
                return self.events
            self.events.append(event)

    def last_line(self) -> dict | None:
        """After exit: the last JSON line it printed (the engine's result)."""
        last = None
        while (event := self.lines.get()) is not None:
            last = event
        return last

    def stderr_tail(self, n: int = 3) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then SIGKILL; returns the exit status (negative: the signal that ended it)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _holder_argv(run: Run, model: Path, args) -> tuple[list[str], set[str]]:
    """The holder's command line and the events that say it is ready."""
    if run.holder == "oracle":
        argv = [sys.executable, "-m", "tests.helpers.moe_engine", "hold", str(model), "--bytes", str(args.oracle_bytes),
                "--zipf", str(args.zipf), "--seed", str(args.seed)]
        return argv, {"locked"}
    argv = [sys.executable, "-m", "warmpool", "keep", str(model), "--budget", args.keeper_budget, "--json", "--no-progress"]
    argv += ["--lock"] if run.holder == "keep-lock" else []
    argv += shlex.split(args.keeper_args)
    return argv, {"locked"} if run.holder == "keep-lock" else {"warmed"}


def _engine_argv(model: Path, args) -> list[str]:
    if args.engine == "llama":
        return [sys.executable, str(TOOLS / "lib" / "llama_decode.py"), str(model), "--seconds", str(args.seconds),
                "--warmup", str(args.warmup)]
    return [sys.executable, "-m", "tests.helpers.moe_engine", "run", str(model), "--seconds", str(args.seconds),
            "--warmup", str(args.warmup), "--zipf", str(args.zipf), "--seed", str(args.seed)]


def _watch_engine(engine: Child, holder: Child | None, warmup: float) -> dict:
    """Wait for the engine, sampling the holder once a second: its peak RssAnon, and its CPU
    time and disk reads from the end of the engine's warm-up (the measured window, to within a
    token) to the engine's exit."""
    start = time.monotonic()
    rss_peak, at_window = 0, None
    while engine.proc.poll() is None:
        if holder and holder.proc.poll() is None:
            rss_peak = max(rss_peak, rss_anon_tree(holder.proc.pid)[0])
            if at_window is None and time.monotonic() - start >= warmup:
                at_window = (time.monotonic(), cpu_seconds(holder.proc.pid), read_bytes(holder.proc.pid))
        time.sleep(1)
    out = {"holder_rss_anon_peak_bytes": rss_peak}
    if holder and at_window and holder.proc.poll() is None:
        t0, cpu0, read0 = at_window
        wall = time.monotonic() - t0
        out["holder_cpu_pct"] = round(100 * (cpu_seconds(holder.proc.pid) - cpu0) / wall, 2)
        out["holder_read_bytes"] = read_bytes(holder.proc.pid) - read0
    return out


def measure(run: Run, model: Path, args, parent: Path, ra: ReadAhead, workdir: Path) -> dict:
    """One run, from an evicted model in a fresh cgroup; everything it started is gone after."""
    ra.set(args.low_readahead if run.low_readahead else ra.original)
    row: dict = {"run": run.key, "title": run.title, "read_ahead_kb": ra.current,
                 "limit_bytes": args.limit if run.limited else None}
    row["resident_after_evict"] = round(evict(model), 4)
    cgroup = Cgroup(parent, f"overram-{os.getpid()}-{run.key.replace(chr(39), '-low')}", args.limit if run.limited else None)
    children: list[Child] = []
    try:
        if run.preread:
            subprocess.run(cgroup.argv(["cat", str(model)]), stdout=subprocess.DEVNULL, check=True)
        holder = None
        if run.holder:
            argv, ready = _holder_argv(run, model, args)
            holder = Child(run.holder, argv, cgroup, workdir / f"{run.key}-holder.log")
            children.append(holder)
            t0 = time.monotonic()
            event = holder.wait_for(ready, args.ready_timeout)
            row["holder_ready_s"] = round(time.monotonic() - t0, 1)
            row["holder_ready_event"] = {k: v for k, v in (event or {}).items() if k not in ("time", "layers")}
            row["holder_events"] = [e.get("event") for e in holder.events]  # what it got through (updated at the end)
            if event is None:
                code = holder.proc.poll()
                why = f"not ready after {args.ready_timeout:g} s" if code is None else f"exit {code}"
                row["holder_not_ready"] = "; ".join(filter(None, [why, holder.stderr_tail()]))
        row["resident_at_start"] = round(resident(model), 4)  # as the engine starts
        engine = Child("engine", _engine_argv(model, args), cgroup, workdir / f"{run.key}-engine.log")
        children.append(engine)
        row.update(_watch_engine(engine, holder, args.warmup))
        row["engine_exit"] = engine.proc.wait()
        result = engine.last_line()
        row["resident_at_end"] = round(resident(model), 4)
        row.update(cgroup.stats())
        if holder:
            row["holder_exit_before_stop"] = holder.proc.poll()  # None: still running at the end
            # Everything the holder said by the end, and when its re-rankings came (seconds
            # after it was ready, and what each swapped).
            row["holder_events"] = [e.get("event") for e in holder.drain()]
            ready_at = (event or {}).get("time")
            row["holder_reranks"] = [
                {"after_ready_s": round(e["time"] - ready_at, 1) if ready_at and "time" in e else None,
                 "added": e.get("experts_added"), "dropped": e.get("experts_dropped"), "held": e.get("experts_held"),
                 "refault_share": e.get("refault_share")}
                for e in holder.events if e.get("event") == "reranked"]
            row["holder_aside"] = [{"after_ready_s": round(e["time"] - ready_at, 1) if ready_at and "time" in e else None,
                                    "refault_share": e.get("refault_share")}
                                   for e in holder.events if e.get("event") == "aside"]
        row["killed"] = [c.name for c in children if c.proc.poll() == -signal.SIGKILL]
        if result is not None:
            row.update(_token_stats(result))
        else:
            row["engine_error"] = engine.stderr_tail() or f"exit {row['engine_exit']}"
    finally:
        for child in children:
            child.stop()
        cgroup.destroy()
    profile = _profile_arg(args.keeper_args)
    if run.holder in ("keep", "keep-lock") and profile and args.engine == "standin" and os.path.isfile(profile):
        row.update(_ranking_mass(profile, model, args))  # written by the keeper at its exit
    return row


def _profile_arg(keeper_args: str) -> str | None:
    words = shlex.split(keeper_args)
    for i, word in enumerate(words):
        if word == "--profile" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--profile="):
            return word.split("=", 1)[1]
    return None


def _ranking_mass(profile: str, model: Path, args) -> dict:
    """The keeper's learned ranking scored against the stand-in's router: the share of expert
    picks landing on its first experts that fit in the oracle's bytes, and the oracle's share."""
    argv = [sys.executable, "-m", "tests.helpers.moe_engine", "mass", profile, str(model), "--bytes",
            str(args.oracle_bytes), "--zipf", str(args.zipf), "--seed", str(args.seed)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"ranking_mass_error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    out = json.loads(done.stdout)
    return {"ranking_mass": out["mass"], "oracle_mass": out["oracle_mass"]}


def _token_stats(result: dict) -> dict:
    t = np.array(result["token_s"])
    n = len(t)
    return {"p50_s": round(float(np.percentile(t, 50)), 4) if n else None,
            "p99_s": round(float(np.percentile(t, 99)), 4) if n else None,
            "tokens": n, "warmup_tokens": result["warmup_tokens"], "window_s": round(result["window_s"], 1),
            "engine_read_bytes": result["read_bytes"],
            "read_bytes_per_token": round(result["read_bytes"] / n) if n else None,
            "bytes_per_token_needed": result["bytes_per_token_needed"]}


# ---------------------------------------------------------------------------------------------
# The report


def add_ratios(rows: list[dict]) -> None:
    """p50 over the engine alone's (run b, the device's own read-ahead) and over the oracle's
    at the same read-ahead (e, or e' for the low read-ahead runs)."""
    p50 = {r["run"]: r.get("p50_s") for r in rows}
    for r in rows:
        mine = r.get("p50_s")
        oracle = p50.get("e'" if r["run"].endswith("'") else "e")
        r["x_alone"] = round(mine / p50["b"], 3) if mine and p50.get("b") else None
        r["x_oracle"] = round(mine / oracle, 3) if mine and oracle else None


def _cell(value, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def print_table(rows: list[dict]) -> None:
    head = (f"{'run':<4} {'what':<44} {'RA KB':>6} {'p50 s/tok':>10} {'p99 s/tok':>10} {'tokens':>7} "
            f"{'GB rd/tok':>9} {'x alone':>8} {'x oracle':>8} {'OOM':<16} {'hits':>8} {'peak GB':>7} "
            f"{'hold RssAnon MB':>15} {'hold CPU%':>9} {'hold GB rd/tok':>14} {'ready s':>7} {'res start/end':>13}")
    print(head)
    for r in rows:
        n = r.get("tokens") or 0
        oom = ",".join(r.get("killed") or []) or ("yes" if r.get("oom_kills") else "no")
        if r.get("oom_kills"):
            oom += f" ({r['oom_kills']} kill{'s' * (r['oom_kills'] > 1)})"
        holder_read = r.get("holder_read_bytes")
        print(f"{r['run']:<4} {r['title'][:44]:<44} {r['read_ahead_kb']:>6} {_cell(r.get('p50_s'), '.4f'):>10} "
              f"{_cell(r.get('p99_s'), '.4f'):>10} {n:>7} "
              f"{_cell(r.get('read_bytes_per_token') and r['read_bytes_per_token'] / 1e9, '.3f'):>9} "
              f"{_cell(r.get('x_alone'), '.3f'):>8} {_cell(r.get('x_oracle'), '.3f'):>8} {oom:<16} "
              f"{r.get('limit_hits', 0):>8} {r.get('peak_bytes', 0) / 1e9:>7.2f} "
              f"{_cell(r.get('holder_rss_anon_peak_bytes') and r['holder_rss_anon_peak_bytes'] / 2**20, '.1f'):>15} "
              f"{_cell(r.get('holder_cpu_pct'), '.2f'):>9} "
              f"{_cell(holder_read / 1e9 / n if holder_read is not None and n else None, '.3f'):>14} "
              f"{_cell(r.get('holder_ready_s'), '.1f'):>7} "
              f"{r.get('resident_at_start', 0):>6.1%}/{_cell(r.get('resident_at_end'), '.1%')}")
        for problem in ("holder_not_ready", "engine_error"):
            if r.get(problem):
                print(f"     {problem.replace('_', ' ')}: {r[problem]}")
    print("p50/p99: seconds per measured token; GB rd/tok: disk bytes the ENGINE process read per token (its own "
          "/proc/PID/io read_bytes over the measured window: its page faults and the read-ahead they triggered; the "
          "holder's reads are in 'hold GB rd/tok', same window); x alone: p50 over run b's (engine alone, the device's "
          "own read-ahead); x oracle: p50 over the oracle's at the same read-ahead (e or e'); OOM: processes that died "
          "of SIGKILL and the cgroup's memory.oom_control oom_kill count; hits: memory.failcnt (charges that hit the "
          "limit and reclaimed); peak: memory.max_usage_in_bytes; hold: the keeper's or oracle's peak RssAnon (with "
          "its live workers) and CPU share (its own and reaped workers' time) over the measured window; ready s: "
          "from its start to its 'warmed'/'locked' event; res: the model's resident fraction when the engine "
          "started / when it ended")


def header(model: Path, args, ra: ReadAhead, parent: Path) -> dict:
    layout = read_layout(model)
    import warmpool

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {"model": str(model), "model_bytes": model.stat().st_size, "n_layers": layout.n_layers,
            "n_experts": int(layout.metadata[f"{layout.architecture}.expert_count"]),
            "top_k": int(layout.metadata[f"{layout.architecture}.expert_used_count"]),
            "zipf_s": args.zipf, "seed": args.seed, "limit_bytes": args.limit, "warmup_s": args.warmup,
            "seconds": args.seconds, "keeper_budget": args.keeper_budget, "keeper_args": args.keeper_args,
            "oracle_bytes": args.oracle_bytes, "read_ahead_file": str(ra.file), "read_ahead_kb_device": ra.original,
            "low_read_ahead_kb": args.low_readahead, "cgroup_parent": str(parent), "kernel": platform.release(),
            "cpus": os.cpu_count(), "warmpool": str(Path(warmpool.__file__).parent), "commit": commit,
            "engine": args.engine, "read_bytes_source": "engine process /proc/PID/io read_bytes over the measured window"}


# ---------------------------------------------------------------------------------------------


def _bench_lock():
    """The machine-wide benchmark lock, an open file: held until it is closed."""
    lock = open(LOCK_FILE, "a")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for {LOCK_FILE} (another benchmark or test suite holds it) ...", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def prepare(args) -> tuple[list[Run], Path, Path, Path]:
    """Everything that can be wrong with the input or the machine, found before waiting for the
    lock: the runs, root, the cgroup controller, the model (generated if it is the default one)
    and its device's read_ahead_kb file."""
    runs = parse_runs(args.runs, args.keeper_budget, args.keeper_args, f"{args.oracle_bytes / 2**30:.2f} GiB")
    if args.engine == "llama" and any(r.holder == "oracle" for r in runs):
        raise BenchError("--engine llama: the oracle knows the stand-in's router, not llama.cpp's; leave runs e and e' out")
    if os.geteuid() != 0:
        raise BenchError("needs root: it makes memory cgroups, sets read_ahead_kb and mlocks beyond RLIMIT_MEMLOCK")
    parent = own_memory_cgroup()
    model = bench_model(Path(args.model) if args.model else None)
    return runs, parent, model, read_ahead_file(model)


def run_all(args, runs: list[Run], parent: Path, model: Path, ra_file: Path) -> int:
    ra = ReadAhead(ra_file)  # under the lock: a killed earlier run's value is put back first
    if ra.recovered is not None:
        print(f"note: restored {ra_file} to {ra.recovered} KB, left changed by a killed earlier run", flush=True)
    setting = header(model, args, ra, parent)
    print(f"model {model} ({setting['model_bytes'] / 1e9:.2f} GB: {setting['n_layers']} layers x {setting['n_experts']} "
          f"experts, top {setting['top_k']}, Zipf({args.zipf:g}), seed {args.seed}); limit {args.limit / 2**30:.2f} GiB; "
          f"{args.warmup:g} s warm-up + {args.seconds:g} s measured per run; {ra.file} = {ra.original} KB "
          f"(low: {args.low_readahead}); warmpool from {setting['warmpool']} ({setting['commit']}); "
          f"kernel {setting['kernel']}, {setting['cpus']} CPUs", flush=True)
    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="overram-bench-") as tmp:
        try:
            for run in runs:
                t0 = time.monotonic()
                print(f"run {run.key}: {run.title} (read_ahead_kb "
                      f"{args.low_readahead if run.low_readahead else ra.original}) ...", flush=True)
                rows.append(measure(run, model, args, parent, ra, Path(tmp)))
                r = rows[-1]
                print(f"  p50 {_cell(r.get('p50_s'), '.4f')} s/token, {r.get('tokens', 0)} tokens, "
                      f"killed {r['killed'] or 'none'}, {time.monotonic() - t0:.0f} s", flush=True)
        finally:
            ra.restore()
            evict(model)
    add_ratios(rows)
    print()
    print_table(rows)
    print(json.dumps({"overram_bench": {"setting": setting, "total_s": round(time.monotonic() - started), "runs": rows}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"which runs, in order (default {DEFAULT_RUNS}; "
                    "X' = run X at --low-readahead)")
    ap.add_argument("--model", help=f"model file (default: ~/.cache/warmpool/bench/{MODEL_NAME}, generated once)")
    ap.add_argument("--limit", type=parse_size, default=parse_size("3.5G"), help="memory cgroup limit (default 3.5G = 3.5 GiB)")
    ap.add_argument("--warmup", type=float, default=20, help="engine seconds before the measured window (default 20)")
    ap.add_argument("--seconds", type=float, default=40, help="measured window (default 40)")
    ap.add_argument("--keeper-budget", default="2500M", help="the keeper's --budget (default 2500M)")
    ap.add_argument("--keeper-args", default="", help='more arguments for warmpool keep in runs c and d, e.g. '
                    '"--profile F" or "--readahead 128K"')
    ap.add_argument("--oracle-bytes", type=parse_size, default=parse_size("2.33G"),
                    help="what the oracle mlocks (default 2.33G = 2.33 GiB)")
    ap.add_argument("--low-readahead", type=int, default=128, help="read_ahead_kb for the X' runs (default 128)")
    ap.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for the holder to be ready (default 600)")
    ap.add_argument("--engine", choices=("standin", "llama"), default="standin",
                    help="standin (default): tests/helpers/moe_engine.py; llama: llama.cpp through llama-cpp-python "
                         "(tools/lib/llama_decode.py), its own router, so no oracle runs")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of expert popularity (default 1.0)")
    ap.add_argument("--seed", type=int, default=0, help="router seed (default 0)")
    ap.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    args = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        prepared = prepare(args)
        with _bench_lock():
            return run_all(args, *prepared)
    except (BenchError, _Stop) as e:
        if args.verbose:
            raise
        print(f"overram_bench: {'stopped by ' if isinstance(e, _Stop) else ''}{e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
