"""``warmpool run [options] [MODEL] -- ENGINE ARGS...``: start the engine, warm and keep its model."""

from __future__ import annotations

import argparse
import sys

from .._units import format_bytes
from ._common import UsageError, add_log_format, add_model_argument, budget_syntax, resolve_budget, say


class Command:
    """Start an engine (its command line after --) and keep its model warm while it runs.

    The model and placement come from the engine's command line (or MODEL and warmpool's flags).
    The engine starts at once with warmpool's stdin, stdout, stderr and environment; the first
    warm runs beside its start-up, then the model is kept resident until the engine exits.
    SIGINT, SIGTERM and SIGHUP are passed on; warmpool exits with the engine's status.
    """

    name = "run"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser)
        parser.add_argument("--listen", metavar="HOST:PORT", help="serve the keeper's GET /metrics, /ready and /status")
        parser.add_argument("--interval", type=float, default=10.0, metavar="SECONDS", help="seconds between residency checks (default 10)")
        parser.add_argument("--lock", action="store_true", help="mlock the selection (as RLIMIT_MEMLOCK allows)")
        parser.add_argument("--min-resident", type=float, default=0.99, metavar="F", help="/ready answers 200 from this resident fraction")
        parser.add_argument("--workers", type=int, metavar="N", help="worker processes for warms")
        parser.add_argument("--budget", type=budget_syntax, metavar="SIZE|PCT", help="most bytes to warm")
        parser.add_argument("--force", action="store_true", help="ignore the memory budget")
        parser.add_argument("--json", action="store_true", help="print the keeper's events, one JSON object per line, on stderr")
        add_log_format(parser)

    def run(self, args: argparse.Namespace) -> int:
        from .._engine.args import parse_engine
        from .._engine.child import run_engine

        if not args.engine:
            raise UsageError("run needs the engine's command line after --, e.g. warmpool run -- llama-server -m MODEL")
        if not (args.model or args.example or parse_engine(args.engine).model):
            raise UsageError("no model in the engine command line (-m, -hf, LLAMA_ARG_MODEL, --model) and none given")
        budget = resolve_budget(args.budget) if args.budget else None

        def start(fail, engine_pid):
            # In warmpool's thread, once the engine is started (at SCHED_IDLE: ``run_engine``): its
            # start never waits on our imports.
            from . import _logs

            log = _logs.start("run", args.log_format, verbose=getattr(args, "verbose", False))  # stderr: stdout is the engine's
            return _keep(args, budget, fail, log, engine_pid)

        return run_engine(args.engine, start, lambda line: say(line, error=True))


def _keep(args: argparse.Namespace, budget: int | None, fail, log, engine_pid: int):
    """warmpool's part: plan, then keep (the first warm runs in the keeper's thread)."""
    import json

    from ._common import plan_from

    plan = plan_from(args)
    command = getattr(args, "engine_command", None)
    if command is not None and not command.reads_page_cache:
        say("the model is warmed once for the engine's load; it is not kept")

    def on_event(event: dict) -> None:
        if args.json:
            print(json.dumps(event), file=sys.stderr, flush=True)
        elif event.get("event") == "started" and event.get("free_page_reporting") is not None:
            from .._keep.keeper import reporting_note

            log.note(f"note: {reporting_note(event['free_page_reporting'])}")
        elif event.get("event") == "warmed":
            share = event.get("resident_fraction")
            log.note(f"warmed {format_bytes(event.get('bytes_warmed') or 0)} of {format_bytes(event.get('bytes_selected') or 0)} "
                     f"selected; {'unknown' if share is None else f'{share:.1%}'} resident", **event)
        if event.get("event") == "error":
            fail(f"keeping {plan.files[0].path}: {event.get('message')}")

    if command is not None and not command.reads_page_cache:
        from .._api import warm

        result = warm(plan.files[0].path, plan=plan, workers=args.workers, budget=budget, force=args.force,
                      beside_engine=True, engine_pid=engine_pid)
        on_event({"event": "warmed", **result._asdict()})
        return None
    from .._keep.keeper import Keeper

    keeper = Keeper([plan], interval=args.interval, lock=args.lock, min_resident=args.min_resident,
                    listen=args.listen, workers=args.workers, budget=budget, force=args.force, on_event=on_event,
                    beside_engine=True, engine_pid=engine_pid)  # the engine is loading the model now (docs/beside-engine.md)
    keeper.start()
    return keeper.stop
