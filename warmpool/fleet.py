"""Warm, check or evict a model on every node of a Ray cluster: one pinned task per node.

The page cache is per node, so a model served on many nodes needs a warm on each.  Ray
already runs under many serving stacks; one task per alive node, pinned with
``NodeAffinitySchedulingStrategy(node_id, soft=False)`` and asking for no CPU slot
(``num_cpus=0``: a node busy serving still runs it), needs no coordinator of our own.  Each
task runs warmpool's own ``warm``/``residency``/``evict`` on the model string it is given,
resolved on that node: a reference (``ollama:NAME``...) is looked up in that node's stores, and
``~`` and ``$VARS`` expand in the node's environment, so one command can name a file whose
directory differs from node to node.

A node that fails gives one row with an error while the others finish; a node that dies or
hangs is reported once ``timeout`` has passed (its task is cancelled), never waited on.
Residency the kernel hides is ``None`` (unknown), never 0 or 1.

Ray is the optional ``ray`` extra and is imported only inside these functions, so that
``import warmpool`` (and this module) stays cheap.  warmpool must be installed on every node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import NamedTuple

from ._errors import WarmpoolError

__all__ = ["DEFAULT_TIMEOUT", "NodeResult", "evict", "failed", "status", "warm"]

# Seconds to wait for every node before reporting the silent ones.  A warm reads the
# selection from disk (minutes for a large model on a slow disk); status and evict read none.
DEFAULT_TIMEOUT = {"warm": 900.0, "status": 60.0, "evict": 60.0}


class NodeResult(NamedTuple):
    node_id: str
    node_ip: str
    bytes_selected: int | None  # None: the node did not answer
    bytes_resident: int | None  # None: unknown (hidden by the kernel, or no answer)
    resident_fraction: float | None
    seconds: float | None  # the operation's time on the node
    error: str | None  # one line; None when the node succeeded
    bytes_warmed: int | None = None  # read in by this warm (warm only)

    @property
    def ok(self) -> bool:
        return self.error is None


def warm(model: str | os.PathLike[str], address: str | None = None, *, timeout: float | None = None,
         min_resident: float | None = None, **selection) -> list[NodeResult]:
    """Warm ``model`` on every alive node (``warmpool.warm(model, **selection)`` there).

    ``address`` is a Ray address or ``"auto"`` (``RAY_ADDRESS``, then the cluster started on
    this machine); ``None`` means ``"auto"``.  A process already connected to Ray (``ray.init``)
    uses that connection whatever ``address`` says.
    With ``min_resident``, a node left below that fraction (or unknown) is a failing row.
    """
    return _run("warm", model, address, timeout, min_resident, selection)


def status(model: str | os.PathLike[str], address: str | None = None, *, timeout: float | None = None,
           min_resident: float | None = None, **selection) -> list[NodeResult]:
    """How much of the selection is resident on every alive node (no data is read).

    With ``min_resident``, a node below that fraction, or whose residency is unknown, fails.
    """
    return _run("status", model, address, timeout, min_resident, selection)


def evict(model: str | os.PathLike[str], address: str | None = None, *, timeout: float | None = None,
          **selection) -> list[NodeResult]:
    """Drop the selection from the page cache of every alive node; rows give what stays resident."""
    return _run("evict", model, address, timeout, None, selection)


def failed(results: list[NodeResult]) -> list[NodeResult]:
    """The rows of nodes that did not succeed."""
    return [r for r in results if not r.ok]


def _import_ray():
    try:
        import ray
    except ImportError:
        raise WarmpoolError("the fleet commands need Ray: pip install 'warmpool[ray]'") from None
    return ray


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, WarmpoolError) else f"{type(e).__name__}: {e}"
    line = next((part.strip() for part in text.splitlines() if part.strip()), type(e).__name__)
    return line if len(line) <= 300 else line[:297] + "..."


def _run(op: str, model, address, timeout, min_resident, selection: dict) -> list[NodeResult]:
    from ._select import Selection

    model = os.fspath(model)
    Selection(**selection).validate()  # a bad flag is reported here, not once per node
    if min_resident is not None and not 0.0 <= min_resident <= 1.0:
        raise WarmpoolError(f"min_resident must be between 0 and 1, got {min_resident}")
    timeout = DEFAULT_TIMEOUT[op] if timeout is None else float(timeout)
    if timeout <= 0:
        raise WarmpoolError(f"timeout must be positive, got {timeout:g}")
    ray = _import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    with _connection(ray, address):
        nodes = sorted(((n["NodeManagerAddress"], n["NodeID"]) for n in ray.nodes() if n.get("Alive")))
        if not nodes:
            raise WarmpoolError("the Ray cluster has no alive node")
        # max_retries=0: a task lost with its node is reported, not retried on a node that is gone.
        task = ray.remote(num_cpus=0, max_retries=0)(_on_node)
        refs = [task.options(name=f"warmpool-fleet-{op}",
                             scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                .remote(op, model, dict(selection)) for _, node_id in nodes]
        try:
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        except BaseException:  # Ctrl-C, SIGTERM: cancel them all before leaving
            _cancel(ray, refs)
            raise
        _cancel(ray, pending)  # a hung or dead node: stop its task, report it, move on
        done = set(ready)
        rows = []
        for (ip, node_id), ref in zip(nodes, refs):
            if ref not in done:
                rows.append(NodeResult(node_id, ip, None, None, None, None,
                                       f"no answer within {timeout:g} s (node dead, hung or unschedulable)"))
                continue
            try:
                answer = ray.get(ref)
            except Exception as e:  # the task died with its worker or node, or could not be placed
                rows.append(NodeResult(node_id, ip, None, None, None, None, _one_line(e)))
                continue
            ran_on = answer.pop("node_id")
            row = NodeResult(node_id, ip, **answer)
            if ran_on != node_id:  # never report one node's page cache under another's name
                row = row._replace(error=f"the task ran on node {ran_on}, not on this one")
            rows.append(_checked(row, min_resident))
    return rows


def _cancel(ray, refs) -> None:
    """Cancel the tasks that have not answered.  One not started yet (its node is gone or
    frozen) then never starts.  One already running is not interrupted by a plain cancel (Ray
    2.60 here), and a forced one would SIGKILL a warm mid-way and leave its progress segment in
    /dev/shm; it ends when the driver that submitted it disconnects, which the CLI does at once."""
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref)


@contextlib.contextmanager
def _connection(ray, address: str | None):
    """Use the caller's Ray connection, or connect for this call only."""
    if ray.is_initialized():
        yield
        return
    address = address or "auto"
    _check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as e:  # ConnectionError, or ValueError/RuntimeError for a bad address
        raise WarmpoolError(f"cannot connect to the Ray cluster at {address}: {_one_line(e)}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds when nothing listens at the cluster's address: ray.init kept retrying
    one for minutes here (Ray 2.60).  "auto" is resolved the way ray.init resolves it."""
    import socket

    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die as resolve

        target = address.removeprefix("ray://") if address.startswith("ray://") else resolve(address)
        host, _, port = target.rpartition(":")
        port = int(port)
    except ConnectionError as e:  # "auto" and no cluster found
        raise WarmpoolError(f"no Ray cluster found for address {address}: {_one_line(e)}") from None
    except Exception:  # an address Ray parses differently, or its private helper moved: let ray.init judge
        return
    try:
        socket.create_connection((host.strip("[]"), port), timeout=5).close()
    except OSError as e:
        raise WarmpoolError(f"cannot connect to the Ray cluster at {target}: {e.strerror or e}") from None


def _checked(row: NodeResult, min_resident: float | None) -> NodeResult:
    if row.error is not None or min_resident is None:
        return row
    if row.resident_fraction is None:
        return row._replace(error=f"residency unknown (hidden by the kernel), cannot confirm {min_resident:.1%}")
    if row.resident_fraction < min_resident:
        return row._replace(error=f"{row.resident_fraction:.1%} resident, below {min_resident:.1%}")
    return row


def _on_node(op: str, model: str, selection: dict) -> dict:
    """The task body, on one node: warmpool's public API on that node's file."""
    import ray

    import warmpool

    started = time.perf_counter()
    model = os.path.expanduser(os.path.expandvars(model))
    answer = dict(bytes_selected=None, bytes_resident=None, resident_fraction=None, bytes_warmed=None, error=None)
    try:
        if op == "warm":
            r = warmpool.warm(model, **selection)
            hidden = r.resident_fraction is None  # the kernel hides residency: unknown, not 0
            answer.update(bytes_selected=r.bytes_selected, bytes_warmed=r.bytes_warmed,
                          bytes_resident=None if hidden else r.bytes_selected - r.bytes_left_cold,
                          resident_fraction=r.resident_fraction)
        elif op == "status":
            r = warmpool.residency(model, **selection)
            answer.update(bytes_selected=r.bytes_selected, bytes_resident=r.bytes_resident,
                          resident_fraction=r.resident_fraction)
        else:
            plan = warmpool.plan_model(model, **selection)
            left = warmpool.evict(model, plan=plan)
            answer.update(bytes_selected=plan.bytes_planned, bytes_resident=left,
                          resident_fraction=None if left is None else left / (plan.bytes_planned or 1))
    except Exception as e:  # one failing row, with the reason, while the other nodes finish
        answer["error"] = _one_line(e)
    answer["seconds"] = time.perf_counter() - started
    answer["node_id"] = ray.get_runtime_context().get_node_id()
    return answer
