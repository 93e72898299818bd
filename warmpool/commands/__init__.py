"""The ``warmpool`` command: one module per subcommand, the shared pieces in ``_common``.

Each subcommand module has a class with ``name``, ``add_arguments(parser)`` and ``run(args)``;
its docstring is its help.  Only :func:`main` maps errors to exit codes: 0 ok, 1 bad input or
I/O error (one line on stderr naming the file, a traceback only with ``-v``), 2 usage,
3 ``status`` below ``--min-resident``, 4 ``status`` cannot observe residency (the kernel
hides it), 130 interrupted, 143 terminated.  Heavy imports (numpy, tqdm, gguf) stay out of
these modules' top level so that a warm of an already-resident
model answers in well under 0.3 s.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence

from .._errors import WarmpoolError
from ._common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    UsageError,
    model_flags,
)

__all__ = ["build_parser", "main"]


# In the order ``warmpool --help`` lists them; each module has a ``Command`` class.
COMMANDS = ("plan", "warm", "status", "evict", "progress", "keep", "listing", "run", "fleet")  # listing.py: a module named list would shadow the builtin here
_MODULE_OF = {"list": "listing"}  # command name -> module, where they differ


def _commands(only: str | None = None) -> list:
    import importlib

    names = COMMANDS if only is None else (_MODULE_OF.get(only, only),)
    return [importlib.import_module(f".{name}", __name__).Command() for name in names]


def _named_command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names, when that is plain (the first word, after -v at most)."""
    for word in argv:
        if word not in ("-v", "--verbose"):
            # a module name that differs from its command's ("listing") is no command
            known = word in _MODULE_OF or (word in COMMANDS and word not in _MODULE_OF.values())
            return word if known else None
    return None


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The parser; with ``only``, one subcommand's alone: importing every command module (the
    fleet, engine-argument and store modules with them) cost a cold warm ~12 ms before its first
    worker started (docs/performance.md, "Pool size and start-up")."""
    parser = argparse.ArgumentParser(prog="warmpool", description="Warm the page cache with the parts of a GGUF model an engine keeps on the CPU.")
    parser.add_argument("-v", "--verbose", action="store_true", help="more detail, and tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"warmpool {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for command in _commands(only):
        doc = command.__doc__.strip()
        p = sub.add_parser(command.name, help=_first_sentence(doc), description=doc)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="more detail, and tracebacks on errors")
        command.add_arguments(p)
        commands[command.name] = command
    return parser, commands


def _first_sentence(doc: str) -> str:
    """A docstring's first sentence on one line (``--help`` lists one per command)."""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def _version() -> str:
    from .._version import __version__

    return __version__


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool its reader left


def _terminate(signum, frame):
    raise SystemExit(EXIT_TERMINATED)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return its exit code.  SIGTERM's default action skips every
    ``finally`` (a killed warm would leave its workers and /dev/shm segment behind), so while
    this runs SIGTERM unwinds like Ctrl-C; the caller's handler is put back afterwards."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _split_engine(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``warmpool CMD [options] -- ENGINE ARGS...``: what follows the first ``--`` is the engine's
    own command line, kept whole (argparse would read its flags as warmpool's)."""
    if "--" not in argv:
        return argv, None
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def _main(argv: Sequence[str] | None) -> int:
    argv, engine = _split_engine(list(sys.argv[1:] if argv is None else argv))
    parser, commands = build_parser(_named_command(argv))
    try:
        args = parser.parse_args(argv)
        if engine is not None and not hasattr(args, "engine"):
            parser.error(f"{args.command} takes no engine command line (nothing after --)")
        if engine is not None:
            args.engine = engine
    except SystemExit as e:  # argparse: 0 for --help, 2 for usage errors
        return int(e.code or 0)
    try:
        if hasattr(args, "model_flag"):
            model_flags(args)
        return commands[args.command].run(args)
    except KeyboardInterrupt:
        print("warmpool: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (warmpool plan ... | head): as a C tool would end
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing to flush at exit
        return EXIT_BROKEN_PIPE
    except WarmpoolError as e:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"warmpool: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_ERROR
