"""Medians, paired ratios, the markdown table, JSON lines and the PNG chart of ``bench_warm.py``.

Definitions (README "Performance" repeats them):
- ``median_s``: median wall time of the method's process over the rounds.
- ``GB/s``: bytes the method left resident in the page cache (whole file, mincore) per second,
  so a hint that leaves pages cold scores what it achieved, not the file size; fio's is its own
  reported bandwidth (direct I/O caches nothing).
- ``ratio_vs_vmtouch``: median over rounds of (this method's time / ``vmtouch -t``'s time in the
  same round, on the same storage): paired, so a slow moment of the machine hits both.
- ``fraction_of_fio``: ``GB/s`` / fio's ``GB/s`` (local disk only: no direct I/O on FUSE).
- ``ratio_vs_seq``: median over rounds of (this method's time / the faster of ``cat`` and
  ``dd bs=8M`` in the same round): issue 9's device-speed target.
- ``engine_faults``/``engine_s``: median minor faults and seconds of a fresh process reading one
  byte per 4 KiB page of the file right after the method (``measure.engine_pass``);
  ``faults_vs_dd``: paired median of engine_faults / dd's.
- ``order0``/``pmd``: median share of the resident pages in order-0 and in PMD-size (order >= 9)
  folios (root only; ``tests/helpers/folios.py``).
"""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .peers import Method, Sample

__all__ = ["Row", "chart", "json_record", "markdown_table", "summarize"]

VMTOUCH, FIO, CAT, DD = "vmtouch -t", "fio --direct=1", "cat > /dev/null", "dd bs=8M"


class Row(NamedTuple):
    method: str
    storage: str
    family: str
    command: str
    median_s: float | None
    gbps: float | None
    resident_fraction: float | None  # warmpool's selection (the whole model by default)
    file_resident_fraction: float | None
    ratio_vs_vmtouch: float | None
    fraction_of_fio: float | None
    rounds: int  # successful runs
    seconds: tuple[float, ...]
    workers: tuple[int, ...]  # warmpool: most workers that ran, per round
    note: str  # "unavailable (install X)", an error, or the settle delay
    ratio_vs_seq: float | None = None  # time / min(cat, dd) of the same round
    engine_faults: float | None = None  # the engine pass after the method (median)
    engine_s: float | None = None
    faults_vs_dd: float | None = None
    order0: float | None = None  # share of resident pages in order-0 folios (median; root)
    pmd: float | None = None  # share in PMD-size folios
    bytes_selected: float | None = None  # warmpool: what its selection covers (median)


def _median(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def _gbps(sample: Sample, size: int) -> float | None:
    if sample.seconds is None:
        return None
    if "fio_bw_bytes" in sample.extra:
        return sample.extra["fio_bw_bytes"] / 1e9
    return size * sample.file_resident / sample.seconds / 1e9


def _paired_ratio(samples: Sequence[Sample], vmtouch: dict[int, float | None]) -> float | None:
    return _median(s.seconds / vmtouch[s.round_no] for s in samples
                   if s.seconds is not None and vmtouch.get(s.round_no))


def _engine(sample: Sample, key: str) -> float | None:
    engine = sample.extra.get("engine")
    return engine[key] if engine else None


def _folios(sample: Sample, key: str) -> float | None:
    folios = sample.extra.get("folios")
    return folios[key] if folios else None


def _per_round(everything: Sequence[Sample], label: str, value) -> dict[int, float | None]:
    return {s.round_no: value(s) for s in everything if s.method == label and s.seconds is not None}


def summarize(method: Method, storage: str, samples: Sequence[Sample], everything: Sequence[Sample],
              size: int, note: str = "") -> Row:
    """One row from one method's samples; ``everything`` (same storage) gives the pairs."""
    ok = [s for s in samples if s.seconds is not None]
    errors = sorted({s.error for s in samples if s.error})
    if errors:
        note = "; ".join(filter(None, [note, *errors]))
    if method.settle_s and not note:
        note = f"residency {method.settle_s:.0f} s after the call"
    vmtouch = {s.round_no: s.seconds for s in everything if s.method == VMTOUCH}
    gbps = _median(_gbps(s, size) for s in ok)
    fio = _median(_gbps(s, size) for s in everything if s.method == FIO and s.seconds is not None)
    cat, dd = (_per_round(everything, label, lambda s: s.seconds) for label in (CAT, DD))
    seq = {r: min(t for t in (cat.get(r), dd.get(r)) if t) for r in cat.keys() | dd.keys() if cat.get(r) or dd.get(r)}
    dd_faults = _per_round(everything, DD, lambda s: _engine(s, "minor_faults"))
    faults_vs_dd = _median(_engine(s, "minor_faults") / dd_faults[s.round_no] for s in ok
                           if _engine(s, "minor_faults") is not None and dd_faults.get(s.round_no))
    return Row(method.label, storage, method.family, method.shown(), _median(s.seconds for s in ok), gbps,
               _median(s.selection_resident for s in ok), _median(s.file_resident for s in ok),
               _paired_ratio(ok, vmtouch), gbps / fio if gbps is not None and fio else None,
               len(ok), tuple(round(s.seconds, 4) for s in ok),
               tuple(s.extra["workers"] for s in ok if "workers" in s.extra), note,
               _paired_ratio(ok, seq), _median(_engine(s, "minor_faults") for s in ok),
               _median(_engine(s, "seconds") for s in ok), faults_vs_dd,
               _median(_folios(s, "order0_fraction") for s in ok), _median(_folios(s, "pmd_fraction") for s in ok),
               _median(s.extra.get("bytes_selected") for s in ok))


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def json_record(row: Row) -> dict:
    """The JSON line of one method on one storage."""
    return {"method": row.method, "storage": row.storage, "median_s": _rounded(row.median_s, 4),
            "GB/s": _rounded(row.gbps, 4), "resident_fraction": _rounded(row.resident_fraction, 5),
            "file_resident_fraction": _rounded(row.file_resident_fraction, 5),
            "ratio_vs_vmtouch": _rounded(row.ratio_vs_vmtouch, 4),
            "fraction_of_fio": _rounded(row.fraction_of_fio, 4), "rounds": row.rounds,
            "seconds": list(row.seconds), "workers": list(row.workers) or None,
            "command": row.command, "note": row.note or None,
            "ratio_vs_cat_or_dd": _rounded(row.ratio_vs_seq, 4), "engine_pass_minor_faults": row.engine_faults,
            "engine_pass_s": _rounded(row.engine_s, 4), "engine_faults_vs_dd": _rounded(row.faults_vs_dd, 4),
            "order0_fraction": row.order0, "pmd_fraction": row.pmd, "bytes_selected": row.bytes_selected}


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _ratio_cell(ratio: float | None) -> str:
    if ratio is None:
        return "–"
    return f"{ratio:.2f}× ({1 / ratio:.1f}× faster)" if ratio < 0.5 else f"{ratio:.2f}×"


def markdown_table(rows: Sequence[Row]) -> str:
    """One markdown table (one storage): README pastes it as printed."""
    lines = ["| method | median s | GB/s | time vs vmtouch -t | time vs min(cat, dd) | of fio | resident | workers "
             "| engine pass faults | engine pass s | faults vs dd | order-0 pages | PMD-size folios | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        workers = "–" if not r.workers else "/".join(str(w) for w in sorted(set(r.workers)))
        lines.append(f"| {r.method} | {_cell(r.median_s, '.2f')} | {_cell(r.gbps, '.3f')} | "
                     f"{_ratio_cell(r.ratio_vs_vmtouch)} | {_cell(r.ratio_vs_seq, '.2f')}{'' if r.ratio_vs_seq is None else '×'} | "
                     f"{_cell(r.fraction_of_fio, '.0%')} | {_cell(r.resident_fraction, '.1%')} | {workers} | "
                     f"{_cell(r.engine_faults, ',.0f')} | {_cell(r.engine_s, '.3f')} | "
                     f"{_cell(r.faults_vs_dd, '.2f')}{'' if r.faults_vs_dd is None else '×'} | "
                     f"{_cell(r.order0, '.1%')} | {_cell(r.pmd, '.1%')} | {r.note} |")
    return "\n".join(lines)


_COLOURS = {"warmpool": "#1f77b4", "peer": "#7f7f7f", "hint": "#d62728", "limit": "#2ca02c"}


def chart(rows_by_storage: dict[str, Sequence[Row]], path: str, title: str) -> str | None:
    """A PNG: one panel per storage, bytes made resident per second for each method.

    Returns None, or why no chart was drawn (matplotlib missing).
    """
    try:
        import matplotlib
    except ImportError:
        return "no chart: matplotlib is not installed (pip install '.[bench]')"
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    storages = list(rows_by_storage)
    height = max(len(rows) for rows in rows_by_storage.values()) * 0.32 + 1.2
    fig, axes = plt.subplots(1, len(storages), figsize=(max(5.2 * len(storages), 7), height + 0.6), squeeze=False)
    for ax, storage in zip(axes[0], storages):
        rows = [r for r in rows_by_storage[storage] if r.gbps is not None][::-1]
        values = [r.gbps for r in rows]
        ax.barh([r.method for r in rows], values, color=[_COLOURS[r.family] for r in rows])
        for y, r in enumerate(rows):
            label = f" {r.gbps:.2f}" + ("" if r.family == "limit" else f" · {r.file_resident_fraction:.0%}")
            ax.text(r.gbps, y, label, va="center", fontsize=7)
        ax.set_xlim(0, max(values) * 1.4 if values else 1)
        fio = [r.gbps for r in rows if r.family == "limit"]
        if fio:
            ax.axvline(fio[0], color=_COLOURS["limit"], linestyle="--", linewidth=0.8)
        ax.set_title(storage, fontsize=10)
        ax.set_xlabel("GB/s made resident (fio: device read)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(textwrap.fill(title, 40 * len(storages)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return None
