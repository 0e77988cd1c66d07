"""Shared bandwidth quota (``shared_quota_shm_path``): what it costs alone, how it shares.

* Alone: sync TCP WRITE/READ of 1 MiB and 16 MiB blocks by an engine that holds a quota slot,
  against the same engine, same lanes, with the quota switched off on its lanes (A/B rounds).
  Target (issue 10): >= 0.9x.
* Contention: three writer processes at priorities background_prefetch / migration /
  weight_loading (weights 1 : 2 : 4), 4 MiB sync WRITEs to one target for ``SHARE_TIME`` s.
  Reported: each one's share of the bytes over its weight's share (target: all within ±15 %,
  the row shows 1 - the worst deviation), and the aggregate rate against the same three
  without the quota (no target: on loopback the link is the CPU, and a weighted share can
  leave a lighter writer waiting while the heaviest cannot use all of its share).

``pytest bench/test_bench_quota.py --benchmark-only -s``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import warnings

import numpy as np
import pytest
from conftest import WSET, MiB, run_paired

from mooncake import quota as Q

BLOCKS = [MiB, 16 * MiB]
SHARE_TIME = float(os.environ.get("MC_BENCH_QUOTA_TIME", "2.0"))
PRIOS = ["background_prefetch", "migration", "weight_loading"]


@pytest.fixture(scope="module")
def qeng(peers):
    """An engine with a quota slot on lo, its buffer, its lanes and its slot."""
    from mooncake.engine import TransferEngine

    d = tempfile.mkdtemp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = TransferEngine("127.0.0.1", protocol="tcp", shared_quota_shm_path=f"{d}/quota")
    try:
        buf = eng.allocate(WSET)
        eng.write(peers.segment, buf.addr, peers.remote, WSET)
        eng.read(peers.segment, buf.addr, peers.remote, WSET)
        tcp = eng.transports["tcp"]
        lanes = [lane for p in tcp._peers.values() for lane in p.lanes]
        (slot,) = tcp._qslots.values()
        yield eng, buf.addr, lanes, slot
    finally:
        eng.close()


@pytest.mark.parametrize("op", ["write", "read"])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b >> 20}MiB")
def test_quota_alone(benchmark, results, peers, qeng, op, block):
    eng, local, lanes, slot = qeng
    one = eng.transfer_sync_write if op == "write" else eng.transfer_sync_read
    count = max(2, WSET // block)
    work = [(local + i * block % WSET, peers.remote + i * block % WSET) for i in range(count)]

    def rounds(quota: bool):
        def fn() -> None:
            for lane in lanes:
                lane.set_quota(slot.core if quota else None, slot.sid)
            for la, ra in work:
                if one(peers.segment, la, ra, block):
                    raise RuntimeError(f"transfer_sync_{op} failed")
        return fn

    waits0 = slot.snapshot()["waits"]
    paired = run_paired(benchmark, rounds(True), rounds(False))
    if paired is None:
        return
    nbytes = count * block
    value = nbytes / paired.median("engine") / 1e9
    base = nbytes / paired.median("baseline") / 1e9
    results.row(f"quota alone sync {op} {block >> 20}MiB", value, "GB/s", base,
                "same lanes, no quota", ("ratio>=", 0.90),
                {**benchmark.extra_info, "refusals": slot.snapshot()["waits"] - waits0})


def _writer(segment: str, raddr: int, qpath: str | None, prio: str, counter, go, stop) -> None:
    warnings.simplefilter("ignore")
    os.environ["MC_SHARED_QUOTA_PRIORITY"] = prio
    from mooncake.engine import TransferEngine

    kw = {"shared_quota_shm_path": qpath} if qpath else {}
    block = 4 * MiB
    with TransferEngine("127.0.0.1", protocol="tcp", **kw) as e:
        buf = np.zeros(block, dtype=np.uint8)
        e.register(buf)
        e.write(segment, buf, raddr)
        counter.value = 1
        go.wait(60)
        while not stop.is_set():
            e.write(segment, buf, raddr)
            counter.value += block


def _run_three(peers, qpath: str | None) -> list[float]:
    ctx = mp.get_context("spawn")
    go, stop = ctx.Event(), ctx.Event()
    counters = [ctx.RawValue("Q", 0) for _ in PRIOS]
    procs = [ctx.Process(target=_writer, args=(peers.segment, peers.remote + i * 4 * MiB, qpath,
                                               pr, c, go, stop))
             for i, (pr, c) in enumerate(zip(PRIOS, counters, strict=True))]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 60
        while min(c.value for c in counters) == 0:
            if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                raise RuntimeError("writers did not start")
            time.sleep(0.05)
        go.set()
        time.sleep(0.5)
        t0, b0 = time.monotonic(), [c.value for c in counters]
        time.sleep(SHARE_TIME)
        t1, b1 = time.monotonic(), [c.value for c in counters]
        return [(y - x) / (t1 - t0) for x, y in zip(b0, b1, strict=True)]
    finally:
        stop.set()
        go.set()
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()


def test_quota_three_writers(benchmark, results, peers):
    d = tempfile.mkdtemp()
    got: dict[str, list[float]] = {}

    def measure() -> None:
        got["quota"] = _run_three(peers, f"{d}/quota")
        got["free"] = _run_three(peers, None)
    benchmark.pedantic(measure, rounds=1, warmup_rounds=0)
    weights = [Q.weight_of(p) for p in PRIOS]
    q, free = got["quota"], got["free"]
    shares = [r / sum(q) for r in q]
    want = [w / sum(weights) for w in weights]
    fit = [s / x for s, x in zip(shares, want, strict=True)]
    info = {**benchmark.extra_info, "weights": weights, "shares": [round(s, 4) for s in shares],
            "share/weight": [round(f, 3) for f in fit],
            "rates GB/s": [round(r / 1e9, 3) for r in q],
            "rates without quota GB/s": [round(r / 1e9, 3) for r in free]}
    results.row("quota 3 writers 1:2:4: 1 - worst |share/weight - 1|",
                1 - max(abs(f - 1) for f in fit), "x", None, "", ("value>=", 0.85), dict(info))
    results.row("quota 3 writers aggregate", sum(q) / 1e9, "GB/s", sum(free) / 1e9,
                "same 3 without quota", None, dict(info))
    print(info)
