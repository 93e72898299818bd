"""Subcommands that touch the page cache: warm, status, evict, progress."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading

from ._cli import EXIT_ERROR, EXIT_NOT_READY, EXIT_OK, add_model_argument, model_path, plan_from, selection_from
from ._errors import ProgressError, WarmpoolError
from ._units import format_bytes, parse_size

__all__ = ["EvictCommand", "ProgressCommand", "StatusCommand", "WarmCommand"]

STRATEGY_CHOICES = ("auto", "populate", "touch", "read", "willneed")
POLL = 0.1  # seconds between progress-bar refreshes


class _Bar:
    """A tqdm bar fed from the shared-memory counters, as any other process could read them."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, segment_name: str) -> None:
        if not self.enabled:
            return
        from ._progress import ProgressView

        view = ProgressView.attach(segment_name)  # before the unlink: the mapping outlives it
        self.thread = threading.Thread(target=self._draw, args=(view,), daemon=True)
        self.thread.start()

    def _draw(self, view) -> None:
        from tqdm import tqdm

        with view, tqdm(total=view.snapshot().total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                        desc="warming", file=sys.stderr, leave=False) as bar:
            while True:
                finished = self.stopped.wait(POLL)
                snap = view.snapshot()
                bar.update(snap.done_bytes - bar.n)
                if finished or snap.finished:
                    return

    def stop(self) -> None:
        self.stopped.set()
        if self.thread:
            self.thread.join()


def _budget_syntax(text: str) -> str:
    """Check --budget at parse time (a usage error, exit 2); resolve percentages later."""
    try:
        parse_size(text, total=100)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _budget(text: str | None) -> int | None:
    if text is None:
        return None
    if text.strip().endswith("%"):
        from ._policy import memory_figures

        m = memory_figures()
        return parse_size(text, total=min(m.total, m.cgroup_limit or m.total))
    return parse_size(text)


class WarmCommand:
    """Fault the selected tensors into the page cache with worker processes, then verify.

    Honours WARMPOOL_PREFAULT (0 skips, 1 forces) and a RAM budget (80% of RAM or the cgroup
    limit, within what is available); what does not fit stays cold and is reported.
    """

    name = "warm"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser)
        parser.add_argument("--workers", type=int, metavar="N", help="worker processes (default: grow while throughput rises)")
        parser.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto", help="how pages are faulted in (default auto: populate where the kernel has it)")
        parser.add_argument("--budget", type=_budget_syntax, metavar="SIZE|PCT", help="most bytes to read, e.g. 8G or 50%%")
        parser.add_argument("--force", action="store_true", help="ignore the memory budget")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
        parser.add_argument("--detach", action="store_true", help="warm in the background; print the progress segment's name")
        parser.add_argument("--linger", type=float, default=0.0, help=argparse.SUPPRESS)
        parser.add_argument("--report-segment", action="store_true", help=argparse.SUPPRESS)

    def run(self, args: argparse.Namespace) -> int:
        from ._log import enable_cli_logging
        from ._warm import warm

        if args.workers is not None and args.workers < 1:
            raise WarmpoolError(f"--workers must be at least 1, got {args.workers}")
        if args.detach:
            return _detach(args)
        enable_cli_logging(getattr(args, "verbose", False))
        budget = _budget(args.budget) if args.budget else None
        plan = plan_from(args)
        if args.example:
            _show_cold_start(plan)
        bar = _Bar(not (args.no_progress or args.json or args.quiet or args.report_segment) and sys.stderr.isatty())

        def on_start(name: str) -> None:
            if args.report_segment:  # tell the detaching parent, then go quiet
                _report_to_parent(name)
            bar.start(name)

        try:
            result = warm(plan.files[0].path, plan=plan, workers=args.workers, strategy=args.strategy,
                          budget=budget, force=args.force, on_start=on_start, linger=args.linger)
        finally:
            bar.stop()
        if args.report_segment:
            _report_to_parent(f"- {result.reason}")
        if args.json:
            print(json.dumps(result._asdict()))
        elif not args.quiet:
            print(result.summary())
        return EXIT_OK


def _show_cold_start(plan) -> None:
    """The built-in example starts from a cold cache so the warm has something to show."""
    from ._warm import evict, residency

    evict(plan.files[0].path, plan=plan)
    before = residency(plan.files[0].path, plan=plan)
    print(f"example    {plan.files[0].path}")
    print(f"           evicted; {before.resident_fraction:.1%} of {format_bytes(before.bytes_selected)} selected resident before the warm")


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
    selection = selection_from(args)
    argv = ["warm", os.path.abspath(model_path(args)), "--chunk-size", str(args.chunk_size), "--strategy", args.strategy]
    if selection.n_gpu_layers is not None:
        argv += ["-ngl", str(selection.n_gpu_layers)]
    argv += [f"--override-tensor={pattern}={buft}" for pattern, buft in selection.rules]  # order kept
    argv += ["--workers", str(args.workers)] if args.workers else []
    argv += ["--budget", args.budget] if args.budget else []
    argv += ["--force"] if args.force else []
    cmd = [sys.executable, "-m", "warmpool", *argv, "--no-progress", "--quiet", "--report-segment", "--linger", "10"]
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True, text=True)
    line = child.stdout.readline().strip()
    child.stdout.close()
    if not line:
        code = child.wait()
        raise WarmpoolError(f"the detached warm exited with status {code} before starting (run it without --detach to see why)")
    if line.startswith("- "):
        print(f"nothing to warm in the background: {line[2:]}", file=sys.stderr)
        return EXIT_OK
    print(line)
    return EXIT_OK


class StatusCommand:
    """Report how much of the selection is resident now (a readiness probe with --min-resident)."""

    name = "status"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--min-resident", type=float, metavar="F", help="exit 3 when the resident fraction is below F (0..1)")

    def run(self, args: argparse.Namespace) -> int:
        from ._warm import residency

        plan = plan_from(args)
        r = residency(plan.files[0].path, plan=plan)
        if args.json:
            out = {"path": r.path, "bytes_selected": r.bytes_selected, "bytes_resident": r.bytes_resident,
                   "resident_fraction": r.resident_fraction}
            if getattr(args, "verbose", False):
                out["layers"] = [layer._asdict() for layer in r.layers]
            print(json.dumps(out))
        else:
            print(f"{format_bytes(r.bytes_resident)} of {format_bytes(r.bytes_selected)} selected resident ({r.resident_fraction:.1%})")
            if getattr(args, "verbose", False):
                for layer in r.layers:
                    name = {-1: "input", plan.n_layers: "output"}.get(layer.layer, f"blk.{layer.layer}")
                    print(f"  {name:<8} {format_bytes(layer.bytes_resident):>12} / {format_bytes(layer.bytes_selected):>12}")
        if args.min_resident is not None and r.resident_fraction < args.min_resident:
            return EXIT_NOT_READY
        return EXIT_OK


class EvictCommand:
    """Drop the selection's pages from the page cache (posix_fadvise DONTNEED)."""

    name = "evict"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        from ._warm import evict

        plan = plan_from(args)
        left = evict(plan.files[0].path, plan=plan)
        note = " (pages mapped or locked by running processes stay)" if left else ""
        print(f"evicted {format_bytes(plan.bytes_planned)} selected; {format_bytes(left)} still resident{note}")
        return EXIT_OK


class ProgressCommand:
    """Follow a warm from another process by its shared-memory segment name."""

    name = "progress"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("segment", help="the name printed by `warmpool warm --detach` (or Warmup.shm_name)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--follow", action="store_true", help="draw a bar until the warm ends")

    def run(self, args: argparse.Namespace) -> int:
        from ._progress import ProgressView

        with ProgressView.attach(args.segment) as view:
            if args.follow:
                bar = _Bar(not args.json)
                bar.start(args.segment)
                while not view.snapshot().finished and not view.abandoned():
                    bar.stopped.wait(POLL)
                bar.stop()
            snap = view.snapshot()
            state = "abandoned" if view.abandoned() else snap.state
        if args.json:
            print(json.dumps({"done_bytes": snap.done_bytes, "total_bytes": snap.total_bytes, "state": state}))
        else:
            print(f"{format_bytes(snap.done_bytes)} of {format_bytes(snap.total_bytes)}, {state}")
        if args.follow and state != "done":
            raise ProgressError(f"the warm ended {state}", args.segment)
        return EXIT_OK if state != "abandoned" else EXIT_ERROR
