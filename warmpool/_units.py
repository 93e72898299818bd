"""Sizes as people write them ("64M", "1.5GiB", "1.7GB", "80%") and as we print them."""

from __future__ import annotations

import re

__all__ = ["DEFAULT_CHUNK_SIZE", "format_bytes", "parse_size"]

# 16 MiB: two 8 MiB readahead windows per chunk, and a per-chunk overhead (IPC, mmap, mincore)
# small against the chunk's I/O; still enough chunks per model to balance the workers and to
# mark a large MoE layer ready in several steps (docs/performance.md, "Pool size and start-up").
DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024

_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(I?B)?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, *, total: int | None = None) -> int:
    """Bytes from a size as GNU coreutils (``dd``, ``truncate -s``) read it; the one parser.

    * ``4096``, ``4096B``: bytes.  An ``int`` is taken as bytes.
    * ``64K``, ``1.5G``, ``2T`` and ``64KiB``, ``1.5GiB``: powers of 1024 (memory sizes, as
      ``--budget 8G`` means).
    * ``64KB``, ``1.7GB``: powers of 1000 (disk and download sizes).
    * ``80%``: that share of ``total``, when one is given.

    Letters are case-insensitive.  Raises ValueError (argparse turns it into a usage error) for
    anything else.
    """
    if isinstance(text, int):
        return text
    text = str(text).strip()
    if text.endswith("%") and total is not None:
        pct = float(text[:-1])
        if not 0 < pct <= 100:
            raise ValueError(f"percentage must be in (0, 100]: {text!r}")
        return int(total * pct / 100)
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64M, 1.5GiB, 1.7GB)")
    number, unit, suffix = m.groups()
    base = 1000 if suffix and suffix.upper() == "B" else 1024
    return int(float(number) * base ** _POWERS[(unit or "").upper()])


def format_bytes(n: float) -> str:
    """Binary units with two decimals: 1.62 GiB, 512.00 MiB, 12 B."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
