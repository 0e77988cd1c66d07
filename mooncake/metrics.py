"""Transfer metrics: counted in C, read here; the Prometheus exporter (``MC_METRICS_PORT``).

Each engine keeps one C meter (:class:`mooncake._core.batch.Meter`) per (transport, peer).  The
engine slices a batch with its meter, which counts it once; from then on the kernel module that
reports a task's last slice (tcp lanes, the shm copy pool, rdma completions) counts the task in
that meter with a few atomic adds, without the GIL, and nothing runs in Python per slice or per
task.  Requests the engine's validator refuses before any transport takes them count as failures
of transport ``unspec`` (TENT's label for them).  A failed batch that the engine retried over
another transport counts one failover ``from`` -> ``to``.

:meth:`EngineMeters.snapshot` (``TransferEngine.metrics()``) reads every counter;
:class:`MetricsServer` serves them at ``/metrics`` in Prometheus' format, through a custom
collector that reads the counters at scrape time, plus ``/health``.  The exporter needs
``prometheus_client`` (``pip install 'mooncake[metrics]'``); the counters do not.

Metric names are TENT's where TENT has one (``tent_read_bytes_total``...); the rest are
``mooncake_*``.  Histograms come from the kernel's fixed log2 buckets: latency bounds are
``2**k`` ns (k = 10..36, given in microseconds), size bounds ``2**k`` bytes (k = 0..40).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from mooncake._core.batch import METER_BUCKETS, Meter
from mooncake.errors import ConfigError

if TYPE_CHECKING:
    from mooncake.engine import TransferEngine

__all__ = ["EngineMeters", "EngineCollector", "MetricsServer", "UNSPEC", "METRIC_NAMES",
           "cumulative", "start_exporter"]

# not a child of "mooncake.metrics" (MC_TE_METRIC's line, which MC_LOG_LEVEL does not filter)
log = logging.getLogger("mooncake.exporter")

#: the transport label of requests refused before a transport was chosen (TENT's)
UNSPEC = "unspec"
OPS = ("read", "write")
#: exported histogram bounds: 2**k ns (latency) and 2**k bytes (size) for these k
LATENCY_EXP = range(10, 37)
SIZE_EXP = range(0, 41)
#: every metric family the exporter serves, as its ``# TYPE`` line names it (counters without
#: their ``_total`` suffix)
METRIC_NAMES = (
    "tent_read_bytes", "tent_write_bytes", "tent_read_requests", "tent_write_requests",
    "tent_read_failures", "tent_write_failures", "tent_transport_failover",
    "tent_deadline_infeasible", "tent_read_latency_us", "tent_write_latency_us",
    "tent_read_size_bytes", "tent_write_size_bytes", "mooncake_peer_bytes",
    "mooncake_peer_requests", "mooncake_peer_failures", "mooncake_inflight_requests",
    "mooncake_inflight_bytes", "mooncake_engine_info", "mooncake_rail_completions",
    "mooncake_rail_errors", "mooncake_rail_pauses", "mooncake_rail_paused",
)
INSTALL_HINT = "pip install 'mooncake[metrics]' (or prometheus_client>=0.17)"


class EngineMeters:
    """One engine's meters: per (transport, peer), the validator's refusals, failovers."""

    def __init__(self) -> None:
        self._meters: dict[tuple[str, str], Meter] = {}
        self._lock = threading.Lock()
        self.rejected = self.get(UNSPEC, "")
        self.failovers: Counter[tuple[str, str]] = Counter()

    def get(self, transport: str, peer: str) -> Meter:
        """The meter of ``transport`` towards ``peer`` (made on first use)."""
        m = self._meters.get((transport, peer))
        if m is None:
            with self._lock:
                m = self._meters.setdefault((transport, peer), Meter())
        return m

    def reject(self, op: int, n: int) -> None:
        """``n`` requests of opcode ``op`` refused before any transport took them."""
        self.rejected.reject(op, n)

    def failover(self, src: str | None, dst: str | None) -> None:
        """A failed batch was retried over another transport."""
        if src and dst and src != dst:
            with self._lock:
                self.failovers[(src, dst)] += 1

    def total_bytes(self) -> int:
        """Bytes of every completed request so far (MC_TE_METRIC's throughput line)."""
        total = 0
        for m in list(self._meters.values()):
            s = m.snapshot()
            total += s["read"]["bytes"] + s["write"]["bytes"]
        return total

    def snapshot(self, transports: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """Every counter: ``transports`` (per transport and opcode: bytes, requests, failures,
        in flight, latency and size histograms), ``peers`` (per peer, transport and opcode:
        bytes, requests, failures), ``failovers`` and ``deadline_infeasible``.  ``transports``
        names the ones to list even when nothing went through them yet."""
        with self._lock:
            items = list(self._meters.items())
            fo = dict(self.failovers)
        per_t: dict[str, dict[str, Any]] = {name: _empty() for name in (*transports, UNSPEC)}
        peers: dict[str, dict[str, dict[str, dict[str, int]]]] = {}
        for (tname, peer), meter in items:
            s = meter.snapshot()
            agg = per_t.setdefault(tname, _empty())
            agg["deadline_infeasible"] += s["infeasible"]
            for op in OPS:
                _merge(agg[op], s[op])
            if peer:
                peers.setdefault(peer, {})[tname] = {
                    op: {k: s[op][k] for k in ("bytes", "requests", "failures")} for op in OPS}
        return {
            "transports": per_t,
            "peers": peers,
            "failovers": [{"from": a, "to": b, "count": n} for (a, b), n in sorted(fo.items())],
            "deadline_infeasible": {t: v["deadline_infeasible"] for t, v in per_t.items()},
        }


def _empty() -> dict[str, Any]:
    zero = {"bytes": 0, "requests": 0, "completed": 0, "failures": 0, "inflight": 0,
            "inflight_bytes": 0, "latency_sum_ns": 0}
    out: dict[str, Any] = {op: dict(zero, latency_ns=[0] * METER_BUCKETS,
                                    size=[0] * METER_BUCKETS) for op in OPS}
    out["deadline_infeasible"] = 0
    return out


def _merge(into: dict[str, Any], s: dict[str, Any]) -> None:
    for k, v in s.items():
        if isinstance(v, list):
            into[k] = [a + b for a, b in zip(into[k], v, strict=True)]
        else:
            into[k] += v


def cumulative(counts: list[int], exps: range) -> list[tuple[int, int]]:
    """``(2**k, count of values <= 2**k)`` for each exported exponent ``k`` of log2 buckets."""
    out, run, i = [], 0, 0
    for k in exps:
        while i <= k and i < len(counts):
            run += counts[i]
            i += 1
        out.append((1 << k, run))
    return out


# ---- Prometheus ------------------------------------------------------------------------------


class EngineCollector:
    """A prometheus_client collector that reads one engine's C counters at each scrape (it
    holds the engine weakly: an exporter never keeps a dropped engine alive)."""

    def __init__(self, engine: TransferEngine) -> None:
        self.engine = weakref.ref(engine)

    def describe(self) -> list:
        return []  # no describe-time collect: the counters are read only when scraped

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        e = self.engine()
        if e is None:
            return
        snap = e.metrics()
        tr = snap["transports"]
        for op in OPS:
            fams = {
                "bytes": CounterMetricFamily(f"tent_{op}_bytes",
                                             f"Bytes of completed {op} requests",
                                             labels=["transport"]),
                "requests": CounterMetricFamily(f"tent_{op}_requests",
                                                f"{op.capitalize()} requests that ended "
                                                "(completed + failed)", labels=["transport"]),
                "failures": CounterMetricFamily(f"tent_{op}_failures",
                                                f"{op.capitalize()} requests that failed or "
                                                "timed out", labels=["transport"]),
            }
            for name, t in tr.items():
                for k, fam in fams.items():
                    fam.add_metric([name], t[op][k])
            yield from fams.values()
        for op in OPS:
            lat = HistogramMetricFamily(f"tent_{op}_latency_us",
                                        f"Latency of completed {op} requests (submit to last "
                                        "slice), microseconds", labels=["transport"])
            size = HistogramMetricFamily(f"tent_{op}_size_bytes",
                                         f"Size of completed {op} requests, bytes",
                                         labels=["transport"])
            for name, t in tr.items():
                o = t[op]
                lat.add_metric([name], _buckets(o["latency_ns"], LATENCY_EXP, o["completed"],
                                                1e-3), o["latency_sum_ns"] / 1e3)
                size.add_metric([name], _buckets(o["size"], SIZE_EXP, o["completed"], 1),
                                o["bytes"])
            yield lat
            yield size
        rail_labels = ["transport", "local", "peer", "remote"]
        rail_fams = {k: CounterMetricFamily(f"mooncake_rail_{k}", doc, labels=rail_labels)
                     for k, doc in (("completions", "Work completions per rail (NIC pair)"),
                                    ("errors", "Path faults the rail monitor counted"),
                                    ("pauses", "Times the rail was paused"))}
        paused = GaugeMetricFamily("mooncake_rail_paused", "1 while the rail is paused",
                                   labels=rail_labels)
        for tname, rows in snap.get("rails", {}).items():
            for r in rows:
                labels = [tname, r["local"], r["peer"], r["remote"]]
                for k, fam in rail_fams.items():
                    fam.add_metric(labels, r[k])
                paused.add_metric(labels, 1 if r["paused"] else 0)
        yield from rail_fams.values()
        yield paused
        fo = CounterMetricFamily("tent_transport_failover",
                                 "Failed batches retried over another transport",
                                 labels=["from", "to"])
        for f in snap["failovers"]:
            fo.add_metric([f["from"], f["to"]], f["count"])
        yield fo
        inf = CounterMetricFamily("tent_deadline_infeasible",
                                  "Batches whose deadline had passed when submitted",
                                  labels=["transport"])
        for name, n in snap["deadline_infeasible"].items():
            inf.add_metric([name], n)
        yield inf
        peer_fams = {k: CounterMetricFamily(f"mooncake_peer_{k}", doc,
                                            labels=["peer", "transport", "operation"])
                     for k, doc in (("bytes", "Bytes of completed requests per peer"),
                                    ("requests", "Requests that ended, per peer"),
                                    ("failures", "Requests that failed, per peer"))}
        for peer, per in snap["peers"].items():
            for name, ops in per.items():
                for op in OPS:
                    for k, fam in peer_fams.items():
                        fam.add_metric([peer, name, op], ops[op][k])
        yield from peer_fams.values()
        gauges = {"inflight": GaugeMetricFamily("mooncake_inflight_requests",
                                                "Requests handed to a transport, not ended yet",
                                                labels=["transport", "operation"]),
                  "inflight_bytes": GaugeMetricFamily("mooncake_inflight_bytes",
                                                      "Bytes of the requests in flight",
                                                      labels=["transport", "operation"])}
        for name, t in tr.items():
            for op in OPS:
                for k, g in gauges.items():
                    g.add_metric([name, op], t[op][k])
        yield from gauges.values()
        yield InfoMetricFamily("mooncake_engine", "The engine this exporter belongs to",
                               value={"segment": e.segment_name,
                                      "transports": ",".join(e.transports)})


def _buckets(counts: list[int], exps: range, total: int, scale: float) -> list:
    from prometheus_client.utils import floatToGoString

    out = [(floatToGoString(bound * scale), c) for bound, c in cumulative(counts, exps)]
    out.append(("+Inf", total))
    return out


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            from prometheus_client.exposition import choose_encoder

            encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
            try:
                body, code = encoder(self.server.registry), 200
            except Exception as e:  # a collector failing must not kill the server thread
                log.warning("metrics: scrape failed: %s", e)
                body, code, ctype = f"scrape failed: {e}\n".encode(), 500, "text/plain"
        elif path in ("/health", "/healthz"):
            code, doc = self.server.health()
            body, ctype = json.dumps(doc).encode(), "application/json"
        else:
            body, code, ctype = b"not found: try /metrics or /health\n", 404, "text/plain"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("metrics %s: " + fmt, self.address_string(), *args)


class MetricsServer(ThreadingHTTPServer):
    """``/metrics`` and ``/health`` of one engine, on a thread of their own."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, engine: TransferEngine, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry

        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        self.engine = weakref.ref(engine)
        self.started = time.monotonic()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(engine))
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="mc-metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def health(self) -> tuple[int, dict[str, Any]]:
        """A liveness answer: 200 while the engine is up (its segment, transports, uptime and
        requests in flight), 503 once it is closing.  Touches no peer and no lock a transfer
        holds."""
        e = self.engine()
        if e is None or e._closed or not e._started:
            return 503, {"status": "closing", "segment": getattr(e, "segment_name", "")}
        snap = e.metrics()["transports"]
        return 200, {"status": "up", "segment": e.segment_name, "transports": list(e.transports),
                     "uptime_s": round(time.monotonic() - self.started, 3),
                     "inflight_requests": sum(t[op]["inflight"] for t in snap.values()
                                              for op in OPS)}

    def close(self) -> None:
        """Stop serving and release the port (returns once the listening socket is closed)."""
        if threading.current_thread() is self._thread:  # the engine was collected in here
            threading.Thread(target=self.close, name="mc-metrics-close", daemon=True).start()
            return
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


def start_exporter(engine: TransferEngine, host: str, port: int,
                   knob: str = "MC_METRICS_PORT") -> MetricsServer:
    """Serve ``engine``'s metrics on ``host:port``; :class:`ConfigError` (naming ``knob``, the
    option that asked for it) when prometheus_client is missing or the port cannot be bound."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(f"{knob}={port}: the Prometheus exporter needs "
                          f"prometheus_client, which is not installed: {INSTALL_HINT}") from None
    try:
        srv = MetricsServer(engine, host, port)
    except OSError as e:
        raise ConfigError(f"{knob}={port}: cannot listen on {host}:{port}: "
                          f"{e.strerror or e}; choose a free port (0 = off)") from None
    log.info("metrics: http://%s:%d/metrics and /health", host, srv.port)
    return srv
