"""``warmpool status``: how much of the selection is resident now (a readiness probe)."""

from __future__ import annotations

import argparse
import json

from .._units import format_bytes
from ._common import EXIT_NOT_READY, EXIT_OK, add_model_argument, plan_from


class Command:
    """Report how much of the selection is resident now (a readiness probe with --min-resident)."""

    name = "status"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--min-resident", type=float, metavar="F", help="exit 3 when the resident fraction is below F (0..1)")

    def run(self, args: argparse.Namespace) -> int:
        from .._warm import residency

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
