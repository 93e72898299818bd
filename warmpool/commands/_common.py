"""What the subcommands share: exit codes, the model, selection and log-format arguments, the
plan they name, sizes and budgets, and the progress bar drawn from the shared-memory counters.

The parser is built from this module before ``run`` spawns its engine, so the layout walk and
the plan are imported only where a plan is made (``plan_from``)."""

from __future__ import annotations

import argparse
import sys
import threading

from .._errors import UsageError, WarmpoolError
from .._pool.strategy import STRATEGIES
from .._select import CATEGORIES, Selection, category, moe_overrides, parse_overrides
from .._units import DEFAULT_CHUNK_SIZE, parse_size

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from .._plan import Plan

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_READY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_HIDDEN = 4  # ``status``: the kernel hides residency for a file of the model
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process it terminated


def _write(namespace: argparse.Namespace, option: str, value=None) -> None:
    """Record a placement flag as the user wrote it, for output (``selection`` in plan)."""
    words = [*(getattr(namespace, "written", None) or []), option if value is None else f"{option} {value}"]
    namespace.written = words


class _Layers(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        _write(namespace, option_string, values)
        setattr(namespace, self.dest, values)


class _OrderedRule(argparse.Action):
    """Collect -ot / --cpu-moe / --n-cpu-moe in command-line order, as llama.cpp applies them."""

    def __call__(self, parser, namespace, values, option_string=None):
        _write(namespace, option_string, values if self.dest != "cpu_moe" else None)
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


def size_arg(text: str) -> int:
    """argparse type for a size (16M, 2.5G, 128K): one line naming the option when it is bad."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("selection (llama.cpp's flags; default: every tensor, a CPU-only engine)")
    group.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, metavar="N", action=_Layers, help="layers offloaded to the GPU")
    group.add_argument("--cpu-moe", nargs=0, action=_OrderedRule, help="keep every MoE expert tensor on the CPU")
    group.add_argument("--n-cpu-moe", type=int, metavar="N", action=_OrderedRule, help="keep the experts of the first N layers on the CPU")
    group.add_argument("-ot", "--override-tensor", metavar="PATTERN=BUFT[,...]", action=_OrderedRule, help="regex=buffer type; CPU keeps, any other moves off (repeatable)")
    parser.set_defaults(rules=[], written=[], cpu_moe=False, n_cpu_moe=None, override_tensor=None)


def selection_from(args: argparse.Namespace) -> Selection:
    # With only the MoE shortcuts, keep them as flags (readable in output); with -ot too, the
    # ordered rule list reproduces llama.cpp's first-match-wins over the command-line order.
    if args.override_tensor is None:
        return Selection(args.n_gpu_layers, bool(args.cpu_moe), args.n_cpu_moe or 0).validate()
    return Selection(args.n_gpu_layers, overrides=tuple(args.rules)).validate()


MODEL_HELP = ("a GGUF file (any shard of a split model), a directory holding one, or a store name: "
              "ollama:NAME[:TAG], hf:ORG/REPO[:QUANT], lmstudio:PUBLISHER/REPO[/FILE], or a bare name "
              "(tried as Ollama, Hugging Face, LM Studio); after --, the engine's own command line")


def add_model_argument(parser: argparse.ArgumentParser, *, many: bool = False) -> None:
    if many:  # keep: several models (args.model is a list)
        parser.add_argument("model", nargs="*", help="models: " + MODEL_HELP)
    else:
        parser.add_argument("model", nargs="?", help=MODEL_HELP)
    group = parser.add_argument_group("model, with llama.cpp's flags (instead of MODEL)")
    group.add_argument("-m", "--model", dest="model_flag", metavar="PATH", help="the model file, as llama.cpp's -m")
    group.add_argument("-hf", "-hfr", "--hf-repo", dest="hf_repo", metavar="ORG/REPO[:QUANT]",
                       help="a model in the Hugging Face cache, chosen as llama.cpp's -hf chooses it (offline)")
    group.add_argument("-hff", "--hf-file", dest="hf_file", metavar="FILE", help="with -hf: that file of the repository")
    parser.add_argument("--example", action="store_true", help="use the built-in example MoE model (generated once)")
    parser.add_argument("--chunk-size", type=size_arg, default=DEFAULT_CHUNK_SIZE, metavar="SIZE", help="largest chunk a worker takes (default 16M)")
    add_selection_arguments(parser)
    parser.set_defaults(engine=None)


def model_flags(args: argparse.Namespace) -> None:
    """Fold -m / -hf / -hff into ``args.model``, once (a usage error beside MODEL)."""
    ref = None
    if args.model_flag or args.hf_repo or args.hf_file:
        from .._engine.args import EngineArgsError, model_reference

        try:
            ref = model_reference(args.model_flag, args.hf_repo, args.hf_file)
        except EngineArgsError as e:
            raise UsageError(str(e)) from None
    if ref is None:
        return
    if isinstance(args.model, list):
        args.model = [*args.model, ref]
    elif args.model:
        raise UsageError(f"two models: {args.model} and {ref} (-m/-hf name the model instead of MODEL)")
    else:
        args.model = ref
    args.model_flag = args.hf_repo = args.hf_file = None


def say(line: str, *, error: bool = False) -> None:
    """A note for the user: on stderr, or in the running service's log (``--log-format``)."""
    from . import _logs

    if _logs.current is not None:
        _logs.current.note(line, error=error)
    else:
        print(f"warmpool: {line}", file=sys.stderr)


def target(args: argparse.Namespace) -> tuple[str, Selection]:
    """The model file and the placement the arguments name, worked out once per command: from
    warmpool's own flags, or from the engine command line after ``--`` (docs/engines.md)."""
    if getattr(args, "_target", None):
        return args._target
    if args.engine:  # imported only then: ~4 ms before a cold warm's first worker otherwise
        from .._engine.args import recognized

    # MODEL with an engine warmpool cannot read: placement from warmpool's own flags.
    if args.engine and (recognized(args.engine) or not (args.model or args.example)):
        from .._engine.args import fit_placement, parse_engine

        if args.n_gpu_layers is not None or args.rules:
            raise UsageError("placement flags go either to warmpool or in the engine command line after --, not both")
        command = parse_engine(args.engine)
        args.engine_command = command
        given = args.model if isinstance(args.model, list) else [args.model] if args.model else []
        if len(given) > 1:
            raise UsageError("one model with an engine command line after --")
        ref = given[0] if given else command.model
        if not ref and not args.example:
            raise UsageError("no model in the engine command line (-m, -hf, LLAMA_ARG_MODEL, --model) and none given")
        path = model_path(args, ref)
        notes = list(command.notes)
        selection = command.selection
        if selection is None:
            selection, note = fit_placement(command, path)
            notes.append(note)
        for note in notes:
            say(note)
        selection.validate()
        args.written = list(command.placement)
    else:
        selection = selection_from(args)  # a bad flag is reported before the file is read
        path = model_path(args, args.model)
    args._target = (path, selection)
    return args._target


def model_path(args: argparse.Namespace, ref: str | None = None) -> str:
    """The file to read for the model reference, saying which store it was found in."""
    if args.example:
        from ..example import example_model

        return str(example_model())
    ref = ref or args.model
    if not ref:
        raise WarmpoolError("no model given: pass a GGUF path, a model name or --example")
    return resolve_ref(ref)


def resolve_ref(ref: str) -> str:
    """The file a model reference names (a path as it is), saying which store it was found in."""
    from .._stores.resolve import _resolve

    resolved = _resolve(ref, strict=False)  # a bad path is read_layout's to report
    if resolved.store != "path":
        say(f"{resolved.ref}: {resolved.store} model {resolved.name} at {resolved.paths[0]}")
    return resolved.paths[0]


def selection_text(args: argparse.Namespace, selection: Selection) -> str:
    """The placement flags as the user wrote them (``--n-cpu-moe 2``, not its two regexes)."""
    return " ".join(getattr(args, "written", None) or []) or selection.describe()


def plan_from(args: argparse.Namespace) -> Plan:
    path, selection = target(args)
    from .._gguf.layout import read_layout
    from .._plan import make_plan

    return make_plan(read_layout(path), selection, args.chunk_size)


def plan_summary(plan: Plan, selection: str | None = None) -> dict:
    """``plan --json``: the fields are documented in docs/json.md.  ``bytes_selected`` is the
    selection's page-rounded bytes, as warm, status, keep and fleet report it; ``tensor_bytes_*``
    count tensor data alone."""
    layout = plan.layout
    by_category = {c: {"tensors_total": 0, "tensors_selected": 0, "tensor_bytes_total": 0, "tensor_bytes_selected": 0}
                   for c in CATEGORIES}
    selected = {t.name for t in plan.selected}
    for t in layout.tensors:
        row = by_category[category(t.name)]
        row["tensors_total"] += 1
        row["tensor_bytes_total"] += t.nbytes
        if t.name in selected:
            row["tensors_selected"] += 1
            row["tensor_bytes_selected"] += t.nbytes
    return {
        "files": [{"path": f.path, "size": f.size} for f in layout.files],
        "architecture": layout.architecture,
        "n_layers": layout.n_layers,
        "selection": selection or plan.selection.describe(),
        "tensors_total": len(layout.tensors),
        "tensors_selected": len(plan.selected),
        "bytes_selected": plan.bytes_planned,
        "tensor_bytes_total": layout.nbytes,
        "tensor_bytes_selected": plan.bytes_selected,
        "chunk_size": plan.chunk_size,
        "chunks": len(plan.chunks),
        "categories": by_category,
    }


POLL = 0.1  # seconds between progress-bar refreshes


class Bar:
    """A tqdm bar fed from the shared-memory counters, as any other process could read them."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, segment_name: str) -> None:
        if not self.enabled:
            return
        from .._progress.segment import ProgressView

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


LOG_FORMATS = ("text", "json")  # the services' logs (``_logs``)


def add_log_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text: readable lines (default); json: one JSON object per line, for log collectors")


STRATEGY_CHOICES = ("auto", *STRATEGIES)


def add_warm_arguments(parser: argparse.ArgumentParser) -> None:
    """How a warm reads (warm, keep): workers, strategy, budget, force."""
    parser.add_argument("--workers", type=int, metavar="N", help="worker processes (default: grow while throughput rises)")
    parser.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto", help="how pages are faulted in (default auto: populate where the kernel has it)")
    parser.add_argument("--budget", type=budget_syntax, metavar="SIZE|PCT", help="most bytes to read, e.g. 8G or 50%%")
    parser.add_argument("--force", action="store_true", help="ignore the memory budget")


def budget_syntax(text: str) -> str:
    """Check --budget at parse time (a usage error, exit 2); resolve percentages later."""
    try:
        parse_size(text, total=100)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def resolve_budget(text: str | None) -> int | None:
    if text is None:
        return None
    if text.strip().endswith("%"):
        from .._policy import memory_figures

        m = memory_figures()
        return parse_size(text, total=min(m.total, m.cgroup_limit or m.total))
    return parse_size(text)


