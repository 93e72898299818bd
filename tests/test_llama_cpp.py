"""engine_adapter.llama_cpp: the selection derived from Llama's keyword arguments, and a real
llama.cpp (llama-cpp-python, installed by the test extra) generating text from a synthetic
MoE while warmpool warms it.
"""

from __future__ import annotations

import glob
import os
import threading

import psutil
import pytest

import warmpool
from warmpool import ProgressView
from conftest import evict_file, resident_fraction
from engine_adapter.llama_cpp import load, selection_for

NO_OVERRIDE_PARAMETER = {"n_gpu_layers", "n_ctx"}  # llama-cpp-python 0.3.36's Llama takes no overrides


def test_cpu_only_build_warms_everything_whatever_n_gpu_layers_says():
    for kwargs in ({}, {"n_gpu_layers": 0}, {"n_gpu_layers": -1}, {"n_gpu_layers": 20}):
        assert selection_for(kwargs, gpu_offload=False, accepted=NO_OVERRIDE_PARAMETER) == {}


def test_gpu_build_models_n_gpu_layers_with_llama_cpp_python_defaults():
    assert selection_for({}, gpu_offload=True, accepted=NO_OVERRIDE_PARAMETER) == {"n_gpu_layers": 0}
    assert selection_for({"n_gpu_layers": -1}, gpu_offload=True, accepted=NO_OVERRIDE_PARAMETER) == {"n_gpu_layers": -1}


def test_overrides_are_modelled_only_when_llama_applies_them():
    kwargs = {"n_gpu_layers": -1, "override_tensor": r"\.ffn_.*_exps=CPU,attn=CUDA0"}
    with pytest.warns(UserWarning, match="ignores it"):
        assert selection_for(kwargs, gpu_offload=True, accepted=NO_OVERRIDE_PARAMETER) == {"n_gpu_layers": -1}
    accepted = NO_OVERRIDE_PARAMETER | {"override_tensor"}
    assert selection_for(kwargs, gpu_offload=True, accepted=accepted) == {
        "n_gpu_layers": -1, "overrides": ((r"\.ffn_.*_exps", "CPU"), ("attn", "CUDA0"))}
    pairs = {"tensor_buft_overrides": [(r"exps", "CPU")]}
    assert selection_for(pairs, gpu_offload=True, accepted={"tensor_buft_overrides"}) == {
        "n_gpu_layers": 0, "overrides": (("exps", "CPU"),)}


@pytest.mark.slow
@pytest.mark.pagecache
def test_load_generates_text_with_the_selection_resident(private_model):
    import llama_cpp  # the test extra installs it
    evict_file(private_model)
    assert resident_fraction(private_model) < 0.05
    llm, warmup = load(private_model, n_ctx=256, seed=1, verbose=False, warmup_options={"raise_errors": True})
    try:
        assert isinstance(llm, llama_cpp.Llama)
        out = llm.create_completion("Hello", max_tokens=4, temperature=0.0)
        assert isinstance(out["choices"][0]["text"], str) and out["usage"]["completion_tokens"] >= 1
        result = warmup.wait(timeout=60)
    finally:
        llm.close()
    # MAP_POPULATE may win the race for some pages: they count as already resident, not warmed.
    assert result is not None and result.resident_fraction >= 0.99
    expected = {} if not llama_cpp.llama_supports_gpu_offload() else {"n_gpu_layers": 0}
    assert result.bytes_selected == warmpool.plan_model(private_model, **expected).bytes_planned
    assert warmpool.residency(private_model, **expected).resident_fraction >= 0.99


def watch_segment(found: list, stop: threading.Event) -> None:
    """Attach to this process's progress segment as soon as it appears in /dev/shm."""
    prefix = f"warmpool-{os.getpid()}-"
    while not stop.is_set() and not found:
        for name in os.listdir("/dev/shm"):
            if name.startswith(prefix):
                try:
                    found.append(ProgressView.attach(name))
                except warmpool.ProgressError:  # not initialised yet, or gone: look again
                    continue
                return
        stop.wait(0.001)


@pytest.mark.slow
@pytest.mark.pagecache
def test_a_failing_constructor_cancels_the_warm_mid_way(gemma_model):
    """Llama() loads the real, evicted Gemma model (reading all 253 MB) and then fails to
    create its context (a quantized V cache without flash attention, which llama.cpp refuses)
    while the warm is still running: load() cancels it, the engine's own error propagates,
    and nothing is left (segment, workers).  Reading 253 MB takes longer than the warm's start,
    and the warm in 64 KiB chunks with one worker takes longer than the load; the test checks
    that it did catch the warm mid-way."""
    evict_file(gemma_model)
    found, stop = [], threading.Event()
    watcher = threading.Thread(target=watch_segment, args=(found, stop), daemon=True)
    watcher.start()
    slow = {"chunk_size": 64 << 10, "workers": 1}  # ~3,900 chunks: longer than the model load
    try:
        with pytest.raises(ValueError, match="llama_context"):  # llama-cpp-python's own error, unchanged
            load(gemma_model, n_ctx=256, verbose=False, type_v=8, flash_attn=False,  # 8: GGML_TYPE_Q8_0
                 warmup_options=slow)
    finally:
        stop.set()
        watcher.join()
    assert found, "the warm never created its progress segment: the constructor failed before the warm started"
    view = found[0]
    snap = view.snapshot()
    view.close()
    assert snap.state == "cancelled" and snap.done_bytes < snap.total_bytes, snap  # stopped mid-warm
    assert glob.glob(f"/dev/shm/warmpool-{os.getpid()}-*") == []
    workers = [p for p in psutil.Process().children(recursive=True) if "warmpool._worker" in " ".join(p.cmdline())]
    assert workers == []
