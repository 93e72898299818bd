"""Start worker processes by forking one that has already imported the worker.

A worker started as its own ``python -I -S`` spends ~57 ms of CPU on the interpreter and its
imports before its first read (``typing``, ``ctypes``, ``re``... ; ~14 ms of it the bare
interpreter).  A warm starts two per CPU and may grow to sixteen, on the CPUs its workers then
need to copy pages: at 6.9 GB the first bulk read came 0.21-0.29 s after the CLI started,
against 0.12-0.13 s for ``vmtouch -t`` (docs/performance.md, "Fork server").  So a warm starts
one interpreter, the fork server, which imports ``worker`` and then forks each worker on
request: 0.7-1.1 ms from the request to the server's answer here (median of 10 about 0.9 ms).

Forking is safe here and not in the caller: the server is a fresh interpreter of ours with one
thread, whereas the caller may be an engine with many (``coordinator``, "Launch").

Protocol, over one socket pair.  The coordinator sends one byte with the worker's end of its
channel as ``SCM_RIGHTS``; the server forks, the child closes the server's fds and serves its
channel (``worker.serve``), and the server answers ``("pid", pid)``.  The server reaps its
children as they exit (``SIGCHLD`` through a wakeup fd) and sends ``("exit", pid, code)``, the
code as ``subprocess`` gives it (``-N`` for signal N).  At the end of file on its socket it
reaps what is left and exits.  The server runs in its own session, so a terminal's Ctrl-C
reaches the coordinator alone, as it did when each worker had its own.

A server may be started before the pool exists (``prestart``): the CLI's warm starts one before
it reads the header and plans, so the interpreter and the worker's imports (~25 ms) run beside
that work instead of before the first read.  It is named ``/warmpool-<pid>-pool`` for ``ps``
(the segment it will serve does not exist yet), and the next pool of the process that needs no
fd passed to it takes it; ``discard_prestarted`` kills one that was not taken (a warm with
nothing cold, an error).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from .wire import Channel, wait

__all__ = ["ForkServer", "Forked", "SERVER_CODE", "discard_prestarted", "prestart", "serve_forks", "take_prestarted"]

# argv: socket fd, the segment name (so `ps` shows which warm the server and its workers belong
# to; every worker is a fork of it and shows the same argv), import path
SERVER_CODE = ("import sys; sys.path[:0] = sys.argv[3:]; from warmpool._pool import forkserver; "
               "forkserver.serve_forks(int(sys.argv[1]))")


# How long the coordinator waits for the server's report of a worker seen to have exited.
REPORT_S = 1.0


def serve_forks(fd: int) -> None:
    """The server's loop (see module doc).  Imports the worker first: every fork inherits it."""
    from . import worker

    # The caller's blocked signals came with the exec (``warmpool run`` blocks SIGCHLD in the
    # thread that starts the pool): unblocked, or no SIGCHLD would wake this loop to reap.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    control = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler, so the wakeup fd is written
    signal.set_wakeup_fd(wake_w)
    channel = Channel(control.fileno())
    try:
        while True:
            ready = wait([channel, Channel(wake_r)], None)
            if any(c.fd == wake_r for c in ready):
                os.read(wake_r, 4096)
                _reap(channel, block=False)
            if any(c.fd == channel.fd for c in ready):
                try:
                    _, fds, _, _ = socket.recv_fds(control, 1, 1)
                except OSError:
                    fds = []
                if not fds:  # end of file: the coordinator is done (or gone)
                    break
                try:
                    pid = os.fork()
                except OSError as e:  # refused (memory, process limit): the coordinator says why
                    os.close(fds[0])
                    _send(channel, ("refused", e.strerror or str(e)))
                    continue
                if pid == 0:
                    _child(worker, fds[0], (control.fileno(), wake_r, wake_w))
                os.close(fds[0])
                _send(channel, ("pid", pid))
    finally:
        signal.set_wakeup_fd(-1)
        _reap(channel, block=True)
    os._exit(0)  # as a worker does: nothing here needs the interpreter's teardown


def _child(worker, fd: int, server_fds: tuple[int, ...]) -> None:
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for f in server_fds:
            os.close(f)
        worker.serve(fd)  # ends the process itself
        code = 0
    finally:
        os._exit(code)


def _reap(channel: Channel, block: bool) -> None:
    """Reap exited children and report each; ``block``: until none is left."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(channel, ("exit", pid, os.waitstatus_to_exitcode(status)))


def _send(channel: Channel, message: tuple) -> None:
    try:
        channel.send(message)
    except OSError:
        pass  # the coordinator went away: the end of file ends the loop


class Forked:
    """A forked worker, with what the coordinator used of ``subprocess.Popen``."""

    def __init__(self, pid: int, server: ForkServer) -> None:
        self.pid, self.server = pid, server
        # Signals go through a pidfd where there is one: the server reaps a worker that exits at
        # once, and its pid alone could then name another process.
        self.pidfd: int | None = None  # None: no pidfds here (Linux < 5.3); -1: it is gone
        if hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(pid)
            except OSError:  # exited and reaped already
                self.pidfd = -1

    def kill(self) -> None:
        if self.server.codes.get(self.pid) is not None or self.pidfd == -1:
            return  # exited: nothing to kill
        try:
            if self.pidfd is None:
                os.kill(self.pid, signal.SIGKILL)
            else:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code (None: unknown); ``subprocess.TimeoutExpired`` if it has not exited in
        ``timeout`` s.  Its end is seen on the pidfd, which turns readable when it exits, so a
        server that cannot report (gone, or stuck) never holds the coordinator here."""
        if self.pidfd is None or self.pidfd < 0:
            return self.server.exit_code(self.pid, timeout)
        if not wait([Channel(self.pidfd)], timeout):
            import subprocess

            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
        import subprocess

        try:
            return self.server.exit_code(self.pid, REPORT_S)
        except subprocess.TimeoutExpired:  # it ended; how is unknown
            return None

    def close(self) -> None:
        if self.pidfd is not None and self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class ForkServer:
    """The coordinator's end: start the server, fork workers, learn how they ended."""

    def __init__(self, name: str, shared_fds: tuple[int, ...] = ()) -> None:
        """``name``: the progress segment's (for ``ps``); ``shared_fds`` stay open in the server
        and so in every worker (an unnamed progress segment)."""
        import subprocess  # the coordinator's side alone: 4 ms the server would pay before its first fork

        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", SERVER_CODE, str(theirs.fileno()), name, *_import_path()],
                pass_fds=(theirs.fileno(), *shared_fds), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.channel = Channel(ours.fileno())
        self.codes: dict[int, int | None] = {}  # pid -> exit code, None while it runs (or unknown)
        self.gone = False  # the server's socket reached its end: no more codes will come

    def fork(self, fd: int) -> Forked:
        """A new worker serving channel ``fd`` (the caller keeps and closes its copy of ``fd``).
        OSError if the fork was refused (its reason) or the server is gone, EOFError if gone."""
        socket.send_fds(self.sock, [b"s"], [fd])
        while (message := self._next()) is not None:
            if message[0] == "refused":
                raise OSError(message[1])
            if message[0] == "pid":
                self.codes[message[1]] = None
                return Forked(message[1], self)
        raise EOFError("the fork server is gone")

    def _next(self) -> tuple | None:
        """The server's next message, an exit recorded on the way; None once it is gone."""
        try:
            message = self.channel.recv()
        except (EOFError, OSError):  # the server died: init reaps its children
            self.gone = True
            return None
        if message[0] == "exit":
            self.codes[message[1]] = message[2]
        return message

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """Worker ``pid``'s exit code, None if the server died first (unknown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.codes.get(pid) is None and not self.gone:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and (left <= 0 or not wait([self.channel], left)):
                import subprocess

                raise subprocess.TimeoutExpired(f"worker {pid}", timeout)
            self._next()
        return self.codes.get(pid)

    def close(self, timeout: float = 2.0) -> None:
        """End the server (after its workers): it reaps what is left and exits; killed if it has
        not within ``timeout`` s (0: at once, for one that may still be starting)."""
        import subprocess

        self.sock.close()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_prestarted: ForkServer | None = None


def prestart() -> None:
    """Start a fork server now for this process's next pool (see the module doc); a failure
    to start it is left for that pool to meet and report."""
    global _prestarted
    if _prestarted is None:
        try:
            _prestarted = ForkServer(f"/warmpool-{os.getpid()}-pool")
        except OSError:
            pass


def take_prestarted() -> ForkServer | None:
    """The server ``prestart`` started, if it is still running; it is then the caller's."""
    global _prestarted
    server, _prestarted = _prestarted, None
    if server is not None and server.process.poll() is not None:
        server.close()
        return None
    return server


def discard_prestarted() -> None:
    """Kill and reap a prestarted server nobody took (it may still be starting: not waited for)."""
    server = take_prestarted()
    if server is not None:
        server.close(timeout=0)


def _import_path() -> list[str]:
    """Where the server finds warmpool (an editable install is an import hook that -S skips):
    our package's parent first, then the caller's path."""
    package = sys.modules[__name__.partition(".")[0]]  # warmpool itself, imported before any of its modules
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(package.__file__)))
    return [package_parent, *[p for p in sys.path if p and p != package_parent]]
