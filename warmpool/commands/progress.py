"""``warmpool progress``: follow a warm from another process by its segment name."""

from __future__ import annotations

import argparse
import json

from .._errors import ProgressError
from .._units import format_bytes
from ._common import EXIT_ERROR, EXIT_OK, POLL, Bar


class Command:
    """Follow a warm from another process by its shared-memory segment name."""

    name = "progress"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("segment", help="the name printed by `warmpool warm --detach` (or Warmup.shm_name)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--follow", action="store_true", help="draw a bar until the warm ends")

    def run(self, args: argparse.Namespace) -> int:
        from .._progress.segment import ProgressView
        from .._progress.shm import is_unnamed

        if is_unnamed(args.segment):
            raise ProgressError("an unnamed segment (/dev/shm was unusable): only the warming process can read it", args.segment)
        with ProgressView.attach(args.segment) as view:
            if args.follow:
                bar = Bar(not args.json)
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
