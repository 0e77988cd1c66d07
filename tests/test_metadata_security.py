"""Who may touch the metadata stores (issue "Who may touch registered memory", item 3).

Real servers only: our HTTP metadata server (in-process, and as the CLI child process), etcd
with authentication (and TLS with client certificates), redis with ACL users (and TLS), the
certificates made by a throw-away CA generated here.  Proved:

* owners: a forged PUT, POST or DELETE of an engine's key is refused (403, counted) while that
  engine's heartbeat keeps its key, and a peer's WRITE still lands in the real engine's memory;
  a key is released when its lease ends or its owner deletes it; a refused heartbeat does not
  kill the heartbeat thread; ``--require-owner``/``--allow-anonymous``; no flags = as before;
* token: a missing or wrong bearer token gets 401 on every path, never echoed nor logged; the
  store and the engine raise :class:`MetadataAuthError` naming ``MC_METADATA_TOKEN``; the CLI
  takes ``--token-file`` and ``MC_METADATA_TOKEN``;
* quotas: body, bytes stored and keys refused (413/507) and counted; 30 large PUTs cannot grow
  the server past ``--max-bytes``;
* connections: the cap refuses (and counts) the excess at once; dripping requests end at the
  frame timeout (408, counted), idle connections at the idle timeout; 1,100 slowloris
  connections do not starve a real client and cost the server no thread;
* etcd (auth on, a user limited to ``mooncake/``, 1 s tokens) and redis (ACL user): engines
  publish and resolve each other with the right credentials, and fail with a typed error naming
  the option with wrong or missing ones; expired etcd tokens are renewed; TLS with CA and client
  certificates works for both, and each missing piece is a typed error naming its option.
"""

from __future__ import annotations

import http.client
import json
import logging
import resource
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import servers
from servers import descriptor, make_store, running

from mooncake.engine import TransferEngine
from mooncake.errors import AuthError, ConfigError
from mooncake.metadata.base import MetadataAuthError
from mooncake.metadata.http_server import OWNER_HEADER, TTL_HEADER, MetadataServer

TOKEN = "t0k3n-" + secrets.token_hex(12)


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read(), r
    finally:
        c.close()


def status(port: int, method: str, path: str, body: bytes | None = None,
           headers: dict[str, str] | None = None) -> int:
    return call(port, method, path, body, headers)[0]


def make_engine(address: str, **config: object) -> TransferEngine:
    config.setdefault("MC_METADATA_TTL", 5)
    return TransferEngine("127.0.0.1", metadata=address, protocol="tcp", **config)


@pytest.fixture
def srv() -> Iterator[MetadataServer]:
    with MetadataServer("127.0.0.1", 0) as s:  # no flags: the default mode
        yield s


def wait_until(pred, timeout: float = 10.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


# ---- owners ----------------------------------------------------------------------------------


def test_forged_put_and_delete_refused_while_owner_heartbeat_keeps_working(
        srv: MetadataServer) -> None:
    dst = np.zeros(1 << 16, np.uint8)
    src = np.random.default_rng(7).integers(0, 256, 1 << 16, dtype=np.uint8)
    with make_engine(srv.url, MC_METADATA_TTL=1.0) as b, \
            make_engine(srv.url, MC_METADATA_TTL=1.0, MC_DISABLE_METACACHE=True) as a:
        b.register(dst)
        a.register(src)
        key = f"mooncake/ram/{b.segment_name}"
        genuine = srv.table.get(key)
        forged = descriptor(b.segment_name)  # points elsewhere: an attacker's buffers
        forged["transports"] = {"tcp": {"port": servers.free_port()}}
        body = json.dumps(forged).encode()
        q = f"/metadata?key={key}"
        # anonymous (a plain client) and with an owner secret of its own: both refused
        for hdrs in ({}, {OWNER_HEADER: "attacker-" + secrets.token_hex(8)}):
            st, text, _ = call(srv.port, "PUT", q, body, hdrs)
            assert st == 403 and b"another owner" in text
            assert status(srv.port, "POST", q, b"", {**hdrs, TTL_HEADER: "3600"}) == 403
            assert status(srv.port, "DELETE", q, None, hdrs) == 403
        assert srv.stats["refused_owner"] == 6
        # the owner's heartbeat keeps the genuine descriptor alive past several leases
        time.sleep(2.5)
        assert srv.table.get(key) is not None
        assert json.loads(srv.table.get(key))["buffers"] == json.loads(genuine)["buffers"]
        # a mooncake client with another owner secret gets the typed error naming the fix
        other = make_store("http", srv.url, MC_METADATA_TTL=1.0)
        try:
            with pytest.raises(MetadataAuthError, match=rf"{key}.*MC_METADATA_OWNER_SECRET"):
                other.publish(b.segment_name, forged)
        finally:
            other._published.clear()
            other.close()
        # and a peer's WRITE lands in the genuine engine's memory
        a.write(b.segment_name, src, dst.ctypes.data)
        assert np.array_equal(dst, src)
        name = b.segment_name
    # b removed its own key on close: the name is free again
    assert srv.table.get(f"mooncake/ram/{name}") is None
    assert status(srv.port, "PUT", f"/metadata?key=mooncake/ram/{name}", b"{}") == 200


def test_lease_end_releases_the_key_and_a_refused_heartbeat_keeps_running(
        srv: MetadataServer, caplog: pytest.LogCaptureFixture) -> None:
    owner = make_store("http", srv.url, MC_METADATA_TTL=0.6)
    key = owner.key("e:1")
    try:
        owner.publish("e:1", descriptor("e:1"))
        assert srv.table.owned(key)
        t = owner._thread
        owner._stop.set()  # the engine froze: no heartbeat
        t.join(5)
        wait_until(lambda: srv.table.get(key) is None, what="lease end")
        # someone else takes the name; the owner's heartbeat is refused, typed, and survives
        assert status(srv.port, "PUT", f"/metadata?key={key}", b"{}",
                      {OWNER_HEADER: "newcomer-secret-123", TTL_HEADER: "30"}) == 200
        owner._stop.clear()
        with caplog.at_level(logging.ERROR, "mooncake.metadata.base"):
            assert owner.heartbeat() is False
        assert "refused our heartbeat" in caplog.text and key in caplog.text
        owner._thread = None
        owner._start_heartbeat()
        time.sleep(0.5)
        assert owner._thread.is_alive()
        assert srv.table.get(key) == b"{}"
    finally:
        owner._published.clear()
        owner.close()


def test_default_mode_keeps_plain_clients_working_and_flags_turn_owners_on(
        srv: MetadataServer) -> None:
    # no flags: Mooncake's C++ client (no owner, no token) works as before
    assert srv.mode == "open" and srv.anonymous_writes
    assert status(srv.port, "PUT", "/metadata?key=plain", b"1") == 200
    assert status(srv.port, "PUT", "/metadata?key=plain", b"2") == 200  # another plain client
    assert status(srv.port, "DELETE", "/metadata?key=plain") == 200
    # an owner claims an unowned key; the owner may rewrite and delete it
    assert status(srv.port, "PUT", "/metadata?key=k", b"x") == 200
    mine = {OWNER_HEADER: "my-own-secret-value"}
    assert status(srv.port, "PUT", "/metadata?key=k", b"y", mine) == 200
    assert status(srv.port, "PUT", "/metadata?key=k", b"z") == 403
    assert status(srv.port, "DELETE", "/metadata?key=k", None, mine) == 200
    assert status(srv.port, "GET", "/metadata?key=k") == 404
    assert status(srv.port, "PUT", "/metadata?key=k", b"w", {OWNER_HEADER: ""}) == 400
    with MetadataServer("127.0.0.1", 0, require_owner=True) as strict:
        assert strict.mode == "owners"
        st, text, _ = call(strict.port, "PUT", "/metadata?key=a", b"1")
        assert st == 403 and b"--allow-anonymous" in text
        assert status(strict.port, "DELETE", "/metadata?key=a") == 403
        assert status(strict.port, "PUT", "/metadata?key=a", b"1", mine) == 200
        assert status(strict.port, "GET", "/metadata?key=a") == 200  # reads stay open
        assert strict.stats["refused_owner"] == 2
    with MetadataServer("127.0.0.1", 0, require_owner=True, allow_anonymous=True) as relaxed:
        assert status(relaxed.port, "PUT", "/metadata?key=a", b"1") == 200
        assert status(relaxed.port, "PUT", "/metadata?key=b", b"1", mine) == 200
        assert status(relaxed.port, "PUT", "/metadata?key=b", b"2") == 403


# ---- token -----------------------------------------------------------------------------------


def test_token_is_required_everywhere_and_never_echoed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with MetadataServer("127.0.0.1", 0, token=TOKEN) as s:
        good = {"Authorization": f"Bearer {TOKEN}"}
        for hdrs in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
            for method, path, body in (("GET", "/metadata?key=k", None),
                                       ("PUT", "/metadata?key=k", b"v"),
                                       ("DELETE", "/metadata?key=k", None),
                                       ("POST", "/metadata?key=k", b""),
                                       ("GET", "/keys", None), ("GET", "/stats", None),
                                       ("GET", "/health", None)):
                st, text, r = call(s.port, method, path, body, hdrs)
                assert st == 401, (method, path, hdrs)
                assert TOKEN.encode() not in text and b"MC_METADATA_TOKEN" in text
                assert r.getheader("WWW-Authenticate", "").startswith("Bearer")
        assert s.stats["refused_auth"] == 35
        assert status(s.port, "GET", "/health", None, good) == 200
        # authenticated but anonymous writes are refused in token mode
        assert status(s.port, "PUT", "/metadata?key=k", b"v", good) == 403
        # the mooncake client: typed errors naming the option, then success with the token
        for cfg in ({}, {"MC_METADATA_TOKEN": "not-the-token"}):
            with pytest.raises(MetadataAuthError, match="401.*MC_METADATA_TOKEN") as ei:
                make_store("http", s.url, **cfg)
            assert isinstance(ei.value, AuthError) and isinstance(ei.value, ConfigError)
        st = make_store("http", s.url, MC_METADATA_TOKEN=TOKEN, MC_METADATA_TTL=1.0)
        reader = make_store("http", s.url, MC_METADATA_TOKEN=TOKEN)
        try:
            st.publish("t:1", descriptor("t:1"))
            time.sleep(1.2)  # heartbeats carry the token too
            assert reader.fetch("t:1")["name"] == "t:1"
            assert TOKEN not in repr(st) and st._owner not in repr(st)
            st.remove("t:1")
        finally:
            st.close()
            reader.close()
        assert TOKEN not in caplog.text and st._owner not in caplog.text
        assert TOKEN not in repr(s)


def test_engines_with_the_token_work_and_without_it_fail_typed() -> None:
    with MetadataServer("127.0.0.1", 0, token=TOKEN) as s:
        with pytest.raises(MetadataAuthError, match="MC_METADATA_TOKEN"):
            make_engine(s.url)
        with pytest.raises(MetadataAuthError, match="MC_METADATA_TOKEN"):
            make_engine(s.url, MC_METADATA_TOKEN="wrong-token")
        assert TransferEngine().initialize("127.0.0.1", s.url, "tcp", "") != 0
        dst = np.zeros(4096, np.uint8)
        with make_engine(s.url, MC_METADATA_TOKEN=TOKEN) as b, \
                make_engine(s.url, MC_METADATA_TOKEN=TOKEN) as a:
            b.register(dst)
            src = np.full(4096, 9, np.uint8)
            a.register(src)
            a.write(b.segment_name, src, dst.ctypes.data)
            assert (dst == 9).all()


def test_cli_takes_token_file_and_environment(tmp_path: Path) -> None:
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    for kw in ({"args": ("--token-file", str(tf))}, {"env": {"MC_METADATA_TOKEN": TOKEN}}):
        with running("http", **kw) as p:
            assert status(p.port, "GET", "/health") == 401
            hdr = {"Authorization": f"Bearer {TOKEN}"}
            st, text, _ = call(p.port, "GET", "/stats", None, hdr)
            assert st == 200 and json.loads(text)["mode"] == "token"
            store = make_store("http", p.address, MC_METADATA_TOKEN=TOKEN)
            try:
                store.publish("c:1", descriptor("c:1"))
                assert store.fetch("c:1")["name"] == "c:1"
            finally:
                store.close()
        assert TOKEN not in p.log_tail(100_000)


# ---- quotas ----------------------------------------------------------------------------------


def test_quotas_refuse_and_count() -> None:
    mib = 1 << 20
    with MetadataServer("127.0.0.1", 0, max_body=mib, max_bytes=8 * mib, max_keys=20) as s:
        st, text, _ = call(s.port, "PUT", "/metadata?key=huge", b"x" * (mib + 1))
        assert st == 413 and str(mib).encode() in text
        chunk = b"y" * mib
        results = [status(s.port, "PUT", f"/metadata?key=big{i}", chunk) for i in range(30)]
        assert results[:7] == [200] * 7 and set(results[7:]) == {507}  # 7 MiB + keys fit
        st, text, _ = call(s.port, "PUT", "/metadata?key=big99", chunk)
        assert st == 507 and b"limit of 8388608 bytes" in text
        assert s.table.bytes <= 8 * mib
        assert status(s.port, "PUT", "/metadata?key=big3", chunk) == 200  # replacing fits
        assert status(s.port, "DELETE", "/metadata?key=big0") == 200
        assert status(s.port, "PUT", "/metadata?key=big7", chunk) == 200  # room again
        for i in range(20 - len(s.table)):
            assert status(s.port, "PUT", f"/metadata?key=small{i}", b"1") == 200
        st, text, _ = call(s.port, "PUT", "/metadata?key=one-too-many", b"1")
        assert st == 507 and b"20 keys" in text
        stats = json.loads(call(s.port, "GET", "/stats")[1])
        assert stats["over_quota"] == 1 + 23 + 1 + 1 == s.stats["over_quota"]
        assert stats["keys"] == 20 and stats["bytes"] == s.table.bytes
        # a mooncake publisher refused for quota: a PeerUnreachable kept for the heartbeat
        store = make_store("http", s.url, MC_METADATA_TTL=0)
        try:
            store.publish("q:1", descriptor("q:1"))
            assert not store._healthy and s.stats["over_quota"] == 27
        finally:
            store.close()


# ---- connections -----------------------------------------------------------------------------


def _closed(sock: socket.socket, timeout: float = 5.0) -> bytes | None:
    """What the server sent before closing ``sock`` within ``timeout``; None if still open."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        return data


def test_connection_cap_refuses_the_excess_at_once_and_counts() -> None:
    with MetadataServer("127.0.0.1", 0, max_connections=20) as s:
        socks = [socket.create_connection(("127.0.0.1", s.port), 5) for _ in range(20)]
        wait_until(lambda: s.stats["connections"] == 20, what="20 connections")
        extra = [socket.create_connection(("127.0.0.1", s.port), 5) for _ in range(10)]
        try:
            t0 = time.monotonic()
            for x in extra:
                out = _closed(x, 5)
                assert out is not None and (out == b"" or out.startswith(b"HTTP/1.1 503"))
            assert time.monotonic() - t0 < 2
            assert s.stats["conn_refused"] == 10
        finally:
            for x in socks + extra:
                x.close()
        wait_until(lambda: s.stats["connections"] == 0, what="connections closed")
        assert status(s.port, "GET", "/health") == 200


def test_large_bodies_in_flight_are_bounded() -> None:
    """Announced-but-unsent large bodies cannot reserve unbounded memory (503 ``busy``); small
    PUTs (descriptors) need no share and still go through."""
    with MetadataServer("127.0.0.1", 0, max_body=256 << 10) as s:  # budget: 1 MiB
        held = []
        try:
            for i in range(4):
                c = socket.create_connection(("127.0.0.1", s.port), 5)
                c.sendall(b"PUT /metadata?key=h%d HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                          % (i, 256 << 10))
                held.append(c)
            wait_until(lambda: s.stats["requests"] == 4, what="4 bodies announced")
            st, text, _ = call(s.port, "PUT", "/metadata?key=more", b"b" * (200 << 10))
            assert st == 503 and b"in flight" in text and s.stats["busy"] == 1
            assert status(s.port, "PUT", "/metadata?key=small", b"{}") == 200
        finally:
            for c in held:
                c.close()
        wait_until(lambda: status(s.port, "PUT", "/metadata?key=more", b"b" * (200 << 10))
                   == 200, what="budget released")


def test_frame_and_idle_timeouts_close_slow_connections() -> None:
    with MetadataServer("127.0.0.1", 0, frame_timeout=0.6, idle_timeout=0.6) as s:
        drip = socket.create_connection(("127.0.0.1", s.port), 5)
        idle = socket.create_connection(("127.0.0.1", s.port), 5)
        try:
            t0 = time.monotonic()
            request = b"PUT /metadata?key=slow HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + \
                b"z" * 100
            answer = b""
            for byte in request:  # one byte every 50 ms: never completes within 0.6 s
                try:
                    drip.send(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.05)
                if time.monotonic() - t0 > 1.5:
                    break
            answer = _closed(drip, 3)
            assert answer is not None and answer.startswith(b"HTTP/1.1 408")
            assert time.monotonic() - t0 < 2.5
            assert _closed(idle, 3) == b""
            assert s.stats["timeouts"] == 1 and s.stats["idle_closed"] >= 1
            assert s.table.get("slow") is None
        finally:
            drip.close()
            idle.close()
        # a kept-alive client whose connection was reaped simply reconnects
        store = make_store("http", s.url, MC_METADATA_TTL=0)
        try:
            store.publish("i:1", descriptor("i:1"))
            time.sleep(1.0)
            assert store.fetch("i:1")["name"] == "i:1"
        finally:
            store.close()


def test_slowloris_does_not_starve_a_real_client() -> None:
    n = 1100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 256  # the attacker's sockets and the server's, in this one process
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        with MetadataServer("127.0.0.1", 0) as s:  # the defaults
            assert s.max_connections > n
            threads_before = threading.active_count()
            slow: list[socket.socket] = []
            try:
                for i in range(n):
                    c = socket.create_connection(("127.0.0.1", s.port), 10)
                    # headers that never end, or a body that never arrives
                    c.sendall(b"PUT /metadata?key=slow%d HTTP/1.1\r\nContent-Le" % i if i % 2
                              else b"PUT /metadata?key=slow%d HTTP/1.1\r\nContent-Length: "
                                   b"1000\r\n\r\nabc" % i)
                    slow.append(c)
                wait_until(lambda: s.stats["connections"] >= n, what="all slow connections")
                assert threading.active_count() == threads_before  # no thread per connection
                store = make_store("http", s.url, MC_METADATA_TTL=1.0)
                reader = make_store("http", s.url)
                try:
                    worst = 0.0
                    for i in range(20):
                        for c in slow[i * 50:(i + 1) * 50]:  # the attackers keep dripping
                            c.send(b"x")
                        t0 = time.monotonic()
                        store.publish("real:1", descriptor("real:1", n=1 + i % 3))
                        assert reader.fetch("real:1")["name"] == "real:1"
                        worst = max(worst, time.monotonic() - t0)
                    time.sleep(1.0)  # heartbeats go through as well
                    assert store.heartbeat()
                    assert worst < 1.0, f"a publish+fetch took {worst:.3f}s"
                    assert s.stats["connections"] >= n and s.stats["conn_refused"] == 0
                    assert threading.active_count() <= threads_before + 1  # our heartbeat
                    server_threads = [t for t in threading.enumerate()
                                      if t.name == "mc-metadata-server"]
                    assert len(server_threads) == 1
                finally:
                    store.remove("real:1")
                    store.close()
                    reader.close()
            finally:
                for c in slow:
                    c.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---- etcd ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> servers.TlsFiles:
    return servers.make_tls(tmp_path_factory.mktemp("tls"))


def test_etcd_with_auth_engines_resolve_and_wrong_credentials_are_typed() -> None:
    with running("etcd", auth_token_ttl=1) as srv:
        servers.etcd_enable_auth(srv, "root-" + secrets.token_hex(6), user=("mc", "mc-pw"))
        creds = {"MC_ETCD_USERNAME": "mc", "MC_ETCD_PASSWORD": "mc-pw"}
        with pytest.raises(MetadataAuthError, match="anonymous.*MC_ETCD_USERNAME"):
            make_engine(srv.address)
        with pytest.raises(MetadataAuthError, match="user 'mc'.*MC_ETCD_PASSWORD"):
            make_engine(srv.address, MC_ETCD_USERNAME="mc", MC_ETCD_PASSWORD="wrong")
        with pytest.raises(ConfigError, match="go together"):
            make_engine(srv.address, MC_ETCD_USERNAME="mc")
        dst = np.zeros(8192, np.uint8)
        with make_engine(srv.address, **creds) as b, make_engine(srv.address, **creds) as a:
            b.register(dst)
            src = np.full(8192, 5, np.uint8)
            a.register(src)
            a.write(b.segment_name, src, dst.ctypes.data)
            assert (dst == 5).all()
        # the user may write only under mooncake/: etcd's refusal is typed too
        s = make_store("etcd", srv.address, MC_METADATA_TTL=0, **creds)
        try:
            with pytest.raises(MetadataAuthError, match="permission denied"):
                s._put("elsewhere/x", b"1")
            s.publish("r:1", descriptor("r:1"))
            token = s._tokens[0]
            time.sleep(2.5)  # past the 1 s token TTL: etcd forgets the token
            assert s.fetch("r:1")["name"] == "r:1"  # logged in again by itself
            assert s._tokens[0] != token
            s.remove("r:1")
        finally:
            s.close()


def test_etcd_tls_with_client_certificates_and_auth(tls: servers.TlsFiles) -> None:
    with running("etcd", tls=tls, client_cert_auth=True) as srv:
        assert srv.address.startswith("etcd://https://")
        servers.etcd_enable_auth(srv, "root-pw", user=("mc", "mc-pw"), tls=tls)
        full = {"MC_ETCD_CA_FILE": str(tls.ca), "MC_ETCD_CERT_FILE": str(tls.client_cert),
                "MC_ETCD_KEY_FILE": str(tls.client_key), "MC_ETCD_USERNAME": "mc",
                "MC_ETCD_PASSWORD": "mc-pw"}
        for drop, match in ((("MC_ETCD_CA_FILE",), "did not verify.*MC_ETCD_CA_FILE"),
                            (("MC_ETCD_CERT_FILE", "MC_ETCD_KEY_FILE"), "MC_ETCD_CERT_FILE"),
                            (("MC_ETCD_PASSWORD",), "MC_ETCD_PASSWORD")):
            cfg = {k: v for k, v in full.items() if k not in drop}
            with pytest.raises(ConfigError, match=match):
                make_store("etcd", srv.address, **cfg)
        with pytest.raises(ConfigError, match="MC_ETCD_CA_FILE"):
            make_store("etcd", srv.address, **{**full, "MC_ETCD_CA_FILE": "/nonexistent.pem"})
        a = make_store("etcd", srv.address, MC_METADATA_TTL=2, **full)
        b = make_store("etcd", srv.address, **full)
        try:
            a.publish("s:1", descriptor("s:1"))
            assert b.fetch("s:1")["name"] == "s:1"
            a.remove("s:1")
        finally:
            a.close()
            b.close()


# ---- redis -----------------------------------------------------------------------------------


def _client_users(srv: servers.Server, password: str, tls: servers.TlsFiles | None = None
                  ) -> list[str]:
    """The ACL user of every connection the server has now (CLIENT LIST, as ``alice``, with
    redis-py: a client other than ours)."""
    redis = pytest.importorskip("redis")
    kw = {}
    if tls is not None:
        kw = {"ssl": True, "ssl_ca_certs": str(tls.ca), "ssl_certfile": str(tls.client_cert),
              "ssl_keyfile": str(tls.client_key)}
    c = redis.Redis(host=srv.host, port=srv.port, username="alice", password=password,
                    socket_timeout=5, **kw)
    try:
        return [entry.get("user", "") for entry in c.client_list()]
    finally:
        c.close()


def test_redis_acl_engines_resolve_and_wrong_credentials_are_typed() -> None:
    with running("redis", password="default-pw", user=("alice", "alice-pw")) as srv:
        creds = {"MC_REDIS_USERNAME": "alice", "MC_REDIS_PASSWORD": "alice-pw"}
        with pytest.raises(MetadataAuthError, match="NOAUTH.*MC_REDIS_PASSWORD"):
            make_engine(srv.address)
        with pytest.raises(MetadataAuthError, match="WRONGPASS.*MC_REDIS_PASSWORD"):
            make_engine(srv.address, MC_REDIS_USERNAME="alice", MC_REDIS_PASSWORD="nope")
        dst = np.zeros(4096, np.uint8)
        with make_engine(srv.address, **creds) as b, make_engine(srv.address, **creds) as a:
            b.register(dst)
            src = np.full(4096, 3, np.uint8)
            a.register(src)
            a.write(b.segment_name, src, dst.ctypes.data)
            assert (dst == 3).all()
            # the engines' connections are logged in as alice: the user name reached redis
            assert _client_users(srv, "alice-pw").count("alice") >= 3


def test_redis_tls_with_ca_and_client_certificate(tls: servers.TlsFiles) -> None:
    with running("redis", tls=tls, tls_auth_clients=True, password="default-pw",
                 user=("alice", "alice-pw")) as srv:
        assert srv.address.startswith("rediss://")
        full = {"MC_REDIS_CA_FILE": str(tls.ca), "MC_REDIS_CERT_FILE": str(tls.client_cert),
                "MC_REDIS_KEY_FILE": str(tls.client_key), "MC_REDIS_USERNAME": "alice",
                "MC_REDIS_PASSWORD": "alice-pw"}
        for drop, match in ((("MC_REDIS_CA_FILE",), "did not verify.*MC_REDIS_CA_FILE"),
                            (("MC_REDIS_CERT_FILE", "MC_REDIS_KEY_FILE"), "MC_REDIS_CERT_FILE"),
                            (("MC_REDIS_PASSWORD",), "MC_REDIS_PASSWORD")):
            cfg = {k: v for k, v in full.items() if k not in drop}
            with pytest.raises(ConfigError, match=match):
                make_store("redis", srv.address, **cfg)
        a = make_store("redis", srv.address, MC_METADATA_TTL=2, **full)
        b = make_store("redis", srv.address, **full)
        try:
            a.publish("s:2", descriptor("s:2"))
            assert b.fetch("s:2")["name"] == "s:2"
            assert "alice" in _client_users(srv, "alice-pw", tls)
            a.remove("s:2")
        finally:
            a.close()
            b.close()
