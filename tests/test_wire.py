"""The worker channel speaks multiprocessing.connection's framing (both directions), and ends
with EOFError when the other end closes."""

import socket
import threading
from multiprocessing.connection import Connection

import pytest

from warmpool._pool.wire import Channel, wait


def _pair():
    a, b = socket.socketpair()
    return a.detach(), b.detach()


@pytest.mark.parametrize("size", [0, 100, 16384, 16385, 3_000_000])
def test_channel_and_connection_understand_each_other(size):
    ours, theirs = _pair()
    chan, conn = Channel(ours), Connection(theirs)
    message = ("job", b"x" * size, list(range(size // 1000)))
    try:
        sender = threading.Thread(target=chan.send, args=(message,))  # large ones block until read
        sender.start()
        assert conn.recv() == message
        sender.join()
        sender = threading.Thread(target=conn.send, args=(message,))
        sender.start()
        assert chan.recv() == message
        sender.join()
    finally:
        chan.close()
        conn.close()


def test_wait_reports_a_message_and_an_end_of_file():
    (a, b), (c, d) = _pair(), _pair()
    quiet, talker = Channel(a), Channel(c)
    peer_quiet, peer_talker = Channel(b), Channel(d)
    try:
        assert wait([quiet, talker], 0.01) == []
        peer_talker.send(("done", 3))
        assert wait([quiet, talker], 1) == [talker]
        assert talker.recv() == ("done", 3)
        peer_quiet.close()
        assert wait([quiet, talker], 1) == [quiet]
        with pytest.raises(EOFError):
            quiet.recv()
    finally:
        for ch in (quiet, talker, peer_quiet, peer_talker):
            ch.close()
