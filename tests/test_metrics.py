"""Transfer metrics on real engines: the kernel's counters (mc_metrics.h) and the Prometheus
exporter (``MC_METRICS_PORT``), scraped over HTTP and parsed by ``prometheus_client.parser``.

One engine (``protocol="auto"``) moves bytes to a tcp peer and to a shm peer in other processes:
the tcp lanes (the ``tcp`` kernel module) and the shm copy pool (the ``copy`` module) both count
into meters the ``batch`` module allocated, so both transports show up with exactly what moved.
Failures are real ones: a range the tcp target refuses (our descriptor of it was stale), a
range the validator refuses, a deadline that had passed.  Also: in-flight gauges while a
stopped peer holds requests, a shm -> tcp failover after the peer restarted, ``/health``, the
port closing with the engine, MC_TE_METRIC's line reading the same counters, and the typed
errors of a bad port, a busy port and a missing ``prometheus_client``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from peer import Peer

from mooncake._core.batch import Batch, Meter, meter_bucket, slice_requests
from mooncake.engine import TransferEngine
from mooncake.errors import ConfigError, InvalidAddress, TransferTimeout
from mooncake.metrics import METRIC_NAMES, cumulative
from mooncake.options import METRIC_LOGGER
from mooncake.testing.conformance import FIXED_ADDRESS

parser = pytest.importorskip("prometheus_client.parser")  # the metrics extra (in test's too)

KiB, MiB = 1 << 10, 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics``: (sample name, its labels) -> value; a family without
    samples yet as (its name, None)."""
    code, ctype, body = get(port, "/metrics")
    assert code == 200 and ctype.startswith("text/plain"), (code, ctype)
    out: dict = {}
    for fam in parser.text_string_to_metric_families(body):
        out[(fam.name, None)] = len(fam.samples)
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture(scope="module")
def shm_peer():
    p = Peer(protocol="shm")
    yield p
    p.close()


@pytest.fixture
def buf():
    return np.random.default_rng(3).integers(0, 256, 2 * MiB, dtype=np.uint8)


def test_log2_buckets_and_their_prometheus_bounds():
    """Bucket i of the kernel counts v <= 2**i; the exporter's bound 2**k is cumulative."""
    for v, i in ((0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (4096, 12), (4097, 13),
                 (1 << 40, 40), ((1 << 63) + 1, 63)):
        assert meter_bucket(v) == i, v
    counts = [0] * 64
    for v in (1, 3, 4, 4096, 4097, 1 << 50):
        counts[meter_bucket(v)] += 1
    bounds = dict(cumulative(counts, range(0, 41)))
    assert bounds[1] == 1 and bounds[2] == 1 and bounds[4] == 3 and bounds[4096] == 4
    assert bounds[8192] == 5 and bounds[1 << 40] == 5  # 2**50 only under +Inf


def test_a_batch_abandoned_in_flight_ends_as_a_failure_of_its_meter():
    """A batch freed with tasks never reported (its transport dropped them) leaves the
    in-flight gauge and counts as failed requests: the gauge cannot leak."""
    m = Meter()
    b = Batch(3)
    s = slice_requests(b, [1, 1, 0], [4096, 8192, 12288], [0, 0, 0], [10, 20, 30], 64, 4,
                       meter=m)
    snap = m.snapshot()
    assert (snap["write"]["inflight"], snap["write"]["inflight_bytes"]) == (2, 30)
    assert (snap["read"]["inflight"], snap["read"]["inflight_bytes"]) == (1, 30)
    b.slice_done(0, 10)
    del b, s
    snap = m.snapshot()
    assert snap["write"]["completed"] == 1 and snap["write"]["bytes"] == 10
    assert snap["write"]["failures"] == 1 and snap["read"]["failures"] == 1
    assert snap["write"]["inflight"] == snap["read"]["inflight"] == 0
    assert snap["write"]["inflight_bytes"] == snap["read"]["inflight_bytes"] == 0


def test_scrape_counts_exactly_what_moved_over_tcp_and_shm(peer, shm_peer, buf, caplog):
    port = free_port()
    with caplog.at_level(logging.INFO, logger=METRIC_LOGGER), \
            TransferEngine("127.0.0.1", protocol="auto", MC_METRICS_PORT=port, MC_TE_METRIC=True,
                           MC_TE_METRIC_INTERVAL_SECONDS=0.1) as e:
        e.register(buf)
        la = buf.ctypes.data
        ta, sa = peer.alloc(2 * MiB, seed=1), shm_peer.alloc(2 * MiB, kind="managed")
        tseg, sseg = peer.segment, shm_peer.segment
        assert e.explain(tseg)["chosen"] == "tcp" and e.explain(sseg)["chosen"] == "shm"

        t0 = time.monotonic()
        e.write(tseg, buf, ta, MiB)                      # 16 slices over the lanes
        e.read(tseg, la, ta, 4 * KiB)                    # one slice, the caller's thread
        with e.submit(tseg, "write", [la + i * 4 * KiB for i in range(3)],   # lane workers
                      [ta + i * 4 * KiB for i in range(3)], [4 * KiB] * 3) as b:
            b.wait(30)
        stale = peer.alloc(4 * KiB, seed=2)
        e.write(tseg, la, stale, 4 * KiB)                # ok, and our descriptor now caches it
        tcp_elapsed = time.monotonic() - t0
        peer.free(stale)
        with pytest.raises(InvalidAddress):  # the target refuses (tcp failure), the retry on a
            e.write(tseg, la, stale, 4 * KiB)  # fresh descriptor is refused by the validator
        with pytest.raises(InvalidAddress):
            e.write(tseg, la, ta + 4 * MiB, 16)          # outside the peer's buffers: unspec

        e.write(sseg, buf, sa, MiB)
        e.read(sseg, la, sa, 64 * KiB)
        with e.submit(sseg, "read", [la, la + 8 * KiB], [sa, sa + 8 * KiB], [8 * KiB] * 2) as b:
            b.wait(30)
        with pytest.raises(TransferTimeout):
            e.write(sseg, la, sa, 4 * KiB, deadline=time.monotonic() - 1)   # shm failure

        s = scrape(port)
        snap = e.metrics()
        time.sleep(0.35)  # MC_TE_METRIC prints the same counters' total
        name = e.segment_name

    tw = MiB + 4 * 4 * KiB  # tcp writes that completed: 1 MiB, 3 x 4 KiB, the stale one's first
    expect = {  # (transport, op): (completed, bytes, failures)
        ("tcp", "write"): (5, tw, 1), ("tcp", "read"): (1, 4 * KiB, 0),
        ("shm", "write"): (1, MiB, 1), ("shm", "read"): (3, 64 * KiB + 16 * KiB, 0),
        ("unspec", "write"): (0, 0, 2), ("unspec", "read"): (0, 0, 0),
    }
    for (tr, op), (done, nbytes, fails) in expect.items():
        assert val(s, f"tent_{op}_bytes_total", transport=tr) == nbytes, (tr, op)
        assert val(s, f"tent_{op}_requests_total", transport=tr) == done + fails, (tr, op)
        assert val(s, f"tent_{op}_failures_total", transport=tr) == fails, (tr, op)
        assert val(s, f"tent_{op}_latency_us_count", transport=tr) == done
        assert val(s, f"tent_{op}_latency_us_bucket", transport=tr, le="+Inf") == done
        assert val(s, f"tent_{op}_size_bytes_count", transport=tr) == done
        assert val(s, f"tent_{op}_size_bytes_sum", transport=tr) == nbytes
        assert val(s, "mooncake_inflight_requests", transport=tr, operation=op) == 0
        assert val(s, "mooncake_inflight_bytes", transport=tr, operation=op) == 0
        m = snap["transports"][tr][op]
        assert (m["completed"], m["bytes"], m["failures"]) == (done, nbytes, fails)
    # size buckets: exactly where each request's length falls
    size = {le: val(s, "tent_write_size_bytes_bucket", transport="tcp", le=le)
            for le in ("2048.0", "4096.0", "524288.0", "1.048576e+06")}
    assert size == {"2048.0": 0, "4096.0": 4, "524288.0": 4, "1.048576e+06": 5}
    assert val(s, "tent_read_size_bytes_bucket", transport="shm", le="8192.0") == 2
    assert val(s, "tent_read_size_bytes_bucket", transport="shm", le="65536.0") == 3
    # latency: cumulative buckets, and the synchronous tcp calls' latencies fit in their time
    lat = [v for (n, lb), v in s.items() if n == "tent_write_latency_us_bucket"
           and ("transport", "tcp") in lb and ("le", "+Inf") not in lb]
    assert lat == sorted(lat) and lat[-1] == 5 and lat[0] == 0
    lat_sum = val(s, "tent_write_latency_us_sum", transport="tcp") + \
        val(s, "tent_read_latency_us_sum", transport="tcp")
    assert 0 < lat_sum <= tcp_elapsed * 1e6
    # per peer
    for peer, tr, op, nbytes, reqs, fails in ((tseg, "tcp", "write", tw, 6, 1),
                                              (tseg, "tcp", "read", 4 * KiB, 1, 0),
                                              (sseg, "shm", "write", MiB, 2, 1)):
        lb = {"peer": peer, "transport": tr, "operation": op}
        assert val(s, "mooncake_peer_bytes_total", **lb) == nbytes
        assert val(s, "mooncake_peer_requests_total", **lb) == reqs
        assert val(s, "mooncake_peer_failures_total", **lb) == fails
    assert val(s, "tent_deadline_infeasible_total", transport="shm") == 1
    assert val(s, "tent_deadline_infeasible_total", transport="tcp") == 0
    info = [dict(lb) for (n, lb) in s if n == "mooncake_engine_info" and lb is not None]
    assert info and info[0]["segment"] == name and "tcp" in info[0]["transports"].split(",")
    assert {n for n, lb in s if lb is None} >= set(METRIC_NAMES)
    total = tw + 4 * KiB + MiB + 80 * KiB
    lines = [r.getMessage() for r in caplog.records if r.name == METRIC_LOGGER]
    totals = [int(m.group(1)) for ln in lines if (m := re.search(r"(\d+) bytes in total", ln))]
    assert totals and totals[-1] == total, lines[-3:]


def test_inflight_gauges_count_what_a_stopped_peer_holds(buf):
    p = Peer(protocol="tcp")
    port = free_port()
    try:
        with TransferEngine("127.0.0.1", protocol="tcp", MC_METRICS_PORT=port) as e:
            e.register(buf)
            ra = p.alloc(MiB)
            e.write(p.segment, buf, ra, 4 * KiB)  # lanes up
            p.stop()
            try:
                b = e.submit(p.segment, "write", [buf.ctypes.data, buf.ctypes.data + 64 * KiB],
                             [ra, ra + 64 * KiB], [64 * KiB, 4 * KiB])
                s = scrape(port)
                assert val(s, "mooncake_inflight_requests", transport="tcp",
                           operation="write") == 2
                assert val(s, "mooncake_inflight_bytes", transport="tcp",
                           operation="write") == 68 * KiB
                code, _, body = get(port, "/health")
                assert code == 200 and json.loads(body)["inflight_requests"] == 2
            finally:
                p.cont()
            b.wait(30)
            b.close()
            s = scrape(port)
            assert val(s, "mooncake_inflight_requests", transport="tcp", operation="write") == 0
            assert val(s, "tent_write_requests_total", transport="tcp") == 3
            assert val(s, "tent_write_bytes_total", transport="tcp") == 72 * KiB
    finally:
        p.close()


def test_failover_shm_to_tcp_after_the_peer_restarted(buf):
    """The peer restarts on the same RPC port speaking only tcp: the write over the cached shm
    route fails (counted under shm), the retry on the fresh descriptor goes over tcp."""
    rpc = free_port()
    port = free_port()
    with TransferEngine("127.0.0.1", protocol="auto", MC_METRICS_PORT=port) as e:
        e.register(buf)
        first = Peer(protocol="shm", _hostname=f"127.0.0.1:{rpc}")
        try:
            a = first.alloc(MiB, at=FIXED_ADDRESS)
            e.write(first.segment, buf, a, MiB)
            assert e.explain(first.segment)["chosen"] == "shm"
        finally:
            first.kill()
        second = Peer(protocol="tcp", _hostname=f"127.0.0.1:{rpc}")
        try:
            a2 = second.alloc(MiB, at=FIXED_ADDRESS)
            e.write(second.segment, buf, a2, MiB)
            s = scrape(port)
        finally:
            second.close()
    assert val(s, "tent_transport_failover_total", **{"from": "shm", "to": "tcp"}) == 1
    assert val(s, "tent_write_failures_total", transport="shm") == 1
    assert val(s, "tent_write_requests_total", transport="shm") == 2
    assert val(s, "tent_write_bytes_total", transport="tcp") == MiB


def test_health_answers_and_the_port_closes_with_the_engine():
    port = free_port()
    e = TransferEngine("127.0.0.1", protocol="tcp", MC_METRICS_PORT=port)
    try:
        code, ctype, body = get(port, "/health")
        doc = json.loads(body)
        assert code == 200 and ctype == "application/json"
        assert doc["status"] == "up" and doc["segment"] == e.segment_name
        assert doc["transports"] == ["tcp"] and doc["inflight_requests"] == 0
        assert get(port, "/nowhere")[0] == 404
    finally:
        e.close()
    with socket.socket() as c, pytest.raises(ConnectionRefusedError):
        c.connect(("127.0.0.1", port))


@pytest.mark.parametrize("bad", ["abc", "-1", "65536", "1.5"])
def test_bad_metrics_port_is_a_config_error(bad, monkeypatch):
    with pytest.raises(ConfigError, match="MC_METRICS_PORT.*allowed: 0..65535"):
        TransferEngine("127.0.0.1", protocol="tcp", MC_METRICS_PORT=bad)
    monkeypatch.setenv("MC_METRICS_PORT", bad)
    with pytest.raises(ConfigError, match="MC_METRICS_PORT"):
        TransferEngine("127.0.0.1", protocol="tcp")


def test_a_busy_metrics_port_is_a_config_error_and_no_engine_starts():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"MC_METRICS_PORT={port}: cannot listen"):
            TransferEngine("127.0.0.1", protocol="tcp", MC_METRICS_PORT=port)


def test_missing_prometheus_client_names_the_extra_and_only_the_exporter_needs_it(monkeypatch):
    for mod in [m for m in sys.modules if m.startswith("prometheus_client")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # `import` raises ImportError
    with pytest.raises(ConfigError, match=r"prometheus_client.*mooncake\[metrics\]"):
        TransferEngine("127.0.0.1", protocol="tcp", MC_METRICS_PORT=free_port())
    with TransferEngine("127.0.0.1", protocol="tcp") as e:  # port unset: counters still there
        assert e.metrics()["transports"]["tcp"]["write"]["requests"] == 0


def test_tent_metrics_keys_start_the_exporter(tmp_path):
    """TENT's ``metrics`` block: ``enabled`` with ``http_port``/``http_host`` serves the same
    exporter; ``enabled: false`` serves nothing; a taken port is a ConfigError naming the key."""
    port = free_port()
    conf = tmp_path / "tent.json"
    conf.write_text(json.dumps({"metrics": {"enabled": True, "http_port": port,
                                            "http_host": "127.0.0.1"}}))
    with TransferEngine("127.0.0.1", protocol="tcp", MC_TENT_CONF=str(conf)) as e:
        code, _, body = get(port, "/health")
        assert code == 200 and json.loads(body)["segment"] == e.segment_name
        with pytest.raises(ConfigError, match=f"metrics/http_port={port}: cannot listen"):
            TransferEngine("127.0.0.1", protocol="tcp", MC_TENT_CONF=str(conf))
    conf.write_text(json.dumps({"metrics": {"enabled": False, "http_port": port}}))
    with TransferEngine("127.0.0.1", protocol="tcp", MC_TENT_CONF=str(conf)) as e:
        assert e._metrics_server is None
