"""``warmpool plan``: which tensors an engine with these flags keeps on the CPU, and the chunks."""

from __future__ import annotations

import argparse
import json

from .._units import format_bytes
from ._common import EXIT_OK, add_model_argument, plan_from, plan_summary, selection_text


class Command:
    """Show which tensors an engine with these flags keeps on the CPU, and the warm plan."""

    name = "plan"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def run(self, args: argparse.Namespace) -> int:
        plan = plan_from(args)
        summary = plan_summary(plan, selection_text(args, plan.selection))
        if args.json:
            summary["chunk_table"] = [c._asdict() for c in plan.chunks]
            print(json.dumps(summary))
            return EXIT_OK
        files = summary["files"]
        print(f"model      {files[0]['path']}" + (f" (+{len(files) - 1} shards)" if len(files) > 1 else ""))
        print(f"           {plan.layout.architecture or '?'}, {plan.n_layers} layers, {format_bytes(summary['tensor_bytes_total'])} of tensors")
        print(f"selection  {summary['selection']}")
        print(f"\n{'category':<18} {'tensors':>15} {'tensor bytes selected / total':>30}")
        for name, row in summary["categories"].items():
            if row["tensors_total"]:
                tensors = f"{row['tensors_selected']} / {row['tensors_total']}"
                print(f"{name:<18} {tensors:>15} {format_bytes(row['tensor_bytes_selected']):>14} / {format_bytes(row['tensor_bytes_total']):>12}")
        tensors = f"{summary['tensors_selected']} / {summary['tensors_total']}"
        print(f"{'total':<18} {tensors:>15} {format_bytes(summary['tensor_bytes_selected']):>14} / {format_bytes(summary['tensor_bytes_total']):>12}")
        print(f"\nplan       {len(plan.chunks)} chunks of at most {format_bytes(plan.chunk_size)}, {format_bytes(summary['bytes_selected'])} selected (whole pages), {len(files)} file(s)")
        return EXIT_OK


