"""keep_bench's statistics over its per-request rows, and its table."""

from __future__ import annotations

import json

import numpy as np

SLOW = 1.2  # a request over this multiple of its steady twin counts as slow (the target)
QUEUED = 0.5e-3  # run-queue wait above which a request counts as preempted (a wake-up alone waits microseconds)
OFF_CPU = 0.5e-3  # time off the CPU, neither running nor queued, above which a request counts as stolen from


def off_cpu(r: dict, twin: bool = False) -> float:
    """Seconds of a request (or of its steady twin) neither on a CPU nor waiting for one: the
    hypervisor ran something else on the vCPU (steal), or the thread blocked (a major fault's
    read, a lock)."""
    if twin:
        return max(r["steady_s"] - r["steady_ran_s"] - r["steady_queued_s"], 0.0)
    return max(r["first_s"] - r["ran_s"] - r["queued_s"], 0.0)


def _causes(rows: list[dict], ratios: np.ndarray) -> dict:
    """Slow requests (> 1.2x) by what was seen during them, first match wins: major faults (the
    engine read the disk), the keeper re-warming or using CPU, the memory cgroup's limit hit
    while the request ran (some task's charge failed and that task reclaimed: the engine's own
    page tables and heap are charged to the same limit), preemption (an involuntary context
    switch, or over 0.5 ms waiting for a CPU, during the request or its steady twin: other
    runnable tasks), over 0.5 ms of the request off the CPU without waiting for it (the host
    took the vCPU), none seen.
    And p99 over the requests where none of the request, its twin or the keeper was preempted or
    busy and the limit was not hit, shown beside the p99 of all requests, never instead of it."""
    causes = {"disk": 0, "keeper": 0, "limit": 0, "preempted": 0, "off-cpu": 0, "unexplained": 0}
    quiet = []
    for r, x in zip(rows, ratios):
        keeper = r.get("rewarm_overlap") or r["keeper_cpu_s"] > 0
        preempted = r["nivcsw"] + r["steady_nivcsw"] > 0 or r["queued_s"] + r["steady_queued_s"] > QUEUED
        if not keeper and not preempted and not r["limit_hits"] + r["steady_limit_hits"]:
            quiet.append(x)
        if x <= SLOW:
            continue
        cause = ("disk" if r["majflt"] else "keeper" if keeper else "limit" if r["limit_hits"]
                 else "preempted" if preempted else "off-cpu" if off_cpu(r) > OFF_CPU else "unexplained")
        causes[cause] += 1
    return {"slow_by_cause": causes, "quiet_requests": len(quiet),
            "p99_x_steady_quiet": round(float(np.percentile(quiet, 99)), 3) if quiet else None}


def summarize(rows: list[dict]) -> dict:
    """Request time against steady (paired per request), the paired statistic's noise floor,
    tail against tail, faults, residency, and why the slow requests were slow."""
    ratios = np.array([r["first_s"] / r["steady_s"] for r in rows])
    hot = np.array([r["first_s"] / r["hot_s"] for r in rows])
    # The same paired ratio in CPU time alone (schedstat run time, which leaves out steal): a
    # request slow in wall time but not here waited or was off the CPU; slow here too, it ran
    # slower on the CPU (cache and TLB misses, the host's memory).
    ran = np.array([r["ran_s"] / r["steady_ran_s"] for r in rows if r["ran_s"] > 0 and r["steady_ran_s"] > 0])
    firsts = np.array([r["first_s"] for r in rows])
    steadies = np.array([r["steady_s"] for r in rows])
    return dict(
        p50_x_steady=round(float(np.percentile(ratios, 50)), 3), p99_x_steady=round(float(np.percentile(ratios, 99)), 3),
        max_x_steady=round(float(ratios.max()), 3),
        p99_cpu_x_steady=round(float(np.percentile(ran, 99)), 3) if len(ran) else None,
        off_cpu_ms_total=round(sum(off_cpu(r) for r in rows) * 1e3, 1),
        steal_ticks_total=int(sum(r["steal_ticks"] for r in rows)),
        # The paired ratio's own noise floor: the same statistic between two warm runs of each
        # request (the steady twin over the hot re-run), which no keeper can change.
        p99_floor=round(float(np.percentile(np.array([r["steady_s"] / r["hot_s"] for r in rows]), 99)), 3),
        # Tail against tail: the requests' p99 over the steady twins' p99.
        p99_over_steady_p99=round(float(np.percentile(firsts, 99) / np.percentile(steadies, 99)), 3),
        p50_x_hot=round(float(np.percentile(hot, 50)), 3), p99_x_hot=round(float(np.percentile(hot, 99)), 3),
        p50_ms=round(float(np.percentile(firsts, 50)) * 1e3, 1), p99_ms=round(float(np.percentile(firsts, 99)) * 1e3, 1),
        steady_median_ms=round(float(np.median(steadies)) * 1e3, 1),
        engine_majflt=int(sum(r["majflt"] for r in rows)),
        slow_requests=int((ratios > SLOW).sum()),
        resident_min=round(min(r["resident"] for r in rows), 4),
        **_causes(rows, ratios),
        per_request_fields=["t", "first_ms", "steady_ms", "hot_ms", "majflt", "nivcsw", "steady_nivcsw",
                            "queued_ms", "steady_queued_ms", "limit_hits", "steady_limit_hits", "keeper_cpu_ms",
                            "rewarm_overlap", "resident", "ran_ms", "steady_ran_ms", "off_cpu_ms", "steady_off_cpu_ms",
                            "steal_ticks", "steady_steal_ticks", "minflt", "steady_minflt"],
        per_request=[[r["t"], round(r["first_s"] * 1e3, 1), round(r["steady_s"] * 1e3, 1), round(r["hot_s"] * 1e3, 1),
                      r["majflt"], r["nivcsw"], r["steady_nivcsw"], round(r["queued_s"] * 1e3, 2),
                      round(r["steady_queued_s"] * 1e3, 2), r["limit_hits"], r["steady_limit_hits"],
                      round(r["keeper_cpu_s"] * 1e3),
                      r.get("rewarm_overlap", False), round(r["resident"], 4),
                      round(r["ran_s"] * 1e3, 2), round(r["steady_ran_s"] * 1e3, 2), round(off_cpu(r) * 1e3, 2),
                      round(off_cpu(r, twin=True) * 1e3, 2), r["steal_ticks"], r["steady_steal_ticks"],
                      r["minflt"], r["steady_minflt"]] for r in rows],
    )


def _fmt(x: float | None) -> str:
    return f"{x:>5.2f}" if x is not None else "  n/a"


def report(results: list[dict]) -> int:
    print()
    head = f"{'config':<10} {'p50 x':>6} {'p99 x':>6} {'floor':>6} {'cpu x':>6} {'tail x':>6} {'max x':>6} {'p50 ms':>7} {'p99 ms':>7} {'steady':>7} {'hot x':>6} {'slow':>5} " \
           f"{'disk MB':>8} {'rewarm MB':>9} {'cpu %':>6} {'RssAnon':>8} {'min res':>7} {'end res':>7} {'quiet p99':>10} {'slow d/k/l/p/o/u':>16} {'load':>9}"
    print(head)
    for r in results:
        print(f"{r['config']:<10} {r['p50_x_steady']:>6.2f} {r['p99_x_steady']:>6.2f} {r['p99_floor']:>6.2f} "
              f"{_fmt(r['p99_cpu_x_steady']):>6} {r['p99_over_steady_p99']:>6.2f} {r['max_x_steady']:>6.2f} "
              f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['steady_median_ms']:>7.1f} {r['p50_x_hot']:>6.1f} {r['slow_requests']:>5} "
              f"{r['engine_bytes_read'] / 1e6:>8.1f} {r.get('keeper_bytes_rewarmed', 0) / 1e6:>9.1f} "
              f"{100 * r.get('keeper_cpu_share', 0):>6.2f} {r.get('keeper_rss_anon_peak_mb', 0):>6.1f}MB "
              f"{r['resident_min']:>7.1%} {r['resident_fraction_end']:>7.1%} "
              f"{_fmt(r['p99_x_steady_quiet'])}x/{r['quiet_requests']:<3} {'/'.join(str(v) for v in r['slow_by_cause'].values()):>16} "
              f"{r['load_before']:>4.1f}/{r['load_after']:<4.1f}")
    print("x: a request's time over steady, the same request right after in a twin engine (its own lazy mapping, same"
          " request history, so the same page-table set-up) when the page cache is warm; floor: p99 of the same paired"
          " ratio between two warm runs of each request (steady twin over hot re-run), the noise no keeper removes;"
          " tail x: p99 of request times over p99 of steady times; slow: requests over 1.2x;"
          " disk MB: the engine's own reads; rewarm MB: the keeper's; min/end res: the model's resident fraction, lowest"
          " after any request / at the end; quiet p99: over the requests (count after /) where neither the request, its"
          " twin nor the keeper was preempted (an involuntary switch or > 0.5 ms waiting for a CPU) or busy, nor"
          " the limit hit;"
          " slow d/k/l/p/o/u: slow requests with major faults / keeper busy / the cgroup's limit hit during them (reclaim) /"
          " preempted / over 0.5 ms off the CPU without waiting for it (the host ran something else: steal) / none of these;"
          " cpu x: p99 of the paired ratio in CPU time alone (schedstat run time, which leaves out steal);"
          " load: 1-min load average before/after")
    print(json.dumps({"keep_bench": [{k: v for k, v in r.items() if not k.startswith("per_request")} for r in results]}))
    return 0
