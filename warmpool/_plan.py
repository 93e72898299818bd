"""Turn the selected tensors into the chunks the workers fault in.

Pipeline: selected tensors -> page-aligned byte ranges per file -> extents (overlapping or
touching ranges merged, since neighbouring tensors share their boundary pages) -> chunks of at
most ``chunk_size`` bytes, sized evenly within each extent -> ordered by the first layer they
hold, so a warm that runs in plan order makes early layers ready first (an engine's first
forward pass walks the layers in order).  Non-layer tensors get layer keys where an engine
needs them: the input layer (``token_embd`` and friends) is key -1, first; the output layer is
key ``n_layers``, last.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

from ._gguf.layout import ModelFile, ModelLayout, TensorInfo
from ._platform import PAGE_SIZE  # the platform layer's, the one page size
from ._select import Selection
from ._units import DEFAULT_CHUNK_SIZE  # defined there: the CLI's parser needs it without a plan

__all__ = ["Chunk", "DEFAULT_CHUNK_SIZE", "PAGE_SIZE", "Plan", "contiguous_runs", "layer_key", "make_plan", "page_span",
           "plan_tensors", "prioritize"]


class Chunk(NamedTuple):
    file: int  # index into Plan.files
    offset: int  # page aligned
    length: int  # a multiple of the page size, except a chunk that ends at the end of its file
    layer_lo: int  # inclusive range of the layer keys whose tensor pages the chunk holds
    layer_hi: int


class Plan(NamedTuple):
    layout: ModelLayout
    selection: Selection
    selected: tuple[TensorInfo, ...]
    chunks: tuple[Chunk, ...]
    chunk_size: int

    @property
    def files(self) -> tuple[ModelFile, ...]:
        return self.layout.files

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def bytes_selected(self) -> int:
        return sum(t.nbytes for t in self.selected)

    @property
    def bytes_planned(self) -> int:
        """Bytes of the pages the chunks cover (selected tensors rounded out to pages)."""
        return sum(c.length for c in self.chunks)


def layer_key(tensor: TensorInfo, n_layers: int) -> int:
    if tensor.layer is not None:
        return tensor.layer
    return n_layers if tensor.name.startswith("output") else -1


def page_span(start: int, end: int, file_size: int) -> tuple[int, int]:
    """``[start, end)`` rounded out to whole pages, clipped at the end of the file: the last page
    of a file is partial, and counting past EOF would report bytes that can never be resident
    (and start a pool to warm them)."""
    return start - start % PAGE_SIZE, min(-(-end // PAGE_SIZE) * PAGE_SIZE, file_size)


def _page_ranges(tensors: list[TensorInfo], files: tuple[ModelFile, ...], n_layers: int) -> dict[int, list[tuple[int, int, int]]]:
    """Per file: (first byte of the first page, end of the last page or of the file, layer key)."""
    ranges: dict[int, list[tuple[int, int, int]]] = {}
    for t in tensors:
        if t.nbytes:
            start, end = page_span(t.offset, t.offset + t.nbytes, files[t.file].size)
            ranges.setdefault(t.file, []).append((start, end, layer_key(t, n_layers)))
    for file_ranges in ranges.values():
        file_ranges.sort()
    return ranges


def _extents(ranges: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Group sorted page ranges into runs that overlap or touch (each run is one extent)."""
    groups: list[list[tuple[int, int, int]]] = []
    end = -1
    for r in ranges:
        if groups and r[0] <= end:
            groups[-1].append(r)
            end = max(end, r[1])
        else:
            groups.append([r])
            end = r[1]
    return groups


def _split(file: int, pieces: list[tuple[int, int, int]], chunk_size: int) -> list[Chunk]:
    """Cut one extent into equal-sized page-aligned chunks of at most chunk_size."""
    start, end = pieces[0][0], max(p[1] for p in pieces)
    pages = -(-(end - start) // PAGE_SIZE)
    n = -(-pages * PAGE_SIZE // chunk_size)
    # The pieces over [lo, hi) lie between the first whose running end passes lo and the last
    # that starts before hi: a whole-file extent has hundreds of pieces and chunks, and testing
    # every piece for every chunk cost 37 ms of a warm's start-up.
    starts = [p[0] for p in pieces]
    reach = list(itertools.accumulate((p[1] for p in pieces), max))
    chunks = []
    for i in range(n):
        lo = start + (pages * i // n) * PAGE_SIZE
        hi = min(start + (pages * (i + 1) // n) * PAGE_SIZE, end)
        first, last = bisect.bisect_right(reach, lo), bisect.bisect_left(starts, hi)
        keys = [k for s, e, k in pieces[first:last] if e > lo]
        chunks.append(Chunk(file, lo, hi - lo, min(keys), max(keys)))
    return chunks


def contiguous_runs(chunks) -> dict[int, list[tuple[int, int]]]:
    """Per file, the (start, end) byte runs that chunks (file, offset, length, ...) cover,
    merged where they touch or overlap."""
    runs: dict[int, list[list[int]]] = {}
    for file, offset, length, *_ in sorted(chunks, key=lambda c: (c[0], c[1])):
        file_runs = runs.setdefault(file, [])
        if file_runs and offset <= file_runs[-1][1]:
            file_runs[-1][1] = max(file_runs[-1][1], offset + length)
        else:
            file_runs.append([offset, offset + length])
    return {file: [(a, b) for a, b in r] for file, r in runs.items()}


def make_plan(layout: ModelLayout, selection: Selection = Selection(), chunk_size: int = DEFAULT_CHUNK_SIZE) -> Plan:
    """Select the tensors an engine keeps on the CPU and plan their warm."""
    on_cpu = selection.cpu_filter(layout.n_layers)
    return plan_tensors(layout, selection, [t for t in layout.tensors if on_cpu(t.name, t.layer)], chunk_size)


def plan_tensors(layout: ModelLayout, selection: Selection, selected, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Plan:
    """Plan the warm of these tensors (``make_plan`` after its selection; a keeper that holds
    part of a selection plans that part with it)."""
    chunk_size = max(PAGE_SIZE, chunk_size - chunk_size % PAGE_SIZE)
    selected = list(selected)
    chunks: list[Chunk] = []
    for file, ranges in _page_ranges(selected, layout.files, layout.n_layers).items():
        for pieces in _extents(ranges):
            chunks += _split(file, pieces, chunk_size)
    chunks.sort(key=lambda c: (c.layer_lo, c.file, c.offset))
    return Plan(layout, selection, tuple(selected), tuple(chunks), chunk_size)


def _owners(covered: list[tuple[int, int]], pieces: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Cut the covered runs of one file into (start, end, owner) segments: owner is the lowest
    group index among the pieces (start, end, group) over it, or -1 where no piece lies."""
    cuts = sorted({p for a, b in covered for p in (a, b)} | {p for a, b, _ in pieces for p in (a, b)})
    starts = sorted(pieces)
    heap: list[tuple[int, int]] = []  # (group, end) of the pieces open at the sweep point
    k, segments = 0, []
    runs = iter(covered)
    run = next(runs, None)
    for lo, hi in pairwise(cuts):
        while run is not None and run[1] <= lo:
            run = next(runs, None)
        while k < len(starts) and starts[k][0] <= lo:
            heapq.heappush(heap, (starts[k][2], starts[k][1]))
            k += 1
        while heap and heap[0][1] <= lo:  # the best open piece ended: drop it (lazily)
            heapq.heappop(heap)
        if run is None or not run[0] <= lo < run[1]:
            continue  # not planned (another tensor's pages, or past the selection)
        owner = heap[0][0] if heap else -1
        if segments and segments[-1][1] == lo and segments[-1][2] == owner:
            segments[-1] = (segments[-1][0], hi, owner)
        else:
            segments.append((lo, hi, owner))
    return segments


def prioritize(plan: Plan, groups: Sequence[Sequence[tuple[int, int, int]]]) -> Plan:
    """The same pages in another order: the pages outside every group first (in plan order),
    then each group's pages in the order given.  A group is (file, start, end) byte ranges,
    taken as whole pages; a page two groups share goes with the earlier one.  Chunks stay page
    aligned, at most ``chunk_size``, cut evenly within each run (the ordering step behind
    ``warm --profile``: the hottest experts right after the dense tensors)."""
    tensor_pages = _page_ranges(list(plan.selected), plan.files, plan.n_layers)
    # Per file, the largest end so far along the sorted ranges: where a segment's candidates
    # start (bisect), instead of a scan of every tensor for each of thousands of segments.
    reach = {file: list(itertools.accumulate((b for _, b, _ in r), max)) for file, r in tensor_pages.items()}
    covered = contiguous_runs(plan.chunks)
    pieces: dict[int, list[tuple[int, int, int]]] = {}
    for g, ranges in enumerate(groups):
        for file, start, end in ranges:
            lo, hi = page_span(start, end, plan.files[file].size)
            if hi > lo:
                pieces.setdefault(file, []).append((lo, hi, g))
    rest: list[Chunk] = []
    ranked: list[tuple[int, int, int, Chunk]] = []  # (group, file, offset, chunk)
    for file, runs in covered.items():
        for lo, hi, owner in _owners(runs, pieces.get(file, [])):
            # The tensors' own page ranges, clipped to the segment, carry its layer keys.
            ranges, keyed = tensor_pages[file], []
            for j in range(bisect.bisect_right(reach[file], lo), len(ranges)):
                a, b, key = ranges[j]
                if a >= hi:
                    break
                if b > lo:
                    keyed.append((max(a, lo), min(b, hi), key))
            keyed.sort()
            for c in _split(file, keyed, plan.chunk_size):
                if owner < 0:
                    rest.append(c)
                else:
                    ranked.append((owner, file, c.offset, c))
    rest.sort(key=lambda c: (c.layer_lo, c.file, c.offset))
    ranked.sort(key=lambda r: r[:3])
    # Neighbours in the new order that are neighbours in the file too (an expert's slice in one
    # tensor split in pieces, or two experts ranked one after the other) become one chunk while
    # it fits: fewer, larger chunks cost less per byte to hand out.
    merged: list[Chunk] = []
    for _, _, _, c in ranked:
        last = merged[-1] if merged else None
        if last and last.file == c.file and last.offset + last.length == c.offset and last.length + c.length <= plan.chunk_size:
            merged[-1] = last._replace(length=last.length + c.length, layer_lo=min(last.layer_lo, c.layer_lo),
                                       layer_hi=max(last.layer_hi, c.layer_hi))
        else:
            merged.append(c)
    return plan._replace(chunks=tuple(rest) + tuple(merged))
