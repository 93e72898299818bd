"""Fuzz warmpool's GGUF header walk on demand: mutate small valid models, parse them, count the outcomes.

    python tools/fuzz_layout.py [--examples 10000] [--limit-s 5]

prints how many mutated files parsed ("ok") and how many raised each class of ``LayoutError``,
then the time taken; it exits 1 when anything else escaped ``read_layout`` (another exception,
a parse over ``--limit-s`` seconds, or one whose Python allocations peaked over 50 MB).

The seeds, the strategy and the per-parse guards live in tests/helpers/fuzz.py, which
tests/test_fuzz_layout.py runs with 2,000 examples in CI.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: warmpool and tests.helpers

from tests.helpers.fuzz import (  # noqa: E402
    FuzzFailure,
    apply_mutations,
    fuzz_cases,
    parse_outcome,
    rewrite,
    write_seeds,
)


def _run(examples: int, limit_s: float, directory: Path) -> tuple[collections.Counter, list[str]]:
    from hypothesis import HealthCheck, Phase, given, settings

    seeds = write_seeds(directory)
    target = str(directory / "mutated.gguf")
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    counts: collections.Counter = collections.Counter()
    failures: list[str] = []

    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz_cases(seeds))
    def one(case):
        index, mutations = case
        rewrite(fd, apply_mutations(seeds[index], mutations))
        try:
            counts[parse_outcome(target, limit_s)] += 1
        except FuzzFailure as e:
            counts["FAILURE"] += 1
            failures.append(f"{e} <- seed {index}, {mutations}")

    try:
        one()
    finally:
        os.close(fd)
    return counts, failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="mutated files to parse (default 10000)")
    parser.add_argument("--limit-s", type=float, default=5.0, help="longest one parse may take (default 5 s)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="warmpool-fuzz-") as directory:
        counts, failures = _run(args.examples, args.limit_s, Path(directory))
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    for outcome, n in counts.most_common():
        print(f"{n:8d}  {outcome}")
    print(f"{total} examples in {elapsed:.1f} s ({1e3 * elapsed / max(total, 1):.2f} ms each), "
          f"{len(failures)} failures")
    for failure in failures[:10]:
        print("FAILURE", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
