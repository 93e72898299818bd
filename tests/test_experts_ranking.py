"""The ranker against a known router: an engine stand-in in a small memory cgroup reads the
experts a seeded Zipf(1.0) router picks, the page cache has to choose what stays, and the
ranker, sampling residency from outside (no root needed for that part, no help from the
engine), must find the router's top quarter.  The same setup must fail a random and a
reversed ranking, so the threshold is not met by construction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import child_cgroup, evict_file, shared_file

from warmpool import read_layout
from warmpool._experts.ranking import Ranker
from warmpool._experts.slices import expert_slices
from warmpool.example import TEST, write_moe_gguf

pytestmark = pytest.mark.pagecache

K = 2  # experts the router picks per layer and token
SEED = 7
CGROUP_LIMIT = 12 << 20  # a third of the experts' 33 MB: the page cache must choose
# Both enough tokens and enough samples: a loaded machine gave 65 tokens in 8 s (75%), an idle
# one 200 tokens in 5 s (72%, too few samples); 8 s idle gave 84-91%.
RUN_TOKENS = 200
MIN_SECONDS = 10.0
RUN_SECONDS = 40.0  # the cap, should the machine be slower still

# The engine stand-in: joins the cgroup, then per token and layer reads one byte per page of
# the K experts its router picks.  FADV_RANDOM turns read-ahead off, so a read brings in the
# page it asks for and not its neighbours (docs/experts.md: what read-ahead does to the signal).
ENGINE = r"""
import json, os, sys, time
import numpy as np
spec = json.load(open(sys.argv[1]))
with open(spec["cgroup_procs"], "w") as f:
    f.write(str(os.getpid()))
fd = os.open(spec["model"], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
rng = np.random.default_rng(spec["seed"])
weights = np.array(spec["weights"])
deadline = time.monotonic() + spec["seconds"]
tokens = 0
began = time.monotonic()
while (tokens < spec["tokens"] or time.monotonic() < began + spec["min_seconds"]) and time.monotonic() < deadline:
    for layer, (perm, ranges) in enumerate(zip(spec["perms"], spec["ranges"])):
        for rank in rng.choice(len(perm), size=spec["k"], replace=False, p=weights):
            for start, end in ranges[perm[rank]]:
                for page in range(start, end, 4096):
                    os.pread(fd, 1, page)
    tokens += 1
print(tokens)
"""


@pytest.fixture(scope="session")
def ranking_model(shared_dir):
    """A TEST-shaped model only this module evicts."""
    return shared_file(shared_dir, "ranking.gguf", lambda p: write_moe_gguf(p, TEST, seed=2))


@pytest.fixture
def small_cgroup():
    """A child memory cgroup with a small limit; its procs file."""
    with child_cgroup(CGROUP_LIMIT, "ranking") as child:
        yield os.path.join(child, "cgroup.procs")


def overlap(ranking, truth) -> float:
    return len(set(ranking[:len(truth)]) & set(truth)) / len(truth)


def test_learned_top_quarter_matches_the_router(ranking_model, small_cgroup, tmp_path):
    import numpy as np

    layout = read_layout(ranking_model)
    slices = expert_slices(layout)
    n = TEST.n_experts
    weights = 1.0 / np.arange(1, n + 1)  # Zipf(1.0) by rank
    rng = np.random.default_rng(SEED)
    perms = [rng.permutation(n).tolist() for _ in range(TEST.n_layers)]  # rank -> expert, per layer
    truth = [(layer, perms[layer][rank]) for layer in range(TEST.n_layers) for rank in range(n // 4)]
    ranges = [[[(a, b) for _, a, b in s.ranges] for s in slices if s.layer == layer] for layer in range(TEST.n_layers)]
    spec = tmp_path / "engine.json"
    spec.write_text(json.dumps(dict(model=str(ranking_model), cgroup_procs=small_cgroup, seed=SEED, k=K,
                                    weights=(weights / weights.sum()).tolist(), perms=perms, ranges=ranges,
                                    tokens=RUN_TOKENS, min_seconds=MIN_SECONDS, seconds=RUN_SECONDS)))
    evict_file(ranking_model)
    ranker = Ranker(slices, half_life=256)
    fd = os.open(ranking_model, os.O_RDONLY)
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, str(spec)], stdout=subprocess.PIPE, text=True)
    try:
        while engine.poll() is None:
            ranker.sample([fd])
            time.sleep(0.05)
        tokens = int(engine.stdout.read())
    finally:
        engine.kill()
        engine.wait()
        os.close(fd)
    assert engine.returncode == 0 and tokens > 20, f"the engine stand-in ran {tokens} tokens"
    learned = ranker.ranking()
    got = overlap(learned, truth)
    shuffled = list(learned)
    np.random.default_rng(1).shuffle(shuffled)
    print(f"{tokens} tokens, {ranker.passes} passes ({ranker.method}), {ranker.last_pass_seconds * 1e3:.2f} ms CPU "
          f"per pass; top-quarter overlap: learned {got:.0%}, random {overlap(shuffled, truth):.0%}, "
          f"reversed {overlap(learned[::-1], truth):.0%}")
    assert got >= 0.8
    # The threshold means something here: a ranker that had learned nothing would miss it.
    assert overlap(shuffled, truth) < 0.8 and overlap(learned[::-1], truth) < 0.8


@pytest.mark.pagecache
@pytest.mark.xdist_group("pagecache")
def test_a_refault_is_a_page_read_again_after_an_eviction_not_a_first_read(ranking_model):
    """``refault_share``: the share of sampled pages per pass that came back after a sample had
    seen them resident and a later one had seen them gone.  The engine's first read of an expert
    (its load) is not one; the same read after an eviction is."""
    from warmpool import _platform

    layout = read_layout(ranking_model)
    slices = expert_slices(layout)
    ranker = Ranker(slices)
    some = slices[: len(slices) // 4]
    ranges = [(start, end - start) for s in some for _, start, end in s.ranges]
    fd = os.open(ranking_model, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # read exactly the experts, no neighbours
        evict_file(ranking_model)
        ranker.sample([fd])  # all cold
        for start, length in ranges:
            os.pread(fd, length, start)
        ranker.sample([fd])  # a first read: no refault
        assert ranker.refault_share(2) == 0.0
        _platform.evict_ranges(fd, ranges)
        ranker.sample([fd])  # gone
        for start, length in ranges:
            os.pread(fd, length, start)
        ranker.sample([fd])  # back: every sampled page of those experts refaulted
    finally:
        os.close(fd)
    share = ranker.refault_share(1)
    assert 0.9 * len(some) / len(slices) <= share <= 1.1 * len(some) / len(slices) + 0.01, share
    assert ranker.refault_share(4) == pytest.approx(share / 4)
