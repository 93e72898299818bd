"""The warm itself: worker processes fault a plan's chunks into the page cache.

``lifetime`` (one warm: its progress segment, the pool, settle and unlink) -> ``coordinator``
(hands chunks to workers in plan order over ``wire`` sockets, grows and retires the pool) ->
``worker`` (a worker process: ``threads`` fault blocks in, ``reread`` settles what was read).
``strategy`` names the ways a worker faults pages in and the CPU priorities it runs at.

Nothing is imported here: a worker process imports ``warmpool._pool.worker`` alone.
"""
