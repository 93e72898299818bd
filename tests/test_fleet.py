"""warmpool.fleet and ``warmpool fleet`` on a real 3-node Ray cluster on this machine.

Each node gets its own environment (Ray's per-node ``env_vars``): ``$WARMPOOL_TEST_MODELS`` points
every node at its own directory, so the one model string ``$WARMPOOL_TEST_MODELS/NAME`` names a
different file on each node and the page cache of each file shows which node did its work.  A
node whose directory lacks the file is the failing node; a node whose processes are stopped
(SIGSTOP) is the hung one; a node killed with SIGKILL is the dead one.  The nodes ask for one
CPU each; the tasks ask for none.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from conftest import evict_file, pinned, resident_fraction
from ray._private import ray_constants
from ray.cluster_utils import Cluster

import warmpool
from tests.helpers.stores import make_ollama
from warmpool import _platform, fleet

pytestmark = [pytest.mark.pagecache, pytest.mark.xdist_group("ray")]

VAR = "WARMPOOL_TEST_MODELS"
MODEL = f"${VAR}/model.gguf"
NODE = dict(num_cpus=1, object_store_memory=80 * 2**20)  # Ray's minimum store: 2 cores, shared


class Fleet:
    def __init__(self, cluster: Cluster, dirs: dict[str, str]) -> None:
        self.cluster = cluster
        self.dirs = dirs  # node id -> that node's $WARMPOOL_TEST_MODELS
        self.address = cluster.address

    def files(self, name: str = "model.gguf") -> dict[str, str]:
        return {node: os.path.join(d, name) for node, d in self.dirs.items()}


def _copy(src, dst) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())  # DONTNEED drops only clean pages


@pytest.fixture(scope="module")
def cluster(tiny_model):
    # A short private temp dir: Ray's socket paths live under it (108-byte limit), and
    # nothing is left in /tmp/ray afterwards.
    root = tempfile.mkdtemp(prefix="wp-ray-")
    # Ray also records the cluster's address in $RAY_TMPDIR/ray/ray_current_cluster (default
    # /tmp/ray, which a fresh machine does not have): keep that file in the private dir too.
    old_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = root
    started = time.perf_counter()
    dirs = [os.path.join(root, f"node{i}") for i in range(3)]
    for i, d in enumerate(dirs):
        os.mkdir(d)
        _copy(tiny_model, os.path.join(d, "model.gguf"))
        # an Ollama store per node whose blob is this node's model.gguf (a hard link: same pages)
        make_ollama(Path(d, "ollama"), Path(d, "model.gguf"), "registry.ollama.ai", "library", "tiny", "latest")
        if i < 2:  # only2.gguf: missing on node 2
            _copy(tiny_model, os.path.join(d, "only2.gguf"))
    env = [{VAR: d, "OLLAMA_MODELS": os.path.join(d, "ollama")} for d in dirs]
    c = Cluster(initialize_head=True, head_node_args=dict(NODE, include_dashboard=False, temp_dir=os.path.join(root, "ray"),
                                                          env_vars=env[0]))
    # Node 2 has no CPU to give, like a node fully booked by its engine: the fleet's tasks ask for none.
    nodes = [c.head_node, c.add_node(**NODE, env_vars=env[1]), c.add_node(**dict(NODE, num_cpus=0), env_vars=env[2])]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    print(f"3-node Ray cluster up in {time.perf_counter() - started:.1f} s")
    try:
        yield Fleet(c, {n.node_id: d for n, d in zip(nodes, dirs)})
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        if old_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmpdir


def selected_resident(path, **selection) -> float:
    """The fraction of the selection's bytes resident now, by this process's own mincore."""
    chunks = warmpool.plan_model(path, **selection).chunks
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(_platform.resident_bytes(fd, c.offset, c.length) for c in chunks) / sum(c.length for c in chunks)
    finally:
        os.close(fd)


@contextlib.contextmanager
def held_selection(paths, **selection):
    """Keep each file's selected ranges mapped (out of the VM's reclaim of unmapped page cache).
    Mapping them reads back whatever reclaim took already: check the warm's effect first."""
    with contextlib.ExitStack() as stack:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            stack.callback(os.close, fd)
            for chunk in warmpool.plan_model(path, **selection).chunks:
                start = chunk.offset - chunk.offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page
                stack.enter_context(pinned(fd, start, chunk.offset + chunk.length - start))
        yield


def by_node(rows):
    return {r.node_id: r for r in rows}


def run_cli(*argv, timeout=120):
    """``warmpool fleet ARGV`` in a fresh process (its own Ray driver); --timeout 30 unless given."""
    argv = [*argv, "--timeout", "30"] if "--timeout" not in argv else list(argv)
    return subprocess.run([sys.executable, "-m", "warmpool", "fleet", *argv], capture_output=True, text=True, timeout=timeout)


def test_import_warmpool_never_imports_ray():
    code = ("import sys, warmpool, warmpool.fleet; from warmpool.commands import build_parser; build_parser(); "
            "warmpool.warm; warmpool.residency; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_ray_missing_is_one_line():
    code = "import sys; sys.modules['ray'] = None; from warmpool.commands import main; sys.exit(main(['fleet', 'status', 'm.gguf']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["warmpool: the fleet commands need Ray: pip install 'warmpool[ray]'"]


def test_unreachable_address_fails_fast():
    started = time.perf_counter()
    proc = run_cli("status", "m.gguf", "--address", "127.0.0.1:1", timeout=60)
    assert proc.returncode == 1 and time.perf_counter() - started < 30
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot connect to the Ray cluster" in proc.stderr


def test_hidden_residency_is_unknown_not_a_number():
    """A node whose kernel hides residency answers None: shown as unknown / null, and it can
    never pass --min-resident (the hiding itself is tested with real capabilities in
    test_hidden_residency.py; fleet only passes None through)."""
    from warmpool.commands.fleet import _table

    hidden = fleet.NodeResult("a" * 56, "10.0.0.1", 4096, None, None, 0.5, None, 4096)
    assert fleet._checked(hidden, None) == hidden
    failing = fleet._checked(hidden, 0.5)
    assert not failing.ok and failing.error.startswith("residency unknown")
    row = _table([hidden]).splitlines()[1].split()
    assert row[:5] == ["a" * 12, "10.0.0.1", "4.00", "KiB", "unknown"]
    assert json.loads(json.dumps(hidden._asdict()))["resident_fraction"] is None


def test_warm_status_evict_on_every_node(cluster):
    files = cluster.files()
    plan = warmpool.plan_model(next(iter(files.values())))
    for path in files.values():
        evict_file(path)
        assert resident_fraction(path) < 0.05

    rows = by_node(fleet.warm(MODEL, timeout=30))
    assert rows.keys() == files.keys()  # one row per node, from that node
    for node, row in rows.items():
        assert row.ok, row
        assert row.bytes_selected == plan.bytes_planned and row.resident_fraction >= 0.99
        assert row.bytes_warmed > plan.bytes_planned / 2  # each node read its own, evicted, copy
        assert row.seconds > 0
    # Seen from here, after all three nodes answered: this VM's background reclaim takes a few
    # hundred just-read, unmapped pages within seconds (a CI run saw node 0 at 98.96%); the
    # nodes' own figures above are the warm's, at 0.99.
    for path in files.values():
        assert resident_fraction(path) >= 0.97

    # Evict node 1's copy behind the fleet's back: only node 1's row may drop.
    node1 = list(files)[1]
    evict_file(files[node1])
    rows = by_node(fleet.status(MODEL, min_resident=0.99, timeout=30))
    assert not rows[node1].ok and rows[node1].resident_fraction < 0.05 and "below 99.0%" in rows[node1].error
    assert all(r.ok and r.resident_fraction >= 0.99 for n, r in rows.items() if n != node1)
    assert fleet.failed(list(rows.values())) == [rows[node1]]

    rows = by_node(fleet.evict(MODEL, timeout=30))
    assert rows.keys() == files.keys() and all(r.ok and r.resident_fraction < 0.05 for r in rows.values())
    for path in files.values():
        assert resident_fraction(path) < 0.05


def test_selection_reaches_the_nodes(cluster):
    files = cluster.files()
    expected = warmpool.plan_model(next(iter(files.values())), cpu_moe=True, n_gpu_layers=99).bytes_planned
    assert expected < warmpool.plan_model(next(iter(files.values()))).bytes_planned
    rows = fleet.status(MODEL, cpu_moe=True, n_gpu_layers=99, timeout=30)
    assert [r.bytes_selected for r in rows] == [expected] * 3


def test_model_references_resolve_on_each_node(cluster):
    """``ollama:tiny`` is looked up in each node's own $OLLAMA_MODELS: each node warms its own blob."""
    files = cluster.files()
    for path in files.values():
        evict_file(path)
    rows = by_node(fleet.warm("ollama:tiny", timeout=30))
    assert rows.keys() == files.keys() and all(r.ok and r.bytes_warmed for r in rows.values()), rows
    for path in files.values():
        assert resident_fraction(path) >= 0.99


def test_missing_model_on_one_node_is_one_failing_row(cluster):
    missing = list(cluster.dirs)[2]
    proc = run_cli("warm", f"${VAR}/only2.gguf", "--address", cluster.address, "--json")
    assert proc.returncode == 1
    rows = {r["node_id"]: r for r in json.loads(proc.stdout)["nodes"]}
    assert rows.keys() == cluster.dirs.keys()
    assert {"node_id", "node_ip", "bytes_selected", "bytes_resident", "resident_fraction", "seconds", "error"} <= rows[missing].keys()
    assert "no such file" in rows[missing]["error"] and cluster.dirs[missing] in rows[missing]["error"]
    assert rows[missing]["bytes_selected"] is None
    for node, row in rows.items():
        if node != missing:
            assert row["error"] is None and row["resident_fraction"] >= 0.99
    # the failing node is named, on one line
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("warmpool: fleet warm failed on 1 of 3 nodes: ") and missing[:12] in last


def test_cli_table_json_and_exit_codes(cluster):
    for path in cluster.files().values():
        evict_file(path)
    proc = run_cli("warm", MODEL, "--address", cluster.address, "-ngl", "99", "--n-cpu-moe", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["node", "address", "selected", "resident", "seconds", "GB/s", "error"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(n[:12] for n in cluster.dirs)
    assert all("(100.0%)" in line for line in lines[1:])

    # The warm's effect, seen by this process at once: the VM's background reclaim takes a few
    # hundred just-read, unmapped pages within seconds (a CI run saw one node at 97.8% by the
    # time status looked), so the selection is then held mapped while status looks.
    assert all(selected_resident(p, n_gpu_layers=99, n_cpu_moe=1) >= 0.99 for p in cluster.files().values())
    with held_selection(cluster.files().values(), n_gpu_layers=99, n_cpu_moe=1):
        proc = run_cli("status", MODEL, "--address", cluster.address, "-ngl", "99", "--n-cpu-moe", "1", "--min-resident", "0.99", "--json")
    assert proc.returncode == 0, proc.stderr
    nodes = json.loads(proc.stdout)["nodes"]
    assert len(nodes) == 3 and all(n["error"] is None and n["resident_fraction"] >= 0.99 for n in nodes)

    proc = run_cli("status", MODEL, "--address", cluster.address, "--min-resident", "0.99")  # every tensor: mostly cold
    assert proc.returncode == 1
    assert "failed on 3 of 3 nodes" in proc.stderr and all(n[:12] in proc.stderr for n in cluster.dirs)

    proc = run_cli("evict", MODEL, "--address", cluster.address, "--min-resident", "0.5")
    assert proc.returncode == 1 and "not evict" in proc.stderr
    assert run_cli("status", MODEL, "--min-resident", "2").returncode == 2


def _node_processes(node) -> list[psutil.Process]:
    """The node's raylet and everything it started (its workers and agents)."""
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    return [raylet, *raylet.children(recursive=True)]


def test_hung_node_is_reported_after_the_timeout(cluster):
    """A frozen node (SIGSTOP on its raylet and workers): the others warm, it is reported after
    --timeout, its cancelled warm never runs, and once thawed it serves the next call."""
    c = cluster.cluster
    node = sorted(c.worker_nodes, key=lambda n: n.node_id)[0]
    files = cluster.files()
    for path in files.values():
        evict_file(path)
    processes = _node_processes(node)
    for p in processes:
        p.suspend()
    try:
        started = time.perf_counter()
        rows = by_node(fleet.warm(MODEL, timeout=3))
        elapsed = time.perf_counter() - started
    finally:
        for p in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()
    assert 3 <= elapsed < 10, elapsed
    hung = rows[node.node_id]
    assert hung.error == "no answer within 3 s (node dead, hung or unschedulable)"
    assert hung.bytes_selected is None and hung.seconds is None
    assert all(r.ok and r.resident_fraction >= 0.99 for n, r in rows.items() if n != node.node_id)
    # Thawed before its health checks ran out: back in service, and the warm cancelled while
    # it was frozen never ran (its copy is still cold).
    rows = by_node(fleet.status(MODEL, timeout=30))
    assert len(rows) == 3 and all(r.ok for r in rows.values()), rows
    assert rows[node.node_id].resident_fraction < 0.05 and resident_fraction(files[node.node_id]) < 0.05


def test_killed_node_is_reported_within_the_timeout(cluster):
    """Runs last: it leaves a dead node in the cluster."""
    root = os.path.dirname(next(iter(cluster.dirs.values())))
    d = os.path.join(root, "node3")
    os.mkdir(d)
    _copy(next(iter(cluster.files().values())), os.path.join(d, "model.gguf"))
    node = cluster.cluster.add_node(**NODE, env_vars={VAR: d})
    cluster.cluster.wait_for_nodes()
    victim = node.node_id
    # SIGKILL, no goodbye: the cluster keeps listing the node as alive until its health checks
    # run out (~15 s here), so its pinned task waits on a node that will never run it.
    cluster.cluster.remove_node(node, allow_graceful=False)
    result: list = []
    started = time.perf_counter()
    worker = threading.Thread(target=lambda: result.append(fleet.warm(MODEL, timeout=4)))
    worker.start()
    worker.join(30)
    elapsed = time.perf_counter() - started
    assert not worker.is_alive() and elapsed < 15, elapsed
    rows = by_node(result[0])
    assert victim in rows and not rows[victim].ok, rows
    assert all(r.ok for n, r in rows.items() if n != victim)
