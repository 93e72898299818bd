"""``warmpool status``: how much of the selection is resident now (a readiness probe)."""

from __future__ import annotations

import argparse
import json

from .._units import format_bytes
from ._common import EXIT_HIDDEN, EXIT_NOT_READY, EXIT_OK, add_model_argument, plan_from


class Command:
    """Report how much of the selection is resident now (a readiness probe with --min-resident).

    Exits 4 when residency cannot be observed: the kernel hides it for a file this process
    neither owns nor may write (Linux >= 5.2)."""

    name = "status"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--min-resident", type=float, metavar="F", help="exit 3 when the resident fraction is below F (0..1)")

    def run(self, args: argparse.Namespace) -> int:
        from .._api import residency

        plan = plan_from(args)
        r = residency(plan.files[0].path, plan=plan)
        verbose = getattr(args, "verbose", False)
        if args.json:
            out = {"path": r.path, "bytes_selected": r.bytes_selected, "bytes_resident": r.bytes_resident,
                   "resident_fraction": r.resident_fraction, "residency_hidden": r.residency_hidden,
                   "files": [f._asdict() for f in r.files]}
            if verbose:
                out["layers"] = [layer._asdict() for layer in r.layers]
            print(json.dumps(out))
        else:
            self._print(r, plan, verbose)
        if r.residency_hidden:
            return EXIT_HIDDEN  # never "ready" on a figure nobody could see
        if args.min_resident is not None and r.resident_fraction < args.min_resident:
            return EXIT_NOT_READY
        return EXIT_OK

    @staticmethod
    def _print(r, plan, verbose: bool) -> None:
        from .._api import hidden_note

        if r.residency_hidden:
            visible = [f for f in r.files if not f.hidden]
            seen = f"; {format_bytes(sum(f.bytes_resident for f in visible))} of the visible files' " \
                   f"{format_bytes(sum(f.bytes_selected for f in visible))} resident" if visible else ""
            print(f"{format_bytes(r.bytes_selected)} selected, residency cannot be observed{seen}: {hidden_note(r.files)}")
        else:
            print(f"{format_bytes(r.bytes_resident)} of {format_bytes(r.bytes_selected)} selected resident ({r.resident_fraction:.1%})")
        if verbose:
            for layer in r.layers:
                name = {-1: "input", plan.n_layers: "output"}.get(layer.layer, f"blk.{layer.layer}")
                got = "hidden" if layer.bytes_resident is None else format_bytes(layer.bytes_resident)
                print(f"  {name:<8} {got:>12} / {format_bytes(layer.bytes_selected):>12}")
