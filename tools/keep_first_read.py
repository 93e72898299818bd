"""The first CPU read of freshly read page cache: a lazy engine's request in three successive
fresh mappings, after different ways of warming the file.

    python tools/keep_first_read.py [--modes warm,warm-populate,warm-touch,cat] [MODEL]

For each mode: evict the model, warm it that way, then run the same 1-token request (seed 5)
of tools/engine_sim.py's engine in three engines, each with its own fresh lazy mapping, one
after another, printing each request's time and minor/major faults.  Default model: the
keep_bench model.  See docs/keep.md ("The first CPU read").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from engine_sim import MoeEngine  # noqa: E402

from warmpool import _platform  # noqa: E402


def _held(path: str, touch: bool) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        held = _platform.HeldMapping(fd, 0, os.fstat(fd).st_size)
        held.populate(0, held.length)
        start = time.perf_counter()
        if touch:
            held.touch(0, held.length)
        took = time.perf_counter() - start
        held.close()
        return took
    finally:
        os.close(fd)


def run(mode: str, path: str) -> dict:
    _platform.evict_file(path)
    if mode == "cat":
        subprocess.run(f"cat '{path}' > /dev/null", shell=True, check=True)
    else:
        subprocess.run([sys.executable, "-m", "warmpool", "warm", path, "-q", "--no-progress"], check=True, cwd=ROOT)
    row = {"mode": mode, "loadavg": os.getloadavg()[0]}
    if mode in ("warm-populate", "warm-touch"):
        row["touch_s"] = round(_held(path, mode == "warm-touch"), 4)
    engines = [MoeEngine(path) for _ in range(3)]
    row["requests"] = []
    for engine in engines:
        engine.seed = 5
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        engine.request(1)
        took = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        row["requests"].append({"ms": round(took * 1e3, 1), "minflt": after.ru_minflt - before.ru_minflt,
                                "majflt": after.ru_majflt - before.ru_majflt})
    for engine in engines:
        engine.close()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--modes", default="warm,warm-populate,warm-touch,cat")
    args = ap.parse_args(argv)
    if args.model is None:
        from keep_bench import _warm_up_python, bench_model

        args.model = str(bench_model(None))
        _warm_up_python()
    rows = [run(mode, args.model) for mode in args.modes.split(",")]
    for r in rows:
        shown = "  ".join(f"{q['ms']:7.1f} ms ({q['minflt']} minflt, {q['majflt']} majflt)" for q in r["requests"])
        print(f"{r['mode']:<14} {shown}  load {r['loadavg']:.2f}" + (f"  touch {r['touch_s']} s" if "touch_s" in r else ""))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
