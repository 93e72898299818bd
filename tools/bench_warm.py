"""Cold warm of a GGUF model: warmpool against the tools people use, side by side in one run.

    python tools/bench_warm.py MODEL_OR_SIZE [--rounds N] [--latency-ms 1,2,5] [--latency-size 512MB]
        [--methods warmpool,vmtouch,...] [--json-out FILE] [--chart FILE] [--quick] [--latency-only]
        [--hot-runs N] [--cache-dir DIR] [--wait-after-evict SECONDS] [--no-page-reporting]
        [--beside [--beside-model SIZE_OR_FILE] [--beside-engines inprocess,server]]

MODEL_OR_SIZE is a GGUF file, or a size such as ``1.7GB`` (``_units.parse_size``: 1.7e9 bytes;
``1.7G`` is 1.7 GiB): a synthetic MoE of about that size
(``write_moe_gguf(shape_for_size(size))``) is generated once into ``~/.cache/warmpool/bench``.

Each round runs every method once, in an order rotated from round to round; before each run
the file is evicted and mincore must show it cold; after it, mincore shows what it left
resident (``--wait-after-evict``: that many seconds after the eviction; on a VM with free page
reporting the evicted memory goes back to the host a few seconds after it is freed, and every
method then fills the page cache more slowly: README, "Device speed"; ``--no-page-reporting``,
as root, switches that reporting off for the run and restores it after).  Medians and ratios are
paired per round (``lib/warm_report.py``).  ``--latency-ms`` runs
the same comparison through ``tools/latency_fs.py`` (a FUSE passthrough that sleeps per read)
on a smaller synthetic model (``--latency-size``), whose source file is kept cached so only
the latency shows.  Then: the hot run (``warmpool warm FILE`` when all is resident), Python's
bare start-up here, and the peak RssAnon of warmpool plus its workers during a default warm.

``--beside`` adds the engine that loads the model itself (``lib/beside.py``): start to first
token of plain ``Llama()`` against ``engine_adapter.llama_cpp.load``, and of ``python -m
llama_cpp.server`` (and llama-server where it is on PATH) against the same under ``warmpool run``,
all with every core, in paired rounds on the local disk (``--beside-model``, default the
first-request bench model, 1.76 GB) and through each ``--latency-ms`` (on the ``--latency-size``
model).  Needs llama-cpp-python with its [server] extra.

Needs vmtouch and fio (Debian packages) and, for ``--latency-ms``, fuse3 and mfusepy; whatever
is missing is reported "unavailable (install X)" and skipped.  Nothing is installed at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: warmpool and tests.helpers

from lib import measure, peers  # noqa: E402
from lib import warm_report as report  # noqa: E402

__all__ = ["main"]

QUICK_METHODS = "warmpool,w1,vmtouch,cat,dd,fio,stride,madv-willneed,seed"
LOAD_1M: dict[str, list[float]] = {}  # 1-minute load average before each timed run, per storage
TIMEOUT_S = 300.0  # one method run; vmtouch -t on 0.55 GB at 5 ms takes ~15 s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = [m.key for m in peers.catalogue()]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL_OR_SIZE", help="a GGUF file, or a size like 1.7GB (synthetic MoE)")
    p.add_argument("--rounds", type=int, help="paired rounds (default 3; --quick 1)")
    p.add_argument("--latency-ms", default=None, help="comma list of FUSE latencies, e.g. 1,2,5 (--quick: 5)")
    p.add_argument("--latency-size", default=None, help="synthetic model for the FUSE runs (default 512MB; --quick 256MB)")
    p.add_argument("--methods", default=None, help=f"comma list of: {','.join(keys)} (default all; --quick a core set)")
    p.add_argument("--hot-runs", type=int, default=5, help="runs of the hot `warmpool warm FILE` (median)")
    p.add_argument("--json-out", help="write the JSON lines here too")
    p.add_argument("--chart", help="write a PNG chart here (needs matplotlib)")
    p.add_argument("--cache-dir", help="where synthetic models live (default ~/.cache/warmpool/bench)")
    p.add_argument("--latency-only", action="store_true", help="skip the local-disk comparison")
    p.add_argument("--quick", action="store_true", help="1 round, core methods, 5 ms only, 256MB on FUSE")
    measure.add_wait_after_evict(p)
    measure.add_no_page_reporting(p)
    p.add_argument("--beside", action="store_true",
                   help="also time engines that load the model themselves, with and without warmpool beside them")
    p.add_argument("--beside-model", default=None, help="model for --beside on the local disk (default: the 1.76 GB bench model)")
    p.add_argument("--beside-engines", default="inprocess,server", help="inprocess (the adapter), server (warmpool run)")
    p.add_argument("--no-engine-pass", action="store_true",
                   help="skip the folio histogram and the engine pass after each method (faster)")
    args = p.parse_args(argv)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    args.latency_ms = args.latency_ms if args.latency_ms is not None else ("5" if args.quick else "")
    args.latency_size = args.latency_size or ("256MB" if args.quick else "512MB")
    wanted = (args.methods or (QUICK_METHODS if args.quick else ",".join(keys))).split(",")
    unknown = sorted(set(wanted) - set(keys))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(keys)}")
    args.methods = [m for m in peers.catalogue() if m.key in wanted]
    try:
        args.latencies = [float(x) for x in args.latency_ms.split(",") if x.strip()]
    except ValueError:
        p.error(f"--latency-ms takes milliseconds like 1,2,5, not {args.latency_ms!r}")
    if args.rounds < 1 or args.hot_runs < 1:
        p.error("--rounds and --hot-runs must be at least 1")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the model files ----------------------------------------------------------------------------


def synthetic_model(size: str, cache_dir: str | None) -> Path:
    """A synthetic MoE of about ``size`` bytes, in a directory of its own (FUSE serves that
    directory); generated once, reused while its size matches."""
    from warmpool.example import _cache_dir, shape_for_size

    shape = shape_for_size(size)
    name = f"bench-moe-{shape.n_layers}L"
    return measure.synthetic_model(shape, f"{name}.gguf", Path(cache_dir or _cache_dir(None) / "bench") / name)


def resolve_model(arg: str, cache_dir: str | None) -> Path:
    if os.path.isfile(arg):
        return Path(arg).resolve()
    from warmpool._units import parse_size

    try:
        parse_size(arg)
    except ValueError:
        raise SystemExit(f"bench_warm: {arg}: neither a file nor a size like 1.7GB") from None
    return synthetic_model(arg, cache_dir)


# -- the machine ----------------------------------------------------------------------------------


def _first_line(path: str) -> str:
    try:
        return Path(path).read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


def _disk_of(path: Path) -> str:
    """Filesystem, device and its readahead for the file (from /proc/mounts and sysfs)."""
    dev = os.stat(path).st_dev
    fs = "?"
    best = ""
    for line in Path("/proc/mounts").read_text().splitlines():
        source, target, kind = line.split()[:3]
        if str(path).startswith(target) and len(target) >= len(best):
            best, fs = target, f"{kind} on {source}"
    node = f"{os.major(dev)}:{os.minor(dev)}"
    ra = _first_line(f"/sys/dev/block/{node}/queue/read_ahead_kb")
    rot = _first_line(f"/sys/dev/block/{node}/queue/rotational")
    return f"{fs} (read_ahead_kb {ra}, rotational {rot})"


def machine(model: Path) -> dict:
    from warmpool._platform.proc import page_reporting_order

    mem_kb = int(_first_line("/proc/meminfo").split()[1])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"record": "machine", "cores": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kb / 2**20, 1),
            "disk": _disk_of(model), "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "page_reporting_order": page_reporting_order(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


# -- one storage: rounds of every method ------------------------------------------------------------


def _selection_fraction(path: Path):
    """Residency of warmpool's default selection (every tensor), planned once: no header
    re-read (which would itself fault pages in) between eviction and timing."""
    import warmpool

    plan = warmpool.plan_model(path)
    return lambda: warmpool.residency(path, plan=plan).resident_fraction


ENGINE_PASS = True  # --no-engine-pass turns it off
WAIT_AFTER_EVICT_S = 0.0  # --wait-after-evict


def run_storage(path: Path, storage: str, methods: list[peers.Method], rounds: int,
                keep_warm: Path | None = None) -> list[report.Row]:
    """``rounds`` rotated rounds of ``methods`` on ``path``; one Row per method."""
    runnable, rows = [], {}
    for m in methods:
        why = peers.unavailable(m) or ("direct I/O: not on FUSE" if m.local_only and keep_warm else None)
        if why:
            rows[m.label] = report.summarize(m, storage, [], [], 1, why)
        else:
            runnable.append(m)
    selection = _selection_fraction(path)
    size = path.stat().st_size
    samples: list[peers.Sample] = []
    loads = LOAD_1M.setdefault(storage, [])
    for r in range(rounds):
        order = runnable[r % len(runnable):] + runnable[:r % len(runnable)] if runnable else []
        for m in order:
            if keep_warm is not None and measure.file_resident(keep_warm) < 0.99:
                _warm_source(keep_warm)  # the backing file must not add disk time to FUSE runs
            loads.append(os.getloadavg()[0])
            s = peers.run_method(m, str(path), storage, r, selection, TIMEOUT_S, ENGINE_PASS, WAIT_AFTER_EVICT_S)
            s.extra["load_1m"] = loads[-1]
            samples.append(s)
            took = "failed: " + s.error if s.error else f"{s.seconds:.2f} s"
            engine, folios = s.extra.get("engine"), s.extra.get("folios")
            after = (f"; engine pass {engine['minor_faults']} faults {engine['seconds']:.3f} s" if engine else "") + \
                (f"; order-0 {folios['order0_fraction']:.1%}, PMD {folios['pmd_fraction']:.1%}" if folios else "")
            log(f"[{storage} {r + 1}/{rounds}] {m.label}: {took}, {s.file_resident:.1%} resident"
                f" (cold before: {s.cold_before:.2%}){after}; load {loads[-1]:.2f}")
    for m in runnable:
        rows[m.label] = report.summarize(m, storage, [s for s in samples if s.method == m.label], samples, size)
    return [rows[m.label] for m in methods]


def _warm_source(path: Path) -> None:
    import warmpool

    warmpool.warm(path, force=True)


def run_latency(path: Path, latency_ms: float, methods: list[peers.Method], rounds: int) -> list[report.Row] | str:
    from latency_fs import FuseUnavailable, mounted

    storage = f"latency_fs {latency_ms:g} ms"
    try:
        with mounted(path.parent, latency_ms) as mnt:
            _warm_source(path)
            return run_storage(mnt / path.name, storage, methods, rounds, keep_warm=path)
    except FuseUnavailable as exc:
        return f"{storage}: {exc}"


# -- beside an engine that loads the model itself -----------------------------------------------------


def _beside_model(args: argparse.Namespace) -> Path:
    if args.beside_model:
        return resolve_model(args.beside_model, args.cache_dir)
    from first_request import bench_model

    return bench_model(args.cache_dir and str(Path(args.cache_dir).parent))


def run_beside(path: Path, args: argparse.Namespace, evict=None) -> dict:
    from lib import beside

    return beside.beside(path, args.rounds, evict or measure.evict_file, log, tuple(args.beside_engines.split(",")))


def beside_latency(path: Path, latency_ms: float, args: argparse.Namespace) -> dict:
    from latency_fs import FuseUnavailable, mounted

    try:
        with mounted(path.parent, latency_ms) as mnt:
            def evict(p: Path) -> None:
                measure.evict_file(p)
                if measure.file_resident(path) < 0.99:
                    _warm_source(path)  # the backing file must not add disk time

            return run_beside(mnt / path.name, args, evict)
    except FuseUnavailable as exc:
        return {"skipped": str(exc)}


def _beside_record(result: dict) -> dict:
    out = {"threads": result.get("threads"), "skipped": result.get("skipped")}
    for engine, r in result.items():
        if isinstance(r, dict):
            out[engine] = {k: r[k] for k in ("rounds", "median_s", "paired_ratio", "x_steady") if k in r}
        elif isinstance(r, str):
            out[engine] = r
    return out


def beside_table(beside: dict[str, dict]) -> str:
    head = "| storage | engine | rounds | alone (median s) | with warmpool (median s) | paired ratio (median; rounds) | first request x steady |"
    rows = [head, "|" + "---|" * 7]
    names = {"adapter": "Llama() / engine_adapter.llama_cpp.load", "llama_cpp.server": "llama_cpp.server / warmpool run",
             "llama-server": "llama-server / warmpool run"}
    for storage, result in beside.items():
        if "skipped" in result and result["skipped"]:
            rows.append(f"| {storage} | skipped: {result['skipped']} | | | | | |")
            continue
        for engine, r in result.items():
            if isinstance(r, str):
                rows.append(f"| {storage} | {engine}: {r} | | | | | |")
            if not isinstance(r, dict):
                continue
            for other in (k for k in r["median_s"] if k != "plain"):
                ratio = r["paired_ratio"][other]
                steady = r.get("x_steady", {})
                steady_s = f"{steady['plain']:.2f} / {steady[other]:.2f}" if steady else "-"
                label = names.get(engine, engine)
                if other == "python-exec":
                    label = f"{engine} / a Python launcher that only execs it (no warmpool)"
                ci = ratio.get("ci95")
                ci_s = f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
                rows.append(f"| {storage} | {label} (threads {result['threads']}) | {r['rounds']} | "
                            f"{r['median_s']['plain']:.2f} | {r['median_s'][other]:.2f} | {ratio['median']:.2f}x{ci_s}; "
                            f"{', '.join(f'{x:.2f}' for x in ratio['rounds'])} | {steady_s} |")
    return "\n".join(rows)


# -- hot run, start-up, memory ------------------------------------------------------------------------


def _wall(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def hot_run(path: Path, runs: int) -> dict:
    """``warmpool warm FILE`` with everything resident: the whole CLI's wall time."""
    argv = [*measure.warmpool_argv(), "warm", str(path)]
    _warm_source(path)
    seconds = [_wall(argv) for _ in range(runs)]
    return {"record": "hot_run", "command": "warmpool warm FILE", "median_s": round(statistics.median(seconds), 4),
            "seconds": [round(s, 4) for s in seconds], "file_resident_fraction": round(measure.file_resident(path), 5)}


def _import_us(lines: list[str], module: str) -> int | None:
    for line in lines:  # "import time: self [us] | cumulative | imported package"
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == module:
            return int(parts[1])
    return None


def python_startup(runs: int) -> dict:
    """Bare interpreter start-up here, for reference (this sandbox's site .pth imports certifi)."""
    plain = [_wall([sys.executable, "-c", "pass"]) for _ in range(runs)]
    isolated = [_wall([sys.executable, "-I", "-S", "-c", "pass"]) for _ in range(runs)]
    lines = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True,
                           text=True, check=False).stderr.splitlines()
    return {"record": "python_startup", "command": "python -c pass", "median_s": round(statistics.median(plain), 4),
            "isolated_command": "python -I -S -c pass", "isolated_median_s": round(statistics.median(isolated), 4),
            "importtime_site_us": _import_us(lines, "site"), "importtime_certifi_us": _import_us(lines, "certifi")}


def memory_peak(path: Path, storage: str) -> dict:
    """Peak RssAnon of the default CLI warm plus its workers (a separate, untimed run)."""
    method = peers.catalogue()[0]
    measure.evict_file(path)
    peak, procs, seconds = measure.peak_rss_anon(method.command(path))
    return {"record": "rss", "storage": storage, "command": method.shown(), "peak_rss_anon_bytes": peak,
            "peak_rss_anon_mb": round(peak / 1e6, 1), "most_processes": procs, "seconds": round(seconds, 3)}


# -- output ------------------------------------------------------------------------------------------


def acceptance(rows: dict[str, list[report.Row]], extras: list[dict], sizes: dict[str, int]) -> list[str]:
    """The issue's figures in one place, each derived from the rows above."""
    out = []
    for storage, table in rows.items():
        by = {r.method: r for r in table}
        wp, vm = by.get("warmpool"), by.get(report.VMTOUCH)
        if not wp or wp.median_s is None or not vm or vm.median_s is None:
            continue
        line = (f"{storage}: warmpool {wp.median_s:.2f} s vs vmtouch -t {vm.median_s:.2f} s, paired ratio "
                f"{wp.ratio_vs_vmtouch:.2f}× ({1 / wp.ratio_vs_vmtouch:.2f}× faster), {wp.resident_fraction:.2%} resident")
        if wp.fraction_of_fio is not None:
            line += f", {wp.gbps:.2f} GB/s = {wp.fraction_of_fio:.0%} of fio"
        out.append(line)
        for r in table:
            if r.family != "warmpool" or r.ratio_vs_seq is None:
                continue
            line = f"{storage}: {r.method}: {r.ratio_vs_seq:.2f}× the faster of cat and dd bs=8M (paired median)"
            size = sizes.get(storage)
            if r.bytes_selected and size and r.bytes_selected < 0.99 * size:
                f = r.bytes_selected / size
                outside = (r.file_resident_fraction * size - r.bytes_selected) / (size - r.bytes_selected)
                line += (f"; selects f = {f:.2f} of the file (target <= {f + 0.1:.2f}×); "
                         f"unselected pages resident after it: {max(outside, 0.0):.2%}")
            if r.faults_vs_dd is not None:
                line += f"; engine pass {r.engine_faults:,.0f} faults = {r.faults_vs_dd:.2f}× dd's"
            out.append(line)
    for e in extras:
        if e["record"] == "hot_run":
            out.append(f"hot run `{e['command']}`: median {e['median_s']:.3f} s of {len(e['seconds'])}")
        elif e["record"] == "python_startup":
            out.append(f"`python -c pass`: {e['median_s']:.3f} s; `python -I -S -c pass`: {e['isolated_median_s']:.3f} s; "
                       f"importtime: site {e['importtime_site_us']} µs, certifi {e['importtime_certifi_us']} µs")
        elif e["record"] == "rss":
            out.append(f"{e['storage']}: peak RssAnon of warmpool + workers {e['peak_rss_anon_mb']} MB "
                       f"({e['most_processes']} processes)")
    return out


def main(argv: list[str] | None = None) -> int:
    global ENGINE_PASS, WAIT_AFTER_EVICT_S
    args = parse_args(argv)
    ENGINE_PASS, WAIT_AFTER_EVICT_S = not args.no_engine_pass, args.wait_after_evict
    command = shlex.join(["python", "tools/bench_warm.py", *(sys.argv[1:] if argv is None else argv)])
    with measure.page_reporting_off(args.no_page_reporting):
        return _run(args, command)


def _run(args: argparse.Namespace, command: str) -> int:
    started = time.perf_counter()
    import warmpool

    measure.compile_bytecode(Path(warmpool.__file__).parents[1])  # the warmpool timed, as installed
    model = resolve_model(args.model, args.cache_dir)
    info = machine(model) | {"command": command, "model": str(model), "model_bytes": model.stat().st_size}
    log(f"{command}\n{json.dumps(info)}")
    tables: dict[str, list[report.Row]] = {}
    extras = []
    if not args.latency_only:
        tables["local disk"] = run_storage(model, "local disk", args.methods, args.rounds)
        extras += [memory_peak(model, "local disk"), hot_run(model, args.hot_runs), python_startup(args.hot_runs)]
    skipped = []
    beside: dict[str, dict] = {}
    if args.beside and not args.latency_only:
        beside["local disk"] = run_beside(_beside_model(args), args)
    if args.latencies:
        small = synthetic_model(args.latency_size, args.cache_dir)
        info.update(latency_model=str(small), latency_model_bytes=small.stat().st_size)
        for ms in args.latencies:
            if args.beside:
                beside[f"latency_fs {ms:g} ms"] = beside_latency(small, ms, args)
            result = run_latency(small, ms, args.methods, args.rounds)
            if isinstance(result, str):
                skipped.append(result)
                log(result)
            else:
                tables[result[0].storage] = result
    if args.latencies and tables.keys() - {"local disk"}:
        from latency_fs import mounted

        with mounted(small.parent, max(args.latencies)) as mnt:
            extras.append(memory_peak(mnt / small.name, f"latency_fs {max(args.latencies):g} ms"))
    info.update(loadavg_end=[round(x, 2) for x in os.getloadavg()], duration_s=round(time.perf_counter() - started, 1),
                load_1m_min_median_max={k: [round(min(v), 2), round(statistics.median(v), 2), round(max(v), 2)]
                                        for k, v in LOAD_1M.items() if v})
    records = [info, *({"record": "method"} | report.json_record(r) for t in tables.values() for r in t), *extras,
               *({"record": "beside", "storage": k} | _beside_record(v) for k, v in beside.items())]
    for storage, table in tables.items():
        size = info["model_bytes"] if storage == "local disk" else info["latency_model_bytes"]
        print(f"\n### {storage} ({size / 1e9:.2f} GB, {args.rounds} rounds)\n\n{report.markdown_table(table)}")
    loads = [f"{k}: 1-min load {v[0]}-{v[2]} (median {v[1]})" for k, v in info["load_1m_min_median_max"].items()]
    sizes = {k: info["model_bytes"] if k == "local disk" else info.get("latency_model_bytes") for k in tables}
    if beside:
        print("\n" + beside_table(beside))
    print("\n" + "\n".join(acceptance(tables, extras, sizes) + skipped + loads) + "\n")
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    print("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text("\n".join(lines) + "\n")
    if args.chart:
        why = report.chart(tables, args.chart, f"{command}  ·  {info['cores']} cores, {info['kernel']}")
        log(why or f"chart: {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
