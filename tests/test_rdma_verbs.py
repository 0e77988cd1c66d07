"""Verbs-kernel tests on Soft-RoCE: device queries, the nogil post/poll paths, and interop with
a plain pyverbs peer process (rdma-core's binding) whose buffer we WRITE and READ."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from rdma_peer import pattern, sha
from rdma_util import RXE_DEV, RXE_GID_INDEX, Peer, needs_rxe

from mooncake.testing.verbs import loopback_qps

pytestmark = needs_rxe

V = pytest.importorskip("mooncake._core.verbs")
K = pytest.importorskip("mooncake._core.verbs_kernel")


@pytest.fixture
def dev():
    return V.Device(RXE_DEV)


def test_device_port_and_gid(dev):
    assert RXE_DEV in V.device_names()
    port = dev.query_port(1)
    assert port["state"] == V.PORT_ACTIVE and port["link_layer"] == V.LINK_LAYER_ETHERNET
    gid, gtype = dev.gid_entry(1, RXE_GID_INDEX)
    assert gtype == V.GID_TYPE_ROCE_V2 and gid[10:12] == b"\xff\xff"
    from mooncake.transports.rdma import select_gid

    rows = [(i, *e) for i in range(16) if (e := dev.gid_entry(1, i)) is not None]
    assert select_gid(rows, False) == RXE_GID_INDEX
    with pytest.raises(OSError, match="no RDMA device named"):
        V.Device("nosuchdev0")


def _pair(dev, cq, depth=64):
    qa, qb = loopback_qps(dev, cq, RXE_GID_INDEX, depth, max_inline=64)
    assert qa.state == V.QPS_RTS
    return qa, qb


def test_kernel_retries_on_another_qp(dev):
    """A slice flushed off a dead QP is reposted on the endpoint's other QP."""
    from mooncake._core.batch import Batch, slice_requests

    cq = V.CQ(dev, 256, V.CompChannel(dev))
    qa, _ = _pair(dev, cq)
    qc, _ = _pair(dev, cq)
    n = 1 << 20
    src, dst = pattern(3, n).copy(), np.zeros(n, np.uint8)
    ms = V.MR(dev, src.ctypes.data, n, V.ACCESS_RW)
    md = V.MR(dev, dst.ctypes.data, n, V.ACCESS_RW)
    slot, hub = K.CQSlot(cq), K.Hub()
    w = K.Worker([slot], hub, 5)
    t = threading.Thread(target=w.run)
    t.start()
    try:
        qa.to_error()  # QP 0 is dead before anything is posted: every slice moves to QP 1
        ep = K.Endpoint(1, [qa, qc], w, slot)
        lt = K.KeyTable([(src.ctypes.data, n, [ms.lkey])], 1)
        rt = K.KeyTable([(dst.ctypes.data, n, [md.rkey])], 1)
        b = Batch(1)
        assert K.submit(slice_requests(b, K.OP_WRITE, [src.ctypes.data], [dst.ctypes.data],
                                       [n], 65536, 4), lt, 0, rt, [0], [ep]) == 0
        assert b.wait(60) and b.status(0) == (4, n, 0)
        assert np.array_equal(src, dst) and ep.users == 0
        # outside the tables: refused before posting, nothing leaks
        b = Batch(1)
        bad = K.submit(slice_requests(b, K.OP_WRITE, [src.ctypes.data], [dst.ctypes.data + 8],
                                      [n], 65536, 4), lt, 0, rt, [0], [ep])
        assert bad == 1 and b.wait(5) and b.status(0)[0] == 6 and ep.users == 0
        done, errors, secs = K.post_poll_loop(qc, cq, V.WR_RDMA_WRITE, src.ctypes.data,
                                              ms.lkey, dst.ctypes.data, md.rkey, 64, 2000)
        assert (done, errors) == (2000, 0) and secs > 0
    finally:
        w.stop()
        t.join(10)


def _gid_text(g: bytes) -> str:
    h = g.hex()
    return ":".join(h[i:i + 4] for i in range(0, 32, 4))


def test_interop_with_pyverbs_peer(dev):
    """Our kernel WRITEs into and READs from a buffer registered by rdma-core's pyverbs."""
    import importlib.util
    import sys

    from mooncake._core.batch import Batch, slice_requests

    if "/usr/lib/python3/dist-packages" not in sys.path:
        sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-pyverbs
    if importlib.util.find_spec("pyverbs") is None:
        pytest.skip("pyverbs (apt python3-pyverbs, CPython 3.11) is not importable here")
    n = 3 * 65536 + 1234
    p = Peer("rdma_pyverbs_peer.py", RXE_DEV, str(RXE_GID_INDEX), str(n))
    try:
        cq = V.CQ(dev, 64, V.CompChannel(dev))
        qp = V.QP(dev, cq, 32)
        qp.to_init(1)
        gid = dev.query_gid(1, RXE_GID_INDEX)
        p.send(qpn=qp.qp_num, psn=0, gid=_gid_text(gid))
        qp.to_rtr(p.info["qpn"], bytes.fromhex(p.info["gid"].replace(":", "")), 0,
                  p.info["psn"], 1024, 1, RXE_GID_INDEX)
        qp.to_rts(0)
        assert p.recv()["state"] == "rts"
        buf = pattern(77, n).copy()
        mr = V.MR(dev, buf.ctypes.data, n, V.ACCESS_RW)
        slot, hub = K.CQSlot(cq), K.Hub()
        w = K.Worker([slot], hub)
        t = threading.Thread(target=w.run)
        t.start()
        try:
            ep = K.Endpoint(1, [qp], w, slot)
            lt = K.KeyTable([(buf.ctypes.data, n, [mr.lkey])], 1)
            rt = K.KeyTable([(p.info["addr"], n, [p.info["rkey"]])], 1)
            for op in (K.OP_WRITE, K.OP_READ):
                if op == K.OP_READ:
                    p.ask(cmd="fill", seed=78)
                    buf[:] = 0
                b = Batch(1)
                K.submit(slice_requests(b, op, [buf.ctypes.data], [p.info["addr"]], [n],
                                        65536, 4), lt, 0, rt, [0], [ep])
                assert b.wait(60) and b.status(0) == (4, n, 0)
                if op == K.OP_WRITE:
                    assert p.ask(cmd="sha")["sha"] == sha(buf)
            assert sha(buf) == sha(pattern(78, n))
        finally:
            w.stop()
            t.join(10)
    finally:
        p.close()


def _rig(dev, n, depth=64):
    """A loopback endpoint on a running worker with src/dst buffers and key tables."""
    cq = V.CQ(dev, 256, V.CompChannel(dev))
    qa, qb = _pair(dev, cq, depth)
    src, dst = pattern(5, n).copy(), np.zeros(n, np.uint8)
    ms = V.MR(dev, src.ctypes.data, n, V.ACCESS_RW)
    md = V.MR(dev, dst.ctypes.data, n, V.ACCESS_RW)
    slot, hub = K.CQSlot(cq), K.Hub()
    w = K.Worker([slot], hub, 5)
    t = threading.Thread(target=w.run)
    t.start()
    ep = K.Endpoint(1, [qa], w, slot)
    lt = K.KeyTable([(src.ctypes.data, n, [ms.lkey]), (dst.ctypes.data, n, [md.lkey])], 1)
    rt = K.KeyTable([(dst.ctypes.data, n, [md.rkey]), (src.ctypes.data, n, [ms.rkey])], 1)
    return dict(cq=cq, qps=(qa, qb), src=src, dst=dst, mrs=(ms, md), w=w, t=t, ep=ep, lt=lt,
                rt=rt, hub=hub, slot=slot)


def test_cancelled_batch_is_never_posted(dev):
    """Slices of a batch cancelled before a worker takes them end with the cancel code and are
    not posted; nothing lands."""
    from mooncake._core import batch as _core
    from mooncake._core.batch import Batch, slice_requests

    n = 1 << 20
    r = _rig(dev, n)
    try:
        posted = r["w"].stats()["posted"]
        b = Batch(1)
        sl = slice_requests(b, K.OP_WRITE, [r["src"].ctypes.data], [r["dst"].ctypes.data], [n],
                            65536, 4)
        b.cancel(_core.E_CANCELED)
        K.submit(sl, r["lt"], 0, r["rt"], [0], [r["ep"]])
        assert b.wait(10) and b.status(0) == (6, 0, _core.E_CANCELED)
        assert r["w"].stats()["posted"] == posted and not r["dst"].any()
        assert r["ep"].users == 0
    finally:
        r["w"].stop()
        r["t"].join(10)


def test_stopped_worker_ends_everything(dev):
    """Teardown: what is still posted when the worker stops ends once the QP is destroyed
    (Endpoint.teardown), what reaches the stopped worker ends at once (CLOSED); no batch is
    left waiting for its timeout, no endpoint reference leaks."""
    from mooncake._core import batch as _core
    from mooncake._core.batch import Batch, slice_requests

    n = 8 << 20
    r = _rig(dev, n, depth=256)
    ep, w = r["ep"], r["w"]
    b = Batch(1)
    K.submit(slice_requests(b, K.OP_READ, [r["dst"].ctypes.data], [r["src"].ctypes.data], [n],
                            65536, 4), r["lt"], 0, r["rt"], [0], [ep])
    w.stop()
    r["t"].join(10)
    assert w.stopped
    ep.teardown(_core.E_CLOSED)
    assert b.wait(5), "a slice was lost at teardown"
    st, nbytes, code = b.status(0)
    assert st == 4 or (st == 6 and code == _core.E_CLOSED), b.status(0)
    assert ep.users == 0 and ep.inflight == 0
    b2 = Batch(1)
    K.submit(slice_requests(b2, K.OP_WRITE, [r["src"].ctypes.data], [r["dst"].ctypes.data],
                            [4096], 65536, 4), r["lt"], 0, r["rt"], [0], [ep])
    assert b2.wait(1) and b2.status(0) == (6, 0, _core.E_CLOSED)
    assert ep.users == 0


def test_abort_reports_on_flush_and_requeues_live_work(dev):
    """abort(requeue=True): QPs go to ERR; a cancelled batch's slices end with its cancel code
    when their flushes are polled, a live batch's slices go to the hub for a new endpoint."""
    from mooncake._core import batch as _core
    from mooncake._core.batch import Batch, slice_requests

    n = 8 << 20
    r = _rig(dev, n, depth=256)
    ep, hub = r["ep"], r["hub"]
    try:
        dead, live = Batch(1), Batch(1)
        for b in (dead, live):
            K.submit(slice_requests(b, K.OP_READ, [r["dst"].ctypes.data],
                                    [r["src"].ctypes.data], [n], 65536, 4),
                     r["lt"], 0, r["rt"], [0], [ep])
        dead.cancel(_core.E_TIMEOUT)
        assert ep.abort(_core.E_TIMEOUT, True) == []
        assert dead.wait(30), "the cancelled batch did not end on its flushes"
        assert dead.status(0)[0] in (4, 5), dead.status(0)
        orphans = None
        for _ in range(100):
            orphans = hub.take(0.1)
            if orphans is not None or live.done:
                break
        if not live.done:
            assert orphans is not None and ep.id in orphans.groups()
            assert orphans.fail(ep.id, _core.E_PEER) > 0
        assert live.wait(30)
        assert ep.users == 0 and ep.inflight == 0
    finally:
        r["w"].stop()
        r["t"].join(10)


def test_dropped_endpoint_with_work_in_flight_is_reclaimed(dev):
    """An Endpoint object garbage-collected while slices are on it: its QPs go to ERR, the
    slices end on their flushes, and the struct and QPs are freed afterwards (no leak, no use
    after free)."""
    import gc

    from mooncake._core.batch import Batch, slice_requests

    n = 8 << 20
    r = _rig(dev, n, depth=256)
    try:
        ep = r.pop("ep")
        b = Batch(1)
        K.submit(slice_requests(b, K.OP_READ, [r["dst"].ctypes.data], [r["src"].ctypes.data],
                                [n], 65536, 4), r["lt"], 0, r["rt"], [0], [ep])
        del ep
        gc.collect()
        assert b.wait(30)
        for _ in range(100):
            if K.reap_graves() == 0:
                break
            threading.Event().wait(0.05)
        assert K.reap_graves() == 0
    finally:
        r["w"].stop()
        r["t"].join(10)
