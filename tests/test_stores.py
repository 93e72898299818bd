"""Model references: stores laid out in temporary directories exactly as Ollama, huggingface_hub,
llama.cpp (hub layout and the older flat cache) and LM Studio write them, each resolving to the
same plan as the plain path; unknown and ambiguous names; which environment variable wins."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import warmpool
from tests.helpers.stores import link, make_hub, make_ollama
from warmpool import (
    AmbiguousModelError,
    ModelNotFoundError,
    resolve_model,
    resolve_models,
)
from warmpool._stores import ollama as _store_ollama

STORE_VARS = ("OLLAMA_MODELS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "LLAMA_CACHE")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty home: no store anywhere until a test makes one."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    for var in STORE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_store_ollama, "SERVICE_MODELS", str(tmp_path / "no-service"))
    return h


def same_plan(ref, path) -> None:
    got, want = warmpool.plan_model(ref, n_gpu_layers=2, n_cpu_moe=1), warmpool.plan_model(path, n_gpu_layers=2, n_cpu_moe=1)
    assert got.chunks == want.chunks and got.selected == want.selected
    assert [f.size for f in got.files] == [f.size for f in want.files]


@pytest.mark.parametrize(("name", "parts"), [
    ("qwen3", ("registry.ollama.ai", "library", "qwen3", "latest")),
    ("qwen3:30b-a3b", ("registry.ollama.ai", "library", "qwen3", "30b-a3b")),
    ("myuser/mymodel:v1.2", ("registry.ollama.ai", "myuser", "mymodel", "v1.2")),
    ("hf.co/unsloth/Qwen3-30B-A3B-GGUF:Q4_K_M", ("hf.co", "unsloth", "Qwen3-30B-A3B-GGUF", "Q4_K_M")),
    ("https://example.com:5000/ns/m:t", ("example.com:5000", "ns", "m", "t")),
    ("a//b", None), ("m:", None), ("ns.with.dot/m", None), ("-m", None), ("m:t/x", None),
])
def test_ollama_names_parse_as_ollama_does(name, parts):
    assert _store_ollama.parse_name(name) == parts


def test_ollama_store(home, tiny_model, tmp_path):
    models = home / ".ollama" / "models"
    blob = make_ollama(models, tiny_model, "registry.ollama.ai", "library", "tiny", "latest")
    make_ollama(models, tiny_model, "hf.co", "org", "Tiny-GGUF", "Q8_0")
    for ref in ("tiny", "tiny:latest", "library/tiny", "ollama:tiny", "registry.ollama.ai/library/tiny:latest", "TINY"):
        model = resolve_model(ref)
        assert (model.store, model.name, model.paths) == ("ollama", "tiny:latest", (str(blob),)), ref
        same_plan(ref, tiny_model)
    assert resolve_model("hf.co/org/Tiny-GGUF:Q8_0").name == "hf.co/org/Tiny-GGUF:Q8_0"
    with pytest.raises(ModelNotFoundError, match=r"tiny:other.*ollama .*manifests/registry.ollama.ai/library/tiny/other"):
        resolve_model("ollama:tiny:other")


def test_ollama_models_variable_replaces_the_defaults(home, tiny_model, tmp_path, monkeypatch):
    make_ollama(home / ".ollama" / "models", tiny_model, "registry.ollama.ai", "library", "tiny", "latest")
    service = tmp_path / "service"
    make_ollama(service, tiny_model, "registry.ollama.ai", "library", "svc", "latest")
    monkeypatch.setattr(_store_ollama, "SERVICE_MODELS", str(service))
    assert resolve_model("svc").store == "ollama"  # the Linux service's store is a default location
    custom = tmp_path / "custom"
    make_ollama(custom, tiny_model, "registry.ollama.ai", "library", "other", "latest")
    monkeypatch.setenv("OLLAMA_MODELS", f' "{custom}" ')  # envconfig.Var trims spaces and quotes
    assert resolve_model("other").paths[0].startswith(str(custom))
    with pytest.raises(ModelNotFoundError):
        resolve_model("ollama:tiny")


def test_hub_cache_chooses_the_file_as_llama_cpp_does(home, tiny_model, split_model, tmp_path):
    cache = home / ".cache" / "huggingface" / "hub"
    snapshot = make_hub(cache, "org/Tiny-GGUF", {
        "Tiny-Q8_0.gguf": tiny_model, "Tiny-Q4_K_M.gguf": tiny_model, "mmproj-Tiny-Q4_K_M.gguf": tiny_model,
        "Tiny.imatrix.gguf": tiny_model, "README.md": tiny_model,
        **{f"split/Tiny-IQ2_M-{k:05d}-of-00003.gguf": s for k, s in enumerate(split_model, 1)},
    })
    cases = {
        "hf:org/Tiny-GGUF": "Tiny-Q4_K_M.gguf",  # no tag: Q4_K_M first
        "org/Tiny-GGUF": "Tiny-Q4_K_M.gguf",  # bare: not an Ollama model here, so Hugging Face
        "hf:org/Tiny-GGUF:q8_0": "Tiny-Q8_0.gguf",  # tags match ignoring case
        "hf:org/Tiny-GGUF/Tiny-Q8_0.gguf": "Tiny-Q8_0.gguf",  # a file named in the repository
        "hf:org/tiny-gguf:IQ2_M": "split/Tiny-IQ2_M-00001-of-00003.gguf",  # repo ids ignore case; first shard
        "hf.co/org/Tiny-GGUF:Q8_0": "Tiny-Q8_0.gguf",  # Ollama's spelling, not pulled by Ollama: the HF cache
    }
    for ref, rel in cases.items():
        model = resolve_model(ref)
        assert model.store == "hf" and model.paths[0] == str(snapshot / rel), ref
        assert model.name == f"org/Tiny-GGUF/{rel}"
    assert len(resolve_model("hf:org/Tiny-GGUF:IQ2_M").paths) == 3
    same_plan("hf:org/Tiny-GGUF:Q8_0", tiny_model)
    same_plan("hf:org/Tiny-GGUF:IQ2_M", split_model[0])
    with pytest.raises(ModelNotFoundError, match="hf "):
        resolve_model("hf:org/Tiny-GGUF:Q5_K_S")


def test_hub_cache_without_q4_k_m_takes_q8_0_then_the_first(home, tiny_model):
    cache = home / ".cache" / "huggingface" / "hub"
    make_hub(cache, "a/b", {"b-F16.gguf": tiny_model, "b-Q8_0.gguf": tiny_model})
    make_hub(cache, "c/d", {"d-F16.gguf": tiny_model, "d-BF16.gguf": tiny_model}, ref="dev")  # no main: another ref
    assert resolve_model("hf:a/b").name == "a/b/b-Q8_0.gguf"
    assert resolve_model("hf:c/d").name == "c/d/d-BF16.gguf"


@pytest.mark.parametrize("winner", ["LLAMA_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HOME"])
def test_hub_cache_location_precedence(home, tiny_model, tmp_path, monkeypatch, winner):
    """Every variable set, each pointing at a cache holding a differently named file: the one
    that wins is the first in llama.cpp's hf-cache.cpp order (huggingface_hub's after LLAMA_CACHE)."""
    order = ["LLAMA_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HOME"]
    for var in order[order.index(winner):]:
        root = home if var == "HOME" else tmp_path / var
        cache = {"HF_HOME": root / "hub", "XDG_CACHE_HOME": root / "huggingface" / "hub",
                 "HOME": root / ".cache" / "huggingface" / "hub"}.get(var, root)
        make_hub(cache, "org/repo", {f"{var}-Q4_K_M.gguf": tiny_model})
        if var != "HOME":
            monkeypatch.setenv(var, str(root))
    assert resolve_model("hf:org/repo").name == f"org/repo/{winner}-Q4_K_M.gguf"


def test_llama_cpp_flat_cache(home, tiny_model, tmp_path, monkeypatch):
    """Builds before the hub layout: <cache>/<org>_<repo>_<file> and the tag's cached manifest."""
    flat = home / ".cache" / "llama.cpp"
    link(tiny_model, flat / "org_Tiny-GGUF_Tiny-Q4_K_M.gguf")
    link(tiny_model, flat / "org_Tiny-GGUF_Tiny-Q8_0.gguf")
    (flat / "manifest=org_Tiny-GGUF=latest.json").write_text(json.dumps({"ggufFile": {"rfilename": "Tiny-Q8_0.gguf"}}))
    model = resolve_model("hf:org/Tiny-GGUF")
    assert (model.store, model.paths) == ("llama.cpp-cache", (str(flat / "org_Tiny-GGUF_Tiny-Q8_0.gguf"),))
    assert resolve_model("hf:org/Tiny-GGUF:Q4_K_M").paths[0].endswith("org_Tiny-GGUF_Tiny-Q4_K_M.gguf")
    same_plan("hf:org/Tiny-GGUF:Q4_K_M", tiny_model)
    moved = tmp_path / "llama-cache"
    monkeypatch.setenv("LLAMA_CACHE", str(moved))  # replaces ~/.cache/llama.cpp
    with pytest.raises(ModelNotFoundError, match=f"llama.cpp cache {moved}"):
        resolve_model("hf:org/Tiny-GGUF")


def test_lmstudio(home, tiny_model, tmp_path):
    models = home / ".lmstudio" / "models"
    link(tiny_model, models / "lmstudio-community" / "Tiny-GGUF" / "Tiny-Q4_K_M.gguf")
    link(tiny_model, models / "lmstudio-community" / "Tiny-GGUF" / "mmproj-Tiny-F16.gguf")
    link(tiny_model, models / "pub" / "Two-GGUF" / "Two-Q4_K_M.gguf")
    link(tiny_model, models / "pub" / "Two-GGUF" / "Two-Q8_0.gguf")
    model = resolve_model("lmstudio:lmstudio-community/Tiny-GGUF")
    assert (model.store, model.name) == ("lmstudio", "lmstudio-community/Tiny-GGUF/Tiny-Q4_K_M.gguf")
    assert resolve_model("lmstudio-community/Tiny-GGUF").store == "lmstudio"  # bare: Ollama, HF, then LM Studio
    same_plan("lmstudio:lmstudio-community/Tiny-GGUF", tiny_model)
    with pytest.raises(AmbiguousModelError, match="holds 2 models"):
        resolve_model("lmstudio:pub/Two-GGUF")
    assert resolve_model("lmstudio:pub/Two-GGUF/Two-Q8_0").name == "pub/Two-GGUF/Two-Q8_0.gguf"
    elsewhere = tmp_path / "lms-home"
    link(tiny_model, elsewhere / "models" / "p" / "r" / "m.gguf")
    (home / ".lmstudio-home-pointer").write_text(f"{elsewhere}\n")  # the pointer wins
    assert resolve_model("lmstudio:p/r").paths[0] == str(elsewhere / "models" / "p" / "r" / "m.gguf")


def test_bare_name_order_ollama_first(home, tiny_model):
    """The same name in Ollama's store and the Hugging Face cache: Ollama's wins."""
    make_ollama(home / ".ollama" / "models", tiny_model, "registry.ollama.ai", "org", "Tiny-GGUF", "latest")
    make_hub(home / ".cache" / "huggingface" / "hub", "org/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": tiny_model})
    assert resolve_model("org/Tiny-GGUF").store == "ollama"
    assert resolve_model("hf:org/Tiny-GGUF").store == "hf"


def test_directory(tmp_path, tiny_model, split_model):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    link(tiny_model, tmp_path / "d" / "one.gguf")
    for shard in split_model:
        link(shard, tmp_path / "d" / "sub" / shard.name)
    link(tiny_model, tmp_path / "d" / "mmproj-x.gguf")
    models = resolve_models(tmp_path / "d")
    assert [(m.store, m.name, len(m.paths)) for m in models] == [("path", "one.gguf", 1), ("path", "sub/tiny-00001-of-00003.gguf", 3)]
    with pytest.raises(AmbiguousModelError, match="holding 2 models"):
        resolve_model(tmp_path / "d")
    assert resolve_model(tmp_path / "d" / "sub").paths == tuple(str(tmp_path / "d" / "sub" / s.name) for s in split_model)
    same_plan(tmp_path / "d" / "sub", split_model[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no .gguf model"):
        resolve_models(tmp_path / "empty")


def test_errors_pickle():
    for error in (ModelNotFoundError("looked in x", "ref"), AmbiguousModelError("two", "ref")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error) == f"ref: {error.message}"


def _cli(*argv: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "warmpool", *argv], capture_output=True, text=True, env=env, timeout=120)


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARS}
    env["HOME"] = str(home)
    env["OLLAMA_MODELS"] = str(home / ".ollama" / "models")  # keep the machine's service store out
    return env


def test_cli_names_the_store_and_plans_as_the_path(home, tiny_model):
    make_ollama(home / ".ollama" / "models", tiny_model, "registry.ollama.ai", "library", "tiny", "q8")
    env = _env(home)
    by_name = _cli("plan", "tiny:q8", "-ngl", "3", "--json", env=env)
    by_path = _cli("plan", str(tiny_model), "-ngl", "3", "--json", env=env)
    assert by_name.returncode == 0, by_name.stderr
    assert "tiny:q8: ollama model tiny:q8 at " in by_name.stderr
    a, b = json.loads(by_name.stdout), json.loads(by_path.stdout)
    assert a["categories"] == b["categories"] and a["chunks"] == b["chunks"] and a["bytes_selected"] == b["bytes_selected"]
    status = _cli("status", "ollama:tiny:q8", "-ngl", "3", "--json", env=env)
    assert status.returncode == 0 and json.loads(status.stdout)["bytes_selected"] == b["bytes_selected"]


def test_cli_unknown_and_ambiguous_are_one_line(home, tiny_model, tmp_path):
    env = _env(home)
    unknown = _cli("warm", "nosuchmodel:7b", env=env)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert len(unknown.stderr.splitlines()) == 1
    assert "nosuchmodel:7b: no such file, and no model of that name; looked in ollama " in unknown.stderr
    assert "hf (not an ORG/REPO name)" in unknown.stderr
    missing_hf = _cli("plan", "org/none", env=env)
    assert missing_hf.returncode == 1 and len(missing_hf.stderr.splitlines()) == 1
    assert f"hf {home}/.cache/huggingface/hub" in missing_hf.stderr and "lmstudio " in missing_hf.stderr
    for k in (1, 2):
        link(tiny_model, tmp_path / "two" / f"m{k}.gguf")
    ambiguous = _cli("evict", str(tmp_path / "two"), env=env)
    assert ambiguous.returncode == 1 and len(ambiguous.stderr.splitlines()) == 1
    assert "a directory holding 2 models (m1.gguf, m2.gguf)" in ambiguous.stderr


def test_list(home, tiny_model, split_model):
    make_ollama(home / ".ollama" / "models", tiny_model, "registry.ollama.ai", "library", "tiny", "latest")
    make_hub(home / ".cache" / "huggingface" / "hub", "org/Tiny-GGUF",
             {f"Tiny-IQ2_M-{k:05d}-of-00003.gguf": s for k, s in enumerate(split_model, 1)})
    link(tiny_model, home / ".lmstudio" / "models" / "p" / "r" / "m.gguf")
    out = _cli("list", "--json", env=_env(home))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["store"], r["name"]) for r in rows] == [
        ("ollama", "tiny:latest"), ("hf", "org/Tiny-GGUF/Tiny-IQ2_M-00001-of-00003.gguf"), ("lmstudio", "p/r/m.gguf")]
    assert rows[1]["size"] == sum(s.stat().st_size for s in split_model) and len(rows[1]["paths"]) == 3
    for row in rows:
        assert row["residency_hidden"] is False and 0.0 <= row["resident_fraction"] <= 1.0
    # The figure is the model's own residency, as `warmpool status` measures it (no flags: every tensor).
    status = _cli("status", "--json", rows[2]["paths"][0], env=_env(home))
    assert abs(json.loads(status.stdout)["resident_fraction"] - rows[2]["resident_fraction"]) < 0.05
    text = _cli("list", env=_env(home))
    assert text.returncode == 0 and "tiny:latest" in text.stdout and "resident" in text.stdout


@pytest.mark.pagecache
def test_python_api_takes_references(home, tiny_model, tmp_path):
    """warm, residency, evict, plan_model and read_layout take a store name where they take a path."""
    private = tmp_path / "private.gguf"
    shutil.copyfile(tiny_model, private)  # evicted here: not the shared file
    blob = make_ollama(home / ".ollama" / "models", private, "registry.ollama.ai", "library", "priv", "latest")
    assert warmpool.read_layout("priv").files[0].path == str(blob)
    warmpool.evict("ollama:priv")
    cold = warmpool.residency("priv").resident_fraction
    result = warmpool.warm("priv", n_gpu_layers=2)
    assert result.path == str(blob) and result.bytes_selected == warmpool.plan_model(private, n_gpu_layers=2).bytes_planned
    assert cold < 0.5 and warmpool.residency("priv", n_gpu_layers=2).resident_fraction == 1.0
    with pytest.raises(ModelNotFoundError):
        warmpool.warm("ollama:absent")


def test_list_reports_hidden_residency_as_null(tiny_model, tmp_path):
    """A model another uid owns, mode 0444 (Ollama's service store), listed by a process without
    CAP_FOWNER/CAP_DAC_OVERRIDE: the kernel hides its residency, so the share is null."""
    from test_hidden_residency import check_setup, dropped, hide

    check_setup()
    (tmp_path / "models").mkdir()
    shutil.copyfile(tiny_model, tmp_path / "models" / "theirs.gguf")
    shutil.copyfile(tiny_model, tmp_path / "models" / "ours.gguf")
    hide(tmp_path / "models" / "theirs.gguf")
    out = dropped(sys.executable, "-m", "warmpool", "list", "--json", str(tmp_path / "models"))
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert rows["theirs.gguf"]["residency_hidden"] is True and rows["theirs.gguf"]["resident_fraction"] is None
    assert rows["ours.gguf"]["residency_hidden"] is False and rows["ours.gguf"]["resident_fraction"] is not None
    assert rows["theirs.gguf"]["size"] == tiny_model.stat().st_size


def test_home_in_a_path_is_expanded(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    link(tiny_model, tmp_path / "models" / "m.gguf")
    assert resolve_model("~/models/m.gguf").paths == (str(tmp_path / "models" / "m.gguf"),)
    assert warmpool.read_layout("~/models/m.gguf").files[0].path == str(tmp_path / "models" / "m.gguf")


def test_lmstudio_home_order(home, tiny_model, tmp_path):
    """findLMStudioHome: the pointer file, else ~/.cache/lm-studio when it exists, else ~/.lmstudio."""
    link(tiny_model, home / ".lmstudio" / "models" / "p" / "r" / "default.gguf")
    assert resolve_model("lmstudio:p/r").name == "p/r/default.gguf"
    link(tiny_model, home / ".cache" / "lm-studio" / "models" / "p" / "r" / "legacy.gguf")
    assert resolve_model("lmstudio:p/r").name == "p/r/legacy.gguf"
    link(tiny_model, tmp_path / "pointed" / "models" / "p" / "r" / "pointed.gguf")
    (home / ".lmstudio-home-pointer").write_text(str(tmp_path / "pointed"))
    assert resolve_model("lmstudio:p/r").name == "p/r/pointed.gguf"


def test_hub_cache_blob_missing_is_not_cached(home, tiny_model):
    """A snapshot link whose blob is gone (an interrupted download, a pruned cache) is no model."""
    snapshot = make_hub(home / ".cache" / "huggingface" / "hub", "org/repo", {"m-Q4_K_M.gguf": tiny_model})
    os.unlink(os.path.realpath(snapshot / "m-Q4_K_M.gguf"))
    with pytest.raises(ModelNotFoundError, match="looked in"):
        resolve_model("hf:org/repo")


def test_cli_takes_llama_cpp_model_flags(home, tiny_model):
    """-hf/-hff/-m as llama.cpp reads them, resolved offline from the HF cache (argparse once
    read -hf as -h, printing help and exiting 0)."""
    make_hub(home / ".cache" / "huggingface" / "hub", "org/tiny-GGUF", {"tiny-Q8_0.gguf": tiny_model, "tiny-Q4_K_M.gguf": tiny_model})
    env = _env(home)
    want = json.loads(_cli("plan", str(tiny_model), "-ngl", "3", "--json", env=env).stdout)
    for flags in (["-hf", "org/tiny-GGUF:Q8_0"], ["-hf", "org/tiny-GGUF"], ["--hf-repo", "org/tiny-GGUF", "-hff", "tiny-Q8_0.gguf"],
                  ["-m", str(tiny_model)]):
        got = _cli("plan", *flags, "-ngl", "3", "--json", env=env)
        assert got.returncode == 0, (flags, got.stderr)
        a = json.loads(got.stdout)
        assert (a["bytes_selected"], a["categories"], a["chunks"]) == (want["bytes_selected"], want["categories"], want["chunks"])
        if flags[0] != "-m":
            assert "hf model org/tiny-GGUF/tiny-" in got.stderr
    chosen = _cli("plan", "-hf", "org/tiny-GGUF", "--json", env=env)
    assert "tiny-Q4_K_M.gguf" in chosen.stderr  # no quant: Q4_K_M first, as llama.cpp chooses
    both = _cli("plan", str(tiny_model), "-m", str(tiny_model), env=env)
    assert both.returncode == 2 and both.stderr.count("\n") == 1 and "two models" in both.stderr
    lone = _cli("plan", "-hff", "tiny-Q8_0.gguf", env=env)
    assert lone.returncode == 2 and "-hff/--hf-file without -hf" in lone.stderr and "Traceback" not in lone.stderr
