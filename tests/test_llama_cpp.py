"""engine_adapter.llama_cpp: the selection derived from Llama's keyword arguments, and a real
llama.cpp (llama-cpp-python, installed by the test extra) generating text from a synthetic
MoE while warmpool warms it.
"""

from __future__ import annotations

import glob
import os
import time

import psutil
import pytest
from conftest import evict_file, resident_fraction

import warmpool
from engine_adapter.llama_cpp import load, selection_for
from warmpool import ProgressView

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


class WaitsForTheWarm(dict):
    """An empty ``Llama(kv_overrides=...)``: llama-cpp-python reads its items before it loads
    the model.  They wait until the warm is seen running mid-way, so the model load (which reads
    the whole file) and the constructor's failure after it land mid-warm whatever the
    machine's load; the failure itself is llama.cpp's."""

    view = None
    mid_warm = None  # the snapshot that showed the warm running, not done

    def items(self):
        prefix, deadline = f"warmpool-{os.getpid()}-", time.monotonic() + 30
        while time.monotonic() < deadline and self.mid_warm is None:
            if self.view is None:
                for name in os.listdir("/dev/shm"):
                    if name.startswith(prefix):
                        try:
                            self.view = ProgressView.attach(name)
                        except warmpool.ProgressError:  # not initialised yet: look again
                            pass
            if self.view is not None:
                snap = self.view.snapshot()
                if snap.state == "running" and 0 < snap.done_bytes < snap.total_bytes:
                    self.mid_warm = snap
            time.sleep(0.001)
        return super().items()


@pytest.mark.slow
@pytest.mark.pagecache
def test_a_failing_constructor_cancels_the_warm_mid_way(private_model):
    """Llama() loads the real model, then fails to create its context (a quantized V cache
    without flash attention, which llama.cpp refuses) while the warm is running: load()
    cancels the warm, llama-cpp-python's own error propagates, and nothing is left (segment,
    workers).  The warm reads the evicted model in 16 KiB chunks with one worker: seconds."""
    evict_file(private_model)
    hook = WaitsForTheWarm()
    with pytest.raises(ValueError, match="llama_context"):  # llama-cpp-python's own error, unchanged
        load(private_model, n_ctx=256, verbose=False, type_v=8, flash_attn=False, kv_overrides=hook,  # 8: Q8_0
             warmup_options={"chunk_size": 16 << 10, "workers": 1})
    assert hook.mid_warm is not None, "the warm was never seen running mid-way"
    final = hook.view.snapshot()
    hook.view.close()
    assert final.state == "cancelled" and final.done_bytes < final.total_bytes, final
    assert glob.glob(f"/dev/shm/warmpool-{os.getpid()}-*") == []
    workers = [p for p in psutil.Process().children(recursive=True) if "warmpool._pool.worker" in " ".join(p.cmdline())]
    assert workers == []
