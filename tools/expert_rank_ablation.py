"""Which part of the ranker's score finds the router's top quarter (docs/experts.md).

The setup of tests/test_experts_ranking.py (a TEST-shaped model, the engine stand-in in a
12 MiB memory cgroup, Zipf(1.0), K experts per layer and token), with four rankers sampling the
same page cache at different half-lives; prints the top-quarter overlap of the combined score,
of the residency average alone and of the refaults alone.  Needs root (a child memory cgroup).

    python tools/expert_rank_ablation.py MODEL SECONDS     (MODEL: write_moe_gguf(path, TEST, seed=2))
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import json
import subprocess
import time

import numpy as np
import test_experts_ranking as T
from conftest import evict_file

from warmpool import read_layout
from warmpool._experts.ranking import Ranker
from warmpool._experts.slices import expert_slices

model = sys.argv[1]
from warmpool._platform.proc import _cgroup_files

files = _cgroup_files(); child = os.path.join(os.path.dirname(files[0]), f"abl-{os.getpid()}"); os.mkdir(child)
try:
    open(os.path.join(child, os.path.basename(files[0])), "w").write(str(T.CGROUP_LIMIT))
    layout = read_layout(model); slices = expert_slices(layout); n = 16; L = 8
    w = 1.0/np.arange(1,n+1); rng = np.random.default_rng(T.SEED); perms=[rng.permutation(n).tolist() for _ in range(L)]
    truth=[(l, perms[l][r]) for l in range(L) for r in range(4)]
    ranges=[[[(a,b) for _,a,b in s.ranges] for s in slices if s.layer==l] for l in range(L)]
    spec='/tmp/exp23/spec.json'; json.dump(dict(model=model, cgroup_procs=os.path.join(child,'cgroup.procs'), seed=T.SEED, k=T.K, weights=(w/w.sum()).tolist(), perms=perms, ranges=ranges, seconds=float(sys.argv[2])), open(spec,'w'))
    evict_file(model)
    rs = {hl: Ranker(slices, half_life=hl) for hl in (16, 64, 256, 1e9)}
    fd=os.open(model, os.O_RDONLY)
    e=subprocess.Popen([sys.executable,'-c',T.ENGINE,spec], stdout=subprocess.PIPE, text=True)
    while e.poll() is None:
        for r in rs.values(): r.sample([fd])
        time.sleep(0.05)
    for hl, r in rs.items():
        res = sorted(r.keys, key=lambda k: -r._resident[r._index[k]]); ris = sorted(r.keys, key=lambda k: -r._risen[r._index[k]])
        print(hl, "combined", T.overlap(r.ranking(), truth), "resident", T.overlap(res, truth), "risen", T.overlap(ris, truth))
finally:
    time.sleep(0.5); os.rmdir(child)
