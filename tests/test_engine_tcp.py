"""TCP-specific transfers between two real processes: 256 MiB, pipelining on the lanes,
several initiator processes and threads on one peer.

Integrity (1 B..64 MiB, unaligned), batches (sync, submit/wait, await), per-task statuses of a
refused request and the fault cases run for tcp in the conformance suite
(tests/test_conformance.py, ``mooncake.testing.conformance``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from peer import Peer, sha

from mooncake.engine import TransferEngine

MiB = 1 << 20


@pytest.fixture(scope="module")
def remote(peer):
    """A 64 MiB + 5 B registered buffer in the peer."""
    size = 64 * MiB + 5
    return peer.alloc(size, seed=1), size


@pytest.fixture
def local(engine):
    buf = np.random.default_rng(7).integers(0, 256, 64 * MiB + 5, dtype=np.uint8)
    engine.register(buf)
    return buf


@pytest.mark.slow
def test_256_mib_roundtrip(engine):
    p = Peer(protocol="tcp")
    try:
        n = 256 * MiB
        raddr = p.alloc(n, seed=3)
        buf = np.random.default_rng(9).integers(0, 256, n, dtype=np.uint8)
        engine.register(buf)
        engine.write(p.segment, buf, raddr)
        assert p.sha(raddr, n) == sha(buf)
        p.call("fill", raddr, n, 11)
        engine.read(p.segment, buf, raddr)
        assert sha(buf) == p.sha(raddr, n)
    finally:
        p.close()


def test_many_small_requests_pipelined(engine, peer, remote, local):
    raddr, _ = remote
    n = 2000
    offs = [i * 4096 for i in range(n)]
    b = engine.submit(peer.segment, "write", [local.ctypes.data + x for x in offs],
                      [raddr + x for x in offs], [4096] * n)
    b.wait(30)
    assert peer.sha(raddr, n * 4096) == sha(local[: n * 4096])


def _writer(segment: str, raddr: int, off: int, n: int, seed: int, q) -> None:
    from mooncake.engine import TransferEngine

    with TransferEngine("127.0.0.1", protocol="tcp") as e:
        buf = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
        e.register(buf)
        for i in range(0, n, 256 * 1024):
            e.write(segment, buf.ctypes.data + i, raddr + off + i, min(256 * 1024, n - i))
        q.put(sha(buf))


def test_concurrent_initiators(peer, remote):
    import multiprocessing as mp

    raddr, _ = remote
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    n = 8 * MiB
    procs = [ctx.Process(target=_writer, args=(peer.segment, raddr, i * n, n, 100 + i, q))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = sorted(q.get(timeout=5) for _ in procs)
    assert got == sorted(peer.sha(raddr + i * n, n) for i in range(3))


def test_threads_share_one_engine(engine, peer, remote, local):
    import threading

    raddr, _ = remote
    errs = []

    def work(k: int) -> None:
        try:
            for i in range(50):
                off = (k * 50 + i) * 8192
                engine.write(peer.segment, local.ctypes.data + off, raddr + off, 8192)
        except Exception as e:
            errs.append(e)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs
    assert peer.sha(raddr, 200 * 8192) == sha(local[: 200 * 8192])


@pytest.mark.parametrize("grace_ns", [0, 300_000_000])
def test_lane_workers_poll_for_the_grace_period_then_sleep(peer, grace_ns):
    """TENT's grace period on the tcp lane workers: batches complete as ever, and once the
    period after the last work has passed the workers sleep (no CPU while idle)."""

    from cpu import other_threads_cpu as others_cpu

    e = TransferEngine("127.0.0.1", protocol="tcp",
                       **{"transports/rdma/workers/grace_period_ns": grace_ns})
    try:
        raddr = peer.alloc(MiB, seed=41)
        buf = np.zeros(MiB, np.uint8)
        e.register(buf)
        for _ in range(3):
            b = e.submit(peer.segment, "read", [buf.ctypes.data + i * 65536 for i in range(16)],
                         [raddr + i * 65536 for i in range(16)], [65536] * 16)
            b.wait()
        assert sha(buf) == peer.sha(raddr, MiB)
        time.sleep(grace_ns / 1e9 + 0.2)
        before = others_cpu()
        time.sleep(1.0)
        assert others_cpu() - before < 0.1
    finally:
        e.close()


def test_sync_call_of_several_slices_is_spread_over_the_lanes(peer):
    """A synchronous call larger than a slice runs on several idle lanes at once (the caller
    drives one part, the lanes' workers the others); the bytes are exact either way."""
    e = TransferEngine("127.0.0.1", protocol="tcp", MC_TCP_SLICE_SIZE=64 * 1024,
                       MC_TCP_LANES_PER_PEER=4)
    try:
        n = 2 * MiB
        raddr = peer.alloc(n, seed=42)
        buf = np.random.default_rng(42).integers(0, 255, n, dtype=np.uint8)
        e.register(buf)
        e.write(peer.segment, buf[:4096], raddr)  # the lanes connect; their workers park
        lanes = e.transports["tcp"]._peers[(peer.segment, 0)].lanes
        time.sleep(0.1)  # past the lane workers' grace period: every lane is idle
        before = [lane.requests for lane in lanes]
        e.write(peer.segment, buf, raddr)
        did = [lane.requests - b for lane, b in zip(lanes, before, strict=True)]
        assert sum(1 for x in did if x > 0) >= 2, did
        assert sum(did) == n // (64 * 1024)
        assert peer.sha(raddr, n) == sha(buf)
        back = np.zeros_like(buf)
        e.register(back)
        e.read(peer.segment, back, raddr)
        assert np.array_equal(back, buf)
    finally:
        e.close()
