"""The cluster token (MC_CLUSTER_TOKEN): who may talk to an engine at all (mooncake.auth).

Real engines in other processes, real sockets: engines sharing a token transfer as ever; an
engine without it, or with another, gets AuthError and the target counts a refusal (logged at
most once per 10 s); a raw client without the token reads nothing and writes nothing; a
captured handshake cannot be replayed; a silent half-open connection is dropped and never
holds a slot; descriptors are signed, so a forged entry in a metadata store is rejected by
readers; the token never shows in descriptors, logs or ``config show``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from peer import Peer, raw_connect, sha

from mooncake.auth import ANSWER, HELLO, MAGIC, ClusterAuth, open_auth
from mooncake.config import load_config
from mooncake.engine import TransferEngine
from mooncake.errors import AuthError, ConfigError
from mooncake.rpc import HEADER, REQUEST

TOKEN = "correct horse battery staple"
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def guarded():
    """A tcp target that requires TOKEN."""
    p = Peer(protocol="tcp", MC_CLUSTER_TOKEN=TOKEN)
    yield p
    p.close()


def _data_port(eng: TransferEngine, segment: str) -> tuple[str, int]:
    info = eng.segment(segment).transports["tcp"]
    return info["host"], info["data_port"]


def test_same_token_transfers_and_descriptors_are_signed(guarded):
    with TransferEngine("127.0.0.1", protocol="tcp", MC_CLUSTER_TOKEN=TOKEN) as e:
        raddr = guarded.alloc(MiB, seed=3)
        buf = np.random.default_rng(3).integers(0, 255, MiB, dtype=np.uint8)
        e.register(buf)
        e.write(guarded.segment, buf, raddr)
        assert guarded.sha(raddr, MiB) == sha(buf)
        back = np.zeros_like(buf)
        e.register(back)
        e.read(guarded.segment, back, raddr)
        assert np.array_equal(back, buf)
        desc = e.describe()
        assert "sig" in desc and TOKEN not in json.dumps(desc)


@pytest.mark.parametrize("token", [None, "another token"], ids=["none", "wrong"])
def test_without_the_token_an_engine_gets_auth_error(guarded, token):
    kw = {"MC_CLUSTER_TOKEN": token} if token else {}
    with TransferEngine("127.0.0.1", protocol="tcp", **kw) as e:
        with pytest.raises(AuthError, match="cluster token"):
            e.segment(guarded.segment)
        buf = np.zeros(4096, np.uint8)
        e.register(buf)
        with pytest.raises(AuthError):
            e.read(guarded.segment, buf, 4096)


def test_an_engine_with_a_token_refuses_a_peer_without_one():
    open_peer = Peer(protocol="tcp")
    try:
        with TransferEngine("127.0.0.1", protocol="tcp", MC_CLUSTER_TOKEN=TOKEN) as e:
            with pytest.raises(AuthError, match="without a cluster token"):
                e.segment(open_peer.segment)
    finally:
        open_peer.close()


def test_raw_client_without_the_token_reads_and_writes_nothing(guarded):
    """The '30-line attacker': no describe, no READ, no WRITE; the target's memory is intact."""
    with TransferEngine("127.0.0.1", protocol="tcp", MC_CLUSTER_TOKEN=TOKEN) as e:
        host, port = _data_port(e, guarded.segment)
    raddr = guarded.alloc(64 * KiB, seed=5)
    before = guarded.sha(raddr, 64 * KiB)
    rpc_host, rpc_port = guarded.segment.rsplit(":", 1)
    for addr, channel in (((rpc_host, int(rpc_port)), "rpc"), ((host, port), "tcp-data")):
        with pytest.raises(AuthError, match="requires a cluster token"):
            raw_connect(addr, channel)
        with pytest.raises(AuthError, match="tokens differ"):
            raw_connect(addr, channel, token="guess")
    # skipping the handshake altogether: a request frame straight away is refused unread
    body = json.dumps({"method": "segment.describe", "args": {}}).encode()
    with socket.create_connection((rpc_host, int(rpc_port)), timeout=10) as s:
        s.sendall(HEADER.pack(b"MCRP", REQUEST, len(body)) + body + bytes(64))
        got = _read_all(s)
    assert b"buffers" not in got and len(got) <= HELLO.size + 33
    req = struct.pack("<IBBHIIQQ", 0x3154434D, 1, 0, 0, 7, 0, raddr, 4096)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(req + b"\xee" * 4096)
        _read_all(s)
    assert guarded.sha(raddr, 64 * KiB) == before


def _read_all(s: socket.socket) -> bytes:
    s.settimeout(10)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _listener() -> socket.socket:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    return ls


def test_a_captured_handshake_cannot_be_replayed():
    """Fresh nonces on both sides: the answer that opened one connection opens no other."""
    import threading

    srv = ClusterAuth(TOKEN.encode())
    ls = _listener()
    results: list[bool] = []

    def serve(n: int) -> None:
        for _ in range(n):
            c, addr = ls.accept()
            with c:
                results.append(srv.serve(c, "rpc", str(addr), 5.0))
    t = threading.Thread(target=serve, args=(2,))
    t.start()
    port = ls.getsockname()[1]
    captured = {}

    class Tap(socket.socket):  # records what the honest client sends
        def sendall(self, data, *a):
            captured.setdefault("answer", data)
            return super().sendall(data, *a)
    honest = Tap()
    honest.connect(("127.0.0.1", port))
    ClusterAuth(TOKEN.encode()).client(honest, "rpc", "srv", 5.0)
    honest.close()
    replay = socket.create_connection(("127.0.0.1", port), timeout=5)
    hello = replay.recv(HELLO.size)
    assert hello[:4] == MAGIC
    replay.sendall(captured["answer"])
    verdict = _read_all(replay)
    replay.close()
    t.join(10)
    ls.close()
    assert results == [True, False]
    assert verdict[:1] == b"\x00" and srv.refused == 1
    assert len(captured["answer"]) == ANSWER.size


def test_a_proof_for_one_channel_does_not_open_another():
    """The MACs bind the channel: a client proving the token for "rpc" is refused by a
    "tcp-data" server with the same token (and learns it was refused)."""
    import threading

    srv = ClusterAuth(TOKEN.encode())
    a, b = socket.socketpair()
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(srv.serve(a, "tcp-data", "pair", 5.0)))
    t.start()
    with pytest.raises(AuthError, match="refused"):
        ClusterAuth(TOKEN.encode()).client(b, "rpc", "pair", 5.0)
    t.join(10)
    a.close()
    b.close()
    assert out == [False] and srv.refused == 1


def test_refusals_are_counted_and_logged_at_most_every_10s(caplog):
    srv = ClusterAuth(TOKEN.encode())
    ls = _listener()
    port = ls.getsockname()[1]
    import threading

    def serve() -> None:
        for _ in range(20):
            c, addr = ls.accept()
            with c:
                srv.serve(c, "tcp-data", str(addr), 5.0)
    t = threading.Thread(target=serve)
    with caplog.at_level(logging.WARNING, logger="mooncake.auth"):
        t.start()
        for _ in range(20):
            with pytest.raises(AuthError):
                raw_connect(("127.0.0.1", port), "tcp-data", token="nope")
        t.join(10)
    ls.close()
    assert srv.refused == 20
    lines = [r for r in caplog.records if "refused a tcp-data connection" in r.getMessage()]
    assert len(lines) == 1 and "wrong cluster token" in lines[0].getMessage()
    assert TOKEN not in caplog.text and "nope" not in caplog.text


def test_silent_connections_are_dropped_and_evicted_first(guarded):
    """A connection that never answers the hello is closed after the handshake timeout and is
    the first evicted when the RPC connection cap is reached."""
    from mooncake.rpc import RpcServer

    srv = RpcServer("127.0.0.1", [0], 1 << 20, max_connections=4, handshake_timeout=1.0,
                    auth=ClusterAuth(TOKEN.encode()))
    srv.add_handler("echo", lambda a: a)
    try:
        silent = [socket.create_connection(("127.0.0.1", srv.port), timeout=10)
                  for _ in range(4)]
        time.sleep(0.2)
        from mooncake.rpc import RpcClient

        cli = RpcClient(1 << 20, 5.0, ClusterAuth(TOKEN.encode()))
        assert cli.call(f"127.0.0.1:{srv.port}", "echo", {"x": 1}) == {"x": 1}  # evicted one
        assert srv.evicted >= 1
        t0 = time.monotonic()
        for s in silent:
            _read_all(s)  # closed by the server: evicted, or past the handshake timeout
            s.close()
        assert time.monotonic() - t0 < 8
        cli.close()
    finally:
        srv.close()


def test_token_file_and_config_checks(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    a = open_auth(load_config({"MC_CLUSTER_TOKEN_FILE": str(f)}, env={}))
    b = ClusterAuth(TOKEN.encode())
    assert a.sign({"x": 1}) == b.sign({"x": 1})
    with pytest.raises(ConfigError, match="both set"):
        open_auth(load_config({"MC_CLUSTER_TOKEN_FILE": str(f), "MC_CLUSTER_TOKEN": "x"},
                              env={}))
    with pytest.raises(ConfigError, match="not a regular file"):
        open_auth(load_config({"MC_CLUSTER_TOKEN_FILE": str(tmp_path)}, env={}))
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        open_auth(load_config({"MC_CLUSTER_TOKEN_FILE": str(tmp_path / "empty")}, env={}))
    out = subprocess.run([sys.executable, "-m", "mooncake", "config", "show"],
                         env={**os.environ, "MC_CLUSTER_TOKEN": TOKEN}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "MC_CLUSTER_TOKEN" in out.stdout
    assert TOKEN not in out.stdout and TOKEN not in out.stderr


@pytest.mark.parametrize("kind", ["etcd", "redis"])
def test_a_forged_descriptor_in_the_metadata_store_is_rejected(kind):
    """Someone with write access to the store (etcd/redis have no per-key owners) replaces
    engine A's descriptor, pointing A's name at other memory: a reader with the token rejects
    the altered entry and an unsigned one."""
    import servers
    from test_metadata_stores import raw_put

    with servers.running(kind) as srv:
        url = f"{kind}://{srv.host}:{srv.port}"
        kw = {"MC_CLUSTER_TOKEN": TOKEN}
        with TransferEngine("127.0.0.1", metadata=url, protocol="tcp", **kw) as a, \
                TransferEngine("127.0.0.1", metadata=url, protocol="tcp", **kw) as b:
            assert b.segment(a.segment_name).name == a.segment_name  # signed: accepted
            forged = dict(a.describe())
            forged["buffers"] = [{"addr": 4096, "length": 4096, "location": "cpu:0"}]
            key = f"mooncake/ram/{a.segment_name}"
            for body in (forged, {k: v for k, v in forged.items() if k != "sig"}):
                raw_put(srv, key, json.dumps(body).encode())
                with pytest.raises(AuthError, match="signature|not signed"):
                    b.segment(a.segment_name, refresh=True)


def test_one_peer_address_cannot_take_every_connection():
    """MC_MAX_CONNECTIONS_PER_PEER on both listeners: one address holding its share is refused
    more (counted) while the engine keeps serving."""
    from mooncake.rpc import Listener, RpcServer

    srv = RpcServer("127.0.0.1", [0], 1 << 20, max_per_peer=3)
    srv.add_handler("echo", lambda a: a)
    held: list[socket.socket] = []
    try:
        held = [raw_connect(("127.0.0.1", srv.port), "rpc") for _ in range(3)]
        extra = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        assert _read_all(extra) == b""  # closed at once: no hello
        extra.close()
        assert srv.stats()["refused_per_peer"] == 1
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # its slot comes back once the server saw the close
            try:
                s = raw_connect(("127.0.0.1", srv.port), "rpc")
                break
            except (OSError, AuthError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        held.append(s)
    finally:
        for s in held:
            s.close()
        srv.close()
    served = []
    lst = Listener("127.0.0.1", [0], lambda c, a: served.append(c.recv(1)), "test",
                   max_per_peer=2)
    try:
        conns = [socket.create_connection(("127.0.0.1", lst.port), timeout=10) for _ in range(3)]
        assert _read_all(conns[2]) == b""
        assert lst.refused_per_peer == 1
        for c in conns:
            c.close()
    finally:
        lst.close()


def test_local_regions_are_not_published_and_refused_by_the_target():
    """access='local' (TENT's local permission): the engine's own transfers use it, it is not in
    the descriptor, and the tcp target refuses a raw peer's READ and WRITE of it (DENIED)."""
    target = Peer(protocol="tcp")
    try:
        with TransferEngine("127.0.0.1", protocol="tcp") as e:
            secret = np.full(64 * KiB, 0x5A, np.uint8)
            e.register(secret, access="local")
            assert all(b["addr"] != secret.ctypes.data for b in e.describe()["buffers"])
            raddr = target.alloc(64 * KiB, seed=8)
            e.read(target.segment, secret, raddr)       # a local READ lands in it
            assert sha(secret) == target.sha(raddr, 64 * KiB)
            e.write(target.segment, secret, raddr)      # and it is a WRITE source
            with TransferEngine("127.0.0.1", protocol="tcp") as other:
                info = other.segment(e.segment_name).transports["tcp"]
            before = sha(secret)
            s = raw_connect((info["host"], info["data_port"]))
            for op in (0, 1):  # READ, then WRITE of the local region
                hdr = struct.pack("<IBBHIIQQ", 0x3154434D, op, 0, 0, 9 + op, 0,
                                  secret.ctypes.data, 4096)
                s.sendall(hdr + (b"\xee" * 4096 if op else b""))
                magic, status, seq, _ = struct.unpack("<IIII", _recv(s, 16))
                assert (magic, status, seq) == (0x3152434D, 2, 9 + op)  # DENIED
            s.close()
            assert sha(secret) == before
    finally:
        target.close()


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk
        out += chunk
    return out


def test_an_open_engine_on_a_non_loopback_address_warns_once(caplog):
    from mooncake import engine as eng_mod
    from mooncake.auth import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost")
    assert not is_loopback("10.0.0.5") and not is_loopback("0.0.0.0")
    eng_mod._warned_open.discard("10.0.0.5")
    with caplog.at_level(logging.WARNING, logger="mooncake.engine"):
        eng_mod._warn_open_once("10.0.0.5")
        eng_mod._warn_open_once("10.0.0.5")
    lines = [r for r in caplog.records if "without a cluster token" in r.getMessage()]
    assert len(lines) == 1 and "MC_CLUSTER_TOKEN" in lines[0].getMessage()
    with caplog.at_level(logging.WARNING, logger="mooncake.engine"):
        with TransferEngine("127.0.0.1", protocol="tcp"):
            pass
    assert len([r for r in caplog.records if "without a cluster token" in r.getMessage()]) == 1


def test_an_oversized_descriptor_in_the_store_is_refused_unparsed():
    """MC_HANDSHAKE_MAX_LENGTH bounds what a reader takes from a metadata store too."""
    import servers
    from test_metadata_stores import raw_put

    from mooncake.metadata.base import DescriptorError

    with servers.running("redis") as srv:
        url = f"redis://{srv.host}:{srv.port}"
        with TransferEngine("127.0.0.1", metadata=url, protocol="tcp",
                            MC_HANDSHAKE_MAX_LENGTH=64 * KiB) as e:
            raw_put(srv, "mooncake/ram/10.9.9.9:1", b"[" * (1 << 20))
            with pytest.raises(DescriptorError, match="MC_HANDSHAKE_MAX_LENGTH"):
                e.segment("10.9.9.9:1")
