"""docs/deploy's keep recipes parse, and their flags, ports and paths agree with the CLI."""

from __future__ import annotations

import configparser
import os
import shlex
from pathlib import Path

import pytest
import yaml

from warmpool.commands import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "docs" / "deploy"
UNIT = DEPLOY / "systemd" / "warmpool-keep.service"
SIDECAR = DEPLOY / "kubernetes" / "keep-sidecar.yaml"


def parse_keep(argv: list[str]):
    """The CLI's own parser on the recipe's argv; a flag it does not know fails the test."""
    parser, _ = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"warmpool rejects the recipe's arguments {argv}: exit {e.code}")
    assert args.command == "keep"
    return args


def listen_port(args) -> int:
    from warmpool._keep.http import parse_listen

    assert args.listen, "the recipe serves no HTTP (--listen) for its probe"
    return parse_listen(args.listen)[1]


def engine_flags(argv: list[str]) -> dict[str, str]:
    """llama.cpp's placement flags and model path from an engine's argv."""
    names = {"-m": "model", "--model": "model", "-ngl": "ngl", "--n-gpu-layers": "ngl", "--gpu-layers": "ngl",
             "--n-cpu-moe": "n_cpu_moe", "-ncmoe": "n_cpu_moe"}
    out = {}
    for flag, value in zip(argv, argv[1:]):
        if flag in names:
            out[names[flag]] = value
    out["cpu_moe"] = "--cpu-moe" in argv or "-cmoe" in argv
    return out


def test_systemd_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(UNIT)
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert os.path.basename(argv[0]) == "warmpool" and os.path.isabs(argv[0])
    args = parse_keep(argv[1:])
    assert all(os.path.isabs(m) for m in args.model), "a unit has no working directory to be relative to"
    assert listen_port(args) == 9184
    assert args.listen.startswith("127.0.0.1:"), "a host-level probe needs no outside address"
    assert 0 < args.min_resident <= 1
    if args.lock:
        assert service["LimitMEMLOCK"] == "infinity", "--lock without LimitMEMLOCK locks only 8 MiB"
    assert service.get("KillSignal", "SIGTERM") in ("SIGTERM", "SIGINT")
    assert int(service["TimeoutStopSec"]) >= 3  # the keeper exits within 3 s of SIGTERM
    assert "Before" in unit["Unit"], "start before the engine so its first request finds the cache warm"


def _sidecar():
    docs = [d for d in yaml.safe_load_all(SIDECAR.read_text()) if d]
    assert len(docs) == 1 and docs[0]["kind"] == "Deployment"
    pod = docs[0]["spec"]["template"]["spec"]
    everyone = pod.get("initContainers", []) + pod["containers"]
    keepers = [c for c in everyone if c.get("command", [None])[0] == "warmpool"]
    assert len(keepers) == 1, "exactly one keeper container"
    engines = [c for c in everyone if c not in keepers]
    assert len(engines) == 1
    return pod, keepers[0], engines[0]


def test_kubernetes_sidecar_flags_ports_paths():
    pod, keeper, engine = _sidecar()
    args = parse_keep(keeper["args"])
    port = listen_port(args)
    assert args.listen.startswith("0.0.0.0:"), "the kubelet probes the pod IP, not loopback"
    assert port in [p["containerPort"] for p in keeper["ports"]]
    probe = keeper["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready"
    named = {p.get("name"): p["containerPort"] for p in keeper["ports"]}
    assert named.get(probe["port"], probe["port"]) == port

    # The keeper keeps exactly what the engine reads: the same file and the same placement.
    flags = engine_flags(engine["args"])
    assert args.model == [flags["model"]]
    assert str(args.n_gpu_layers) == flags["ngl"]
    assert str(args.n_cpu_moe) == flags.get("n_cpu_moe", "None")
    assert bool(args.cpu_moe) == flags["cpu_moe"]

    # Both mount the same volume at the path the model lies under.
    def volume_of(container, path):
        for mount in container["volumeMounts"]:
            if path.startswith(mount["mountPath"].rstrip("/") + "/"):
                return mount["name"]
        pytest.fail(f"{container['name']} mounts nothing holding {path}")

    volume = volume_of(keeper, args.model[0])
    assert volume == volume_of(engine, flags["model"])
    assert volume in [v["name"] for v in pod["volumes"]]


def test_kubernetes_sidecar_lock_and_memory():
    _, keeper, _ = _sidecar()
    args = parse_keep(keeper["args"])
    if args.lock:
        assert "IPC_LOCK" in keeper["securityContext"]["capabilities"]["add"]
    assert keeper.get("restartPolicy") == "Always", "a native sidecar: started before the engine, stopped after"
    limit = keeper["resources"]["limits"]["memory"]
    from warmpool._units import parse_size

    # The selection's page cache is charged to the keeper's cgroup (see the file's comment).
    assert parse_size(limit.replace("i", "")) > 1 << 30
    assert "cgroup v2" in SIDECAR.read_text() and "charged" in SIDECAR.read_text()


def test_readme_names_the_recipes_and_the_port():
    text = (DEPLOY / "README.md").read_text()
    assert "systemd/warmpool-keep.service" in text and "kubernetes/keep-sidecar.yaml" in text
    assert "9184" in text and "LimitMEMLOCK" in text and "IPC_LOCK" in text and "--ulimit memlock" in text
