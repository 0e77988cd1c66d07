"""TCP transfers between two real processes: integrity, batches, async, concurrency."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from peer import Peer, sha

from mooncake.batch import Status
from mooncake.errors import TransferFailed

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


@pytest.mark.parametrize("size", [1, 7, 4096, 65535, 65536 + 1, MiB + 3, 3 * MiB + 1, 16 * MiB])
@pytest.mark.parametrize("offset", [0, 1, 4093])
def test_write_then_read_back(engine, peer, remote, local, size, offset):
    raddr, _ = remote
    src = local.ctypes.data + offset
    engine.write(peer.segment, src, raddr + offset * 3, size)
    assert peer.sha(raddr + offset * 3, size) == sha(local[offset: offset + size])
    back = np.zeros(size, np.uint8)
    engine.register(back)
    engine.read(peer.segment, back, raddr + offset * 3)
    assert sha(back) == sha(local[offset: offset + size])


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


def test_mixed_size_batch_sync_and_async(engine, peer, remote, local):
    raddr, _ = remote
    rng = np.random.default_rng(5)
    sizes = [int(s) for s in rng.integers(1, 2 * MiB, 40)]
    offs, o = [], 0
    for s in sizes:
        offs.append(o)
        o += s + int(rng.integers(0, 64))
    base = local.ctypes.data
    engine.transfer(peer.segment, "write", [base + x for x in offs], [raddr + x for x in offs],
                    sizes)
    for x, s in zip(offs, sizes, strict=True):
        assert peer.sha(raddr + x, s) == sha(local[x: x + s])
    dst = np.zeros_like(local)
    engine.register(dst)
    b = engine.submit(peer.segment, "read", [dst.ctypes.data + x for x in offs],
                      [raddr + x for x in offs], sizes)
    b.wait(30)
    sts = b.statuses()
    assert [s.status for s in sts] == [Status.COMPLETED] * len(sizes)
    assert [s.transferred_bytes for s in sts] == sizes
    for x, s in zip(offs, sizes, strict=True):
        assert sha(dst[x: x + s]) == sha(local[x: x + s])
    b.close()


def test_many_small_requests_pipelined(engine, peer, remote, local):
    raddr, _ = remote
    n = 2000
    offs = [i * 4096 for i in range(n)]
    b = engine.submit(peer.segment, "write", [local.ctypes.data + x for x in offs],
                      [raddr + x for x in offs], [4096] * n)
    b.wait(30)
    assert peer.sha(raddr, n * 4096) == sha(local[: n * 4096])


def test_await_and_context_manager(engine, peer, remote, local):
    raddr, _ = remote

    async def go():
        with engine.submit(peer.segment, "write", [local.ctypes.data], [raddr], [MiB]) as b:
            return await b

    sts = asyncio.run(go())
    assert sts[0].status == Status.COMPLETED and sts[0].transferred_bytes == MiB


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


def test_failed_task_reports_per_task_status(engine, peer, remote, local):
    raddr, size = remote
    # corrupt our cached view so the initiator's check passes; the target must refuse
    entry = engine._segments.get(peer.segment)
    entry.table.add(raddr + size + 4096, 8192)
    with pytest.raises(TransferFailed) as ei:
        engine.transfer(peer.segment, "write", [local.ctypes.data] * 2,
                        [raddr + size + 4096, raddr], [4096, 4096])
    sts = ei.value.statuses
    assert sts[0].status == Status.FAILED and "refused" in sts[0].error
    assert sts[1].status == Status.COMPLETED
    assert peer.sha(raddr, 4096) == sha(local[:4096])  # the good task landed
    engine._segments.drop(peer.segment)
