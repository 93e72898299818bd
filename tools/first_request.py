"""The seed issue's scenario, measured: the first request after start-up, cold vs warmed.

    python tools/first_request.py [--quick] [--rounds N] [--rounds-a N] [--tokens N] [--no-llama] [--cache-dir DIR]
                                  [--wait-after-evict SECONDS]

Model: a synthetic qwen3moe GGUF of ~1.76 GB (``warmpool.example.BENCH``: 16 layers x 64
experts, experts ~97% of the bytes), generated once into ``$WARMPOOL_CACHE/bench`` (else
``~/.cache/warmpool/bench``) and reused.  Every measurement starts from an evicted file
(posix_fadvise DONTNEED after fdatasync; /proc/sys/vm/drop_caches is not needed), right after
the eviction or ``--wait-after-evict`` seconds later (a VM with free page reporting has handed
the evicted memory back to its host by then: README, "Device speed").

Part A: a simulated CPU-MoE engine (tools/lib/engine_sim.py: the access pattern of decoding with
mmap'd experts and no pre-fault, no real inference).  One request = ``--tokens`` tokens, each
routing top-k of E experts per layer with a seeded router.  Its first request after start-up:
cold; after the seed's loop (first and last byte of each tensor); after ``cat FILE`` (the
floor for any page-cache warm); after ``warmpool warm``; and with
``engine_adapter.start_warmup`` started together with the engine, the engine calling
``wait_layer(k)`` before layer k of the first token (and, for comparison, not waiting: its
faults then race the warm).  Each first request is compared with the steady state of the
same engine (the request again, right after: load from other jobs moves both alike).  The
preparation (loop, warm) is shown apart; "start->resp" counts everything from start-up to
the response.  Major faults are reads from disk; minor faults are page-table set-up in the
engine's fresh mapping, which even a fully cached file costs and the steady state does not.

Engine pass: after ``dd bs=8M``, ``cat`` and ``warmpool warm`` of the evicted file, a fresh
process maps it and reads one byte per 4 KiB page (``python tools/lib/measure.py engine-pass FILE``): its minor faults and time,
and (root) the folio sizes the warm left, the cause of the difference (docs/folios.md).

Part B (tools/lib/llama_trial.py): real llama.cpp (llama-cpp-python) on the same file: start-to-first-token after
eviction, plain ``Llama()`` vs ``engine_adapter.llama_cpp.load`` vs ``warmpool.warm`` then
``Llama()``; each trial in a fresh process, ``--rounds`` paired rounds in rotating order,
medians.  llama.cpp maps the model with MAP_POPULATE, so it pays the cold read at load time;
the adapter's workers read beside it, at idle CPU priority (its default) and, for comparison,
at normal priority (``warmup_options={"priority": "normal"}``, the adapter before that default).

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path[:0] = [str(ROOT), str(TOOLS)]

from lib.llama_trial import part_b, print_part_b  # noqa: E402
from lib.measure import (  # noqa: E402
    add_wait_after_evict,
    engine_pass,
    evict_file,
    file_resident,
    synthetic_model,
)

from warmpool.example import BENCH  # noqa: E402

BENCH_FILENAME = "first-request-qwen3moe-bench-v1.gguf"  # bump when BENCH changes


# --- model and page cache -----------------------------------------------------------------

def bench_model(cache_dir: str | None) -> Path:
    return synthetic_model(BENCH, BENCH_FILENAME, Path(cache_dir) / "bench" if cache_dir else None)


WAIT_AFTER_EVICT_S = 0.0  # --wait-after-evict (see tools/bench_warm.py: free page reporting)


def evict(path: Path) -> float:
    """Drop the file's pages, then wait ``--wait-after-evict`` seconds; return the fraction still
    resident (mapped pages stay)."""
    evict_file(path)
    time.sleep(WAIT_AFTER_EVICT_S)
    left = file_resident(path)
    if left > 0.02:
        print(f"warning: {left:.1%} of {path.name} still resident after eviction", file=sys.stderr)
    return left


# --- Part A: the simulated engine -------------------------------------------------------------

def _faults() -> tuple[int, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process only: the engine's own faults
    return usage.ru_minflt, usage.ru_majflt


def _cat(path: Path) -> None:
    with open(path, "rb") as f:
        while f.readinto(_CAT_BUFFER):
            pass


def _warmpool_cli(path: Path) -> None:
    subprocess.run([sys.executable, "-m", "warmpool", "warm", str(path), "--quiet", "--no-progress"], check=True, cwd=ROOT)


_CAT_BUFFER = bytearray(8 << 20)


def _scenario(path: Path, tokens: int, key: str, name: str, *, before_open=None, after_open=None,
              warmup: bool = False, wait: bool = False, steady_runs: int = 2) -> dict:
    """Evict, start the clock, prepare, open a fresh engine (a fresh mapping), run the request."""
    from lib.engine_sim import MoeEngine

    from engine_adapter import start_warmup

    evict(path)
    waited = [0.0]
    t0 = time.perf_counter()
    if before_open:
        before_open(path)
    handle = start_warmup(path) if warmup else None
    with MoeEngine(path) as engine:
        if after_open:
            after_open(engine)
        prepared = time.perf_counter()
        before = None if warmup else file_resident(path)  # not timed
        t1 = time.perf_counter()

        def wait_layer(k: int) -> None:
            s = time.perf_counter()
            handle.wait_layer(k)
            waited[0] += time.perf_counter() - s

        minor, major = _faults()
        engine.request(tokens, before_layer=wait_layer if wait else None)
        t2 = time.perf_counter()
        minor, major = (now - then for now, then in zip(_faults(), (minor, major)))
        steady = []
        for _ in range(steady_runs):
            s = time.perf_counter()
            engine.request(tokens)
            steady.append(time.perf_counter() - s)
    out = dict(key=key, name=name, prepare_s=prepared - t0, request_s=t2 - t1,
               start_to_response_s=t2 - t0 - (t1 - prepared), resident_before=before,
               minor_faults=minor, major_faults=major)
    out["steady_runs_s"] = steady  # the same request again in this engine: its steady state
    if handle is not None:
        result = handle.wait()
        out.update(waited_s=waited[0], warm_summary=result.summary() if result else str(handle.error))
    return out


SCENARIOS = (  # key, label, _scenario options
    ("cold", "cold (no pre-fault)", {}),
    ("seed_loop", "seed's loop (first+last byte/tensor)", dict(after_open=lambda e: e.seed_prefault())),
    ("cat", "after `cat FILE` (page-cache floor)", dict(before_open=_cat)),
    ("warmpool", "after `warmpool warm`", dict(before_open=_warmpool_cli)),
    ("start_warmup_wait", "start_warmup + wait_layer(k)", dict(warmup=True, wait=True)),
    ("start_warmup_nowait", "start_warmup, engine not waiting", dict(warmup=True)),
)
_MEDIAN_FIELDS = ("prepare_s", "request_s", "start_to_response_s", "steady_s", "x_steady", "x_pooled_steady",
                  "minor_faults", "major_faults")


def part_a(path: Path, tokens: int, rounds: int) -> dict:
    """Every scenario ``rounds`` times in rotating order; per scenario the median of each figure."""
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in SCENARIOS}
    for r in range(rounds):
        for key, label, options in SCENARIOS[r % len(SCENARIOS):] + SCENARIOS[:r % len(SCENARIOS)]:
            runs[key].append(_scenario(path, tokens, key, label, **options))
    # Each first request is compared with the steady state of its own engine, measured right
    # after it (the faster of two runs: other jobs only ever add time), and with the median
    # of all steady runs.
    steady_runs = [t for rs in runs.values() for s in rs for t in s["steady_runs_s"]]
    steady = statistics.median(steady_runs)
    scenarios = {}
    for key, label, _ in SCENARIOS:
        for s in runs[key]:
            s["steady_s"] = min(s.pop("steady_runs_s"))
            s["x_steady"] = s["request_s"] / s["steady_s"]
            s["x_pooled_steady"] = s["request_s"] / steady
        first = runs[key][0]
        scenarios[key] = dict(name=label, rounds=runs[key],
                              resident_before=first["resident_before"], warm_summary=first.get("warm_summary"),
                              waited_s=statistics.median(s.get("waited_s", 0.0) for s in runs[key]),
                              **{f: statistics.median(s[f] for s in runs[key]) for f in _MEDIAN_FIELDS})
    return dict(engine="simulated CPU-MoE engine, no real inference", tokens=tokens, rounds=rounds, steady_s=steady,
                steady_runs_s=steady_runs, scenarios=scenarios)


def _dd(path: Path) -> None:
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=8M", "status=none"], check=True)


PREPARATIONS = (("dd", "dd bs=8M", _dd), ("cat", "cat FILE", _cat), ("warmpool", "warmpool warm", _warmpool_cli))


def engine_passes(path: Path, rounds: int) -> dict:
    """Per preparation: median engine-pass faults/seconds and folio figures over ``rounds``
    rotated rounds, each from an evicted file."""
    from tests.helpers import folios

    runs: dict[str, list[dict]] = {key: [] for key, _, _ in PREPARATIONS}
    for r in range(rounds):
        for key, _, prepare in PREPARATIONS[r % len(PREPARATIONS):] + PREPARATIONS[:r % len(PREPARATIONS)]:
            evict(path)
            prepare(path)
            run = dict(load_1m=os.getloadavg()[0], folios=None)
            if folios.available() is None:
                run["folios"] = folios.summary(folios.histogram(path))
            run.update(engine_pass(path))
            runs[key].append(run)
    out = {}
    for key, label, _ in PREPARATIONS:
        rs = runs[key]
        out[key] = dict(name=label, rounds=rs, **{f: statistics.median(r[f] for r in rs)
                                                    for f in ("minor_faults", "seconds", "load_1m")})
        if all(r["folios"] for r in rs):
            out[key].update({f: statistics.median(r["folios"][f] for r in rs)
                             for f in ("order0_fraction", "pmd_fraction", "mean_folio_kib")})
    return out


def print_engine_passes(passes: dict) -> None:
    print("\nEngine pass after each preparation (fresh process, one byte per 4 KiB page; median of "
          f"{len(next(iter(passes.values()))['rounds'])} rounds)")
    head = f"{'after':<16} {'minor faults':>12} {'seconds':>8} {'order-0':>8} {'PMD-size':>9} {'mean folio':>11} {'load':>5}"
    print(head + "\n" + "-" * len(head))
    for p in passes.values():
        fol = (f"{p['order0_fraction']:>8.1%} {p['pmd_fraction']:>9.1%} {p['mean_folio_kib']:>8.0f} KiB"
               if "order0_fraction" in p else f"{'-':>8} {'-':>9} {'-':>11}")
        print(f"{p['name']:<16} {p['minor_faults']:>12,.0f} {p['seconds']:>7.3f}s {fol} {p['load_1m']:>5.2f}")


def print_part_a(a: dict) -> None:
    print(f"\nPart A - {a['engine']} (access pattern only): first request of {a['tokens']} tokens, "
          f"median of {a['rounds']} rounds")
    runs = a["steady_runs_s"]
    print(f"steady state (the same request again, warm engine): median {a['steady_s']:.3f} s of {len(runs)} runs "
          f"({min(runs):.3f}-{max(runs):.3f} s)")
    print("'steady' = the same engine's steady state (faster of 2 runs right after); 'x pooled' = over the median")
    head = (f"{'scenario':<38} {'resident':>8} {'prepare':>8} {'request':>8} {'steady':>7} {'x steady':>9} "
            f"{'x pooled':>8} {'start->resp':>11} {'major flt':>9} {'minor flt':>9}")
    print(head + "\n" + "-" * len(head))
    for s in a["scenarios"].values():
        res = "-" if s["resident_before"] is None else f"{s['resident_before']:.1%}"
        print(f"{s['name']:<38} {res:>8} {s['prepare_s']:>7.3f}s {s['request_s']:>7.3f}s {s['steady_s']:>6.3f}s "
              f"{s['x_steady']:>8.2f}x {s['x_pooled_steady']:>7.2f}x {s['start_to_response_s']:>10.3f}s "
              f"{s['major_faults']:>9} {s['minor_faults']:>9}")
    print("  prepare = the loop or the warm, before the request (start_warmup: 0, it runs beside the engine);")
    print("  start->resp = from start-up (right after eviction) to the request's end, prepare included")
    wait = a["scenarios"]["start_warmup_wait"]
    print(f"  start_warmup + wait_layer: the engine waited {wait['waited_s']:.3f} s; {wait['warm_summary']}")


# --- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 simulated round, 3 llama rounds, 8-token requests")
    parser.add_argument("--rounds", type=int, default=5, help="paired llama.cpp rounds (default 5)")
    parser.add_argument("--rounds-a", type=int, default=3, help="rounds of the simulated engine (default 3)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per simulated request (default 16)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens llama.cpp generates (default 8)")
    parser.add_argument("--no-llama", action="store_true", help="skip Part B")
    parser.add_argument("--cache-dir", help="where the bench model lives (default $WARMPOOL_CACHE or ~/.cache/warmpool)")
    add_wait_after_evict(parser)
    args = parser.parse_args(argv)
    global WAIT_AFTER_EVICT_S
    WAIT_AFTER_EVICT_S = args.wait_after_evict
    if args.quick:
        args.rounds, args.rounds_a, args.tokens = min(args.rounds, 3), 1, min(args.tokens, 8)
    path = bench_model(args.cache_dir)
    load_before = os.getloadavg()
    print(f"model: {path} ({path.stat().st_size / 1e9:.2f} GB, synthetic qwen3moe: {BENCH.n_layers} layers x "
          f"{BENCH.n_experts} experts, top-{BENCH.n_experts_used}); cpus {os.cpu_count()}; "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    passes = engine_passes(path, args.rounds_a)
    print_engine_passes(passes)
    a = part_a(path, args.tokens, args.rounds_a)
    print_part_a(a)
    b = dict(skipped="--no-llama") if args.no_llama else part_b(path, args.rounds, args.max_tokens, evict, file_resident)
    print_part_b(b)
    load_after = os.getloadavg()
    after_warmpool, after_cat = (a["scenarios"][k]["x_steady"] for k in ("warmpool", "cat"))
    targets = {"part_a_after_warmpool_x_steady<=1.15": after_warmpool <= 1.15,
               "part_a_after_warmpool<=after_cat+0.05": after_warmpool <= after_cat + 0.05,
               "engine_pass_faults_after_warmpool<=1.3x_dd": passes["warmpool"]["minor_faults"]
               <= 1.3 * passes["dd"]["minor_faults"]}
    if "medians" in b:
        # the median of the per-round ratios: each pair ran back to back, under the same load
        targets["part_b_adapter_x_plain<=1.05"] = b["medians"]["adapter"]["x_plain_paired_median"] <= 1.05
    print(f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    for trials in b.get("trials", {}).values():
        for t in trials:
            t.pop("variant", None)
    print(json.dumps(dict(tool="first_request", model=dict(path=str(path), bytes=path.stat().st_size),
                          cpus=os.cpu_count(), load_avg_before=load_before, load_avg_after=load_after,
                          engine_pass=passes, part_a=a, part_b=b, targets=targets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
