"""How the rdma transport picks its rails, on real verbs (Soft-RoCE in the VM).

* ``MC_IB_TC`` is on every QP's address vector, as the provider reports it back
  (``ibv_query_qp``), and ``MC_IB_SL`` too on InfiniBand (RoCE carries no SL: rxe reports 0);
* the descriptor publishes each NIC's NUMA node and each buffer's (``numa<i>``, ``numa``), and
  ``explain`` names the NIC pairs a buffer goes through and the rule;
* with every rail to a peer paused, a synchronous transfer completes over tcp (a failover, counted
  in the metrics and said in the log), and once the rail cooled down transfers go back to rdma.
"""

from __future__ import annotations

import logging
import time
import zlib

import numpy as np
import pytest
from rdma_util import RXE_DEV, needs_rxe

from mooncake._core import verbs as V

pytestmark = needs_rxe
MiB = 1 << 20
NO_SAME_HOST = {"transports/shm/enable": False, "transports/cxl/enable": False}


def _engine(**cfg):
    from mooncake.engine import TransferEngine

    return TransferEngine("127.0.0.1", metadata="p2p", protocol="auto", device_name=RXE_DEV,
                          **NO_SAME_HOST, **cfg)


@pytest.fixture(scope="module")
def pair():
    target = _engine(MC_IB_SL=5, MC_IB_TC=32)
    init = _engine(MC_IB_SL=5, MC_IB_TC=32, MC_RDMA_RAIL_PAUSE_SECONDS=1)
    tbuf = np.zeros(4 * MiB, np.uint8)
    target.register(tbuf)
    lbuf = np.random.default_rng(9).integers(0, 256, 4 * MiB, dtype=np.uint8)
    init.register(lbuf)
    yield init, target, lbuf, tbuf
    init.close()
    target.close()


def _write(init, target, lbuf, tbuf, off: int) -> None:
    seg = target.segment_name
    n = MiB
    init.write(seg, lbuf.ctypes.data + off, tbuf.ctypes.data + off, n)
    assert zlib.crc32(tbuf[off:off + n]) == zlib.crc32(lbuf[off:off + n])


def test_service_level_and_traffic_class_are_on_every_qp(pair):
    init, target, lbuf, tbuf = pair
    _write(init, target, lbuf, tbuf, 0)
    for eng in (init, target):  # the active and the passive side of the handshake
        eps = [ep for d in eng.transports["rdma"].devs for ep in d.store.values()]
        assert eps
        ib = eng.transports["rdma"].devs[0].dev.query_port(1)["link_layer"] != \
            V.LINK_LAYER_ETHERNET
        for ep in eps:
            for qp in ep.qps:
                path = qp.path()
                assert path["traffic_class"] == 32, path
                assert path["is_global"] == 1  # RoCE: the GRH carries the traffic class
                if ib:  # RoCE has no SL in its headers (its priority rides the traffic class),
                    assert path["sl"] == 5, path  # and rxe reports 0 for it


def test_descriptor_publishes_numa_and_explain_names_the_rails(pair):
    init, target, lbuf, tbuf = pair
    desc = init._peer(target.segment_name).desc
    info = desc.transports["rdma"]
    assert "numa0" in info and -1 <= info["numa0"] <= 1023
    buf = next(b for b in desc.buffers if b.addr == tbuf.ctypes.data)
    assert "numa" in buf.transports["rdma"]
    why = init.explain(target.segment_name, lbuf.ctypes.data, tbuf.ctypes.data)
    assert why["chosen"] == "rdma"
    assert why["path"]["pairs"] == [f"{RXE_DEV}->{RXE_DEV}"]
    assert "NIC" in why["path"]["rule"] and why["path"]["paused"] == {}
    rails = init.metrics()["rails"]["rdma"]  # the NIC pair's work completions, from the kernel
    assert any(r["local"] == RXE_DEV and r["remote"] == RXE_DEV and r["completions"] > 0
               for r in rails), rails


def test_every_rail_paused_fails_over_to_tcp_and_back(pair, caplog):
    init, target, lbuf, tbuf = pair
    seg = target.segment_name
    rdma = init.transports["rdma"]
    inst = init._peer(seg).desc.transports["rdma"]["instance"]
    init.ROUTE_RECHECK_S = 0.2
    before = init.metrics()["transports"]
    rdma._pause_rail(RXE_DEV, seg, inst, RXE_DEV, "test: the rail is down")
    with caplog.at_level(logging.WARNING, logger="mooncake.engine"):
        _write(init, target, lbuf, tbuf, MiB)  # still whole: over tcp
    assert init.explain(seg)["chosen"] == "tcp"
    mid = init.metrics()
    assert mid["transports"]["tcp"]["write"]["bytes"] >= before["tcp"]["write"]["bytes"] + MiB
    assert any(f["from"] == "rdma" and f["to"] == "tcp" for f in mid["failovers"]), mid
    assert any("now via tcp instead of rdma" in r.getMessage() for r in caplog.records)
    time.sleep(1.3)  # the rail's pause (MC_RDMA_RAIL_PAUSE_SECONDS=1) and the route's recheck
    _write(init, target, lbuf, tbuf, 2 * MiB)
    assert init.explain(seg)["chosen"] == "rdma"
    after = init.metrics()["transports"]
    assert after["rdma"]["write"]["bytes"] >= mid["transports"]["rdma"]["write"]["bytes"] + MiB


def test_lanes_put_every_worker_on_one_nic_pair():
    """num_lanes=2: the NIC pair gets two endpoints of one QP each, lane i on worker i, and a
    striped transfer (MC_PATH_ROUNDROBIN) completes work on both."""
    target = _engine(**{"transports/rdma/num_lanes": 2})
    init = _engine(MC_PATH_ROUNDROBIN=True, **{"transports/rdma/num_lanes": 2})
    try:
        tbuf = np.zeros(8 * MiB, np.uint8)
        target.register(tbuf)
        lbuf = np.random.default_rng(4).integers(0, 256, 8 * MiB, dtype=np.uint8)
        init.register(lbuf)
        seg = target.segment_name
        init.write(seg, lbuf.ctypes.data, tbuf.ctypes.data, 8 * MiB)
        assert zlib.crc32(tbuf) == zlib.crc32(lbuf)
        back = np.zeros_like(lbuf)
        init.register(back)
        init.read(seg, back.ctypes.data, tbuf.ctypes.data, 8 * MiB)
        assert zlib.crc32(back) == zlib.crc32(lbuf)
        rdma = init.transports["rdma"]
        eps = [ep for _, key, ep in rdma.endpoints() if key[0] == seg]
        assert len(eps) == 2 and all(len(ep.qps) == 1 for ep in eps)
        assert {id(ep.worker) for ep in eps} == {id(w) for w in rdma.devs[0].workers}
        assert all(ep.completions > 0 for ep in eps), [ep.completions for ep in eps]
        served = [ep for _, key, ep in target.transports["rdma"].endpoints()
                  if key[0] == init.segment_name]
        assert len(served) == 2 and len({id(ep.worker) for ep in served}) == 2
    finally:
        init.close()
        target.close()
