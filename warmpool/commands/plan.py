"""``warmpool plan``: which tensors an engine with these flags keeps on the CPU, and the chunks."""

from __future__ import annotations

import argparse
import json

from .._units import format_bytes
from ._common import (
    EXIT_OK,
    add_model_argument,
    plan_from,
    plan_summary,
    selection_text,
)


class Command:
    """Show which tensors an engine with these flags keeps on the CPU, and the warm plan."""

    name = "plan"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--profile", metavar="FILE", help="order the chunks as warm --profile FILE does (hottest experts first)")
        parser.add_argument("--experts", action="store_true",
                            help="each (layer, expert)'s byte ranges in the stacked expert tensors (with --json: all of them)")

    def run(self, args: argparse.Namespace) -> int:
        plan = plan_from(args)
        if args.profile:
            from .._experts.order import order_by_profile

            plan = order_by_profile(plan, args.profile)
        summary = plan_summary(plan, selection_text(args, plan.selection))
        if args.experts:
            return _experts(plan, summary, args.json)
        if args.json:
            summary["chunk_table"] = [c._asdict() for c in plan.chunks]
            print(json.dumps(summary))
            return EXIT_OK
        files = summary["files"]
        _head(plan, summary, f"{format_bytes(summary['tensor_bytes_total'])} of tensors")
        print(f"\n{'category':<18} {'tensors':>15} {'tensor bytes selected / total':>30}")
        for name, row in summary["categories"].items():
            if row["tensors_total"]:
                tensors = f"{row['tensors_selected']} / {row['tensors_total']}"
                print(f"{name:<18} {tensors:>15} {format_bytes(row['tensor_bytes_selected']):>14} / {format_bytes(row['tensor_bytes_total']):>12}")
        tensors = f"{summary['tensors_selected']} / {summary['tensors_total']}"
        print(f"{'total':<18} {tensors:>15} {format_bytes(summary['tensor_bytes_selected']):>14} / {format_bytes(summary['tensor_bytes_total']):>12}")
        print(f"\nplan       {len(plan.chunks)} chunks of at most {format_bytes(plan.chunk_size)}, {format_bytes(summary['bytes_selected'])} selected (whole pages), {len(files)} file(s)")
        return EXIT_OK



def _head(plan, summary: dict, size: str) -> None:
    """The model, its shape and the selection: the first three lines of either table."""
    files = summary["files"]
    print(f"model      {files[0]['path']}" + (f" (+{len(files) - 1} shards)" if len(files) > 1 else ""))
    print(f"           {plan.layout.architecture or '?'}, {plan.n_layers} layers, {size}")
    print(f"selection  {summary['selection']}")


def _experts(plan, summary: dict, as_json: bool) -> int:
    """``plan --experts``: the selected expert slices, in full as JSON, as one line per layer."""
    from .._errors import LayoutError
    from .._experts.slices import expert_slices, n_experts

    n = n_experts(plan.layout)
    if not n:
        raise LayoutError("no stacked expert tensors (blk.N.ffn_{gate,up,down,gate_up}_{ch,}exps): "
                          "--experts needs a MoE model", plan.files[0].path)
    slices = expert_slices(plan.layout, {t.name for t in plan.selected})
    if as_json:
        summary["n_experts"] = n
        summary["expert_slices"] = [{"layer": s.layer, "expert": s.expert, "bytes": s.nbytes,
                                     "ranges": [list(r) for r in s.ranges]} for s in slices]
        print(json.dumps(summary))
        return EXIT_OK
    _head(plan, summary, f"{n} experts per layer")
    if not slices:
        print("\nno expert tensor is on the CPU with this selection")
        return EXIT_OK
    layers = sorted({s.layer for s in slices})
    print(f"\n{len(slices)} expert slices in {len(layers)} layers, {format_bytes(sum(s.nbytes for s in slices))}; "
          "expert e of a stacked tensor is bytes [offset + e*S, offset + (e+1)*S)")
    print(f"\n{'layer':>5} {'experts':>7} {'bytes/expert':>12}  {'tensor':<24} {'offset':>14} {'S':>10}")
    by_layer = {}
    for s in slices:
        by_layer.setdefault(s.layer, []).append(s)
    names = {(t.file, t.offset): t.name for t in plan.selected}
    for layer in layers:
        first = by_layer[layer][0]
        for k, (file, start, end) in enumerate(first.ranges):
            head = f"{layer:>5} {len(by_layer[layer]):>7} {format_bytes(first.nbytes):>12}" if k == 0 else " " * 26
            name = names.get((file, start), "?").removeprefix(f"blk.{layer}.")
            print(f"{head}  {name:<24} {start:>14} {end - start:>10}")
    return EXIT_OK
