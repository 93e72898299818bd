"""What one residency check of the keeper costs, and what that means for a 100 GB selection.

    python tools/keep_check_cost.py [MODEL] [--passes 200] [--target 100G] [--interval 10]

Times the keeper's own check (``KeptModel.measure``: cachestat per chunk where the kernel has it,
else mincore per chunk) over a warm model's chunks, per chunk, both ways; the per-chunk cost
does not depend on the selection's size for cachestat (one syscall per chunk) and grows with
the pages of the chunk for mincore (timed both through a fresh mapping per chunk and through
the held mapping, which is what the keeper uses without cachestat), so the extrapolation multiplies by the number of 16 MiB
chunks of the target.  Also times one touch pass (one byte per page through the held mapping,
the ``--hold touch`` mode) and the default refresh (``KeptModel.refresh``), and extrapolates
them the same way.  Default model: the keep_bench
model.  Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from warmpool import Keeper, _platform, plan_model, warm  # noqa: E402
from warmpool._keep.keeper import REFRESH_CPU_SHARE  # noqa: E402
from warmpool._units import parse_size  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--passes", type=int, default=200)
    ap.add_argument("--target", default="100G")
    ap.add_argument("--interval", type=float, default=10.0)
    args = ap.parse_args(argv)
    if args.model is None:
        from keep_bench import bench_model

        args.model = str(bench_model(None))
    plan = plan_model(args.model)
    warm(args.model, plan=plan, force=True)
    keeper = Keeper([plan], interval=args.interval)
    model = keeper.models[0]
    model.hold(mapped=True)
    chunks = len(plan.chunks)
    target_chunks = parse_size(args.target) / plan.chunk_size
    out = {"model": args.model, "bytes_selected": plan.bytes_planned, "chunks": chunks,
           "target_bytes": parse_size(args.target), "interval": args.interval,
           "cachestat": _platform.supports_cachestat(), "loadavg": os.getloadavg()[0]}
    try:
        for name, fn in (("cachestat", lambda m: m.measure()), ("mincore", _mincore), ("mincore-held", _mincore_held)):
            if name == "cachestat" and not _platform.supports_cachestat():
                continue
            cpu0, t0 = time.process_time(), time.perf_counter()
            for _ in range(args.passes):
                fn(model)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
            per_chunk = cpu / args.passes / chunks
            out[name] = {"cpu_us_per_chunk": round(per_chunk * 1e6, 2), "wall_ms_per_pass": round(wall / args.passes * 1e3, 3),
                         "target_core_share": round(per_chunk * target_chunks / args.interval, 5)}
        cpu0 = time.process_time()
        for _, _, held in model.held:
            held.touch(0, held.length)
        touch = time.process_time() - cpu0
        out["touch"] = {"cpu_s_per_pass": round(touch, 4),
                        "target_core_share": round(touch * parse_size(args.target) / plan.bytes_planned / args.interval, 4)}
        passes = max(args.passes // 10, 1)
        cpu0 = time.process_time()
        for _ in range(passes):
            model.refresh()
        refresh = (time.process_time() - cpu0) / passes * parse_size(args.target) / plan.bytes_planned
        out["refresh"] = {"cpu_ms_per_pass": round(refresh * plan.bytes_planned / parse_size(args.target) * 1e3, 3),
                          "target_core_share_every_1s": round(refresh, 4),
                          "target_seconds_between_passes": round(max(1.0, refresh / REFRESH_CPU_SHARE), 2)}
    finally:
        model.release()
    print(f"{chunks} chunks, {plan.bytes_planned / 2**30:.2f} GiB selected; extrapolated to {args.target} "
          f"({target_chunks:.0f} chunks) checked every {args.interval:g} s; load {out['loadavg']:.2f}")
    for name in ("cachestat", "mincore", "mincore-held"):
        if name in out:
            r = out[name]
            print(f"  {name:<12} {r['cpu_us_per_chunk']:8.2f} us CPU per chunk  -> {100 * r['target_core_share']:6.3f}% of one core")
    print(f"  touch     {out['touch']['cpu_s_per_pass']:8.4f} s CPU per pass   -> {100 * out['touch']['target_core_share']:6.3f}% of one core (--hold touch)")
    r = out["refresh"]
    print(f"  refresh   {r['cpu_ms_per_pass']:8.3f} ms CPU per pass  -> {100 * r['target_core_share_every_1s']:6.3f}% of one core "
          f"every 1 s; under the keeper's {100 * REFRESH_CPU_SHARE:g}% cap, one pass every {r['target_seconds_between_passes']:g} s")
    print(json.dumps(out))
    return 0


def _mincore(model) -> None:
    """Without cachestat and without a held mapping: map, mincore, unmap per chunk."""
    for chunk in model.plan.chunks:
        _platform.resident_bytes(model.fds[chunk.file], chunk.offset, chunk.length)


def _mincore_held(model) -> None:
    """Without cachestat, with the held mapping (what the keeper does there)."""
    for chunk in model.plan.chunks:
        model._mincore(model.fds[chunk.file], chunk)


if __name__ == "__main__":
    sys.exit(main())
