"""Paired rounds of warm variants switched by the environment knobs of warm_rate_experiments.diff
(docs/performance.md, "Against vmtouch and four dd").  Scratch driver, kept so the figures can be
remade: CHECKOUT=<patched checkout> [EP=1] [WAIT=s] python warm_rate_ab.py MODEL ROUNDS on|off WAY...
where WAY is vmtouch, cat, dd4 or NAME=[--flag:value,KNOB:value...]."""
import sys, os, json, statistics
CHECKOUT = os.path.abspath(os.environ.get("CHECKOUT", ".")); sys.path[:0] = [os.path.join(CHECKOUT, "tools"), CHECKOUT]
from lib.measure import timed_rounds, page_reporting_off, engine_pass
from lib.peers import catalogue
M = os.path.expanduser(sys.argv[1]); rounds = int(sys.argv[2]); off = sys.argv[3] == "off"
specs = sys.argv[4:]
wp = [sys.executable, "-m", "warmpool", "warm", M, "--no-progress", "--json"]
base = dict(os.environ, PYTHONPATH=CHECKOUT)
ways = {}
for spec in specs:
    name, _, rest = spec.partition("=")
    if name == "vmtouch": ways[name] = ["vmtouch", "-t", "-q", M]
    elif name == "cat": ways[name] = ["sh", "-c", f"cat '{M}' > /dev/null"]
    elif name == "dd4":
        ways[name] = ["sh", "-c", 'q=$(( ($(stat -c %s "$1") + 33554431) / 33554432 )); for i in 0 1 2 3; do dd if="$1" of=/dev/null bs=8M skip=$((i * q)) count=$q status=none & done; wait', "dd4", M]
    else:
        env = dict(base); args = []
        for kv in rest.split(",") if rest else []:
            k, _, v = kv.partition(":")
            if k.startswith("--"): args += [k, v] if v else [k]
            else: env[k] = v
        ways[name] = (wp + args, env)
ep = os.environ.get("EP")
def after(name, run):
    if ep:
        e = engine_pass(M); run.update(faults=e.get("minor_faults"), eps=e.get("seconds"))
with page_reporting_off(off):
    runs = timed_rounds(M, ways, rounds, wait_s=float(os.environ.get("WAIT", "0")), after=after)
ref = {}
for r in runs: ref.setdefault(r["round"], {})[r["way"]] = r
for name in ways:
    w = [r["wall_s"] for r in runs if r["way"] == name]; c = [r["cpu_s"] for r in runs if r["way"] == name]
    rel = [ref[k][name]["wall_s"] / min(ref[k][p]["wall_s"] for p in ("vmtouch","dd4") if p in ref[k]) for k in ref if any(p in ref[k] for p in ("vmtouch","dd4"))]
    f = [(r.get("faults"), r.get("eps")) for r in runs if r["way"] == name]
    print(f"{name:14s} wall {statistics.median(w):.3f} {w} cpu {statistics.median(c):.2f} paired/min(vmtouch,dd4) {statistics.median(rel) if rel else 0:.3f} faults {f}")
