"""Faults: a peer killed or hung mid-batch, and garbage on the RPC and data ports."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from peer import Peer, raw_connect, sha

from mooncake.batch import CANCEL_GRACE
from mooncake.engine import TransferEngine
from mooncake.errors import PeerUnreachable, TransferFailed, TransferTimeout

MiB = 1 << 20


@pytest.fixture(scope="module")
def peer():
    """The target with a short timeout: half-sent frames are dropped after 2 s."""
    p = Peer(protocol="tcp", _env={"MC_TRANSFER_TIMEOUT": "2"})
    yield p
    p.close()


@pytest.fixture
def engine2():
    e = TransferEngine("127.0.0.1", protocol="tcp", MC_TRANSFER_TIMEOUT=3)
    yield e
    e.close()


def test_peer_killed_mid_batch(engine2):
    p = Peer(protocol="tcp")
    try:
        raddr = p.alloc(64 * MiB)
        buf = np.zeros(64 * MiB, np.uint8)
        engine2.register(buf)
        b = engine2.submit(p.segment, "read", [buf.ctypes.data + i * MiB for i in range(64)],
                           [raddr + i * MiB for i in range(64)], [MiB] * 64)
        p.kill()
        t0 = time.monotonic()
        with pytest.raises(TransferFailed):
            for _ in range(50):  # the batch may finish before the kill lands: submit again
                b.wait()
                b = engine2.submit(p.segment, "read", [buf.ctypes.data], [raddr], [MiB])
        assert time.monotonic() - t0 < 3 + 2
        assert engine2.send_probe(p.segment) == -1
        with pytest.raises(PeerUnreachable):
            engine2.probe(p.segment)
    finally:
        p.kill()


def test_peer_hung_times_out(engine2):
    p = Peer(protocol="tcp")
    try:
        raddr = p.alloc(4 * MiB)
        buf = np.zeros(4 * MiB, np.uint8)
        engine2.register(buf)
        engine2.write(p.segment, buf, raddr)  # lanes are up
        p.stop()
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout) as ei:
            engine2.write(p.segment, buf, raddr)
        # the timeout, then a grace period to drain what was sent, then the lane is cut
        assert 2.5 < time.monotonic() - t0 < 3 + CANCEL_GRACE + 5
        assert ei.value.statuses[0].status.name == "TIMEOUT"
        bid = engine2.batch_transfer_async_write(p.segment, [buf.ctypes.data], [raddr], [MiB])
        assert engine2.get_batch_transfer_status([bid]) == -1
        p.cont()
        engine2.write(p.segment, buf, raddr)  # new lanes once the peer is back
        assert p.sha(raddr, 4 * MiB) == sha(buf)
    finally:
        p.kill()


def _addr(engine: TransferEngine, segment: str, kind: str) -> tuple[str, int]:
    if kind == "rpc":
        host, port = segment.rsplit(":", 1)
        return host, int(port)
    info = engine.segment(segment).transports["tcp"]
    return info["host"], info["data_port"]


REQ = struct.Struct("<IBBHIIQQ")
GARBAGE = {
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4,
    "truncated": b"MCRP\x01",
    "rpc-oversized": struct.pack("<4sBI", b"MCRP", 1, 0xFFFFFFF0) + b"{",
    "rpc-not-json": struct.pack("<4sBI", b"MCRP", 1, 5) + b"\xff\xfe{{{",
    "data-bad-op": REQ.pack(0x3154434D, 9, 0, 0, 1, 0, 4096, 16),
    "data-oversized": REQ.pack(0x3154434D, 1, 0, 0, 1, 0, 4096, 1 << 40),
    "data-truncated": REQ.pack(0x3154434D, 1, 0, 0, 1, 0, 4096, 16)[:20],
}


@pytest.mark.parametrize("kind", ["rpc", "data"])
@pytest.mark.parametrize("payload", sorted(GARBAGE))
def test_garbage_drops_only_that_connection(engine, peer, kind, payload):
    raddr = peer.alloc(MiB, seed=4)
    buf = np.random.default_rng(1).integers(0, 256, MiB, dtype=np.uint8)
    engine.register(buf)
    engine.write(peer.segment, buf, raddr)  # an established lane, kept across the garbage
    s = raw_connect(_addr(engine, peer.segment, kind), "tcp-data" if kind == "data" else "rpc")
    s.sendall(GARBAGE[payload])  # and keep the socket open: the server must still drop it
    s.settimeout(10)
    try:
        rest = s.recv(65536)
        while rest:  # the server may answer an error frame first; then it must close
            rest = s.recv(65536)
    except ConnectionResetError:
        pass
    s.close()
    engine.probe(peer.segment)
    buf[:] = 77
    engine.write(peer.segment, buf, raddr)
    engine.read(peer.segment, buf.ctypes.data, raddr, MiB)
    assert peer.sha(raddr, MiB) == sha(buf) == sha(np.full(MiB, 77, np.uint8))


def test_rpc_unknown_method_keeps_connection(engine, peer):
    from mooncake.rpc import RemoteError

    with pytest.raises(RemoteError, match="unknown RPC method"):
        engine._rpc_call(peer.segment, "no.such.method", {})
    engine.probe(peer.segment)


def test_engine_closed_with_batches_in_flight():
    """close() fails what is in flight with its own reason; nothing hangs, the peer goes on."""
    p = Peer(protocol="tcp")
    try:
        raddr = p.alloc(64 * MiB)
        for _ in range(3):
            e = TransferEngine("127.0.0.1", protocol="tcp")
            buf = np.zeros(64 * MiB, np.uint8)
            e.register(buf)
            b = e.submit(p.segment, "read", [buf.ctypes.data + i * MiB for i in range(64)],
                         [raddr + i * MiB for i in range(64)], [MiB] * 64)
            e.close()
            try:
                b.wait(10)  # it may have finished before close()
            except TransferFailed as ex:
                bad = [s for s in ex.statuses if s.status.name != "COMPLETED"]
                assert bad and all("engine was closed" in s.error for s in bad)
        with TransferEngine("127.0.0.1", protocol="tcp") as e:
            src = np.arange(MiB, dtype=np.uint8)
            e.register(src)
            e.write(p.segment, src, raddr)
            assert p.sha(raddr, MiB) == sha(src)
    finally:
        p.close()
