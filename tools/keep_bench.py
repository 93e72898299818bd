"""A lazy engine serving a request every N seconds for minutes under real memory pressure:
without warmpool, after a one-shot warm, with ``warmpool keep`` (defaults), with ``keep --hold
touch`` (a byte of every resident page per ``--touch-refresh`` seconds, paced), with ``keep --lock``.

    python tools/keep_bench.py [--seconds 180] [--every 2] [--configs none,oneshot,keep,keep-touch,keep-lock]
                               [--pressure cgroup|none] [--headroom 512M] [--hog-size 2G] [--hog-rate 128] [--pin]

The engine is tools/lib/engine_sim.py's simulated CPU-MoE engine (plain lazy ``mmap``, no
pre-fault) on a private copy of the ~1.76 GB synthetic qwen3moe (``warmpool.example.BENCH``:
16 layers, top-8 of 64 experts), generated once into ``~/.cache/warmpool/keep-bench`` (other
tools evict their own copy; this one must not be disturbed mid-run).  Request ``i`` routes with
seed ``i`` through a skewed router (``--skew``: a few experts are routed often, most rarely, as
in real MoE models), so each request reaches some experts no earlier request touched.

Eviction is real (tools/lib/mem_pressure.py, ``--pressure cgroup``, the default): the bench moves
itself into a child memory cgroup limited to the model's size plus ``--headroom``, so the warm,
the keeper, their workers, the engine and a co-tenant all share that limit, and from the end of
each warm the co-tenant streams through ``--hog-size`` of another file at ``--hog-rate`` MB/s.
The kernel's LRU reclaim then takes the model pages nobody has referenced lately (docs/keep.md).
The limit bounds the pressure: nothing outside the cgroup is squeezed.

Each request is followed at once by the same request in a twin engine: its own lazy mapping of
the file that has served the same requests, so it pays the same page-table set-up but finds the
page cache warm: that is the request's steady time, and load from other jobs moves both alike.
The same request a third time in the engine's own mapping is shown as "hot".  Per configuration,
one after another from an evicted file:

* request time p50/p99 as a multiple of steady (paired per request) and in ms; beside p99, its
  noise floor (the same paired p99 between two warm runs of each request) and p99 of request
  times over p99 of steady times;
* bytes the engine read from disk (its /proc/self/io read_bytes) and bytes the keeper re-read
  (its ``rewarmed`` events); the engine's major faults;
* the keeper's CPU share (its own and its reaped workers' CPU time over the wall time) and peak
  RssAnon of the keeper plus any live worker, sampled before every request;
* the model's resident fraction after every request (lowest and at the end);
* why each slow request (> 1.2x) was slow, as observed during it: major faults, the keeper
  busy (CPU ticks or a re-warm overlapping it), the memory cgroup's limit hit (reclaim),
  preemption (involuntary context switches of the request or its twin, or over 0.5 ms of
  run-queue wait), or none of these; and p99 over the "quiet" requests (none of those) beside,
  never instead of, p99 over all;
* the 1-minute load average before and after.

Prints a table, one JSON line per configuration and a last JSON line with all of them;
``--json-out`` also keeps the per-request rows and the keeper's events.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path[:0] = [str(ROOT), str(TOOLS)]

from lib.engine_sim import MoeEngine  # noqa: E402
from lib.keep_stats import report, summarize  # noqa: E402
from lib.measure import (  # noqa: E402
    add_no_page_reporting,
    file_resident,
    page_reporting_off,
    rss_anon_tree,
    synthetic_model,
)
from lib.mem_pressure import Hog, MemoryCage, make_file  # noqa: E402
from lib.proc_stats import cpu_seconds, read_bytes, sched, steal_ticks, usage  # noqa: E402

from warmpool import _platform  # noqa: E402
from warmpool._platform.proc import page_reporting_order  # noqa: E402
from warmpool.example import BENCH, write_moe_gguf  # noqa: E402

CONFIGS = ("none", "oneshot", "keep", "keep-touch", "keep-lock")
MODEL_NAME = "keep-bench-qwen3moe-v1.gguf"


def bench_model(directory: str | None) -> Path:
    """The BENCH model in the keep bench's own directory (its co-tenant's file goes beside it)."""
    return synthetic_model(BENCH, MODEL_NAME, directory or Path.home() / ".cache" / "warmpool" / "keep-bench")


class Keeper:
    """``warmpool keep MODEL --json`` in a child process, its events collected."""

    def __init__(self, path: Path, lock: bool, interval: float, hold: str | None = None,
                 refresh: float | None = None) -> None:
        argv = [sys.executable, "-m", "warmpool", "keep", str(path), "--json", "--interval", str(interval)]
        argv += ["--hold", hold] if hold else []
        argv += ["--refresh", str(refresh)] if refresh else []
        self.proc = subprocess.Popen(argv + (["--lock"] if lock else []), stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.events: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for("locked" if lock else "warmed")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def wait_for(self, kind: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            self.seen.append(event)
            if event["event"] == kind:
                return event

    def drain(self) -> list[dict]:
        while True:
            try:
                self.seen.append(self.events.get_nowait())
            except queue.Empty:
                return self.seen

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(10)
        time.sleep(0.1)
        self.drain()
        return code


def _serve(path: Path, seconds: float, every: float, tokens: int, skew: float, keeper: Keeper | None):
    """The engine's requests, each timed with its steady and hot twins; returns (rows, keeper RssAnon peak)."""
    rows, rss_peak = [], 0
    with MoeEngine(path, skew=skew) as engine, MoeEngine(path, skew=skew) as twin, _pinned(PIN.get("engine")):
        start = time.monotonic()
        i = 0
        while True:
            due = start + i * every
            if due - start > seconds:
                break
            time.sleep(max(due - time.monotonic(), 0))
            if keeper:
                rss_peak = max(rss_peak, rss_anon_tree(keeper.proc.pid)[0])
            engine.seed = twin.seed = 1000 + i
            kcpu0 = cpu_seconds(keeper.proc.pid) if keeper else 0.0
            u0, (r0, q0), h0, s0, wall0 = usage(), sched(), _limit_hits(), steal_ticks(), time.time()
            t0 = time.perf_counter()
            engine.request(tokens)
            t1 = time.perf_counter()
            u1, (r1, q1), h1, s1, wall1 = usage(), sched(), _limit_hits(), steal_ticks(), time.time()
            kcpu = cpu_seconds(keeper.proc.pid) - kcpu0 if keeper else 0.0
            twin.request(tokens)  # same request, same mapping history, page cache now warm
            t2 = time.perf_counter()
            u2, (r2, q2), h2, s2 = usage(), sched(), _limit_hits(), steal_ticks()
            engine.request(tokens)  # again in the engine's own mapping: every page mapped
            t3 = time.perf_counter()
            # Why a request was slow, observed rather than guessed: its major faults (disk), its
            # involuntary context switches and run-queue wait (another runnable task had the
            # CPU: load), the cgroup's limit hits (reclaim), the keeper's CPU ticks while it
            # ran, and the model's resident fraction after it.
            rows.append({"t": round(due - start, 1), "wall": (wall0, wall1), "first_s": t1 - t0, "steady_s": t2 - t1,
                         "hot_s": t3 - t2, "majflt": u1.ru_majflt - u0.ru_majflt,
                         "nivcsw": u1.ru_nivcsw - u0.ru_nivcsw, "steady_nivcsw": u2.ru_nivcsw - u1.ru_nivcsw,
                         "queued_s": q1 - q0, "steady_queued_s": q2 - q1,
                         "ran_s": r1 - r0, "steady_ran_s": r2 - r1,
                         "minflt": u1.ru_minflt - u0.ru_minflt, "steady_minflt": u2.ru_minflt - u1.ru_minflt,
                         "steal_ticks": s1 - s0, "steady_steal_ticks": s2 - s1,
                         "limit_hits": h1 - h0, "steady_limit_hits": h2 - h1,
                         "keeper_cpu_s": kcpu, "resident": file_resident(path)})
            i += 1
    return rows, rss_peak


PIN: dict[str, set[int]] = {}  # --pin: {"engine": CPUs, "co-tenant": CPUs}; empty: nothing pinned
CAGE: list[MemoryCage] = []  # the memory cgroup everything runs in (--pressure cgroup)


def _limit_hits() -> int:
    return CAGE[0].limit_hits() if CAGE else 0


class _pinned:
    """Run the calling thread (the engine and its twin) on ``cpus`` for the ``with`` block; the
    keeper and the co-tenant were started before it and keep their own masks."""

    def __init__(self, cpus: set[int] | None) -> None:
        self.cpus, self.saved = cpus, None

    def __enter__(self) -> None:
        if self.cpus:
            self.saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, self.cpus)

    def __exit__(self, *exc) -> None:
        if self.saved:
            os.sched_setaffinity(0, self.saved)


def run_config(name: str, path: Path, seconds: float, every: float, tokens: int, interval: float, skew: float,
               hog_file: Path | None = None, hog_rate: float = 0, touch_refresh: float = 1) -> dict:
    _platform.evict_file(path)
    if hog_file:
        _platform.evict_file(hog_file)
    load_before = os.getloadavg()[0]
    cold = file_resident(path)
    keeper = None
    prep_start = time.monotonic()
    if name == "oneshot":
        subprocess.run([sys.executable, "-m", "warmpool", "warm", str(path), "--quiet", "--no-progress"], check=True, cwd=ROOT)
    elif name.startswith("keep"):
        touch = name == "keep-touch"
        keeper = Keeper(path, lock=name == "keep-lock", interval=interval, hold="touch" if touch else None,
                        refresh=touch_refresh if touch else None)
    prep = time.monotonic() - prep_start
    hog = Hog(hog_file, hog_rate) if hog_file else None
    if hog and PIN:
        os.sched_setaffinity(hog.proc.pid, PIN["co-tenant"])
    start_wall = time.monotonic()
    cpu0 = cpu_seconds(keeper.proc.pid) if keeper else 0.0
    engine_read0 = read_bytes()
    try:
        rows, rss_peak = _serve(path, seconds, every, tokens, skew, keeper)
        # before the co-tenant is reaped: a reaped child's I/O is added to its parent's /proc/PID/io
        engine_read = read_bytes() - engine_read0
        wall = time.monotonic() - start_wall
    finally:
        if hog:
            hog.stop()
    result = {"config": name, "requests": len(rows), "seconds": round(wall, 1), "every_s": every, "tokens": tokens, "skew": skew,
              "pinned": bool(PIN),
              "cold_fraction_at_start": round(cold, 4), "prep_s": round(prep, 2)}
    if keeper:
        cpu = cpu_seconds(keeper.proc.pid) - cpu0
        rss_peak = max(rss_peak, rss_anon_tree(keeper.proc.pid)[0])
        locked = next((e for e in keeper.drain() if e["event"] == "locked"), None)
        result.update(keeper_cpu_share=round(cpu / wall, 5), keeper_cpu_s=round(cpu, 3),
                      keeper_rss_anon_peak_mb=round(rss_peak / 2**20, 1),
                      bytes_locked=locked["bytes_locked"] if locked else None)
    result["resident_fraction_end"] = round(file_resident(path), 4)
    if keeper:
        result["keeper_exit"] = keeper.stop()
        events = keeper.seen
        result["keeper_bytes_rewarmed"] = sum(e.get("bytes_rewarmed", 0) for e in events if e["event"] == "rewarmed")
        result["keeper_rewarms"] = sum(1 for e in events if e["event"] == "rewarmed")
        result["keeper_backoffs"] = sum(1 for e in events if e["event"] == "backoff")
        result["per_request_keeper_events"] = [e for e in events if e["event"] in ("rewarmed", "backoff", "error")]
        result["keeper_backoff_reasons"] = sorted({e["reason"].split(":")[0] for e in events if e["event"] == "backoff"})
        rewarms = [(e["time"] - e.get("seconds", 0), e["time"]) for e in events if e["event"] == "rewarmed"]
        for r in rows:  # a re-warm overlapping the request (event time is its end, seconds its length)
            r["rewarm_overlap"] = any(a <= r["wall"][1] and b >= r["wall"][0] for a, b in rewarms)
    result.update(summarize(rows), engine_bytes_read=engine_read, load_before=load_before, load_after=os.getloadavg()[0])
    return result


def _warm_up_python() -> None:
    """One request on a tiny model first: numpy's first calls in a process cost tens of ms,
    which would otherwise land on the first configuration's first request."""
    import tempfile

    from warmpool.example import TINY

    with tempfile.TemporaryDirectory() as d:
        write_moe_gguf(Path(d) / "tiny.gguf", TINY)
        with MoeEngine(Path(d) / "tiny.gguf") as engine:
            engine.request(2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180, help="length of each configuration's run (default 180)")
    ap.add_argument("--every", type=float, default=2, help="seconds between requests (default 2: ~90 requests in 3 "
                    "minutes, so p99 is not just the slowest one)")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per request (default 1)")
    ap.add_argument("--interval", type=float, default=10, help="the keeper's --interval (default 10)")
    ap.add_argument("--skew", type=float, default=1.0, help="router skew (engine_sim): 0 uniform; 1 (default) leaves "
                    "~30%% of experts untouched after 37 requests and reaches new ones throughout")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--touch-refresh", type=float, default=1, help="keep-touch's --refresh: the period over which "
                    "it spreads each pass that reads a byte of every resident page (default 1)")
    ap.add_argument("--pressure", choices=("cgroup", "none"), default="cgroup",
                    help="cgroup (default): run everything in a child memory cgroup limited to the model plus "
                         "--headroom, with a co-tenant streaming through --hog-size of another file; none: no pressure")
    ap.add_argument("--headroom", default="512M", help="cgroup limit over the model's size (default 512M)")
    ap.add_argument("--hog-size", default="2G", help="the co-tenant's file (default 2G)")
    ap.add_argument("--hog-rate", type=float, default=128, help="the co-tenant's read rate, MB/s (default 128)")
    ap.add_argument("--pin", action="store_true", help="run the engine (and its twin) on the last CPU and the "
                    "co-tenant on the others, as an engine pinned to its own cores would run; the keeper and its "
                    "workers stay unpinned (they may run on the engine's CPU)")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    add_no_page_reporting(ap)
    args = ap.parse_args(argv)
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            print("keep_bench: --pin needs at least 2 CPUs", file=sys.stderr)
            return 2
        PIN.update({"engine": {cpus[-1]}, "co-tenant": set(cpus[:-1])})
    path = bench_model(args.model_dir)
    configs = args.configs.split(",")
    if "keep-lock" in configs and os.geteuid() != 0 and shutil.which("true"):
        print("note: keep-lock without root locks only RLIMIT_MEMLOCK's worth", file=sys.stderr)
    print(f"model {path} ({path.stat().st_size / 1e9:.2f} GB); a request ({args.tokens} token(s), router skew {args.skew:g}) every {args.every:g} s "
          f"for {args.seconds:g} s per configuration; keeper --interval {args.interval:g}; cpus {os.cpu_count()}"
          + (f"; engine on CPU {sorted(PIN['engine'])}, co-tenant on {sorted(PIN['co-tenant'])}" if PIN else ""), flush=True)
    _warm_up_python()
    cage = hog_file = None
    if args.pressure == "cgroup":
        from warmpool._units import parse_size

        hog_file = make_file(path.parent / "co-tenant.bin", parse_size(args.hog_size))
        try:
            cage = MemoryCage(path.stat().st_size + parse_size(args.headroom))
            CAGE.append(cage)
        except OSError as e:
            print(f"keep_bench: cannot make a memory cgroup ({e}); use --pressure none", file=sys.stderr)
            return 1
        print(f"memory cgroup {cage.path} limit {cage.limit / 2**20:.0f} MiB (model + {args.headroom}); co-tenant "
              f"streams {hog_file.stat().st_size / 2**30:.1f} GiB at {args.hog_rate:g} MB/s from the end of each warm", flush=True)
    try:
        with page_reporting_off(args.no_page_reporting):
            print(f"free page reporting order {page_reporting_order()} (None: no reporting; 11: off)", flush=True)
            results = _run_all(args, path, configs, hog_file)
    finally:
        if cage:
            cage.close()
    return report(results)


def _run_all(args, path: Path, configs: list[str], hog_file: Path | None) -> list[dict]:
    results = []
    for name in configs:
        r = run_config(name, path, args.seconds, args.every, args.tokens, args.interval, args.skew,
                       hog_file=hog_file, hog_rate=args.hog_rate, touch_refresh=args.touch_refresh)
        results.append(r)
        brief = {k: v for k, v in r.items() if not k.startswith("per_request")}
        print(json.dumps(brief), flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(main())
