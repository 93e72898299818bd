"""Sizes as people write them ("64M", "1.5GiB", "80%") and as we print them."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_size"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, *, total: int | None = None) -> int:
    """Bytes from "4096", "64M", "1.5G", "2GiB"; "80%" of ``total`` when one is given.

    Raises ValueError (argparse turns it into a usage error) for anything else.
    """
    text = str(text).strip()
    if text.endswith("%") and total is not None:
        pct = float(text[:-1])
        if not 0 < pct <= 100:
            raise ValueError(f"percentage must be in (0, 100]: {text!r}")
        return int(total * pct / 100)
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64M, 1.5G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_bytes(n: float) -> str:
    """Binary units with two decimals: 1.62 GiB, 512.00 MiB, 12 B."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
