"""``warmpool list``: every model in the known stores, with how much of it is resident now."""

from __future__ import annotations

import argparse
import json
import os

from .._units import format_bytes
from ._common import EXIT_OK


class Command:
    """List every model in the known stores, its size and the share of it resident now.

    The stores: Ollama's, the Hugging Face and llama.cpp caches, LM Studio's (or, with DIR, the
    models in those directories).  The share is null where the kernel hides residency.
    """

    name = "list"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("directories", nargs="*", metavar="DIR", help="list the models in these directories instead")
        parser.add_argument("--json", action="store_true", help="print one JSON object per model, one per line")

    def run(self, args: argparse.Namespace) -> int:
        from .._stores.resolve import list_models, models_in

        models = [m for d in args.directories for m in models_in(d)] if args.directories else list_models()
        rows = [_row(m) for m in models]
        if args.json:
            for row in rows:
                print(json.dumps(row))
            return EXIT_OK
        if not rows:
            print("no models found")
            return EXIT_OK
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            share = "hidden" if r["residency_hidden"] else "?" if r["resident_fraction"] is None else f"{r['resident_fraction']:.1%}"
            size = format_bytes(r["size"]) if r["size"] is not None else "?"
            print(f"{r['store']:<16} {r['name']:<{width}} {size:>10} {share:>7} resident  {r['paths'][0]}")
        return EXIT_OK


def _row(model) -> dict:
    """One model's row: None (null) for whatever could not be observed."""
    from .._api import residency
    from .._errors import WarmpoolError

    row = {"store": model.store, "name": model.name, "paths": list(model.paths), "size": None,
           "resident_fraction": None, "residency_hidden": False}
    try:
        row["size"] = sum(os.stat(p).st_size for p in model.paths)
        r = residency(model.paths[0])  # no flags: every tensor of the model
    except (OSError, WarmpoolError) as e:
        row["error"] = str(e)
        return row
    row["residency_hidden"] = r.residency_hidden  # the kernel hides residency from this caller
    row["resident_fraction"] = None if row["residency_hidden"] else r.resident_fraction
    return row
