"""make_plan against an oracle over random layouts, and its order on a real model file.

The oracle works page by page from llama.cpp's placement rules and the tensors' byte ranges;
it shares no code, and no formula, with ``_plan`` or ``_select``, so a bug there cannot hide
behind the same bug here.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warmpool import (
    Chunk,
    ModelFile,
    ModelLayout,
    Plan,
    Selection,
    TensorInfo,
    make_plan,
    read_layout,
)
from warmpool._plan import PAGE_SIZE

P = PAGE_SIZE
LAYER_NAMES = ("attn_q.weight", "attn_norm.weight", "ffn_gate_inp.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
OTHER_NAMES = ("token_embd.weight", "rope_freqs.weight", "output_norm.weight", "output.weight")


def key_of(t: TensorInfo, n_layers: int) -> int:
    if t.layer is not None:
        return t.layer
    return n_layers if t.name.startswith("output") else -1


def merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-touching intervals covering the same bytes."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


MAX_LAYERS = 6
ALL_NAMES = [f"blk.{i}.{n}" for i in range(MAX_LAYERS) for n in LAYER_NAMES] + list(OTHER_NAMES)
# Built once: constructing strategies inside the composite is most of a draw's cost.
NAMES = st.lists(st.sampled_from(ALL_NAMES), min_size=1, max_size=24, unique=True)
GAP = st.integers(0, 3 * P)  # under a page: neighbours share their boundary page
NBYTES = st.one_of(st.integers(0, 64), st.integers(1, 40 * P))
TAIL = st.integers(0, 2 * P)  # the last page of a file may be partial
DATA_OFFSET = st.integers(0, 3 * P)


@st.composite
def layouts(draw) -> ModelLayout:
    """1-3 files of back-to-back tensors with random gaps, sizes and page-unaligned offsets."""
    names = draw(NAMES)
    layers = [int(name.split(".")[1]) if name.startswith("blk.") else None for name in names]
    n_layers = draw(st.integers(max((x for x in layers if x is not None), default=0) + 1, MAX_LAYERS + 1))
    n_files = draw(st.integers(1, 3))
    files: list[ModelFile] = []
    tensors: list[TensorInfo] = []
    for file in range(n_files):
        offset = data_offset = draw(DATA_OFFSET)
        for name, layer in list(zip(names, layers))[file::n_files]:
            offset += draw(GAP)
            nbytes = draw(NBYTES)
            tensors.append(TensorInfo(name, file, offset, nbytes, 0, (nbytes,), layer))
            offset += nbytes
        files.append(ModelFile(f"/model-{file}.gguf", offset + draw(TAIL), data_offset))
    return ModelLayout(tuple(files), tuple(tensors), "test", n_layers, 3, 32, {})


selections = st.builds(
    Selection,
    n_gpu_layers=st.one_of(st.none(), st.integers(-1, 9)),
    cpu_moe=st.booleans(),
    n_cpu_moe=st.integers(0, 7),
    overrides=st.just(()),
)
chunk_sizes = st.one_of(st.integers(1, 64 * P), st.integers(1, 64).map(lambda k: k * P))


# --- the oracle: llama.cpp's placement rules and page arithmetic, one page at a time ----------

EXPERT_NAMES = ("ffn_up_exps.weight", "ffn_down_exps.weight")  # what --cpu-moe keeps (of LAYER_NAMES)


def oracle_on_cpu(selection: Selection, n_layers: int, t: TensorInfo) -> bool:
    """llama.cpp, from its rules (src/llama-model.cpp, common/arg.cpp): the MoE shortcuts are CPU
    overrides and win; else no -ngl keeps everything; else slot il stays iff il < n_layer + 1 - ngl,
    the output layer is slot n_layer, the input layer never leaves."""
    is_expert = t.layer is not None and t.name.split(".", 2)[2] in EXPERT_NAMES
    if is_expert and (selection.cpu_moe or t.layer < selection.n_cpu_moe):
        return True
    if selection.n_gpu_layers is None:
        return True
    ngl = n_layers + 1 if selection.n_gpu_layers < 0 else selection.n_gpu_layers
    slot = t.layer if t.layer is not None else (n_layers if t.name.startswith("output") else None)
    return slot is None or slot < n_layers + 1 - ngl


def oracle_pages(layout: ModelLayout, selected: list[TensorInfo]) -> dict[tuple[int, int], set[int]]:
    """(file, page index) -> layer keys of the selected tensors with a byte on that page."""
    pages: dict[tuple[int, int], set[int]] = {}
    for t in selected:  # an empty tensor has no bytes, so no page
        for byte_page in range(t.offset // P, -(-(t.offset + t.nbytes) // P) if t.nbytes else 0):
            pages.setdefault((t.file, byte_page), set()).add(key_of(t, layout.n_layers))
    return pages


@given(layouts(), selections, chunk_sizes)
def test_plan_against_a_page_by_page_oracle(layout, selection, chunk_size):
    plan = make_plan(layout, selection, chunk_size)
    selected = [t for t in layout.tensors if oracle_on_cpu(selection, layout.n_layers, t)]
    assert list(plan.selected) == selected
    assert plan.bytes_selected == sum(t.nbytes for t in selected)
    pages = oracle_pages(layout, selected)

    # Chunk size: whole pages, at least one, never above what was asked (unless under a page).
    assert plan.chunk_size % P == 0 and plan.chunk_size > chunk_size - P
    assert plan.chunk_size <= max(chunk_size, P)

    covered: list[tuple[int, int]] = []
    for c in plan.chunks:
        size = layout.files[c.file].size
        assert c.offset % P == 0 and 0 < c.length <= plan.chunk_size
        assert c.offset + c.length <= size
        assert c.length % P == 0 or c.offset + c.length == size  # only a chunk at EOF is partial
        chunk_pages = [(c.file, p) for p in range(c.offset // P, -(-(c.offset + c.length) // P))]
        covered += chunk_pages
        keys = set().union(*(pages.get(p, set()) for p in chunk_pages))
        assert (c.layer_lo, c.layer_hi) == (min(keys), max(keys))  # KeyError/ValueError: an unselected chunk
    assert len(covered) == len(set(covered)), "two chunks cover the same page"
    assert set(covered) == set(pages), "the chunks do not cover exactly the selected tensors' pages"
    # Bytes: every page whole, except the one holding EOF, which counts up to EOF.
    assert plan.bytes_planned == sum(min(P, layout.files[f].size - p * P) for f, p in pages)

    # Plan order: a chunk never holds an earlier first layer than the chunk before it.
    firsts = [c.layer_lo for c in plan.chunks]
    assert firsts == sorted(firsts)
    for file in range(len(layout.files)):
        chunks = sorted((c for c in plan.chunks if c.file == file), key=lambda c: c.offset)
        assert_even_extents(chunks, plan.chunk_size)


def assert_even_extents(chunks: list[Chunk], chunk_size: int) -> None:
    """Chunks of one extent (a run of touching chunks) differ by at most a page, and are as few
    as chunk_size allows."""
    runs: list[list[Chunk]] = []
    for c in chunks:
        if runs and runs[-1][-1].offset + runs[-1][-1].length == c.offset:
            runs[-1].append(c)
        else:
            runs.append([c])
    for run in runs:
        pages = [-(-c.length // P) for c in run]
        assert max(pages) - min(pages) <= 1, pages
        extent_pages = sum(pages)
        assert len(run) == -(-extent_pages * P // chunk_size)


# --- examples on the synthetic qwen3moe ----------------------------------------------------------


@pytest.fixture(scope="module")
def layout(test_model) -> ModelLayout:
    return read_layout(test_model)


def holding(plan: Plan, name: str) -> list[int]:
    """Indexes (in plan order) of the chunks holding bytes of the tensor."""
    t = next(t for t in plan.layout.tensors if t.name == name)
    return [i for i, c in enumerate(plan.chunks) if c.offset < t.offset + t.nbytes and c.offset + c.length > t.offset]


def test_embeddings_first_output_last(layout):
    plan = make_plan(layout, chunk_size=256 << 10)
    assert len(plan.chunks) > 20
    assert holding(plan, "token_embd.weight")[0] == 0
    assert plan.chunks[0].layer_lo == -1
    assert holding(plan, "output.weight")[-1] == len(plan.chunks) - 1
    assert plan.chunks[-1].layer_hi == layout.n_layers
    firsts = [holding(plan, f"blk.{i}.attn_norm.weight")[0] for i in range(layout.n_layers)]
    assert firsts == sorted(firsts)  # early layers are warmed first


def test_whole_model_is_one_extent(layout):
    """Every tensor selected: the chunks tile the data section, page aligned, to EOF."""
    plan = make_plan(layout)
    size, start = layout.files[0].size, layout.files[0].data_offset
    spans = merge((c.offset, c.offset + c.length) for c in plan.chunks)
    assert spans == [(start // P * P, size)]
    assert plan.bytes_selected == layout.nbytes


def test_offloaded_output_is_not_planned(layout):
    plan = make_plan(layout, Selection(n_gpu_layers=1))
    assert max(c.layer_hi for c in plan.chunks) == layout.n_layers - 1
    assert not holding(plan, "output.weight") or all(
        plan.chunks[i].layer_hi < layout.n_layers for i in holding(plan, "output.weight")
    )


def test_chunk_size_is_page_rounded(layout):
    assert make_plan(layout, chunk_size=1).chunk_size == P
    assert make_plan(layout, chunk_size=3 * P + 5).chunk_size == 3 * P
    assert all(c.length <= 3 * P for c in make_plan(layout, chunk_size=3 * P + 5).chunks)
