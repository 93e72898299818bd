"""The ``warmpool`` command: one small class per subcommand, its help in the docstring.

Only :func:`main` maps errors to exit codes: 0 ok, 1 bad input or I/O error (one line on
stderr naming the file, a traceback only with ``-v``), 2 usage, 3 ``status`` below
``--min-resident``, 130 interrupted.  Heavy imports (numpy, tqdm, loguru, gguf) stay out of
this module so that a warm of an already-resident model answers in well under 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import traceback
from collections.abc import Sequence

from ._errors import WarmpoolError
from ._layout import read_layout
from ._plan import DEFAULT_CHUNK_SIZE, Plan, make_plan
from ._select import CATEGORIES, Selection, category, moe_overrides, parse_overrides
from ._units import format_bytes, parse_size

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_READY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process it terminated


class _OrderedRule(argparse.Action):
    """Collect -ot / --cpu-moe / --n-cpu-moe in command-line order, as llama.cpp applies them."""

    def __call__(self, parser, namespace, values, option_string=None):
        rules = list(getattr(namespace, "rules", None) or [])
        try:
            if self.dest == "override_tensor":
                rules += parse_overrides([values])
            elif self.dest == "cpu_moe":
                rules += moe_overrides(cpu_moe=True)
            else:
                rules += moe_overrides(n_cpu_moe=values)
        except WarmpoolError as e:
            parser.error(str(e))
        namespace.rules = rules
        setattr(namespace, self.dest, True if self.dest == "cpu_moe" else values)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("selection (llama.cpp's flags; default: every tensor, a CPU-only engine)")
    group.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, metavar="N", help="layers offloaded to the GPU")
    group.add_argument("--cpu-moe", nargs=0, action=_OrderedRule, help="keep every MoE expert tensor on the CPU")
    group.add_argument("--n-cpu-moe", type=int, metavar="N", action=_OrderedRule, help="keep the experts of the first N layers on the CPU")
    group.add_argument("-ot", "--override-tensor", metavar="PATTERN=BUFT[,...]", action=_OrderedRule, help="regex=buffer type; CPU keeps, any other moves off (repeatable)")
    parser.set_defaults(rules=[], cpu_moe=False, n_cpu_moe=None, override_tensor=None)


def selection_from(args: argparse.Namespace) -> Selection:
    # With only the MoE shortcuts, keep them as flags (readable in output); with -ot too, the
    # ordered rule list reproduces llama.cpp's first-match-wins over the command-line order.
    if args.override_tensor is None:
        return Selection(args.n_gpu_layers, bool(args.cpu_moe), args.n_cpu_moe or 0).validate()
    return Selection(args.n_gpu_layers, overrides=tuple(args.rules)).validate()


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="a GGUF file (any shard of a split model)")
    parser.add_argument("--example", action="store_true", help="use the built-in example MoE model (generated once)")
    parser.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE, metavar="SIZE", help="largest chunk a worker takes (default 16M)")
    add_selection_arguments(parser)


def model_path(args: argparse.Namespace) -> str:
    if args.example:
        from ._example import example_model

        return str(example_model())
    if not args.model:
        raise WarmpoolError("no model given: pass a GGUF path or --example")
    return args.model


def plan_from(args: argparse.Namespace) -> Plan:
    selection = selection_from(args)  # a bad flag is reported before the file is read
    return make_plan(read_layout(model_path(args)), selection, args.chunk_size)


def plan_summary(plan: Plan) -> dict:
    """The machine-readable description of a plan, shared by ``plan --json`` and others."""
    layout = plan.layout
    by_category = {c: {"tensors_total": 0, "tensors_selected": 0, "bytes_total": 0, "bytes_selected": 0} for c in CATEGORIES}
    selected = {t.name for t in plan.selected}
    for t in layout.tensors:
        row = by_category[category(t.name)]
        row["tensors_total"] += 1
        row["bytes_total"] += t.nbytes
        if t.name in selected:
            row["tensors_selected"] += 1
            row["bytes_selected"] += t.nbytes
    return {
        "files": [{"path": f.path, "size": f.size} for f in layout.files],
        "architecture": layout.architecture,
        "n_layers": layout.n_layers,
        "selection": plan.selection.describe(),
        "tensors_total": len(layout.tensors),
        "tensors_selected": len(plan.selected),
        "bytes_total": layout.nbytes,
        "bytes_selected": plan.bytes_selected,
        "bytes_planned": plan.bytes_planned,
        "chunk_size": plan.chunk_size,
        "chunks": len(plan.chunks),
        "categories": by_category,
    }


class PlanCommand:
    """Show which tensors an engine with these flags keeps on the CPU, and the warm plan."""

    name = "plan"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def run(self, args: argparse.Namespace) -> int:
        plan = plan_from(args)
        summary = plan_summary(plan)
        if args.json:
            summary["chunk_table"] = [c._asdict() for c in plan.chunks]
            print(json.dumps(summary))
            return EXIT_OK
        files = summary["files"]
        print(f"model      {files[0]['path']}" + (f" (+{len(files) - 1} shards)" if len(files) > 1 else ""))
        print(f"           {plan.layout.architecture or '?'}, {plan.n_layers} layers, {format_bytes(summary['bytes_total'])} of tensors")
        print(f"selection  {summary['selection']}")
        print(f"\n{'category':<18} {'tensors':>15} {'bytes selected / total':>30}")
        for name, row in summary["categories"].items():
            if row["tensors_total"]:
                tensors = f"{row['tensors_selected']} / {row['tensors_total']}"
                print(f"{name:<18} {tensors:>15} {format_bytes(row['bytes_selected']):>14} / {format_bytes(row['bytes_total']):>12}")
        tensors = f"{summary['tensors_selected']} / {summary['tensors_total']}"
        print(f"{'total':<18} {tensors:>15} {format_bytes(summary['bytes_selected']):>14} / {format_bytes(summary['bytes_total']):>12}")
        print(f"\nplan       {len(plan.chunks)} chunks of at most {format_bytes(plan.chunk_size)}, {format_bytes(plan.bytes_planned)} of pages, {len(files)} file(s)")
        return EXIT_OK


def _commands() -> list:
    from ._cli_warm import EvictCommand, ProgressCommand, StatusCommand, WarmCommand

    return [PlanCommand(), WarmCommand(), StatusCommand(), EvictCommand(), ProgressCommand()]


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="warmpool", description="Warm the page cache with the parts of a GGUF model an engine keeps on the CPU.")
    parser.add_argument("-v", "--verbose", action="store_true", help="more detail, and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for command in _commands():
        doc = command.__doc__.strip()
        p = sub.add_parser(command.name, help=doc.splitlines()[0], description=doc)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="more detail, and tracebacks on errors")
        command.add_arguments(p)
        commands[command.name] = command
    return parser, commands


def _exit_on_sigterm() -> None:
    """SIGTERM's default action skips every ``finally``: a killed warm would leave its workers
    and its /dev/shm segment behind.  As an exception it unwinds like Ctrl-C does."""
    import signal

    def terminate(signum, frame):
        raise SystemExit(EXIT_TERMINATED)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


def main(argv: Sequence[str] | None = None) -> int:
    _exit_on_sigterm()
    parser, commands = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 0 for --help, 2 for usage errors
        return int(e.code or 0)
    try:
        return commands[args.command].run(args)
    except KeyboardInterrupt:
        print("warmpool: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except WarmpoolError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"warmpool: {e}", file=sys.stderr)
        return EXIT_ERROR
