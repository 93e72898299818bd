"""``warmpool evict``: drop the selection's pages from the page cache."""

from __future__ import annotations

import argparse

from .._units import format_bytes
from ._common import EXIT_OK, add_model_argument, plan_from


class Command:
    """Drop the selection's pages from the page cache (posix_fadvise DONTNEED)."""

    name = "evict"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        from .._api import evict

        plan = plan_from(args)
        left = evict(plan.files[0].path, plan=plan)
        if left is None:
            from .._api import HIDDEN

            print(f"evicted {format_bytes(plan.bytes_planned)} selected; what is still resident is unknown: {HIDDEN}")
            return EXIT_OK
        note = " (pages mapped or locked by running processes stay)" if left else ""
        print(f"evicted {format_bytes(plan.bytes_planned)} selected; {format_bytes(left)} still resident{note}")
        return EXIT_OK
