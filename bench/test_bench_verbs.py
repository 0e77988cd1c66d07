"""Verbs kernel overhead and RDMA throughput on Soft-RoCE (run inside tools/rxe-vm.sh).

* ``test_wr_rate``: work requests posted + completed per second by our nogil loop
  (``verbs_kernel.post_poll_loop``) vs a pyverbs ``post_send``/``poll`` loop doing the same work
  (same device, same WR size and depth, same run).  Target: >= 5x.
* ``test_engine_throughput``: engine WRITE/READ GB/s (decimal) vs a raw 64 KiB-WR verbs loop in
  the same run.  Under TCG the link is emulated: the numbers are functional only.

    tools/rxe-vm.sh -- python -m pytest bench/test_bench_verbs.py -m rdma --benchmark-disable-gc
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

from mooncake.testing.verbs import loopback_qps

RXE_DEV = os.environ.get("RXE_DEV", "")
GIDX = int(os.environ.get("RXE_GID_INDEX", "1"))
pytestmark = [
    pytest.mark.rdma,
    pytest.mark.skipif(not (os.environ.get("IN_RXE_VM") or RXE_DEV),
                       reason="needs a verbs device: run inside tools/rxe-vm.sh"),
]
V = pytest.importorskip("mooncake._core.verbs")
K = pytest.importorskip("mooncake._core.verbs_kernel")

N_WR = 20000
DEPTH = 64
WR_BYTES = 64


def _our_pair(dev, cq):
    return loopback_qps(dev, cq, GIDX, DEPTH)


def _pyverbs_loop(n: int) -> float:
    """The same work through rdma-core's pyverbs: one post_send per WR, poll() per batch."""
    sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-pyverbs
    pytest.importorskip("pyverbs", reason="pyverbs (apt python3-pyverbs) not importable")
    from pyverbs.addr import AHAttr, GlobalRoute
    from pyverbs.cq import CQ
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import SGE, SendWR

    try:
        from pyverbs import libibverbs_enums as E  # noqa: N812
    except ImportError:
        from pyverbs import enums as E  # noqa: N812
    ctx = Context(name=RXE_DEV)
    pd = PD(ctx)
    cq = CQ(ctx, 256)
    acc = (E.ibv_access_flags.IBV_ACCESS_LOCAL_WRITE | E.ibv_access_flags.IBV_ACCESS_REMOTE_WRITE
           | E.ibv_access_flags.IBV_ACCESS_REMOTE_READ)
    src, dst = MR(pd, 4096, acc), MR(pd, 4096, acc)
    ia = QPInitAttr(qp_type=E.ibv_qp_type.IBV_QPT_RC, scq=cq, rcq=cq,
                    cap=QPCap(max_send_wr=DEPTH, max_recv_wr=1))
    qa, qb = QP(pd, ia), QP(pd, ia)
    gid = ctx.query_gid(1, GIDX)
    for me, other in ((qa, qb), (qb, qa)):
        a = QPAttr(port_num=1)
        a.qp_access_flags = acc
        a.path_mtu = E.ibv_mtu.IBV_MTU_1024
        a.dest_qp_num = other.qp_num
        a.rq_psn = a.sq_psn = 0
        a.max_dest_rd_atomic = a.max_rd_atomic = 1
        a.min_rnr_timer, a.timeout, a.retry_cnt, a.rnr_retry = 12, 14, 7, 7
        a.ah_attr = AHAttr(port_num=1, is_global=1, gr=GlobalRoute(dgid=gid, sgid_index=GIDX))
        me.to_rts(a)
    wr = SendWR(opcode=E.ibv_wr_opcode.IBV_WR_RDMA_WRITE, num_sge=1,
                sg=[SGE(src.buf, WR_BYTES, src.lkey)],
                send_flags=E.ibv_send_flags.IBV_SEND_SIGNALED)
    wr.set_wr_rdma(dst.rkey, dst.buf)
    posted = done = 0
    t0 = time.perf_counter()
    while done < n:
        while posted < n and posted - done < DEPTH:
            qa.post_send(wr)
            posted += 1
        k, wcs = cq.poll(DEPTH)
        for wc in wcs:
            assert wc.status == E.ibv_wc_status.IBV_WC_SUCCESS, wc.status
        done += k
    return time.perf_counter() - t0


def test_wr_rate(benchmark):
    dev = V.Device(RXE_DEV)
    cq = V.CQ(dev, 256)
    qa, _qb = _our_pair(dev, cq)
    buf = np.zeros(8192, np.uint8)
    mr = V.MR(dev, buf.ctypes.data, buf.nbytes, V.ACCESS_RW)
    args = (qa, cq, V.WR_RDMA_WRITE, buf.ctypes.data, mr.lkey, buf.ctypes.data + 4096, mr.rkey,
            WR_BYTES, N_WR, DEPTH)

    def ours():
        done, errors, secs = K.post_poll_loop(*args)
        assert (done, errors) == (N_WR, 0)
        return secs

    ours_s = min(ours() for _ in range(3))
    theirs_s = min(_pyverbs_loop(N_WR) for _ in range(3))
    benchmark.extra_info.update(
        wr_bytes=WR_BYTES, depth=DEPTH, work_requests=N_WR,
        ours_wr_per_s=round(N_WR / ours_s), pyverbs_wr_per_s=round(N_WR / theirs_s),
        ratio=round(theirs_s / ours_s, 2))
    print(f"\nWR/s ours {N_WR / ours_s:,.0f}  pyverbs {N_WR / theirs_s:,.0f}  "
          f"ratio {theirs_s / ours_s:.1f}x")
    benchmark.pedantic(ours, rounds=3, iterations=1)


def test_engine_throughput(benchmark):
    from mooncake.engine import TransferEngine

    n = 16 << 20
    a = TransferEngine("127.0.0.1", metadata="p2p", protocol="rdma", device_name=RXE_DEV)
    b = TransferEngine("127.0.0.1", metadata="p2p", protocol="rdma", device_name=RXE_DEV)
    try:
        src, dst = np.ones(n, np.uint8), np.zeros(n, np.uint8)
        a.register(src)
        b.register(dst)
        seg = b.segment_name

        def timed(op) -> float:
            t0 = time.perf_counter()
            op(seg, src.ctypes.data, dst.ctypes.data, n)
            return time.perf_counter() - t0

        w = min(timed(a.write) for _ in range(3))
        r = min(timed(a.read) for _ in range(3))
        # the device's own limit in this run: one QP, 64 KiB RDMA WRITEs, nogil loop
        dev = V.Device(RXE_DEV)
        cq = V.CQ(dev, 256)
        qa, _qb = _our_pair(dev, cq)
        ms = V.MR(dev, src.ctypes.data, n, V.ACCESS_RW)
        md = V.MR(dev, dst.ctypes.data, n, V.ACCESS_RW)
        _, _, raw = K.post_poll_loop(qa, cq, V.WR_RDMA_WRITE, src.ctypes.data, ms.lkey,
                                     dst.ctypes.data, md.rkey, 65536, n // 65536, 16)
        benchmark.extra_info.update(
            bytes=n, write_gbps=round(n / w / 1e9, 4), read_gbps=round(n / r / 1e9, 4),
            raw_verbs_write_gbps=round(n / raw / 1e9, 4))
        print(f"\nengine write {n / w / 1e9:.3f} GB/s, read {n / r / 1e9:.3f} GB/s, "
              f"raw verbs 64 KiB WRITE loop {n / raw / 1e9:.3f} GB/s")
        benchmark.pedantic(lambda: a.write(seg, src.ctypes.data, dst.ctypes.data, n),
                           rounds=2, iterations=1)
    finally:
        a.close()
        b.close()
