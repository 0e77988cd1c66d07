"""The engine on the http, etcd and redis stores (loopback, real servers, no root needed)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import servers
from servers import running
from test_metadata_stores import raw_get, raw_put

from mooncake.engine import TransferEngine
from mooncake.errors import ConfigError, PeerUnreachable, SegmentNotFound


@pytest.fixture(scope="module", params=["http", "etcd", "redis"])
def server(request: pytest.FixtureRequest) -> Iterator[servers.Server]:
    with running(request.param) as s:
        yield s


def engine(address: str, **config: object) -> TransferEngine:
    return TransferEngine("127.0.0.1", metadata=address, protocol="tcp",
                          MC_METADATA_TTL=5, **config)


def test_engines_find_each_other_through_the_store(server: servers.Server) -> None:
    src = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
    dst = np.zeros(3 << 20, dtype=np.uint8)
    with engine(server.address) as a, engine(server.address) as b:
        a.register(src)
        b.register(dst)
        stored = json.loads(raw_get(server, f"mooncake/ram/{b.segment_name}"))
        assert stored["name"] == b.segment_name
        assert stored["buffers"][0]["addr"] == dst.ctypes.data
        a.write(b.segment_name, src, dst.ctypes.data)
        assert np.array_equal(src, dst)
        back = np.zeros_like(src)
        a.register(back)
        a.read(b.segment_name, back, dst.ctypes.data)
        assert np.array_equal(back, src)
        name = b.segment_name
    assert raw_get(server, f"mooncake/ram/{name}") is None  # removed on clean shutdown


def test_registration_changes_are_republished(server: servers.Server) -> None:
    with engine(server.address) as a:
        key = f"mooncake/ram/{a.segment_name}"
        assert json.loads(raw_get(server, key))["buffers"] == []
        bufs = [np.zeros(4096, np.uint8) for _ in range(3)]
        for b in bufs:
            a.register(b)
        assert len(json.loads(raw_get(server, key))["buffers"]) == 3
        a.unregister(bufs[1])
        addrs = [b["addr"] for b in json.loads(raw_get(server, key))["buffers"]]
        assert bufs[1].ctypes.data not in addrs and len(addrs) == 2


def test_cluster_ids_do_not_see_each_other(server: servers.Server) -> None:
    dst = np.zeros(4096, np.uint8)
    with engine(server.address, MC_METADATA_CLUSTER_ID="red") as a, \
            engine(server.address, MC_METADATA_CLUSTER_ID="blue") as b:
        b.register(dst)
        src = np.ones(4096, np.uint8)
        a.register(src)
        assert raw_get(server, f"mooncake/blue/ram/{b.segment_name}") is not None
        with pytest.raises(SegmentNotFound, match=b.segment_name):
            a.write(b.segment_name, src, dst.ctypes.data)
        assert not dst.any()


def test_malformed_descriptor_is_rejected_naming_the_segment(server: servers.Server) -> None:
    bogus = "10.9.9.9:4242"
    raw_put(server, f"mooncake/ram/{bogus}", json.dumps(
        {"name": bogus, "host_id": "x", "pid": 1, "timestamp": 0, "transports": {},
         "buffers": [{"addr": -5, "length": 10, "location": "cpu:0"}]}).encode())
    with engine(server.address) as a:
        src = np.ones(16, np.uint8)
        a.register(src)
        with pytest.raises(SegmentNotFound, match=f"{bogus}.*malformed"):
            a.write(bogus, src, 4096)


def test_metacache_serves_a_vanished_entry_unless_disabled(server: servers.Server) -> None:
    dst = np.zeros(4096, np.uint8)
    with engine(server.address) as b, engine(server.address) as cached, \
            engine(server.address, MC_DISABLE_METACACHE=True) as uncached:
        b.register(dst)
        src = np.full(4096, 7, np.uint8)
        cached.register(src)
        uncached.register(src)
        cached.write(b.segment_name, src, dst.ctypes.data)
        uncached.write(b.segment_name, src, dst.ctypes.data)
        # the entry disappears from the store (b stops heartbeating, an operator deletes it)
        b.metadata._published.clear()
        b.metadata.remove(b.segment_name)
        cached.write(b.segment_name, src, dst.ctypes.data)  # still known here
        with pytest.raises(SegmentNotFound, match=b.segment_name):
            uncached.write(b.segment_name, src, dst.ctypes.data)


@pytest.mark.parametrize("conn", ["zookeeper://127.0.0.1:2181", "nonsense"])
def test_unknown_scheme_is_an_error_not_an_abort(conn: str) -> None:
    with pytest.raises(ConfigError, match="metadata_server"):
        TransferEngine("127.0.0.1", metadata=conn, protocol="tcp")
    e = TransferEngine()
    assert e.initialize("127.0.0.1", conn, "tcp", "") != 0


@pytest.mark.parametrize("fmt", ["http://127.0.0.1:{p}/metadata", "etcd://127.0.0.1:{p}",
                                 "127.0.0.1:{p}", "redis://127.0.0.1:{p}"])
def test_store_unreachable_at_startup(fmt: str) -> None:
    port = servers.free_port()
    with pytest.raises(PeerUnreachable, match=rf"metadata store .*{port}.*unreachable"):
        TransferEngine("127.0.0.1", metadata=fmt.format(p=port), protocol="tcp")
    assert TransferEngine().initialize("127.0.0.1", fmt.format(p=port), "tcp", "") != 0


def test_initialize_ext_with_metadata_type(server: servers.Server) -> None:
    bare = f"{server.host}:{server.port}"
    e = TransferEngine()
    assert e.initialize_ext("127.0.0.1", bare, "tcp", "", server.kind) == 0
    try:
        assert raw_get(server, f"mooncake/ram/127.0.0.1:{e.get_rpc_port()}") is not None
    finally:
        e.close()
