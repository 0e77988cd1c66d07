"""RDMA pieces that need no verbs device: endpoint-store eviction, GID choice, probing."""

from __future__ import annotations

import pytest

from mooncake.errors import ConfigError
from transports.rdma_endpoints import EndpointStore


def test_fifo_evicts_oldest_regardless_of_hits():
    s = EndpointStore(2, "FIFO")
    assert s.insert("a", 1) == [] and s.insert("b", 2) == []
    s.get("a")
    assert s.insert("c", 3) == [1]
    assert s.keys() == ["b", "c"] and s.evictions == 1


def test_sieve_spares_visited_entries():
    s = EndpointStore(3, "SIEVE")
    for k in "abc":
        s.insert(k, k.upper())
    s.get("a")
    assert s.insert("d", "D") == ["B"]  # the hand passes visited a (clearing it)
    assert s.insert("e", "E") == ["C"]  # and goes on from where it stopped
    s.get("d")
    assert s.insert("f", "F") == ["E"]  # d was visited since: spared
    assert s.keys() == ["a", "d", "f"] and s.evictions == 3


def test_store_replace_and_conditional_remove():
    s = EndpointStore(2)
    s.insert("a", 1)
    assert s.insert("a", 2) == [1] and s.get("a") == 2 and len(s) == 1
    assert s.remove("a", 1) is None and s.remove("a", 2) == 2 and len(s) == 0


@pytest.mark.parametrize("kw, what", [({"policy": "LRU"}, "MC_ENDPOINT_STORE_TYPE='LRU'"),
                                      ({"capacity": 0}, "MC_MAX_EP_PER_CTX=0")])
def test_store_rejects_bad_config(kw, what):
    args = {"capacity": 2, "policy": "SIEVE", **kw}
    with pytest.raises(ConfigError, match=what):
        EndpointStore(args["capacity"], args["policy"])


def test_gid_selection_prefers_roce_v2_ipv4():
    V = pytest.importorskip("mooncake._core.verbs")
    from transports.rdma import select_gid

    link_local = bytes.fromhex("fe800000000000000000000000000001")
    v4 = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    rows = [(0, link_local, V.GID_TYPE_ROCE_V1), (1, link_local, V.GID_TYPE_ROCE_V2),
            (2, v4, V.GID_TYPE_ROCE_V1), (3, v4, V.GID_TYPE_ROCE_V2)]
    assert select_gid(rows, False) == 3
    assert select_gid(rows[:3], False) == 1
    assert select_gid([(0, bytes(16), V.GID_TYPE_IB), (1, link_local, V.GID_TYPE_IB)], True) == 1
    assert select_gid([], False) is None


def test_probe_explains_why_rdma_cannot_run():
    from transports.rdma import RdmaTransport, V

    why = RdmaTransport.probe()
    if V is None:
        assert why == "unavailable: built without libibverbs"
    elif not V.device_names():
        assert why and "no RDMA device" in why
    else:
        assert why is None


def test_engine_with_rdma_protocol_fails_loudly_without_device():
    from transports.rdma import V

    if V is not None and V.device_names():
        pytest.skip("this machine has an RDMA device")
    from mooncake.engine import TransferEngine
    from mooncake.errors import TransportUnavailable

    with pytest.raises(TransportUnavailable, match="rdma"):
        TransferEngine("127.0.0.1", metadata="p2p", protocol="rdma")
