"""A warm's progress, readable from any process: a POSIX shared-memory segment of counters.

``shm`` (create, map, unlink a named object) -> ``segment`` (the byte layout, writers and
``ProgressView``).  docs/progress-protocol.md documents the layout for readers in other languages.
"""
