"""``warmpool fleet``: warm, status or evict on every node of a Ray cluster, one table."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from .._errors import WarmpoolError
from .._units import format_bytes
from ._common import EXIT_ERROR, EXIT_OK, add_log_format, add_selection_arguments, selection_from

ACTIONS = ("warm", "status", "evict")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


class Command:
    """Warm, check or evict a model on every node of a Ray cluster (one pinned task per node).

    MODEL is resolved on each node: a reference (ollama:NAME, hf:ORG/REPO) in that node's stores;
    '~' and $VARS expand in the node's environment (quote them).
    Exit 0 when every node succeeded (for status with --min-resident: every node at or above
    it), else 1 naming the failing nodes.  Needs the ray extra: pip install 'warmpool[ray]'.
    """

    name = "fleet"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from ..fleet import DEFAULT_TIMEOUT  # the module imports Ray only when it runs

        parser.add_argument("action", choices=ACTIONS, help="what every node does")
        parser.add_argument("model", help="the model on each node: a GGUF path (any shard) or a model reference")
        add_selection_arguments(parser)
        parser.add_argument("--address", default="auto", metavar="ADDR|auto", help="the Ray cluster (default auto: $RAY_ADDRESS, then the local cluster)")
        parser.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                            help="report nodes silent this long as failed (default %s)"
                                 % ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TIMEOUT.items()))
        parser.add_argument("--min-resident", type=_fraction, metavar="F", help="warm, status: a node below F (0..1), or unknown, fails")
        parser.add_argument("--json", action="store_true", help='print {"nodes": [...]}, one object per node')
        add_log_format(parser)

    def run(self, args: argparse.Namespace) -> int:
        from .. import fleet
        from . import _logs

        log = _logs.start("fleet", args.log_format, verbose=getattr(args, "verbose", False))  # stderr: stdout has the table
        if args.action == "evict" and args.min_resident is not None:
            raise WarmpoolError("--min-resident applies to fleet warm and fleet status, not evict")
        selection = selection_from(args)._asdict()
        options = dict(timeout=args.timeout, **selection)
        if args.action != "evict":
            options["min_resident"] = args.min_resident
        # Ray's driver prints cluster events (a node marked dead...) to stdout: keep stdout for
        # the table or the JSON, and let those lines go to the log (stderr).
        with contextlib.redirect_stdout(sys.stderr if args.log_format == "text" else _logs.LineWriter(log, source="ray")):
            rows = getattr(fleet, args.action)(args.model, args.address, **options)
        if args.json:
            print(json.dumps({"nodes": [row._asdict() for row in rows]}))
        else:
            print(_table(rows))
        for row in rows:  # one record per node, for a log collector (the table is for people)
            line = f"fleet {args.action}: node {row.node_id[:12]} ({row.node_ip}): {row.error or 'ok'}"
            (log.info if row.ok else log.warning)(line, action=args.action, **row._asdict())
        bad = fleet.failed(rows)
        if not bad:
            return EXIT_OK
        names = "; ".join(f"{r.node_id[:12]} ({r.node_ip}): {r.error}" for r in bad)
        log.note(f"fleet {args.action} failed on {len(bad)} of {len(rows)} nodes: {names}", error=True)
        return EXIT_ERROR


def _table(rows) -> str:
    head = ("node", "address", "selected", "resident", "seconds", "GB/s", "error")
    lines = [head]
    for r in rows:
        if r.bytes_resident is not None and r.resident_fraction is not None:
            resident = f"{format_bytes(r.bytes_resident)} ({r.resident_fraction:.1%})"
        else:
            resident = "-" if r.bytes_selected is None else "unknown"
        rate = r.bytes_warmed / r.seconds / 1e9 if r.bytes_warmed is not None and r.seconds else None
        lines.append((r.node_id[:12], r.node_ip, "-" if r.bytes_selected is None else format_bytes(r.bytes_selected),
                      resident, "-" if r.seconds is None else f"{r.seconds:.2f}",
                      "-" if rate is None else f"{rate:.2f}", r.error or ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join(("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1]).rstrip() for line in lines)
