"""The real engine for tools/overram_bench.py ``--engine llama``: llama.cpp (llama-cpp-python)
decoding one token at a time from a model mapped as llama.cpp maps it.

    python tools/lib/llama_decode.py MODEL --seconds 40 --warmup 20 [--threads 2]   # one JSON line

Prints the fields the stand-in (tests/helpers/moe_engine.py ``run``) prints: each measured
token's seconds, the window, the tokens of the warm-up, the disk bytes this process read in the
window (/proc/self/io), and ``bytes_per_token_needed`` as null: which experts a real router
picks is not visible from outside, so what a token needs is not known here.  ``load_s`` is the
time ``Llama()`` took (its loader maps the file and faults it in before the first token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from proc_stats import read_bytes  # tools/lib, this script's own directory


def decode(path: str, seconds: float, warmup_s: float, threads: int) -> dict:
    import llama_cpp

    started = time.monotonic()
    llm = llama_cpp.Llama(path, n_ctx=256, n_batch=1, n_threads=threads, n_threads_batch=threads,
                          seed=1, verbose=False)
    load_s = time.monotonic() - started
    token = llm.token_bos()
    token_s: list[float] = []
    warmup_tokens = 0
    start = time.monotonic()
    measuring_from = read0 = None
    while True:
        t0 = time.monotonic()
        if measuring_from is None and t0 - start >= warmup_s:
            measuring_from, read0 = t0, read_bytes()
        if measuring_from is not None and t0 - measuring_from >= seconds:
            break
        if llm.n_tokens >= llm.n_ctx() - 1:
            llm.reset()  # the context is full: start over (the weights read per token are the same)
        llm.eval([token])
        token = int(llm.scores[-1].argmax())  # greedy: the next input (the last logits only)
        if measuring_from is None:
            warmup_tokens += 1
        else:
            token_s.append(time.monotonic() - t0)
    return {"token_s": token_s, "window_s": time.monotonic() - measuring_from, "warmup_tokens": warmup_tokens,
            "read_bytes": read_bytes() - read0, "bytes_per_token_needed": None, "load_s": round(load_s, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--warmup", type=float, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print(json.dumps(decode(args.model, args.seconds, args.warmup, args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
