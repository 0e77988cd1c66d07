"""RDMA pieces that need no verbs device: endpoint-store eviction, GID choice, probing."""

from __future__ import annotations

import pytest

from mooncake.errors import ConfigError
from mooncake.transports.rdma_endpoints import EndpointStore


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
    from mooncake.transports.rdma import select_gid

    link_local = bytes.fromhex("fe800000000000000000000000000001")
    v4 = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    rows = [(0, link_local, V.GID_TYPE_ROCE_V1), (1, link_local, V.GID_TYPE_ROCE_V2),
            (2, v4, V.GID_TYPE_ROCE_V1), (3, v4, V.GID_TYPE_ROCE_V2)]
    assert select_gid(rows, False) == 3
    assert select_gid(rows[:3], False) == 1
    assert select_gid([(0, bytes(16), V.GID_TYPE_IB), (1, link_local, V.GID_TYPE_IB)], True) == 1
    assert select_gid([], False) is None


def test_probe_explains_why_rdma_cannot_run():
    from mooncake.transports.rdma import RdmaTransport, V

    why = RdmaTransport.probe()
    if V is None:
        assert why and "verbs kernels are not built" in why
    elif V.library_error():  # no libibverbs.so.1 here (tests/test_ibv_loader.py covers it)
        assert why == f"unavailable: {V.library_error()}"
    elif not V.device_names():
        assert why and "no RDMA device" in why
    else:
        assert why is None


def test_engine_with_rdma_protocol_fails_loudly_without_device():
    from mooncake.transports.rdma import V

    if V is not None and not V.library_error() and V.device_names():
        pytest.skip("this machine has an RDMA device")
    from mooncake.engine import TransferEngine
    from mooncake.errors import TransportUnavailable

    with pytest.raises(TransportUnavailable, match="rdma"):
        TransferEngine("127.0.0.1", metadata="p2p", protocol="rdma")


# ------------------------------------------------- kernel hygiene that needs no device


def test_typed_kernel_arguments_refuse_none():
    K = pytest.importorskip("mooncake._core.verbs_kernel")
    V = pytest.importorskip("mooncake._core.verbs")
    from mooncake._core.batch import Batch, slice_requests

    hub = K.Hub()
    t = K.KeyTable([], 1)
    sl = slice_requests(Batch(1), 0, [4096], [8192], [10], 65536, 4)
    calls = [
        lambda: K.CQSlot(None), lambda: K.Worker(None, hub), lambda: K.Worker([None], hub),
        lambda: K.Endpoint(1, None, None, None), lambda: K.submit(None, t, 0, t, [0], []),
        lambda: K.submit(sl, None, 0, t, [0], []), lambda: K.submit(sl, t, 0, None, [0], []),
        lambda: K.submit(sl, t, 0, t, None, []), lambda: K.submit(sl, t, 0, t, [0], None),
        lambda: K.submit(sl, t, 0, t, [0], [object()]),
        lambda: K.post_poll_loop(None, None, 0, 0, 0, 0, 0, 0, 0),
        lambda: V.Device(None), lambda: V.MR(None, 0, 0, 0), lambda: V.CompChannel(None),
        lambda: V.CQ(None, 1), lambda: V.QP(None, None, 1),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(TypeError):
            call()
            pytest.fail(f"call {i} accepted None")


def test_hub_take_clamps_any_timeout():
    import math
    import time

    K = pytest.importorskip("mooncake._core.verbs_kernel")
    h = K.Hub()
    for tmo in (math.nan, -1.0, -math.inf, 0.0, 0.01):
        t0 = time.monotonic()
        assert h.take(tmo) is None
        assert time.monotonic() - t0 < 2.0
    h.close()
    for tmo in (math.inf, 1e300):  # closed: returns at once, the huge deadline never overflows
        assert h.take(tmo) is None


def test_key_table_refuses_bad_rows_and_tracks_writability():
    K = pytest.importorskip("mooncake._core.verbs_kernel")
    for rows in ([(10, 0, [1])], [(2**64 - 5, 10, [1])], [(0, 10, [1]), (5, 10, [2])],
                 [(0, 10, [1, 2])]):
        with pytest.raises(ValueError):
            K.KeyTable(rows, 1)
    with pytest.raises(OverflowError):
        K.KeyTable([(-1, 10, [1])], 1)
    t = K.KeyTable([(100, 10, [7], False), (0, 10, [5])], 1)
    assert t.lookup(0, 10) == 5 and t.lookup(100, 10) == 7 and t.lookup(5, 10) is None
    assert t.writable_at(0, 1) is True and t.writable_at(100, 1) is False
    assert t.lookup(2**64 - 1, 2) is None  # wraps: no row


def test_published_fields_are_declared_and_strict():
    pytest.importorskip("mooncake._core.verbs")
    from mooncake.fields import FieldError, check_fields
    from mooncake.transports.rdma import BUFFER_FIELDS, SEGMENT_FIELDS, RdmaTransport, peer_devices

    assert RdmaTransport.segment_fields is SEGMENT_FIELDS
    assert RdmaTransport.buffer_fields is BUFFER_FIELDS
    good = {"instance": "ab" * 16, "ndevs": 2, "dev0": "mlx5_0", "gid0": "0" * 32, "lid0": 3,
            "dev1": "mlx5_1", "gid1": "f" * 32, "lid1": 0}
    check_fields(good, SEGMENT_FIELDS, "seg")
    assert peer_devices(good) == ["mlx5_0", "mlx5_1"]
    assert peer_devices({**good, "ndevs": 3}) is None  # dev2 missing
    for k, v in (("instance", "x"), ("ndevs", 0), ("ndevs", 17), ("dev0", "../etc"),
                 ("gid0", "0" * 31), ("gid0", 5), ("lid0", 1 << 16), ("lid0", True),
                 ("dev1", "a" * 65)):
        with pytest.raises(FieldError):
            check_fields({**good, k: v}, SEGMENT_FIELDS, "seg")
    check_fields({"rkey0": 0, "rkey1": 2**32 - 1}, BUFFER_FIELDS, "buf")
    for bad in ({"rkey0": -1}, {"rkey0": 2**32}, {"rkey0": "1"}, {}, {"rkey0": 1, "rkey3": 1.5}):
        with pytest.raises(FieldError):
            check_fields(bad, BUFFER_FIELDS, "buf")


def test_handshake_is_validated():
    pytest.importorskip("mooncake._core.verbs")
    from mooncake.fields import FieldError
    from mooncake.transports.rdma import _CONNECT_FIELDS, _HANDSHAKE_FIELDS, _check_handshake

    ok = {"instance": "0" * 32, "gid": "1" * 32, "lid": 0, "mtu": 4096, "qpns": [17, 18],
          "psns": [0, 2**24 - 1]}
    _check_handshake(ok, _HANDSHAKE_FIELDS, 2, "reply")
    for k, v in (("mtu", 1000), ("qpns", [1]), ("qpns", [1, 2**24]), ("psns", "ab"),
                 ("qpns", [1] * 300), ("gid", "zz" * 16), ("lid", -1), ("qpns", [1, True])):
        with pytest.raises(FieldError):
            _check_handshake({**ok, k: v}, _HANDSHAKE_FIELDS, None if k == "qpns" else 2, "r")
    with pytest.raises(FieldError):
        _check_handshake(ok, _HANDSHAKE_FIELDS, 3, "reply")  # QP count mismatch
    with pytest.raises(FieldError):  # a request also names the devices
        _check_handshake(ok, _CONNECT_FIELDS, None, "request")
    _check_handshake({**ok, "segment": "h:1", "src_dev": "rxe0", "dst_dev": "rxe0"},
                     _CONNECT_FIELDS, None, "request")
