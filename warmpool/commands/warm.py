"""``warmpool warm``: fault the selection in with worker processes, then verify."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from .._errors import WarmpoolError
from .._pool.strategy import PRIORITIES
from .._units import format_bytes
from ._common import (
    EXIT_OK,
    Bar,
    add_model_argument,
    add_warm_arguments,
    plan_from,
    resolve_budget,
    target,
)


class Command:
    """Fault the selected tensors into the page cache with worker processes, then verify.

    Honours WARMPOOL_PREFAULT (0 skips, 1 forces) and a RAM budget (80% of RAM or the cgroup
    limit, within what is available); what does not fit stays cold and is reported.
    """

    name = "warm"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser)
        add_warm_arguments(parser)
        parser.add_argument("--priority", choices=PRIORITIES, default="normal",
                            help="the workers' CPU priority (idle: only CPU time nothing else wants; default normal)")
        parser.add_argument("--profile", metavar="FILE",
                            help="an expert profile (keep --profile writes one): warm the hottest experts first, after the other tensors")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
        parser.add_argument("--detach", action="store_true", help="warm in the background; print the progress segment's name")
        parser.add_argument("--linger", type=float, default=0.0, help=argparse.SUPPRESS)
        parser.add_argument("--report-segment", action="store_true", help=argparse.SUPPRESS)

    def run(self, args: argparse.Namespace) -> int:
        if args.workers is not None and args.workers < 1:
            raise WarmpoolError(f"--workers must be at least 1, got {args.workers}")
        if args.detach:
            return _detach(args)
        from .._pool.forkserver import discard_prestarted, prestart

        # The pool's fork server starts (~25 ms: an interpreter, the worker's imports) while this
        # process imports the rest, reads the header and plans, not after (docs/performance.md,
        # "Fork server"); one that no pool took is killed on the way out.
        prestart()
        try:
            return _warm(args)
        finally:
            discard_prestarted()


def _warm(args: argparse.Namespace) -> int:
    """The warm itself, inside ``run``'s lifetime of the prestarted fork server."""
    from .._api import warm
    from .._log import enable_cli_logging

    enable_cli_logging(getattr(args, "verbose", False))
    budget = resolve_budget(args.budget) if args.budget else None
    plan = plan_from(args)
    if args.profile:  # a profile that cannot be used is an error: nothing has been warmed yet
        from .._experts.order import order_by_profile

        plan = order_by_profile(plan, args.profile)
    if args.example:
        _show_cold_start(plan, say=not (args.json or args.quiet))
    bar = Bar(not (args.no_progress or args.json or args.quiet or args.report_segment) and sys.stderr.isatty())

    reported = []

    def on_start(name: str) -> None:
        if args.report_segment:  # tell the detaching parent, then go quiet
            _report_to_parent(name)
            reported.append(name)
        bar.start(name)

    try:
        result = warm(plan.files[0].path, plan=plan, workers=args.workers, strategy=args.strategy,
                      budget=budget, force=args.force, on_start=on_start, linger=args.linger,
                      require_name=args.report_segment, priority=args.priority)
    except WarmpoolError as e:
        if args.report_segment and not reported:  # the parent prints why, as its one line
            _report_to_parent(f"! {e}")
        raise
    finally:
        bar.stop()
    if args.report_segment:
        _report_to_parent(f"- {result.reason}")
    if args.json:
        print(json.dumps(result.to_dict()))
    elif not args.quiet:
        print(result.summary())
    return EXIT_OK


def _show_cold_start(plan, say: bool) -> None:
    """The built-in example starts from a cold cache so the warm has something to show; ``say``:
    print so (not with ``--json``, whose output is one JSON object, nor ``--quiet``)."""
    from .._api import evict, residency

    evict(plan.files[0].path, plan=plan)
    if not say:
        return
    before = residency(plan.files[0].path, plan=plan)
    print(f"example    {plan.files[0].path}")
    share = "unknown" if before.resident_fraction is None else f"{before.resident_fraction:.1%}"
    print(f"           evicted; {share} of {format_bytes(before.bytes_selected)} selected resident before the warm")


def _report_to_parent(line: str) -> None:
    """The detached child's one line to its parent; later output goes nowhere."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _detach(args: argparse.Namespace) -> int:
    """Start the same warm in a new session and print its segment name when it has one."""
    path, selection = target(args)
    argv = ["warm", os.path.abspath(path), "--chunk-size", str(args.chunk_size), "--strategy", args.strategy,
            "--priority", args.priority]
    if selection.n_gpu_layers is not None:
        argv += ["-ngl", str(selection.n_gpu_layers)]
    argv += [f"--override-tensor={pattern}={buft}" for pattern, buft in selection.rules]  # order kept
    argv += ["--workers", str(args.workers)] if args.workers else []
    argv += ["--budget", args.budget] if args.budget else []
    argv += ["--force"] if args.force else []
    argv += ["--profile", os.path.abspath(args.profile)] if args.profile else []
    cmd = [sys.executable, "-m", "warmpool", *argv, "--no-progress", "--quiet", "--report-segment", "--linger", "10"]
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True, text=True)
    line = child.stdout.readline().strip()
    child.stdout.close()
    if not line:
        code = child.wait()
        raise WarmpoolError(f"the detached warm exited with status {code} before starting (run it without --detach to see why)")
    if line.startswith("! "):
        child.wait()
        raise WarmpoolError(f"cannot detach: {line[2:]} (a detached warm needs a named segment that `warmpool progress` can open)")
    if line.startswith("- "):
        print(f"nothing to warm in the background: {line[2:]}", file=sys.stderr)
        return EXIT_OK
    print(line)
    return EXIT_OK
