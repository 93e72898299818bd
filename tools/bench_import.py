"""What ``import warmpool`` and a warm's logging cost an engine that configured no logging.

Each sample is a fresh interpreter timed from outside (``subprocess.run`` start to exit), so
interpreter start-up, ``site`` and the imports a call triggers are all in it.  Variants, run
interleaved round by round so machine load hits them alike:

* ``pass``: ``python -c pass``, the baseline.
* ``logging``: ``import warmpool`` plus the log calls a warm makes (an INFO decision and a
  WARNING fallback note, through ``warmpool._log.logger``) with no logging configured.
* ``warm``: ``import warmpool; warmpool.warm(TINY)`` on an already-resident TINY model (no pool
  starts: layout walk, plan, cachestat, policy, the log call).

Prints one line per variant and one JSON object (medians in ms, and the differences over
``pass``) with the load average before and after.  Asserts nothing.

Command line::

    python tools/bench_import.py [--runs 21] [--repo CHECKOUT]
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

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "pass": "pass",
    "logging": ("import warmpool; from warmpool._log import logger; "
                "logger.info('%s: %s', 'model.gguf', 'the selection is already resident'); "
                "logger.warning('a platform note')"),
    "warm": "import sys, warmpool; warmpool.warm(sys.argv[1])",
}


def sample(code: str, model: str, env: dict, cwd: str) -> float:
    started = time.perf_counter()
    # cwd elsewhere: ``-c`` puts the working directory first on sys.path, before PYTHONPATH
    subprocess.run([sys.executable, "-c", code, model], check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - started) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="fresh processes per variant (>= 15)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to measure (default: this one)")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    sys.path.insert(0, str(repo))
    import warmpool
    from warmpool.example import TINY, write_moe_gguf

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_moe_gguf(Path(tmp) / "tiny.gguf", TINY)[0])
        warmpool.warm(model)  # resident from here on; each timed warm finds nothing to do
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.runs):
            for name, code in VARIANTS.items():
                times[name].append(sample(code, model, env, tmp))
        load_after = os.getloadavg()
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:8s} median {medians[name]:6.1f} ms  (min {min(values):.1f}, max {max(values):.1f}, "
              f"{len(values)} runs)  over pass: {medians[name] - medians['pass']:+.1f} ms")
    print(json.dumps({
        "repo": str(repo), "runs": args.runs,
        "median_ms": {k: round(v, 2) for k, v in medians.items()},
        "over_pass_ms": {k: round(v - medians["pass"], 2) for k, v in medians.items() if k != "pass"},
        "loadavg_before": load_before, "loadavg_after": load_after, "python": sys.version.split()[0],
    }))


if __name__ == "__main__":
    main()
