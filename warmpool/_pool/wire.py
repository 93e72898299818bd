"""Both ends of the socket between the coordinator and a worker, without ``multiprocessing``.

Importing ``multiprocessing.connection`` (with ``tempfile``, ``random``, ``shutil``,
``socket``...) took ~11 ms, about a quarter of a worker's start-up before its first fault, and
the same again in the coordinator before it could start the first worker
(docs/performance.md, "Pool size and start-up").  Only sending, receiving and waiting are needed, so this
module does them with the framing of ``multiprocessing.connection.Connection`` (CPython's
``_send_bytes``/``_recv_bytes``, Lib/multiprocessing/connection.py): each message is a pickle
preceded by its length as a signed 32-bit big-endian integer, or by -1 and a 64-bit length when
it does not fit.  A worker can therefore still be driven through a ``Connection``.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
from collections.abc import Sequence

__all__ = ["Channel", "wait"]

_LONG = 0x7FFFFFFF


class Channel:
    """``send``/``recv``/``close`` on a connected socket's fd, as ``Connection`` frames them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, obj: object) -> None:
        data = pickle.dumps(obj)
        n = len(data)
        header = struct.pack("!i", n) if n <= _LONG else struct.pack("!iQ", -1, n)
        self._write(header + data if n <= 16384 else header)
        if n > 16384:
            self._write(data)

    def recv(self) -> object:
        (n,) = struct.unpack("!i", self._read(4))
        if n == -1:
            (n,) = struct.unpack("!Q", self._read(8))
        return pickle.loads(self._read(n))

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def _read(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            part = os.read(self.fd, left)
            if not part:  # the other end closed (a worker died, or its coordinator)
                raise EOFError("got end of file during message" if left < n else "end of file")
            parts.append(part)
            left -= len(part)
        return b"".join(parts)


def wait(channels: Sequence[Channel], timeout: float | None) -> list[Channel]:
    """The channels with a message or an end of file to read, after at most ``timeout`` s
    (None: until one has)."""
    poller = select.poll()
    for c in channels:
        poller.register(c.fd, select.POLLIN)
    ready = {fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)}
    return [c for c in channels if c.fd in ready]
