"""The block device's read-ahead, for a keeper whose selection does not fit: which device
multiplies every miss and by how much (``readahead_note``), and ``--readahead`` set for the run
and put back on every way out (``DeviceReadAhead``).  Why: docs/keep.md, "When the model does
not fit".
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .. import _platform
from .._errors import WarmpoolError
from .model import KeptModel

__all__ = ["DeviceReadAhead", "readahead_note"]


def readahead_note(model: KeptModel, set_by_keeper: bool) -> dict | None:
    """Which device's read-ahead multiplies what an engine reads per miss, by how much (an
    estimate), and the fix; None where the model is on no device with a read-ahead."""
    try:
        device = os.stat(model.path).st_dev
    except OSError:
        return None
    found = _platform.read_ahead(device)
    if found is None:
        return None
    hot = model.hot
    # One miss faults one page of one expert range; mmap read-around reads read_ahead_kb
    # around it (do_sync_mmap_readahead), of which the range itself is at most its size.
    piece = max(c.length for c in hot.chunks(next(iter(hot.slices)))) if hot is not None and hot.total else None
    window = max(found.kb * 1024, _platform.PAGE_SIZE)
    factor = window / min(piece, window) if piece else None
    return dict(device=found.device, path=found.path, read_ahead_kb=found.kb, expert_range_bytes=piece,
                read_multiplier_estimate=None if factor is None else round(factor, 1),
                set_by_keeper=set_by_keeper,
                fix=f"echo 128 > {found.path}  (or: warmpool keep --readahead 128K; applies to files "
                    "opened afterwards: start the engine after it)")


class DeviceReadAhead:
    """``--readahead``: the devices' read_ahead_kb this keeper set, and their old values."""

    def __init__(self, emit: Callable[..., None]) -> None:
        self._emit = emit
        self._restore: list[tuple[str, int]] = []  # (read_ahead_kb file, old value) to put back

    def set(self, paths: list[str], size: int) -> None:
        """Set read_ahead_kb of every model file's block device for the run (root only)."""
        kb = max(size // 1024, 0)
        for path in paths:
            found = _platform.read_ahead(os.stat(path).st_dev)
            if found is None:
                raise WarmpoolError(f"--readahead: {path} is on no block device with a read-ahead setting")
            if any(done == found.path for done, _ in self._restore):
                continue
            try:
                _platform.set_read_ahead_kb(found.path, kb)
            except WarmpoolError as e:
                self.restore()
                raise WarmpoolError(f"--readahead: cannot write {found.path}: {e} (needs root and a writable /sys)") from None
            self._restore.append((found.path, found.kb))
            # The kernel copies it into a file at open(): an engine running already (--for-pid)
            # keeps the old value for the model it has open.
            self._emit("readahead_set", device=found.device, path=found.path, read_ahead_kb=kb, previous_kb=found.kb,
                       applies_to="files opened from now on")

    def restore(self) -> None:
        """Put back every read_ahead_kb this keeper changed; safe to call twice."""
        while self._restore:
            path, kb = self._restore.pop()
            try:
                _platform.set_read_ahead_kb(path, kb)
                self._emit("readahead_restored", path=path, read_ahead_kb=kb)
            except WarmpoolError as e:
                self._emit("error", message=f"could not restore {path} to {kb}: {e}")
