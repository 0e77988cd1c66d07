"""What only one backend has: redis logins and databases, etcd leases and endpoint fail-over."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request

import pytest
import servers
from servers import descriptor, make_store, running

from mooncake.errors import ConfigError


def test_redis_password_and_db_index_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with running("redis", password="s3cret") as srv:
        with pytest.raises(ConfigError, match=r"refused.*MC_REDIS_PASSWORD"):
            make_store("redis", srv.address)
        with pytest.raises(ConfigError, match="refused"):
            make_store("redis", srv.address, MC_REDIS_PASSWORD="wrong")
        monkeypatch.setenv("MC_REDIS_PASSWORD", "s3cret")
        monkeypatch.setenv("MC_REDIS_DB_INDEX", "7")
        s = make_store("redis", srv.address, MC_METADATA_TTL=30)
        try:
            s.publish("h:1", descriptor("h:1"))
            redis = pytest.importorskip("redis")
            r7 = redis.Redis(host=srv.host, port=srv.port, password="s3cret", db=7)
            assert json.loads(r7.get("mooncake/ram/h:1"))["name"] == "h:1"
            assert 0 < r7.pttl("mooncake/ram/h:1") <= 30_000  # leased
            r0 = redis.Redis(host=srv.host, port=srv.port, password="s3cret", db=0)
            assert r0.get("mooncake/ram/h:1") is None
            assert s.list_keys("mooncake/ram/") == ["mooncake/ram/h:1"]
            s.remove("h:1")
            assert r7.get("mooncake/ram/h:1") is None
        finally:
            s.close()


def test_redis_acl_user_in_url_and_env() -> None:
    with running("redis", user=("alice", "pw1")) as srv:
        url = f"redis://alice:pw1@{srv.host}:{srv.port}/2"
        s = make_store("redis", url)
        t = make_store("redis", srv.address, MC_REDIS_USERNAME="alice",
                       MC_REDIS_PASSWORD="pw1", MC_REDIS_DB_INDEX=2)
        try:
            s.publish("h:2", descriptor("h:2"))
            assert t.fetch("h:2")["name"] == "h:2"
        finally:
            s.close()
            t.close()
        with pytest.raises(ConfigError, match="refused"):
            make_store("redis", srv.address, MC_REDIS_USERNAME="alice",
                       MC_REDIS_PASSWORD="nope")


@pytest.mark.parametrize("db", [256, -1, "x"])
def test_redis_db_index_range(db: object) -> None:
    with pytest.raises(ConfigError, match=r"0\.\.255"):
        make_store("redis", "redis://127.0.0.1:1", MC_REDIS_DB_INDEX=db)


def test_bad_addresses_are_config_errors() -> None:
    for kind, addr in (("redis", "redis://h:notaport"), ("http", "ftp://h/metadata"),
                       ("http", "http://h:99999/metadata"), ("etcd", "h:"), ("etcd", ",")):
        with pytest.raises(ConfigError):
            make_store(kind, addr)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=servers.REPO)


_BLOCKED = """
import sys
sys.modules["redis"] = None  # as if redis-py were not installed
from mooncake.errors import ConfigError
from mooncake.metadata.base import MetadataContext
from mooncake.metadata.redis import RedisMetadata
from mooncake.registry import get_metadata
assert get_metadata("redis") is RedisMetadata  # the plugin itself still loads
try:
    RedisMetadata({address!r}, MetadataContext(config={{}}, rpc_call=None))
except ConfigError as e:
    print("ConfigError:", e)
"""


def test_redis_store_without_redis_py_is_a_config_error_naming_the_extra() -> None:
    with running("redis") as srv:  # a live server: only the missing library can fail it
        out = _python(_BLOCKED.format(address=srv.address))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ConfigError:"), out.stdout
    assert "pip install 'mooncake[redis]'" in out.stdout and "redis-py" in out.stdout


def test_redis_py_is_imported_only_when_a_store_is_made() -> None:
    with running("redis") as srv:
        out = _python(
            "import sys\nimport mooncake.metadata.redis, mooncake.registry\n"
            "mooncake.registry.get_metadata('redis')\n"
            "print('before', 'redis' in sys.modules)\n"
            "from mooncake.metadata.base import MetadataContext\n"
            f"s = mooncake.metadata.redis.RedisMetadata({srv.address!r}, "
            "MetadataContext(config={}, rpc_call=None))\n"
            "print('after', 'redis' in sys.modules)\ns.close()\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["before", "False", "after", "True"]


def _etcd(srv: servers.Server, path: str, body: dict) -> dict:
    return json.loads(urllib.request.urlopen(f"http://{srv.host}:{srv.port}{path}",
                                             json.dumps(body).encode(), timeout=10).read())


def test_etcd_keys_hang_on_one_lease_revoked_at_close() -> None:
    with running("etcd") as srv:
        s = make_store("etcd", srv.address, MC_METADATA_TTL=30)
        try:
            s.publish("a:1", descriptor("a:1"))
            s.publish("b:2", descriptor("b:2"))
            leases = set()
            for k in ("mooncake/ram/a:1", "mooncake/ram/b:2"):
                kvs = _etcd(srv, "/v3/kv/range", {"key": base64.b64encode(k.encode()).decode()})
                leases.add(kvs["kvs"][0]["lease"])
            assert len(leases) == 1 and leases != {"0"}
            lease = leases.pop()
            ttl = _etcd(srv, "/v3/lease/timetolive", {"ID": lease})
            assert 0 < int(ttl["TTL"]) <= 30
            assert s.list_keys("mooncake/ram/") == ["mooncake/ram/a:1", "mooncake/ram/b:2"]
            s.remove("a:1")
            s.remove("b:2")
        finally:
            s.close()
        ttl = _etcd(srv, "/v3/lease/timetolive", {"ID": lease})
        assert int(ttl.get("TTL", -1)) == -1  # revoked


def test_etcd_fails_over_to_a_live_endpoint() -> None:
    dead = servers.free_port()
    with running("etcd") as srv:
        s = make_store("etcd", f"127.0.0.1:{dead},{srv.host}:{srv.port}")
        try:
            s.publish("f:1", descriptor("f:1"))
            assert s.fetch("f:1")["name"] == "f:1"
            s.remove("f:1")
        finally:
            s.close()


def test_etcd_lease_lost_while_partitioned_is_regranted() -> None:
    """The lease expires while we cannot reach etcd (same data dir): new lease, keys back."""
    with running("etcd") as srv:
        s = make_store("etcd", srv.address, MC_METADATA_TTL=1.0)
        try:
            s.publish("p:1", descriptor("p:1"))
            old = s._lease
            _etcd(srv, "/v3/lease/revoke", {"ID": str(old)})  # as if it had expired
            key = base64.b64encode(b"mooncake/ram/p:1").decode()
            assert "kvs" not in _etcd(srv, "/v3/kv/range", {"key": key})
            assert s.heartbeat()
            assert s._lease != old
            assert s.fetch("p:1")["name"] == "p:1"
            s.remove("p:1")
        finally:
            s.close()
