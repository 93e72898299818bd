"""Part B of tools/first_request.py: real llama.cpp (llama-cpp-python), one trial per process.

    python tools/lib/llama_trial.py VARIANT MODEL MAX_TOKENS   # one trial; prints one JSON line

Each trial starts a fresh interpreter, so every variant pays the same imports and loads the
model into a process of its own: plain ``Llama()``, ``engine_adapter.llama_cpp.load`` (at the
adapter's default idle priority and at normal priority) and ``warmpool.warm`` then ``Llama()``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]  # the checkout
PROMPT = "Hello"  # short: start-to-first-token is then mostly load, not prompt compute
# One thread each: with two, a thread descheduled by another job stalls the other at every
# barrier, and the first token's time then measures the machine's load, not the page cache.
LLAMA_KWARGS = dict(n_ctx=512, seed=1, verbose=False, n_threads=1, n_threads_batch=1)
VARIANTS = ("plain", "adapter", "adapter-normal", "warm-first")
ADAPTERS = ("adapter", "adapter-normal")


def llama_child(variant: str, path: str, max_tokens: int) -> None:
    import llama_cpp

    t0 = time.perf_counter()
    warm_s = None
    if variant == "plain":
        llm = llama_cpp.Llama(path, **LLAMA_KWARGS)
    elif variant in ADAPTERS:
        from engine_adapter.llama_cpp import load

        options = {"priority": "normal"} if variant == "adapter-normal" else {}
        llm, warmup = load(path, warmup_options=options, **LLAMA_KWARGS)
    else:
        import warmpool

        warmpool.warm(path)
        warm_s = time.perf_counter() - t0
        llm = llama_cpp.Llama(path, **LLAMA_KWARGS)
    t_load = time.perf_counter()
    # One token: llama-cpp-python's stream yields every token at the end, so time the prompt
    # plus the first sampled token as a request of its own, then the rest of the request.
    llm.create_completion(PROMPT, max_tokens=1, temperature=0.0)
    first = time.perf_counter()
    llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0)
    t_end = time.perf_counter()
    out = dict(variant=variant, load_s=t_load - t0 - (warm_s or 0.0), warm_s=warm_s, first_token_s=first - t_load,
               next_request_s=t_end - first, start_to_first_token_s=first - t0)
    if variant in ADAPTERS:
        result = warmup.wait()
        out.update(warm_s=result.seconds if result else None, warm_warmed_bytes=result.bytes_warmed if result else None,
                   warm_error=str(warmup.error) if warmup.error else None)
    llm.close()
    # CPU time, the warm's worker processes included: a figure other jobs on the machine move little.
    out["cpu_s"] = sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                                  resource.RUSAGE_CHILDREN)))
    print(json.dumps(out))


def part_b(path: Path, rounds: int, max_tokens: int, evict: Callable[[Path], object],
           resident: Callable[[Path], float]) -> dict:
    """``rounds`` paired rounds of every variant in rotating order, each from a file ``evict`` dropped."""
    try:
        import llama_cpp
    except ImportError as e:
        return dict(skipped=f"llama-cpp-python not installed ({e}); pip install 'warmpool[llama]'")
    trials: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]  # rotate: no variant always runs first
        for variant in order:
            evict(path)
            out = subprocess.run([sys.executable, __file__, variant, str(path), str(max_tokens)],
                                 capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
            if out.returncode != 0:
                raise SystemExit(f"llama child {variant} failed:\n{out.stderr[-2000:]}")
            trial = json.loads(out.stdout.strip().splitlines()[-1])
            trial["resident_after"] = resident(path)
            trials[variant].append(trial)
    medians = {v: {k: statistics.median(t[k] for t in ts) for k in ("load_s", "first_token_s", "next_request_s",
                                                                      "start_to_first_token_s", "cpu_s")}
               for v, ts in trials.items()}
    medians["warm-first"]["warm_s"] = statistics.median(t["warm_s"] for t in trials["warm-first"])
    plain = medians["plain"]["start_to_first_token_s"]
    for v in VARIANTS:
        medians[v]["x_plain"] = medians[v]["start_to_first_token_s"] / plain
    paired = {v: [a["start_to_first_token_s"] / p["start_to_first_token_s"] for a, p in zip(trials[v], trials["plain"])]
              for v in ADAPTERS}
    for v in ADAPTERS:
        medians[v]["x_plain_paired_median"] = statistics.median(paired[v])
    return dict(engine=f"llama-cpp-python {llama_cpp.__version__}, {'GPU' if llama_cpp.llama_supports_gpu_offload() else 'CPU-only'} build",
                rounds=rounds, max_tokens=max_tokens, medians=medians, adapter_over_plain_paired=paired["adapter"],
                adapter_normal_over_plain_paired=paired["adapter-normal"], trials=trials)


def print_part_b(b: dict) -> None:
    if "skipped" in b:
        print(f"\nPart B - real llama.cpp: SKIPPED: {b['skipped']}")
        return
    print(f"\nPart B - real llama.cpp ({b['engine']}): start to first token after eviction, "
          f"median of {b['rounds']} paired rounds")
    head = (f"{'variant':<30} {'warm':>7} {'load':>7} {'1st token':>9} {'start->1st tok':>14} {'x plain':>8} "
            f"{'next request':>12} {'CPU':>6}")
    print(head + "\n" + "-" * len(head))
    labels = {"plain": "plain Llama()", "adapter": "engine_adapter.llama_cpp.load",
              "adapter-normal": "  same, priority normal",
              "warm-first": "warmpool.warm, then Llama()"}
    for v in VARIANTS:
        m = b["medians"][v]
        warm = f"{m['warm_s']:.3f}s" if "warm_s" in m else "bg" if v in ADAPTERS else "-"
        print(f"{labels[v]:<30} {warm:>7} {m['load_s']:>6.3f}s {m['first_token_s']:>8.3f}s "
              f"{m['start_to_first_token_s']:>13.3f}s {m['x_plain']:>7.3f}x {m['next_request_s']:>11.3f}s "
              f"{m['cpu_s']:>5.2f}s")
    print(f"  1st token = the prompt ({PROMPT!r}) and one sampled token, right after load; next request = "
          f"{b['max_tokens']} tokens more; 'bg' = the adapter's warm runs beside Llama(); CPU = user+sys of the\n"
          "  whole trial process and its warm workers (import, load, both requests)")
    print("  adapter/plain start->1st token, per round: " + ", ".join(f"{x:.3f}" for x in b["adapter_over_plain_paired"])
          + f" (median {b['medians']['adapter']['x_plain_paired_median']:.3f}); at priority normal: "
          + ", ".join(f"{x:.3f}" for x in b["adapter_normal_over_plain_paired"])
          + f" (median {b['medians']['adapter-normal']['x_plain_paired_median']:.3f})")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    llama_child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
