"""Engine command lines: llama.cpp's tools in every spelling and through LLAMA_ARG_* variables,
llama-cpp-python's server, and `warmpool plan|warm|status -- ENGINE ARGS` planning exactly what
warmpool's own flags plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from warmpool import Selection
from warmpool._engine.args import EngineArgsError, parse_engine
from warmpool._select import moe_overrides

EXPERTS = moe_overrides(cpu_moe=True)


@pytest.mark.parametrize("argv", [
    ["llama-server", "-m", "M.gguf", "-ngl", "20"],
    ["llama-server", "--model", "M.gguf", "--gpu-layers", "20"],
    ["/opt/llama.cpp/bin/llama-cli", "--model=M.gguf", "--n-gpu-layers=20"],
    ["llama-server", "--n_gpu_layers", "20", "-m", "M.gguf"],  # --long_name reads as --long-name
    # flags warmpool ignores, with values that look like its own flags or a model
    ["llama-server", "-c", "4096", "--alias", "-m", "--port", "8080", "-m", "M.gguf", "--jinja", "-ngl", "20",
     "--control-vector-layer-range", "-ngl", "5", "--api-key", "-ngl", "-fa", "on", "-t", "8"],
])
def test_spellings(argv):
    cmd = parse_engine(argv, {})
    assert (cmd.engine, cmd.model, cmd.selection) == ("llama.cpp", "M.gguf", Selection(20))
    assert cmd.reads_page_cache and not cmd.notes


def test_gpu_layers_all_and_auto():
    assert parse_engine(["llama-server", "-m", "M", "-ngl", "all"], {}).selection == Selection(-1)
    auto = parse_engine(["llama-server", "-m", "M", "-ngl", "auto"], {})
    assert auto.selection is None  # the engine fits layers to free VRAM: warmpool must decide
    assert parse_engine(["llama-server", "-m", "M"], {}).selection is None
    off = parse_engine(["llama-server", "-m", "M", "-fit", "off"], {})
    assert off.selection == Selection(-1) and "-fit off" in off.notes[0]


def test_overrides_keep_command_line_order():
    cmd = parse_engine(["llama-server", "-m", "M", "-ngl", "99", "-ot", "blk\\.0\\.=CPU", "--cpu-moe",
                        "--override-tensor", "attn=CUDA0,ffn_norm=CPU", "-ncmoe", "2"], {})
    assert cmd.selection == Selection(99, overrides=(("blk\\.0\\.", "CPU"), *EXPERTS, ("attn", "CUDA0"), ("ffn_norm", "CPU"),
                                                     *moe_overrides(n_cpu_moe=2)))
    assert parse_engine(["llama-server", "-m", "M", "-ngl", "9", "-cmoe"], {}).selection == Selection(9, overrides=EXPERTS)


def test_device_none_keeps_everything_on_the_cpu():
    cmd = parse_engine(["llama-server", "-m", "M", "-ngl", "99", "-ot", "x=CUDA0", "-dev", "none"], {})
    assert cmd.selection == Selection()


@pytest.mark.parametrize(("flags", "env", "reads"), [
    (["--no-mmap"], {}, False),
    (["--no-mmap", "--mmap"], {}, True),
    (["-lm", "none"], {}, False),
    (["--load-mode", "mlock"], {}, False),
    (["-lm", "mmap+mlock"], {}, True),
    (["-lm", "dio"], {}, False),
    (["-dio"], {}, False),
    ([], {"LLAMA_ARG_NO_MMAP": "1"}, False),
    ([], {"LLAMA_ARG_MMAP": "false"}, False),  # a bool option's variable takes a truth value
    ([], {"LLAMA_ARG_MMAP": "on"}, True),
    ([], {"LLAMA_ARG_LOAD_MODE": "none"}, False),
    (["-lm", "auto"], {"LLAMA_ARG_LOAD_MODE": "none"}, True),  # the command line wins
])
def test_loading(flags, env, reads):
    cmd = parse_engine(["llama-server", "-m", "M", "-ngl", "0", *flags], env)
    assert cmd.reads_page_cache is reads
    assert any("warming helps its load only, keeping it warm does not help" in n for n in cmd.notes) is not reads


def test_mlock():
    assert parse_engine(["llama-server", "-m", "M", "--mlock"], {}).mlock
    assert parse_engine(["llama-server", "-m", "M", "-lm", "mmap+mlock"], {}).mlock
    assert parse_engine(["llama-server", "-m", "M"], {"LLAMA_ARG_MLOCK": "1"}).mlock


def test_environment_then_command_line():
    env = {"LLAMA_ARG_MODEL": "E.gguf", "LLAMA_ARG_N_GPU_LAYERS": "7", "LLAMA_ARG_OVERRIDE_TENSOR": "a=CPU,b=CUDA0",
           "LLAMA_ARG_CPU_MOE": "1", "LLAMA_ARG_N_CPU_MOE": "1", "LLAMA_ARG_PORT": "9"}
    cmd = parse_engine(["llama-server"], env)
    # arg.cpp applies variables in option order: -ot, then --cpu-moe, then --n-cpu-moe
    assert cmd.model == "E.gguf"
    assert cmd.selection == Selection(7, overrides=(("a", "CPU"), ("b", "CUDA0"), *EXPERTS, *moe_overrides(n_cpu_moe=1)))
    cmd = parse_engine(["llama-server", "-m", "C.gguf", "-ngl", "3", "-ot", "c=CPU"], env)
    assert cmd.model == "C.gguf" and cmd.selection.n_gpu_layers == 3
    assert cmd.selection.overrides[-1] == ("c", "CPU")  # appended after the variables' overrides
    assert parse_engine(["llama-server", "-m", "M", "-ngl", "5"], {"LLAMA_ARG_CPU_MOE": "0"}).selection == Selection(5)
    assert parse_engine(["llama-server", "-m", "M"], {"LLAMA_ARG_DEVICE": "none"}).selection == Selection()


def test_hugging_face_flags():
    assert parse_engine(["llama-server", "-hf", "org/repo:Q4_K_M"], {}).model == "hf:org/repo:Q4_K_M"
    assert parse_engine(["llama-server", "-hfr", "org/repo"], {}).model == "hf:org/repo"
    assert parse_engine(["llama-server", "--hf-repo", "org/repo:Q8_0", "-hff", "sub/x.gguf"], {}).model == "hf:org/repo/sub/x.gguf"
    assert parse_engine(["llama-server"], {"LLAMA_ARG_HF_REPO": "org/repo", "LLAMA_ARG_HF_FILE": "x.gguf"}).model == "hf:org/repo/x.gguf"
    assert parse_engine(["llama-server", "-m", "local.gguf", "-hf", "org/repo"], {}).model == "local.gguf"


def test_llama_cpp_python_server():
    cmd = parse_engine([sys.executable, "-m", "llama_cpp.server", "--model", "M.gguf", "--n_gpu_layers", "10",
                        "--port", "8000", "--tensor_split", "0.5", "0.5", "--use_mmap", "false"], {})
    assert (cmd.engine, cmd.model, cmd.selection, cmd.reads_page_cache) == ("llama-cpp-python", "M.gguf", Selection(10), False)
    default = parse_engine(["python3", "-m", "llama_cpp.server", "--model=M.gguf"], {})
    assert default.selection == Selection(0) and default.reads_page_cache  # n_gpu_layers defaults to 0
    assert parse_engine(["python", "-m", "llama_cpp.server", "--n_gpu_layers", "-1"], {"MODEL": "E.gguf"}) \
        .selection == Selection(-1)
    assert parse_engine(["python", "-m", "llama_cpp.server"], {"MODEL": "E.gguf", "N_GPU_LAYERS": "4"}).model == "E.gguf"


def test_llama_bench_lists():
    cmd = parse_engine(["llama-bench", "-m", "a.gguf,b.gguf", "-ngl", "10,20", "-ncmoe", "1,3", "-p", "512", "--progress"], {})
    assert cmd.model == "a.gguf" and cmd.selection == Selection(10, overrides=moe_overrides(n_cpu_moe=3))
    assert any("llama-bench runs 2 values of -ngl" in n for n in cmd.notes)


@pytest.mark.parametrize(("argv", "message"), [
    (["llama-server", "-m"], "-m: expected a value"),
    (["llama-server", "-m", "M", "-ngl", "many"], "-ngl: expected a number"),
    (["llama-server", "-m", "M", "-ot", "noequals"], "invalid tensor override"),
    (["llama-server", "-m", "M", "-lm", "fast"], "unknown mode"),
    (["llama-server", "-hff", "x.gguf"], "-hff/--hf-file without -hf"),
    ([], "empty engine command line"),
])
def test_bad_command_lines(argv, message):
    with pytest.raises(EngineArgsError, match=message):
        parse_engine(argv, {})


def _cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "warmpool", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_cli_plans_what_warmpools_flags_plan(test_model):
    own = _cli("plan", str(test_model), "-ngl", "5", "--n-cpu-moe", "2", "-ot", "attn_q=CPU", "--json")
    for engine in (["llama-server", "-m", str(test_model), "-ngl", "5", "--n-cpu-moe=2", "-ot", "attn_q=CPU", "-c", "8192", "--port", "1"],
                   ["llama-server", "--n-cpu-moe", "2", "--port", "1", "-ot", "attn_q=CPU"]):
        got = _cli("plan", "--json", "--", *engine, env={"LLAMA_ARG_MODEL": str(test_model), "LLAMA_ARG_N_GPU_LAYERS": "5"})
        assert got.returncode == 0, got.stderr
        a, b = json.loads(got.stdout), json.loads(own.stdout)
        assert (a["categories"], a["chunks"], a["bytes_selected"]) == (b["categories"], b["chunks"], b["bytes_selected"])
    status = _cli("status", "--json", "--", "llama-server", "-m", str(test_model), "-ngl", "5", "--n-cpu-moe", "2", "-ot", "attn_q=CPU")
    assert json.loads(status.stdout)["bytes_selected"] == json.loads(own.stdout)["bytes_selected"]


def test_cli_engine_decides_placement(test_model, tmp_path):
    everything = json.loads(_cli("plan", str(test_model), "--json").stdout)
    env = {"PATH": str(tmp_path)}  # no llama-fit-params here
    got = _cli("plan", "--json", "--", "llama-server", "-m", str(test_model), env=env)
    assert got.returncode == 0, got.stderr
    assert "llama-fit-params is not on PATH: warming what a CPU-only run keeps (every tensor)" in got.stderr
    assert json.loads(got.stdout)["bytes_selected"] == everything["bytes_selected"]


def test_cli_reads_llama_fit_params_output(test_model, tmp_path):
    """llama-fit-params prints the fitted flags on one stdout line (tools/fit-params/fit-params.cpp:
    ``-c N -ngl N [-ts ...] [-ot "..."]``); this stand-in prints that line for this model."""
    tool = tmp_path / "llama-fit-params"
    tool.write_text('#!/bin/sh\necho "fitting..." >&2\necho \'-c 4096 -ngl 3 -ot "blk\\.0\\.ffn_up_exps=CPU"\'\n')
    tool.chmod(0o755)
    got = _cli("plan", "--json", "--", "llama-server", "-m", str(test_model), env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    want = _cli("plan", str(test_model), "-ngl", "3", "-ot", "blk\\.0\\.ffn_up_exps=CPU", "--json")
    assert got.returncode == 0, got.stderr
    assert 'llama-fit-params chose: -c 4096 -ngl 3 -ot "blk\\.0\\.ffn_up_exps=CPU"' in got.stderr
    assert json.loads(got.stdout)["bytes_selected"] == json.loads(want.stdout)["bytes_selected"]


def test_cli_no_model_is_a_usage_error(test_model):
    got = _cli("plan", "--", "llama-server", "-c", "100")
    assert got.returncode == 2 and got.stdout == "" and len(got.stderr.splitlines()) == 1
    assert "no model in the engine command line" in got.stderr
    both = _cli("plan", "-ngl", "3", "--", "llama-server", "-m", str(test_model))
    assert both.returncode == 2 and "not both" in both.stderr
    wrong = _cli("progress", "x", "--", "llama-server")
    assert wrong.returncode == 2 and "takes no engine command line" in wrong.stderr
    bad = _cli("plan", "--", "llama-server", "-m", str(test_model), "-ngl")
    assert bad.returncode == 1 and bad.stderr == "warmpool: -ngl: expected a value\n"
    nommap = _cli("plan", "--", "llama-server", "-m", str(test_model), "-ngl", "1", "--no-mmap")
    assert nommap.returncode == 0 and "warming helps its load only" in nommap.stderr


def test_keep_reads_the_engine_command_line(test_model, tmp_path):
    """`warmpool keep -- ENGINE` keeps what the engine keeps on the CPU; it ends with --for-pid."""
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    want = json.loads(_cli("plan", str(test_model), "-ngl", "4", "--cpu-moe", "--json").stdout)["bytes_selected"]
    got = _cli("keep", "--json", "--interval", "1", "--for-pid", str(engine.pid), "--",
               "llama-server", "-m", str(test_model), "-ngl", "4", "-cmoe", "--port", "1")
    engine.wait()
    assert got.returncode == 0, got.stderr
    events = [json.loads(line) for line in got.stdout.splitlines()]
    warmed = [e for e in events if e["event"] == "warmed"]
    assert warmed and warmed[0]["bytes_selected"] == want
    assert events[-1]["event"] == "stopped"
