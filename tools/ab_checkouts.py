"""Paired rounds of `warmpool warm` from several checkouts, beside `cat`, `dd bs=8M`, four
parallel `dd` and `vmtouch -t` (where installed), with the CPU each one spent: for an A/B of a
change to the warm itself.

    python tools/ab_checkouts.py FILE NAME=CHECKOUT[@ARGS] ... [--rounds 4] [--wait-after-evict 10]
        [--no-page-reporting]

    e.g. python tools/ab_checkouts.py MODEL before=/tmp/old after=. 'w4=.@--workers 4' --wait-after-evict 10

Each round runs every way once, in an order rotated by one per round, each after its own
eviction (and wait).  Wall time is from spawn to exit; CPU is user + system of the children
(``getrusage(RUSAGE_CHILDREN)``, the warm's workers included); after each warm a fresh
process's one-byte-per-page pass over the file reports its minor faults
(``python tools/lib/measure.py engine-pass FILE``).  The summary gives medians; "x fastest peer" is the
median over rounds of the time over the fastest peer in the same round, with a 95% confidence
interval (from 6 rounds); and "paired" is the median over
rounds of the time over the faster of `cat` and `dd` in the same round.  One JSON line per run
and one per way follow the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: warmpool

from lib.measure import (  # noqa: E402
    add_no_page_reporting,
    add_wait_after_evict,
    compile_bytecode,
    engine_pass,
    median_ci,
    page_reporting_off,
    timed_rounds,
    warmpool_argv,
)
from lib.peers import FILE, catalogue  # noqa: E402

PEERS = ("cat", "dd", "dd4", "vmtouch")  # bench_warm's methods of these names (vmtouch where installed)


def _ways(specs: list[str]) -> dict[str, tuple[list[str], dict[str, str] | None]]:
    """name -> (argv, environment or None for the peers)."""
    ways = {m.key: (list(m.argv), None) for m in catalogue() if m.key in PEERS
            and (m.key != "vmtouch" or shutil.which("vmtouch"))}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        checkout, _, args = rest.partition("@")
        if not sep or not name or not checkout or name in ways:
            raise SystemExit(f"{spec!r}: expected a new NAME=CHECKOUT[@ARGS]")
        if not (Path(checkout) / "warmpool" / "__init__.py").is_file():
            raise SystemExit(f"{checkout}: not a warmpool checkout (no warmpool/__init__.py)")
        compile_bytecode(checkout)  # as an installed copy has it
        env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
        ways[name] = ([*warmpool_argv(), "warm", FILE, "--quiet", "--no-progress", *args.split()], env)
    return ways


def _rounds(args, ways) -> list[dict]:
    def after(name: str, run: dict) -> None:
        run["load_1m"] = round(os.getloadavg()[0], 2)
        if ways[name][1] is not None:
            run["engine_pass_minor_faults"] = engine_pass(args.file)["minor_faults"]

    filled = {name: ([a.replace(FILE, args.file) for a in argv], env) for name, (argv, env) in ways.items()}
    return timed_rounds(args.file, filled, args.rounds, args.wait_after_evict, after)


def _report(ways, runs: list[dict], rounds: int) -> None:
    names = list(ways)
    by_round = {r: {x["way"]: x for x in runs if x["round"] == r} for r in range(rounds)}
    print(f"\n{'way':12s} {'median s':>9s} {'paired':>7s} {'x fastest peer (95% CI)':>24s} {'CPU s':>6s}  engine pass faults")
    for name in names:
        mine = [x for x in runs if x["way"] == name]
        paired = [b[name]["wall_s"] / min(b["cat"]["wall_s"], b["dd"]["wall_s"]) for b in by_round.values()]
        # Over the fastest of the peers in the same round (cat, dd, four dd, vmtouch -t where installed).
        fastest = [b[name]["wall_s"] / min(b[p]["wall_s"] for p in PEERS if p in b) for b in by_round.values()]
        faults = sorted({x["engine_pass_minor_faults"] for x in mine if "engine_pass_minor_faults" in x})
        summary = {"way": name, "median_s": round(statistics.median(x["wall_s"] for x in mine), 3),
                   "paired_vs_min_cat_dd": round(statistics.median(paired), 3),
                   "paired_vs_fastest_peer": round(statistics.median(fastest), 3),
                   "paired_vs_fastest_peer_ci95": median_ci(fastest),
                   "median_cpu_s": round(statistics.median(x["cpu_s"] for x in mine), 3), "engine_pass_faults": faults,
                   "command": " ".join(ways[name][0]), "pythonpath": (ways[name][1] or {}).get("PYTHONPATH")}
        ci = summary["paired_vs_fastest_peer_ci95"]
        fastest_s = f"{summary['paired_vs_fastest_peer']:.3f}x" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
        print(f"{name:12s} {summary['median_s']:9.3f} {summary['paired_vs_min_cat_dd']:6.2f}x {fastest_s:>24s} "
              f"{summary['median_cpu_s']:6.2f}  {faults or '-'}")
        runs.append(summary)
    print("\n".join(json.dumps(x) for x in runs[-len(names):]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("ways", nargs="+", metavar="NAME=CHECKOUT[@ARGS]")
    p.add_argument("--rounds", type=int, default=4)
    add_wait_after_evict(p)
    add_no_page_reporting(p)
    args = p.parse_args(argv)
    ways = _ways(args.ways)
    with page_reporting_off(args.no_page_reporting):
        runs = _rounds(args, ways)
    _report(ways, runs, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
