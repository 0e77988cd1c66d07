"""The http, etcd and redis metadata plugins against real servers: one contract, three stores."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import servers
from servers import descriptor, make_store, running

from mooncake.errors import ConfigError, PeerUnreachable, SegmentNotFound
from mooncake.metadata.base import DescriptorError, LeasedStore

KINDS = ["http", "etcd", "redis"]


def raw_put(server: servers.Server, key: str, value: bytes) -> None:
    """Write a key with a client other than ours (curl-like HTTP, etcd gateway, redis-py)."""
    if server.kind == "http":
        req = urllib.request.Request(f"http://{server.host}:{server.port}/metadata?key={key}",
                                     data=value, method="PUT")
        urllib.request.urlopen(req, timeout=10).read()
    elif server.kind == "etcd":
        body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                           "value": base64.b64encode(value).decode()}).encode()
        urllib.request.urlopen(f"http://{server.host}:{server.port}/v3/kv/put", body,
                               timeout=10).read()
    else:
        redis = pytest.importorskip("redis")
        redis.Redis(host=server.host, port=server.port).set(key, value)


def raw_get(server: servers.Server, key: str) -> bytes | None:
    if server.kind == "http":
        try:
            return urllib.request.urlopen(
                f"http://{server.host}:{server.port}/metadata?key={key}", timeout=10).read()
        except urllib.error.HTTPError as e:
            assert e.code == 404
            return None
    if server.kind == "etcd":
        body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
        out = json.loads(urllib.request.urlopen(
            f"http://{server.host}:{server.port}/v3/kv/range", body, timeout=10).read())
        kvs = out.get("kvs") or []
        return base64.b64decode(kvs[0]["value"]) if kvs else None
    redis = pytest.importorskip("redis")
    return redis.Redis(host=server.host, port=server.port).get(key)


def wait_until(pred, timeout: float = 30.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout}s")


@pytest.fixture(scope="module", params=KINDS)
def server(request: pytest.FixtureRequest) -> Iterator[servers.Server]:
    with running(request.param) as s:
        yield s


@pytest.fixture(params=KINDS)
def fresh_server(request: pytest.FixtureRequest) -> Iterator[servers.Server]:
    """A server of each kind that the test may kill or restart."""
    with running(request.param) as s:
        yield s


@pytest.fixture
def seg() -> str:
    return f"10.0.0.{uuid.uuid4().int % 250}:{uuid.uuid4().int % 60000 + 1024}"


def test_publish_fetch_remove(server: servers.Server, seg: str) -> None:
    a = make_store(server.kind, server.address, MC_METADATA_TTL=5)
    b = make_store(server.kind, server.address, MC_METADATA_TTL=5)
    try:
        desc = descriptor(seg, n=3)
        a.publish(seg, desc)
        assert b.fetch(seg) == desc
        desc["buffers"].append({"addr": 0x900000, "length": 8, "location": "cpu:1"})
        a.publish(seg, desc)  # registrations changed: replaced, not added
        assert b.fetch(seg) == desc
        assert json.loads(raw_get(server, f"mooncake/ram/{seg}")) == desc
        a.remove(seg)
        with pytest.raises(SegmentNotFound, match=seg):
            b.fetch(seg)
    finally:
        a.close()
        b.close()


def test_missing_segment_names_it(server: servers.Server) -> None:
    s = make_store(server.kind, server.address)
    try:
        with pytest.raises(SegmentNotFound, match=r"'nobody:1'.*key 'mooncake/ram/nobody:1'"):
            s.fetch("nobody:1")
    finally:
        s.close()


def test_cluster_id_namespaces_keys(server: servers.Server, seg: str) -> None:
    a = make_store(server.kind, server.address, MC_METADATA_CLUSTER_ID="blue")
    b = make_store(server.kind, server.address, MC_METADATA_CLUSTER_ID="green")
    c = make_store(server.kind, server.address)
    try:
        a.publish(seg, descriptor(seg))
        assert raw_get(server, f"mooncake/blue/ram/{seg}") is not None
        assert raw_get(server, f"mooncake/ram/{seg}") is None
        assert a.fetch(seg)["name"] == seg
        for other in (b, c):
            with pytest.raises(SegmentNotFound):
                other.fetch(seg)
        a.remove(seg)
    finally:
        for s in (a, b, c):
            s.close()


@pytest.mark.parametrize("value, match", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"name": "x"}', "describes segment 'x'|missing field"),
    (None, "missing field 'buffers'"),
    (None, r"buffers\[0\].addr .* not an address"),
])
def test_malformed_descriptor_rejected_naming_segment(server: servers.Server, seg: str,
                                                      value: bytes | None, match: str) -> None:
    if value is None:
        d = descriptor(seg)
        if "buffers'" in match:
            del d["buffers"]
        else:
            d["buffers"][0]["addr"] = 1 << 64
        value = json.dumps(d).encode()
    raw_put(server, f"mooncake/ram/{seg}", value)
    s = make_store(server.kind, server.address)
    try:
        with pytest.raises(DescriptorError, match=match) as ei:
            s.fetch(seg)
        assert seg in str(ei.value)
        assert isinstance(ei.value, SegmentNotFound)
    finally:
        s.close()


def test_foreign_client_reads_our_descriptor(server: servers.Server, seg: str) -> None:
    """Mooncake-compatible layout: the value at the documented key is the JSON descriptor."""
    s = make_store(server.kind, server.address)
    try:
        s.publish(seg, descriptor(seg))
        assert json.loads(raw_get(server, f"mooncake/ram/{seg}"))["name"] == seg
        s.remove(seg)
        assert raw_get(server, f"mooncake/ram/{seg}") is None
    finally:
        s.close()


def test_concurrent_fetches(server: servers.Server, seg: str) -> None:
    s = make_store(server.kind, server.address)
    errors: list[BaseException] = []
    try:
        s.publish(seg, descriptor(seg, n=50))

        def worker() -> None:
            try:
                for _ in range(30):
                    assert len(s.fetch(seg)["buffers"]) == 50
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        s.remove(seg)
    finally:
        s.close()


def test_heartbeat_keeps_key_past_its_ttl(server: servers.Server, seg: str) -> None:
    s = make_store(server.kind, server.address, MC_METADATA_TTL=1.0)
    try:
        s.publish(seg, descriptor(seg))
        time.sleep(3.5)  # several TTLs: only the heartbeat can keep it
        assert s.fetch(seg)["name"] == seg
        s.remove(seg)
    finally:
        s.close()
    assert raw_get(server, f"mooncake/ram/{seg}") is None


def test_crashed_publisher_expires(server: servers.Server, seg: str) -> None:
    """A process that dies without removing its descriptor: the lease/TTL removes it."""
    p = subprocess.Popen([sys.executable, servers.__file__, "publish", server.kind,
                          server.address, seg, "1.0"], stdout=subprocess.PIPE,
                         cwd=servers.REPO)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == b"published"
        key = f"mooncake/ram/{seg}"
        assert raw_get(server, key) is not None
        time.sleep(2.5)  # alive: the heartbeat keeps it past its TTL
        assert raw_get(server, key) is not None
        p.kill()
        p.wait(10)
        wait_until(lambda: raw_get(server, key) is None, what="descriptor expiry")
    finally:
        p.kill()
        p.wait(10)


def test_no_ttl_means_no_expiry_and_no_heartbeat(server: servers.Server, seg: str) -> None:
    s = make_store(server.kind, server.address, MC_METADATA_TTL=0)
    try:
        s.publish(seg, descriptor(seg))
        assert s._thread is None  # nothing to keep alive
        s.remove(seg)
    finally:
        s.close()


def test_server_restart_republishes(fresh_server: servers.Server, seg: str) -> None:
    srv = fresh_server
    s = make_store(srv.kind, srv.address, MC_METADATA_TTL=1.0)
    reader = make_store(srv.kind, srv.address, MC_METADATA_TTL=1.0)
    try:
        desc = descriptor(seg)
        s.publish(seg, desc)
        raw_put(srv, "sentinel", b"1")
        srv.restart(wipe=True)  # comes back empty
        assert raw_get(srv, "sentinel") is None
        wait_until(lambda: raw_get(srv, f"mooncake/ram/{seg}") is not None,
                   what="re-publish after restart")
        assert reader.fetch(seg) == desc
        # the republished key is leased again: a crash now still expires it
        s._stop.set()
        wait_until(lambda: raw_get(srv, f"mooncake/ram/{seg}") is None, what="expiry")
    finally:
        s.close()
        reader.close()


def test_publish_during_outage_is_deferred(fresh_server: servers.Server, seg: str) -> None:
    srv = fresh_server
    s = make_store(srv.kind, srv.address, MC_METADATA_TTL=1.0)
    try:
        s.publish(seg, descriptor(seg, n=1))
        srv.kill()
        with pytest.raises(PeerUnreachable, match="unreachable"):
            s.fetch(seg)
        s.publish(seg, descriptor(seg, n=4))  # warns, keeps it for the heartbeat
        srv.restart(wipe=True)
        wait_until(lambda: (raw_get(srv, f"mooncake/ram/{seg}") or b"").count(b"addr") == 4,
                   what="deferred publish")
    finally:
        s.close()


@pytest.mark.parametrize("kind, address", [
    ("http", "http://127.0.0.1:{port}/metadata"),
    ("etcd", "127.0.0.1:{port}"),
    ("redis", "redis://127.0.0.1:{port}"),
])
def test_unreachable_at_startup(kind: str, address: str) -> None:
    port = servers.free_port()
    addr = address.format(port=port)
    with pytest.raises(PeerUnreachable, match=rf"metadata store .*{port}.* unreachable"):
        make_store(kind, addr)


def test_close_stops_heartbeat_thread(server: servers.Server, seg: str) -> None:
    s = make_store(server.kind, server.address, MC_METADATA_TTL=1.0)
    s.publish(seg, descriptor(seg))
    t = s._thread
    assert t is not None and t.is_alive() and t.daemon
    s.remove(seg)
    s.close()
    assert not t.is_alive()


def test_bad_ttl_is_config_error(server: servers.Server) -> None:
    for bad in (-1, "soon"):
        with pytest.raises(ConfigError, match="MC_METADATA_TTL"):
            make_store(server.kind, server.address, MC_METADATA_TTL=bad)


def test_leased_store_is_the_base() -> None:
    from mooncake.metadata.etcd import EtcdMetadata
    from mooncake.metadata.http import HttpMetadata
    from mooncake.metadata.redis import RedisMetadata

    for cls in (EtcdMetadata, HttpMetadata, RedisMetadata):
        assert issubclass(cls, LeasedStore)
        assert cls.name in ("etcd", "http", "redis")
