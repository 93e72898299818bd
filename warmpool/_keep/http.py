"""The keeper's HTTP endpoints: ``/metrics`` (Prometheus text), ``/ready`` and ``/status``.

Imported only when a keeper is given ``listen``: prometheus-client (the ``server`` extra) and
http.server stay out of every other process.  Each keeper has its own registry, so two keepers
in one process (tests, an engine keeping two models apart) never share series.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .._errors import WarmpoolError

__all__ = ["parse_listen", "serve"]

# Seconds: a cachestat pass over a few hundred chunks takes well under a millisecond, a
# mincore pass over a 100 GB selection tens of milliseconds to a second.
CHECK_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


def parse_listen(text: str) -> tuple[str, int]:
    """"HOST:PORT" (``[::1]:PORT`` for IPv6; an empty host is every interface)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise WarmpoolError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9184")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Collector:
    """Reads the keeper's rows on every scrape (no copy of the state to keep in sync)."""

    def __init__(self, keeper) -> None:
        self.keeper = keeper

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        gauges = {name: GaugeMetricFamily(f"warmpool_{name}", help_, labels=["model"]) for name, help_ in (
            ("selected_bytes", "Bytes of the selection (page-rounded)"),
            ("resident_bytes", "Bytes of the selection resident at the last check (absent where hidden)"),
            ("locked_bytes", "Bytes of the selection mlocked by the keeper"),
            ("kept_bytes", "Bytes the keeper holds: the selection, or the part that fits the budget and memory"),
            ("experts_held", "Experts held (absent where the whole selection fits or the model has none)"),
            ("experts", "Experts in the selection (absent as experts_held)"),
            ("expert_held_score_share", "The held experts' share of the ranking's summed scores: an estimate of "
             "the share of expert reads that find their expert held (absent until something is learned)"))}
        counters = {name: CounterMetricFamily(f"warmpool_{name}", help_, labels=["model"]) for name, help_ in (
            ("rewarmed_bytes", "Bytes read back in after the kernel evicted them"),
            ("rewarms", "Re-warms of evicted chunks"),
            ("sheds", "Passes that dropped the cached pages outside what is held that no process maps "
             "(the selection does not fit; docs/keep.md)"),
            ("shed_cpu_seconds", "CPU seconds those passes took"))}
        for row in self.keeper.status():
            labels = [row["model"]]
            gauges["selected_bytes"].add_metric(labels, row["bytes_selected"])
            if row["bytes_resident"] is not None:
                gauges["resident_bytes"].add_metric(labels, row["bytes_resident"])
            gauges["locked_bytes"].add_metric(labels, row["bytes_locked"])
            gauges["kept_bytes"].add_metric(labels, row["bytes_kept"])
            for name, key in (("experts_held", "experts_held"), ("experts", "experts_total"),
                              ("expert_held_score_share", "expert_held_score_share")):
                if row[key] is not None:
                    gauges[name].add_metric(labels, row[key])
            counters["rewarmed_bytes"].add_metric(labels, row["bytes_rewarmed_total"])
            counters["rewarms"].add_metric(labels, row["rewarms_total"])
            counters["sheds"].add_metric(labels, row["sheds_total"])
            counters["shed_cpu_seconds"].add_metric(labels, row["shed_cpu_seconds_total"])
        yield from gauges.values()
        yield from counters.values()
        if self.keeper.refresh_period is not None:
            yield GaugeMetricFamily("warmpool_refresh_period_seconds", "Seconds between refresh passes in effect "
                                    "(the asked --refresh, or more where the CPU cap spaces them)",
                                    value=self.keeper.refresh_period)


def _handler(keeper, registry):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/ready":
                ready = keeper.ready()
                self._send(200 if ready else 503, b"ready\n" if ready else b"not ready\n", "text/plain")
            elif path == "/status":
                body = json.dumps({"models": keeper.status(), "ready": keeper.ready(), "refresh_seconds": keeper.refresh,
                                   "refresh_period_seconds": keeper.refresh_period}).encode()
                self._send(200, body, "application/json")
            else:
                self._send(404, b"not found: try /metrics, /ready or /status\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # probes every few seconds: not worth a log line
            pass

    return Handler


def serve(keeper, listen: str) -> ThreadingHTTPServer:
    """Bind ``listen`` now and serve in a daemon thread; ``shutdown()`` + ``server_close()`` stop it."""
    from prometheus_client import CollectorRegistry, Histogram

    host, port = parse_listen(listen)
    registry = CollectorRegistry()
    registry.register(_Collector(keeper))
    histogram = Histogram("warmpool_check_seconds", "Time of one residency check of one model",
                          registry=registry, buckets=CHECK_BUCKETS)
    keeper.check_observers.append(histogram.observe)
    server_class = ThreadingHTTPServer
    if ":" in host:  # an IPv6 address
        import socket

        server_class = type("ThreadingHTTPServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    try:
        server = server_class((host, port), _handler(keeper, registry))
    except OSError as e:
        raise WarmpoolError(f"--listen {listen}: cannot bind: {e.strerror}") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="warmpool-keeper-http", daemon=True).start()
    return server
