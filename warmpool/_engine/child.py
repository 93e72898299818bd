"""Run an engine as a child and keep its model warm beside it (``warmpool run``).

The engine starts at once, with warmpool's stdin, stdout, stderr and environment.  warmpool's
own part (resolving the model, planning, the first warm, keeping) runs in a thread beside it, at
SCHED_IDLE once it has imported the platform layer (its first statement; nothing of the
pipeline is imported before the spawn): its imports and plan, and the threads it starts, take
only CPU time the loading engine leaves (docs/beside-engine.md).  If it fails, the failure is
reported once and the engine keeps running.  SIGINT, SIGTERM and
SIGHUP sent to warmpool are passed on to the engine, except those the terminal sent to the
whole foreground process group (``si_code == SI_KERNEL``), which the engine got already: a
second Ctrl-C makes llama-server quit without its clean shutdown.  warmpool exits with the
engine's status, 128 + N when the engine died of signal N.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable, Sequence

from .._errors import WarmpoolError

__all__ = ["FORWARDED", "run_engine"]

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_SI_KERNEL = 0x80  # siginfo si_code of a signal the kernel sent (the terminal's Ctrl-C, hang-up)


class _Once:
    """Report warmpool's first failure, and only that one."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.report, self.done, self.lock = report, False, threading.Lock()

    def __call__(self, message: str) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        self.report(f"{message}; the engine keeps running")


def run_engine(argv: Sequence[str], start_warmpool: Callable[[Callable[[str], None], int], Callable[[], None] | None],
               report: Callable[[str], None]) -> int:
    """Start ``argv``; call ``start_warmpool(fail, engine_pid)`` in a thread beside it, which
    returns a stop function (or None); wait for the engine, passing signals on; return its exit
    status."""
    blocked = {*FORWARDED, signal.SIGCHLD}

    def unblock() -> None:  # the engine must not inherit warmpool's blocked signals
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        try:
            child = subprocess.Popen(list(argv), preexec_fn=unblock)  # noqa: PLW1509 - no threads yet
        except OSError as e:
            raise WarmpoolError(f"cannot start the engine: {e.strerror}", argv[0]) from None
        fail = _Once(report)
        stop: list[Callable[[], None] | None] = [None]
        finished = threading.Event()

        def warmpool_part() -> None:
            from .. import _platform  # after the spawn: the engine's start waits on no import of ours

            _platform.lower_priority()  # per thread; the threads it starts inherit it
            try:
                stopper = start_warmpool(fail, child.pid)
            except Exception as e:  # noqa: BLE001 - any failure of ours must leave the engine alone
                fail(f"{e}" if isinstance(e, WarmpoolError) else f"{type(e).__name__}: {e}")
                return
            stop[0] = stopper
            if finished.is_set() and stopper:  # the engine ended while we were starting
                stopper()

        thread = threading.Thread(target=warmpool_part, name="warmpool-run", daemon=True)
        thread.start()
        status = _wait(child)
        finished.set()
        if stop[0]:
            stop[0]()
        thread.join(timeout=5.0)
        return status if status >= 0 else 128 - status
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _wait(child: subprocess.Popen) -> int:
    waited = {*FORWARDED, signal.SIGCHLD}
    while True:
        status = child.poll()
        if status is not None:
            return status
        info = signal.sigtimedwait(waited, 1.0)  # SIGCHLD also comes for warm workers: poll again
        if info is None or info.si_signo == signal.SIGCHLD:
            continue
        if info.si_code != _SI_KERNEL:
            try:
                child.send_signal(info.si_signo)
            except ProcessLookupError:
                pass
