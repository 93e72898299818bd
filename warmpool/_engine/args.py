"""Read the model and its placement from an engine's own command line (docs/engines.md).

llama.cpp's tools (llama-server, llama-cli, llama-bench, ...) parse options as
``common/arg.cpp`` ``common_params_parse_ex`` does: ``LLAMA_ARG_*`` environment variables
first, in the order the options are defined, then the command line; ``--long_name`` is read as
``--long-name``.  ``-ot``, ``--cpu-moe`` and ``--n-cpu-moe`` append to one override list in that
order.  Every other option is skipped with its value(s) (``llama_flags``, generated from
arg.cpp).  ``--flag=value`` is accepted too.  llama-cpp-python's server
(``python -m llama_cpp.server``) takes ``--model``, ``--n_gpu_layers`` (default 0, -1 all),
``--use_mmap`` and ``--use_mlock``, or the same names as environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from .._errors import EngineArgsError, WarmpoolError
from .._select import Selection, moe_overrides, parse_overrides

__all__ = ["EngineArgsError", "EngineCommand", "fit_placement", "model_reference", "parse_engine", "recognized"]


class EngineCommand(NamedTuple):
    engine: str  # "llama.cpp" | "llama-cpp-python"
    model: str | None  # a reference for resolve_model: a path, or hf:REPO[:TAG] / hf:REPO/FILE
    selection: Selection | None  # None: the engine chooses the placement itself (fit)
    reads_page_cache: bool  # False: no mmap, or direct I/O: the engine reads past the page cache
    mlock: bool
    placement: tuple[str, ...]  # the placement flags as given (for llama-fit-params)
    notes: tuple[str, ...]  # what was assumed, one line each


_TRUTHY = ("on", "enabled", "true", "1")  # arg.cpp common_arg_utils::is_truthy
_FALSEY = ("off", "disabled", "false", "0")

# Spellings, canonical name first (common/arg.cpp).
_SPELLINGS = {
    "model": ("-m", "--model"),
    "hf_repo": ("-hf", "-hfr", "--hf-repo"),
    "hf_file": ("-hff", "--hf-file"),
    "ngl": ("-ngl", "--gpu-layers", "--n-gpu-layers"),
    "ot": ("-ot", "--override-tensor"),
    "cmoe": ("-cmoe", "--cpu-moe"),
    "ncmoe": ("-ncmoe", "--n-cpu-moe"),
    "dev": ("-dev", "--device"),
    "mmap": ("--mmap",),
    "no_mmap": ("--no-mmap",),
    "mlock": ("--mlock",),
    "dio": ("-dio", "--direct-io"),
    "no_dio": ("-ndio", "--no-direct-io"),
    "load_mode": ("-lm", "--load-mode"),
    "fit": ("-fit", "--fit"),
}
_BY_SPELLING = {s: key for key, spellings in _SPELLINGS.items() for s in spellings}
_VALUELESS = {"cmoe", "mmap", "no_mmap", "mlock", "dio", "no_dio"}
# Environment variables, in the order arg.cpp defines (and so applies) their options.
_ENV = (("LLAMA_ARG_MLOCK", "mlock"), ("LLAMA_ARG_MMAP", "mmap"), ("LLAMA_ARG_DIO", "dio"),
        ("LLAMA_ARG_LOAD_MODE", "load_mode"), ("LLAMA_ARG_DEVICE", "dev"), ("LLAMA_ARG_OVERRIDE_TENSOR", "ot"),
        ("LLAMA_ARG_CPU_MOE", "cmoe"), ("LLAMA_ARG_N_CPU_MOE", "ncmoe"), ("LLAMA_ARG_N_GPU_LAYERS", "ngl"),
        ("LLAMA_ARG_FIT", "fit"), ("LLAMA_ARG_MODEL", "model"), ("LLAMA_ARG_HF_REPO", "hf_repo"),
        ("LLAMA_ARG_HF_FILE", "hf_file"))


class _State:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.rules: list[tuple[str, str]] = []
        self.placement: list[str] = []
        self.mmap, self.mlock, self.dio = True, False, False

    def apply(self, key: str, value: str | bool) -> None:
        if key in ("ot", "cmoe", "ncmoe"):
            try:
                if key == "ot":
                    self.rules += parse_overrides([value])
                elif key == "cmoe":
                    self.rules += moe_overrides(cpu_moe=True)
                else:
                    self.rules += moe_overrides(n_cpu_moe=_int(value, "--n-cpu-moe"))
            except WarmpoolError as e:
                raise EngineArgsError(str(e)) from None
        elif key in ("mmap", "no_mmap"):
            self.mmap = bool(value) == (key == "mmap")
        elif key in ("dio", "no_dio"):
            self.dio = bool(value) == (key == "dio")
        elif key == "mlock":
            self.mlock = bool(value)
        elif key == "load_mode":  # -lm replaced --mmap/--mlock/-dio in 2026 builds
            mode = str(value)
            if mode not in ("auto", "none", "mmap", "mlock", "mmap+mlock", "dio"):
                raise EngineArgsError(f"-lm/--load-mode: unknown mode {mode!r}")
            self.mmap = mode in ("auto", "mmap", "mmap+mlock")
            self.mlock = "mlock" in mode
            self.dio = mode == "dio"
        else:
            self.values[key] = str(value)


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise EngineArgsError(f"{flag}: expected a number, got {text!r}") from None


# llama-bench (tools/llama-bench/llama-bench.cpp) has its own parser: no environment variables,
# every option but these takes one value, and a value may list several runs ("-ngl 10,20").
_BENCH_VALUELESS = {"-h", "--help", "--version", "--offline", "--list-devices", "-v", "--verbose", "--progress", "--no-warmup"}


def _bench_value(key: str, value: str, notes: list[str]) -> str:
    """The one run of a llama-bench list that keeps the most on the CPU (a superset of the others)."""
    if key == "ot":
        runs = value.split(",")  # runs are comma separated, one run's overrides ";" separated
        first = runs[0].replace(";", ",")
    else:
        runs = value.split(",")
        numbers = [_int(r, "-" + key) for r in runs]
        first = str(min(numbers) if key == "ngl" else max(numbers))
    if len(runs) > 1:
        notes.append(f"llama-bench runs {len(runs)} values of -{key}; warming for {first}")
    return first


def _llama_cpp(argv: Sequence[str], env: Mapping[str, str], bench: bool = False, notes: list[str] | None = None) -> _State:
    from .llama_flags import TAKES_ONE, TAKES_TWO

    state = _State()
    for name, key in () if bench else _ENV:
        negated = name.replace("LLAMA_ARG_", "LLAMA_ARG_NO_")
        if key in ("mmap", "dio") and negated in env:
            state.apply(key, False)
        elif name in env:
            value = env[name]
            if key == "cmoe" and value not in _TRUTHY:
                continue  # a flag's variable acts only when truthy (handler_void)
            state.apply(key, value in _TRUTHY if key in _VALUELESS else value)
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        inline = None
        if arg.startswith("--") and "=" in arg:
            arg, _, inline = arg.partition("=")
        if arg.startswith("--"):
            arg = arg.replace("_", "-")
        key = _BY_SPELLING.get(arg)
        if key in _VALUELESS:
            state.apply(key, True)
            continue
        if bench:
            n = 0 if arg in _BENCH_VALUELESS else 1
        else:
            n = 1 if key else 2 if arg in TAKES_TWO else 1 if arg in TAKES_ONE else 0
        if inline is not None:
            values, n = [inline], n - 1
        else:
            values = []
        if i + n > len(argv):
            raise EngineArgsError(f"{arg}: expected a value")
        values += argv[i : i + n]
        i += n
        if key:
            if bench and key in ("ngl", "ncmoe", "ot", "model"):
                values[0] = values[0].split(",")[0] if key == "model" else _bench_value(key, values[0], notes)
            state.apply(key, values[0])
            if key in ("ngl", "ot", "cmoe", "ncmoe", "dev"):
                state.placement += [arg, values[0]]
    return state


def _llama_cpp_python(argv: Sequence[str], env: Mapping[str, str]) -> _State:
    """llama_cpp/server/cli.py: ``--name VALUE`` per settings field (bools take a value too),
    pydantic BaseSettings reads the same names from the environment (any case)."""
    state = _State()
    lowered = {k.lower(): v for k, v in env.items()}
    values = {name: lowered[name] for name in ("model", "n_gpu_layers", "use_mmap", "use_mlock") if name in lowered}
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith("--"):
            continue
        name, eq, inline = arg[2:].partition("=")
        taken = [inline] if eq else []
        while not eq and i < len(argv) and not argv[i].startswith("--"):  # nargs="*" lists too
            taken.append(argv[i])
            i += 1
        if taken:
            values[name] = taken[0]
    if "model" in values:
        state.values["model"] = values["model"]
    ngl = _int(values.get("n_gpu_layers", "0"), "--n_gpu_layers")
    state.values["ngl"] = str(ngl)
    state.placement += ["-ngl", str(ngl)]
    for name, attr in (("use_mmap", "mmap"), ("use_mlock", "mlock")):
        if name in values:
            text = values[name].strip().lower()
            setattr(state, attr, text in ("1", "on", "t", "true", "y", "yes"))
    return state


def _engine_of(argv: Sequence[str]) -> tuple[str, list[str]]:
    prog = os.path.basename(argv[0])
    if prog.startswith("python") and len(argv) > 2 and argv[1] == "-m" and argv[2] == "llama_cpp.server":
        return "llama-cpp-python", list(argv[3:])
    return "llama.cpp", list(argv[1:])


def recognized(argv: Sequence[str]) -> bool:
    """A command line warmpool knows how to read: a llama.cpp tool or llama-cpp-python's server."""
    return bool(argv) and (_engine_of(argv)[0] == "llama-cpp-python" or os.path.basename(argv[0]).startswith("llama"))


def model_reference(model: str | None, hf_repo: str | None, hf_file: str | None) -> str | None:
    """The model reference llama.cpp's ``-m``, ``-hf ORG/REPO[:QUANT]`` and ``-hff FILE`` name
    (``-m`` when given); ``hf:...`` is looked up in the Hugging Face cache, offline."""
    if model:
        return model
    if hf_repo:
        repo = hf_repo.partition(":")[0]
        return f"hf:{repo}/{hf_file}" if hf_file else f"hf:{hf_repo}"
    if hf_file:
        raise EngineArgsError("-hff/--hf-file without -hf/--hf-repo")
    return None


def parse_engine(argv: Sequence[str], env: Mapping[str, str] | None = None) -> EngineCommand:
    """What the engine started with ``argv`` (and ``env``) will load, and where it places it."""
    if not argv:
        raise EngineArgsError("an empty engine command line after --")
    env = os.environ if env is None else env
    engine, args = _engine_of(argv)
    notes: list[str] = []
    prog = os.path.basename(argv[0])
    if engine == "llama-cpp-python":
        state = _llama_cpp_python(args, env)
    else:
        state = _llama_cpp(args, env, bench=prog.startswith("llama-bench"), notes=notes)
    if engine == "llama.cpp" and not prog.startswith("llama"):
        notes.append(f"{prog}: read as a llama.cpp tool's command line")
    v = state.values
    model = model_reference(v.get("model"), v.get("hf_repo"), v.get("hf_file"))
    selection: Selection | None
    ngl = v.get("ngl", "auto")
    if v.get("dev", "").strip() == "none":
        selection = Selection()  # no device to offload to: everything stays on the CPU
        notes.append("-dev none: the engine keeps the whole model on the CPU")
    elif ngl == "auto" or ngl == "-1" and engine == "llama.cpp":
        if v.get("fit", "on") in _FALSEY:
            selection = Selection(-1, overrides=tuple(state.rules))
            notes.append("-fit off without -ngl: llama.cpp offloads every layer it can")
        else:
            selection = None
    else:
        n = -1 if ngl == "all" else _int(ngl, "-ngl")
        selection = Selection(n, overrides=tuple(state.rules))
    if not state.mmap or state.dio:
        how = "with direct I/O, past the page cache" if state.dio else "into its own memory (no mmap)"
        notes.append(f"the engine reads the model {how}: warming helps its load only, keeping it warm does not help")
    return EngineCommand(engine, model, selection, state.mmap and not state.dio, state.mlock, tuple(state.placement), tuple(notes))


def fit_placement(command: EngineCommand, model_path: str, env: Mapping[str, str] | None = None) -> tuple[Selection, str]:
    """The placement llama.cpp will choose itself (no -ngl: it fits layers to free device memory),
    from ``llama-fit-params`` when it is on PATH; else what a CPU-only run keeps: everything."""
    import shutil
    import subprocess

    tool = shutil.which("llama-fit-params")
    if tool is None:
        return Selection(), ("the engine fits layers to free VRAM itself (no -ngl) and llama-fit-params is not on PATH: "
                             "warming what a CPU-only run keeps (every tensor)")
    cmd = [tool, "-m", model_path, *command.placement]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Selection(), f"llama-fit-params failed ({e}): warming what a CPU-only run keeps (every tensor)"
    line = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
    if not line:
        return Selection(), f"llama-fit-params exited {out.returncode}: warming what a CPU-only run keeps (every tensor)"
    import shlex

    fitted = parse_engine(["llama-fit-params", *shlex.split(line[0])], {})
    selection = fitted.selection or Selection()
    return selection, f"llama-fit-params chose: {line[0]}"
