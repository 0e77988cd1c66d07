"""TENT's grace period (``workers/grace_period_ns``): CPU spent against 4 KiB latency.

The seed's three rows (1-5 us for latency-sensitive inference, the 5 ms default, 10-50 ms where
CPU is scarce), on the shm copy pool: a same-host peer, 4 KiB WRITEs submitted asynchronously
and waited for (``async_memcpy_threshold=0``: always copied by a pool worker, never by the
caller's thread), paced at one every PACE seconds for DURATION seconds.  Reported per
row: p50/p99 submit-to-completion latency (us) and the initiator's CPU use (percent of one CPU)
during the paced run and while idle afterwards; the baseline row is the same paced loop doing a
4 KiB memcpy (no pool).  Run: ``pytest bench/test_bench_grace.py --benchmark-only -s``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from mooncake._core import copy as kc
from mooncake.engine import TransferEngine
from mooncake.testing.peer import Peer

ROWS = {"1-5us": 2_000, "5ms": 5_000_000, "10-50ms": 20_000_000}
PACE = 0.002
DURATION = 1.5
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def target():
    p = Peer(protocol="shm")
    yield p
    p.close()


def _paced(op) -> tuple[list[float], float, float]:
    """Run ``op`` every PACE s for DURATION s: latencies (s), CPU %% busy, CPU %% idle after."""
    lat = []
    c0, t0 = time.process_time(), time.monotonic()
    nxt = t0
    while time.monotonic() - t0 < DURATION:
        a = time.perf_counter()
        op()
        lat.append(time.perf_counter() - a)
        nxt += PACE
        time.sleep(max(0.0, nxt - time.monotonic()))
    busy = (time.process_time() - c0) / (time.monotonic() - t0) * 100
    c1, t1 = time.process_time(), time.monotonic()
    time.sleep(1.0)
    idle = (time.process_time() - c1) / (time.monotonic() - t1) * 100
    return lat, busy, idle


def _row(name: str, lat: list[float], busy: float, idle: float) -> dict:
    us = np.array(lat) * 1e6
    RESULTS[name] = row = {"p50 us": round(float(np.percentile(us, 50)), 1),
                           "p99 us": round(float(np.percentile(us, 99)), 1),
                           "cpu busy %": round(busy, 1), "cpu idle %": round(idle, 1)}
    return row


def test_baseline_memcpy(benchmark):
    a, b = np.zeros(4096, np.uint8), np.ones(4096, np.uint8)
    out = benchmark.pedantic(lambda: _paced(lambda: kc.memcpy(a.ctypes.data, b.ctypes.data,
                                                              4096)), rounds=1, iterations=1)
    benchmark.extra_info.update(_row("memcpy (no pool)", *out))


@pytest.mark.parametrize("row", list(ROWS))
def test_grace_row(benchmark, target, row):
    eng = TransferEngine("127.0.0.1", protocol="shm", MC_WORKERS_PER_CTX=1, **{
        "transports/rdma/workers/grace_period_ns": ROWS[row],
        "transports/shm/async_memcpy_threshold": 0})
    try:
        raddr = target.alloc(4096)
        buf = np.ones(4096, np.uint8)
        eng.register(buf)

        req = ((buf.ctypes.data,), (raddr,), (4096,))

        def one():  # through a worker: asynchronous (async_memcpy_threshold=0), then waited for
            with eng.submit(target.segment, "write", *req) as b:
                b.wait()

        one()
        out = benchmark.pedantic(lambda: _paced(one), rounds=1, iterations=1)
        benchmark.extra_info.update(_row(f"grace {row} ({ROWS[row]} ns)", *out))
    finally:
        eng.close()


@pytest.fixture(scope="module", autouse=True)
def report():
    """Print the table once every row ran (also under --benchmark-only)."""
    yield
    if not RESULTS:
        return
    print(f"\n4 KiB shm WRITE through the copy pool, one every {PACE * 1e3:g} ms for "
          f"{DURATION:g} s")
    print(f"{'row':28s} {'p50 us':>8s} {'p99 us':>8s} {'cpu busy %':>11s} {'cpu idle %':>11s}")
    for name, r in RESULTS.items():
        print(f"{name:28s} {r['p50 us']:8.1f} {r['p99 us']:8.1f} {r['cpu busy %']:11.1f} "
              f"{r['cpu idle %']:11.1f}")
