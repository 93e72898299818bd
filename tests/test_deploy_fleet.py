"""docs/deploy/kubernetes's fleet recipes parse, and their flags, ports, paths, capabilities and
memory agree with the CLI and with what the comments promise."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from warmpool._keep.http import parse_listen
from warmpool._policy import BUDGET_FRACTION
from warmpool._units import parse_size
from warmpool.commands import build_parser
from warmpool.commands._common import add_selection_arguments, selection_from

KUBE = Path(__file__).resolve().parents[1] / "docs" / "deploy" / "kubernetes"
DAEMONSET = KUBE / "fleet-daemonset.yaml"
INIT = KUBE / "fleet-warm-init.yaml"
WARMPOOL_OVERHEAD = 256 << 20  # the comments' "+ ~256 MiB" for warmpool's own processes


def load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path.name}: one object"
    return docs[0]


def parse_cli(argv: list[str], command: str) -> argparse.Namespace:
    """warmpool's own parser on the recipe's argv: a flag it does not know fails the test."""
    parser, _ = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"warmpool rejects the recipe's arguments {argv}: exit {e.code}")
    assert args.command == command
    return args


def warmpool_container(containers: list[dict]) -> dict:
    ours = [c for c in containers if c.get("command") == ["warmpool"]]
    assert len(ours) == 1, "exactly one container runs warmpool"
    return ours[0]


def mem(quantity: str) -> int:
    """A Kubernetes memory quantity (binary suffixes only, as the recipes use) in bytes."""
    assert re.fullmatch(r"\d+(Ki|Mi|Gi|Ti)?", quantity), f"use a binary suffix: {quantity!r}"
    return parse_size(quantity.replace("i", ""))


def volume_of(container: dict, path: str, volumes: list[dict]) -> dict:
    """The pod volume mounted in ``container`` at a directory holding ``path``."""
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            volume = next((v for v in volumes if v["name"] == mount["name"]), None)
            assert volume is not None, f"mount {mount['name']} names no volume"
            assert "hostPath" in volume or "persistentVolumeClaim" in volume, "the engine's files: a host directory or a volume claim"
            return volume
    pytest.fail(f"{container['name']} mounts nothing holding {path}")


def selection_in_comment(text: str) -> int:
    """The selection size the file's comments size the memory for ("a 16 GiB selection")."""
    found = re.search(r"a (\d+) GiB selection", text)
    assert found, "the comments give the selection the memory was sized for"
    return int(found.group(1)) << 30


def check_capabilities(container: dict, lock: bool) -> None:
    caps = container.get("securityContext", {}).get("capabilities", {})
    added, dropped = caps.get("add", []), caps.get("drop", [])
    assert ("IPC_LOCK" in added) == lock, "IPC_LOCK exactly when --lock is used"
    if "ALL" in dropped:  # FOWNER: residency of a read-only file is visible to root only with it
        assert "FOWNER" in added


def test_daemonset_runs_keep_with_the_clis_flags_ports_and_paths():
    ds = load(DAEMONSET)
    assert ds["kind"] == "DaemonSet"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    pod = ds["spec"]["template"]["spec"]
    assert pod.get("nodeSelector"), "only on the nodes that serve the model"
    keeper = warmpool_container(pod["containers"])
    args = parse_cli(keeper["args"], "keep")

    host, port = parse_listen(args.listen)
    assert host == "0.0.0.0", "the kubelet probes the pod's IP, not loopback"
    ports = {p.get("name"): p["containerPort"] for p in keeper["ports"]}
    assert port in ports.values()
    probe = keeper["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready"
    assert ports.get(probe["port"], probe["port"]) == port, "the probe asks the port --listen binds"
    assert 0 < args.min_resident <= 1

    assert len(args.model) == 1 and args.model[0].startswith("/")
    volume = volume_of(keeper, args.model[0], pod["volumes"])
    assert volume.get("hostPath", {}).get("path", "").startswith("/")
    check_capabilities(keeper, args.lock)
    assert pod.get("terminationGracePeriodSeconds", 30) >= 3  # the keeper needs up to 3 s to let go


def test_daemonset_memory_holds_the_selection_it_is_charged_for():
    text = DAEMONSET.read_text()
    keeper = warmpool_container(load(DAEMONSET)["spec"]["template"]["spec"]["containers"])
    resources = keeper["resources"]
    limit = mem(resources["limits"]["memory"])
    assert mem(resources["requests"]["memory"]) == limit, "request = limit: the charged page cache is reserved"
    # warmpool warms at most BUDGET_FRACTION of memory.max: the limit must leave the whole
    # selection inside that budget, or the warm is partial and /ready never answers 200.
    assert limit * BUDGET_FRACTION >= selection_in_comment(text) + WARMPOOL_OVERHEAD * BUDGET_FRACTION
    assert "cgroup v2" in text and "charged" in text and "80%" in text


def engine_selection(argv: list[str]):
    """llama.cpp's model path and placement flags from an engine's argv, read with warmpool's
    own selection parser (the same flags, the same order rules)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-m", "--model")
    add_selection_arguments(parser)
    known, _ = parser.parse_known_args(argv)
    return known.model, selection_from(known)


def test_init_container_warms_what_the_engine_maps():
    deployment = load(INIT)
    pod = deployment["spec"]["template"]["spec"]
    warm = warmpool_container(pod["initContainers"])
    args = parse_cli(warm["args"], "warm")
    (engine,) = pod["containers"]
    model, selection = engine_selection(engine["args"])
    assert args.model == model, "the same file the engine maps"
    assert selection_from(args) == selection, "the engine's placement flags"
    assert volume_of(warm, args.model, pod["volumes"]) == volume_of(engine, model, pod["volumes"])
    check_capabilities(warm, lock=False)  # a one-shot warm locks nothing


def test_init_container_memory_and_the_engines_limit():
    text = INIT.read_text()
    pod = load(INIT)["spec"]["template"]["spec"]
    warm = warmpool_container(pod["initContainers"])
    (engine,) = pod["containers"]
    selected = selection_in_comment(text)
    limit = mem(warm["resources"]["limits"]["memory"])
    assert mem(warm["resources"]["requests"]["memory"]) == limit
    assert limit * BUDGET_FRACTION >= selected + WARMPOOL_OVERHEAD * BUDGET_FRACTION
    # After the init container exits its pages count against the pod: the engine's limit holds
    # them as well as the engine's own memory the comment names.
    own = re.search(r"engine's own memory \(~(\d+) GiB", text)
    assert own, "the comment says what the engine itself needs"
    assert mem(engine["resources"]["limits"]["memory"]) >= selected + (int(own.group(1)) << 30)


def test_image_and_readme_agree_with_the_manifests():
    images = {warmpool_container(load(DAEMONSET)["spec"]["template"]["spec"]["containers"])["image"],
              warmpool_container(load(INIT)["spec"]["template"]["spec"]["initContainers"])["image"]}
    assert len(images) == 1
    dockerfile = (KUBE / "Dockerfile").read_text()
    assert f"-t {images.pop()} ." in dockerfile, "the Dockerfile builds the image the manifests name"
    assert "pip install --no-cache-dir /src " in dockerfile, "the image installs this checkout"
    requires = re.search(r"^dependencies = \[(.*?)\]", (KUBE.parents[2] / "pyproject.toml").read_text(), re.M | re.S)
    assert '"prometheus-client' in requires.group(1), "keep --listen serves /metrics in the image"
    readme = (KUBE / "README.md").read_text()
    for path in re.findall(r"kubectl apply -f ([\w./-]+)", readme):
        assert (KUBE.parents[2] / path).is_file(), path
    assert DAEMONSET.name in readme and INIT.name in readme
