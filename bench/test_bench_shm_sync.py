"""Same-host synchronous paths (shm): the calling thread copies, against memcpy in the same run.

Rows (each engine round alternates with its baseline round, so load hits both alike):

* ``shm sync {write,read} {1,16} MiB``: one ``transfer`` per block over the 64 MiB working set of
  a peer's managed (mapped) buffer, against a single-thread ``memcpy`` per block over the same
  sizes; target >= 0.9x.
* ``shm batch 16x4MiB write``: one synchronous batch with ``MC_WORKERS_PER_CTX=2`` (the caller
  and the two workers share it) against single-thread memcpy (target >= 1.3x); the physical
  limit is measured next to it: two threads copying halves with ``memcpy`` at once.
* ``shm sync 4 KiB {write,read} p50``: latency of one call (target <= 2 us), with the p50 of a
  4 KiB ``memcpy`` called from Python as the reference.

Run: ``pytest bench/test_bench_shm_sync.py --benchmark-only -s``.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import MiB, percentile, run_paired

from mooncake._core import copy as kc
from mooncake.engine import TransferEngine
from mooncake.testing.peer import Peer

WSET = 64 * MiB
SYNC_BLOCKS = [MiB, 16 * MiB]
BATCH_BLOCK = 4 * MiB
LAT_N = 20000


@pytest.fixture(scope="module")
def target():
    p = Peer(protocol="shm")
    p.raddr = p.alloc(WSET, kind="managed")
    yield p
    p.close()


@pytest.fixture(scope="module")
def local():
    src = np.random.default_rng(0).integers(0, 255, WSET, dtype=np.uint8)
    return src, np.zeros_like(src)


@pytest.fixture(scope="module")
def engine(local):
    e = TransferEngine("127.0.0.1", protocol="shm", MC_WORKERS_PER_CTX=2)
    for a in local:
        e.register(a)
    yield e
    e.close()


def _memcpy_blocks(dst: int, src: int, block: int):
    offs = range(0, WSET, block)
    return lambda: [kc.memcpy(dst + o, src + o, block) for o in offs]


@pytest.mark.parametrize("block", SYNC_BLOCKS, ids=lambda b: f"{b >> 20}MiB")
@pytest.mark.parametrize("op", ["write", "read"])
def test_sync_block(benchmark, results, engine, target, local, op, block):
    src, dst = local
    mine = src if op == "write" else dst
    work = [((mine.ctypes.data + o,), (target.raddr + o,), (block,))
            for o in range(0, WSET, block)]
    seg = target.segment

    def fn() -> None:
        for la, ra, n in work:
            engine.transfer(seg, op, la, ra, n)
    p = run_paired(benchmark, fn, _memcpy_blocks(dst.ctypes.data, src.ctypes.data, block))
    if p is None:
        return
    gbps, base = WSET / p.median("engine") / 1e9, WSET / p.median("baseline") / 1e9
    results.row(f"shm sync {op} {block >> 20} MiB", gbps, "GB/s", base,
                "single-thread memcpy", ("ratio>=", 0.9), benchmark.extra_info)


def _two_thread_memcpy(dst: int, src: int) -> float:
    """Seconds for two threads to copy one half of the working set each (the machine's memory
    bandwidth for two copying threads: the ceiling of a two-worker batch)."""
    half = WSET // 2
    go = threading.Barrier(3)

    def half_copy(i: int) -> None:
        go.wait()
        for o in range(i * half, (i + 1) * half, BATCH_BLOCK):
            kc.memcpy(dst + o, src + o, BATCH_BLOCK)
    ts = [threading.Thread(target=half_copy, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def test_sync_batch(benchmark, results, engine, target, local):
    src, dst = local
    offs = list(range(0, WSET, BATCH_BLOCK))
    la = [src.ctypes.data + o for o in offs]
    ra = [target.raddr + o for o in offs]
    lens = [BATCH_BLOCK] * len(offs)
    seg = target.segment
    p = run_paired(benchmark, lambda: engine.transfer(seg, "write", la, ra, lens),
                   _memcpy_blocks(dst.ctypes.data, src.ctypes.data, BATCH_BLOCK))
    if p is None:
        return
    gbps, base = WSET / p.median("engine") / 1e9, WSET / p.median("baseline") / 1e9
    two = sorted(_two_thread_memcpy(dst.ctypes.data, src.ctypes.data) for _ in range(15))
    limit = WSET / percentile(two, 0.5) / 1e9
    results.row("shm batch 16x4MiB write (2 workers)", gbps, "GB/s", base,
                "single-thread memcpy", ("ratio>=", 1.3), benchmark.extra_info)
    results.row("  physical limit: 2-thread memcpy", limit, "GB/s", base,
                "single-thread memcpy", None, {})
    results.row("  shm batch vs the 2-thread limit", gbps, "GB/s", limit, "2-thread memcpy",
                None, {})


@pytest.mark.parametrize("op", ["write", "read"])
def test_sync_4k_latency(benchmark, results, engine, target, local, op):
    src, dst = local
    mine = src if op == "write" else dst
    la, ra, n = (mine.ctypes.data,), (target.raddr,), (4096,)
    seg = target.segment
    clock = time.perf_counter_ns
    for _ in range(1000):
        engine.transfer(seg, op, la, ra, n)

    def sample() -> tuple[list[int], list[int]]:
        eng, mem = [], []
        d, s = dst.ctypes.data, src.ctypes.data
        for _ in range(LAT_N):
            t = clock()
            engine.transfer(seg, op, la, ra, n)
            t1 = clock()
            kc.memcpy(d, s, 4096)
            t2 = clock()
            eng.append(t1 - t)
            mem.append(t2 - t1)
        return sorted(eng), sorted(mem)
    eng, mem = benchmark.pedantic(sample, rounds=1, iterations=1)
    p50 = percentile(eng, 0.5) / 1e3
    benchmark.extra_info.update(p50_us=p50, p99_us=percentile(eng, 0.99) / 1e3)
    results.row(f"shm sync 4 KiB {op} p50", p50, "us", percentile(mem, 0.5) / 1e3,
                "4 KiB memcpy called from Python", ("value<=", 2.0), benchmark.extra_info)
