"""``warmpool keep``: warm, then keep the selection resident for as long as an engine runs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from .._errors import WarmpoolError
from .._keep.keeper import HOLD_MODES, reporting_note
from .._units import format_bytes
from ._common import (
    EXIT_OK,
    Bar,
    add_log_format,
    add_model_argument,
    add_warm_arguments,
    plan_from,
    resolve_budget,
    resolve_ref,
    selection_from,
    size_arg,
)


class Command:
    """Warm the selection, then keep it resident: check every --interval, re-warm what the
    kernel evicted, optionally mlock it (--lock), serve /metrics, /ready and /status (--listen).

    Runs until SIGTERM/SIGINT (exit 0) or until the --for-pid process ends.
    """

    name = "keep"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser, many=True)
        add_warm_arguments(parser)
        parser.add_argument("--interval", type=float, default=10.0, metavar="SECONDS", help="seconds between residency checks (default 10)")
        parser.add_argument("--lock", action="store_true", help="mlock the selection in plan order (as much as RLIMIT_MEMLOCK allows without CAP_IPC_LOCK)")
        parser.add_argument("--hold", choices=HOLD_MODES, default="map", help="how pages are kept from looking idle: map (default) holds a populated mapping and marks its resident pages accessed every --refresh seconds, touch also reads a byte of every resident page once per --refresh seconds, spread over them, none only re-warms")
        parser.add_argument("--refresh", type=float, default=1.0, metavar="SECONDS", help="how often the held pages are marked accessed, and with --hold touch the length of each touch pass (default 1; spaced out to stay under 2%% of a core; 0: never)")
        parser.add_argument("--listen", metavar="HOST:PORT", help="serve GET /metrics, /ready and /status")
        parser.add_argument("--min-resident", type=float, default=0.99, metavar="F", help="/ready answers 200 from this resident fraction (default 0.99)")
        parser.add_argument("--for-pid", type=int, metavar="PID", help="exit 0 when this process ends")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar for the first warm")
        parser.add_argument("--json", action="store_true", help="print one JSON event per line on stdout (the log then goes to stderr)")
        add_log_format(parser)
        parser.add_argument("--headroom", type=size_arg, metavar="SIZE", help="memory left free for the engine under the memory cgroup's limit and RAM (default: the larger of 512M and 10%% of the limit); what is held shrinks to stay under it")
        parser.add_argument("--profile", metavar="FILE", help="expert ranking to start from (if the file exists), written every minute and at exit (docs/profile.md)")
        parser.add_argument("--readahead", type=size_arg, metavar="SIZE", help="set the model's block device read_ahead_kb to SIZE for the run and put the old value back at exit (root; e.g. 128K when the model does not fit: each miss then reads 128 KiB, not 8 MiB)")

    def run(self, args: argparse.Namespace) -> int:
        from .. import _platform
        from .._keep.keeper import Keeper
        from . import _logs

        if args.workers is not None and args.workers < 1:
            raise WarmpoolError(f"--workers must be at least 1, got {args.workers}")
        if args.for_pid is not None and not _platform.pid_alive(args.for_pid):
            raise WarmpoolError(f"--for-pid {args.for_pid}: no such process")
        if not 0 <= args.min_resident <= 1:
            raise WarmpoolError(f"--min-resident must be in [0, 1], got {args.min_resident}")
        from .._gguf.layout import read_layout
        from .._plan import make_plan

        if args.engine:  # model and placement from the engine's command line after --
            plans = [plan_from(args)]
        else:
            selection = selection_from(args)
            plans = [make_plan(read_layout(m), selection, args.chunk_size) for m in _models(args)]
        if args.readahead is not None:
            _check_readahead([p.files[0].path for p in plans])
        # The log is keep's output on stdout, unless --json gives stdout to the event stream.
        log = _logs.start("keep", args.log_format, sys.stderr if args.json else sys.stdout, prefix="",
                          verbose=getattr(args, "verbose", False))
        bars: list[Bar] = []
        tty = not (args.no_progress or args.json) and sys.stderr.isatty()

        def on_warm_start(segment: str) -> None:
            for bar in bars:
                bar.stop()
            bars.append(Bar(tty))
            bars[-1].start(segment)

        def on_event(event: dict) -> None:
            for bar in bars if event["event"] != "started" else ():
                bar.stop()
            if args.json:
                print(json.dumps(event), flush=True)
            else:
                level = {"error": log.error, "backoff": log.warning}.get(event["event"], log.info)
                level(_describe(event), **event)

        keeper = Keeper(plans, interval=args.interval, lock=args.lock, min_resident=args.min_resident,
                        listen=args.listen, workers=args.workers, strategy=args.strategy,
                        budget=resolve_budget(args.budget), force=args.force, on_event=on_event,
                        hold=args.hold, refresh=args.refresh, for_pid=args.for_pid, on_warm_start=on_warm_start if tty else None,
                        headroom=args.headroom, profile=args.profile, readahead=args.readahead)
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            keeper.start()
            while not stop.wait(0.1) and not keeper.wait(0):
                pass
        finally:
            keeper.stop()
            for bar in bars:
                bar.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return EXIT_OK


def _check_readahead(paths: list[str]) -> None:
    """--readahead needs to write the device's sysfs file: say so before anything starts."""
    from .. import _platform

    for path in paths:
        found = _platform.read_ahead(os.stat(path).st_dev)
        if found is not None and not os.access(found.path, os.W_OK):
            raise WarmpoolError(f"--readahead: cannot write {found.path} (needs root and a writable /sys)")


def _models(args: argparse.Namespace) -> list[str]:
    if args.example:
        from ..example import example_model

        return [str(example_model()), *args.model]
    if not args.model:
        raise WarmpoolError("no model given: pass one or more GGUF paths or --example")
    # A directory names every model in it (docs/stores.md); a name is looked up in the stores.
    return [path for ref in args.model for path in (_directory_models(ref) or [resolve_ref(ref)])]


def _directory_models(ref: str) -> list[str]:
    from .._stores.resolve import models_in

    return [m.paths[0] for m in models_in(ref)] if os.path.isdir(ref) and not ref.lower().endswith(".gguf") else []


def _describe(event: dict) -> str:
    """One human line per event."""
    kind = event["event"]
    model = event.get("model", "")
    if kind == "started":
        where = f", serving http://{event['address']}" if event.get("address") else ""
        refresh = f", marking held pages accessed every {event['refresh']:g} s" if event.get("refresh") else ""
        line = f"keep: keeping {len(event['models'])} model(s), checking every {event['interval']:g} s{refresh}{where}"
        if event.get("free_page_reporting") is not None:
            line += f"\nkeep: note: {reporting_note(event['free_page_reporting'])}"
        return line
    if kind == "warmed":
        fraction = event["resident_fraction"]
        shown = "unknown (hidden)" if fraction is None else f"{fraction:.1%}"
        return f"keep: {model}: warmed {format_bytes(event['bytes_warmed'])} in {event['seconds']:.2f} s; {shown} resident"
    if kind == "rewarmed":
        return f"keep: {model}: re-warmed {format_bytes(event['bytes_rewarmed'])} ({event['chunks']} chunks evicted) in {event['seconds']:.2f} s"
    if kind == "locked":
        line = f"keep: {model}: locked {format_bytes(event['bytes_locked'])} of {format_bytes(event['bytes_selected'])}"
        if event.get("partial"):
            limit = event.get("memlock_limit")
            line += (f" (mlock: {event['error']}; RLIMIT_MEMLOCK {format_bytes(limit) if limit else 'unlimited'};"
                     f" fix: {event['fix']})")
        return line
    if kind == "backoff":
        return f"keep: {model}: backing off for {event['seconds']:g} s: {event['reason']}"
    if kind == "replaced":
        what = "deleted" if event.get("deleted") else "re-planned from the new file" if event.get("replanned") else "replaced"
        return f"keep: {model}: model file {what}"
    if kind == "error":
        return f"keep: {model}: {event['message']}" if model else f"keep: {event['message']}"
    if kind == "partial":
        line = (f"keep: {model}: the selection ({format_bytes(event['bytes_selected'])}) does not fit ({event['reason']}): "
                f"holding {format_bytes(event['bytes_kept'])}")
        if event.get("experts_total") and event.get("profile"):
            line += (f": the dense tensors ({format_bytes(event['bytes_dense'])}) and {event['experts_held']} of "
                     f"{event['experts_total']} experts, hottest first (the profile's ranking)")
        elif event.get("experts_total"):
            line += (f": the dense tensors ({format_bytes(event['bytes_dense'])}) while it learns which of the "
                     f"{event['experts_total']} experts the engine reads, then the hottest")
        else:
            line += " in plan order"
        return line
    if kind == "readahead":
        factor = event.get("read_multiplier_estimate")
        line = f"keep: {model}: misses read {event['read_ahead_kb']} KiB around each fault (read_ahead_kb of {event['device']})"
        if factor:
            line += (f", an expert range is {format_bytes(event['expert_range_bytes'])}: about {factor:g}x the bytes "
                     "a miss needs (an estimate)")
        if not event.get("set_by_keeper") and event["read_ahead_kb"] > 128:
            line += f"; fix: {event['fix']}"
        return line
    if kind == "readahead_set":
        return (f"keep: read_ahead_kb of {event['device']} set to {event['read_ahead_kb']} (was {event['previous_kb']}) "
                f"for the run; it applies to {event['applies_to']}: start the engine after this line")
    if kind == "readahead_restored":
        return f"keep: {event['path']} put back to {event['read_ahead_kb']}"
    if kind == "shrunk":
        return (f"keep: {model}: memory is short ({event['reason']}): holding {format_bytes(event['bytes_kept'])} "
                f"(was {format_bytes(event['bytes_kept_before'])}), locked {format_bytes(event['bytes_locked'])} "
                f"(was {format_bytes(event['bytes_locked_before'])}), {event['experts_dropped']} coldest experts let go")
    if kind == "reranked":
        return (f"keep: {model}: re-ranked: {event['experts_added']} experts in, {event['experts_dropped']} out; "
                f"{event['experts_held']} held")
    return f"keep: stopped ({event.get('reason', '')})"
