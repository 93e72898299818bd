"""What naming a model by store costs: `warmpool plan REF --json` wall time per reference form.

Builds an Ollama store and a Hugging Face hub cache in a temporary home (hard links to one
synthetic TEST-shaped model), then runs the CLI for each form in rotated order per round and
prints the medians, the ratio to the plain path, and one JSON line.

    python tools/bench_resolve.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout: warmpool and tests.helpers

from tests.helpers.stores import make_hub, make_ollama  # noqa: E402 - the stores the tests build
from warmpool.example import TEST, write_moe_gguf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home, model = Path(tmp) / "home", Path(tmp) / "test.gguf"
        write_moe_gguf(model, TEST)
        make_ollama(home / ".ollama" / "models", model, "registry.ollama.ai", "library", "test", "latest")
        make_hub(home / ".cache" / "huggingface" / "hub", "org/Test-GGUF", {"Test-Q4_K_M.gguf": model})
        env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_MODELS", "HF_HOME", "HF_HUB_CACHE", "LLAMA_CACHE", "XDG_CACHE_HOME")}
        env.update(HOME=str(home), PYTHONPATH=str(ROOT))
        refs = {"path": str(model), "ollama": "test", "hf:": "hf:org/Test-GGUF", "bare hf": "org/Test-GGUF"}
        times: dict[str, list[float]] = {k: [] for k in refs}
        names = list(refs)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "warmpool", "plan", refs[name], "--json"], env=env, capture_output=True)
                times[name].append(time.perf_counter() - start)
                if out.returncode:
                    sys.exit(out.stderr.decode())
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'reference':<10} {'median s':>9} {'vs path':>8}")
    for name, m in medians.items():
        print(f"{name:<10} {m:>9.3f} {m / medians['path']:>7.2f}x")
    print(json.dumps({"bench": "resolve", "rounds": args.rounds, "median_s": medians, "loadavg": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
