"""Owned memory and distrusted peers, the TCP- and engine-specific cases (two real processes).

Registrations hold their buffers and know read-only memory; a stalled or hostile client stalls
only its own connection; descriptors and notifications from strangers are checked and bounded.
What every transport must do (unregister/free/close in flight, silence after a timeout, restart
at the same address, timeouts that stay local) is in the conformance suite,
``mooncake.testing.conformance`` (tests/test_conformance.py).
"""

from __future__ import annotations

import ctypes
import mmap
import socket
import struct
import time

import numpy as np
import pytest
from peer import raw_connect, sha

from mooncake._core import batch as _core
from mooncake.engine import TransferEngine
from mooncake.errors import (
    InvalidAddress,
    SegmentNotFound,
    TransferFailed,
)
from mooncake.rpc import RpcServer

MiB = 1 << 20
REQ = struct.Struct("<IBBHIIQQ")
RSP = struct.Struct("<IIII")
MAGIC = 0x3154434D


@pytest.fixture
def eng():
    e = TransferEngine("127.0.0.1", protocol="tcp", MC_TRANSFER_TIMEOUT=20)
    yield e
    e.close()


def _data_port(e: TransferEngine, segment: str) -> tuple[str, int]:
    info = e.segment(segment).transports["tcp"]
    return info["host"], info["data_port"]


def _settled(buf: np.ndarray, value: int, wait: float = 0.5) -> bool:
    """Fill ``buf`` with ``value``, give stray writers time, and see whether it stayed."""
    buf[:] = value
    time.sleep(wait)
    return bool((buf == value).all())


# -- unregister / free / close while work is in flight ----------------------------------------

# -- read-only memory ---------------------------------------------------------------------------

def _ro_mmap(n: int):
    m = mmap.mmap(-1, n, prot=mmap.PROT_READ)
    return m, np.frombuffer(m, np.uint8)


def test_read_only_buffers_are_sources_only(eng, peer):
    raddr = peer.alloc(MiB, seed=7)
    m, mview = _ro_mmap(MiB)
    ro_np = np.arange(MiB, dtype=np.uint8)
    ro_np.flags.writeable = False
    for obj in (bytes(MiB), ro_np, m):
        r = eng.register(obj)
        assert not r.writable
        with pytest.raises(InvalidAddress, match="read-only"):
            eng.read(peer.segment, r.addr, raddr, 4096)
        eng.write(peer.segment, r.addr, raddr, MiB)  # a source is fine
        eng.unregister(r)
    with pytest.raises(InvalidAddress, match="read-only"):
        eng.register(bytes(4096), access="rw")
    # the Mooncake face, by address: a PROT_READ mapping registers read-only
    addr = mview.ctypes.data
    assert eng.register_memory(addr, MiB) == 0
    assert eng.transfer_sync_read(peer.segment, addr, raddr, 4096) == -1
    assert eng.transfer_sync_write(peer.segment, addr, raddr, 4096) == 0
    assert eng.unregister_memory(addr) == 0
    assert eng.register_memory(8, 4096) == -1  # not mapped at all
    del mview
    m.close()


def test_bytearray_cannot_be_resized_while_registered(eng):
    ba = bytearray(64 * 1024)
    eng.register(ba)
    with pytest.raises(BufferError):
        ba.extend(b"x" * 4096)
    eng.unregister(ba)
    ba.extend(b"x")  # released with the registration
    assert len(ba) == 64 * 1024 + 1


def test_remote_write_into_read_only_region_is_refused_by_the_target(eng, peer):
    raddr = peer.call("alloc_ro", 64 * 1024, 9)
    before = peer.sha(raddr, 64 * 1024)
    src = np.full(64 * 1024, 3, np.uint8)
    eng.register(src)
    with pytest.raises(InvalidAddress, match="read-only"):
        eng.write(peer.segment, src, raddr)
    assert eng.transfer_sync_write(peer.segment, src.ctypes.data, raddr, 4096) == -1
    # a raw client that skips the initiator's check: the target answers DENIED, and lives
    s = raw_connect(_data_port(eng, peer.segment))
    s.sendall(REQ.pack(MAGIC, 1, 0, 0, 7, 0, raddr, 4096) + b"\xee" * 4096)
    magic, status, seq, _ = RSP.unpack(s.recv(16, socket.MSG_WAITALL))
    assert (status, seq) == (2, 7)
    s.close()
    assert peer.sha(raddr, 64 * 1024) == before
    eng.read(peer.segment, src.ctypes.data, raddr, 64 * 1024)  # reading it is allowed
    assert sha(src) == before


# -- a stalled or hostile client stalls only its own connection -----------------------------

def test_stalled_write_header_freezes_nothing(eng, peer):
    raddr = peer.alloc(4 * MiB, seed=11)
    s = raw_connect(_data_port(eng, peer.segment))
    s.sendall(REQ.pack(MAGIC, 1, 0, 0, 1, 0, raddr, MiB) + b"\x00" * 10)  # then nothing
    try:
        time.sleep(0.2)
        assert peer.call("register_timed", 4096, timeout=10) < 5
        buf = np.full(4 * MiB, 6, np.uint8)
        eng.register(buf)
        eng.write(peer.segment, buf, raddr)  # other connections are served meanwhile
        assert peer.sha(raddr, 4 * MiB) == sha(buf)
        peer.call("unregister", raddr, timeout=15)  # the stalled payload is discarded
    finally:
        s.close()


def test_undrained_read_reply_freezes_nothing(eng, peer):
    raddr = peer.alloc(64 * MiB, seed=12)
    s = raw_connect(_data_port(eng, peer.segment))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for i in range(8):  # 512 MiB of replies that we never read
        s.sendall(REQ.pack(MAGIC, 0, 0, 0, i, 0, raddr, 64 * MiB))
    try:
        time.sleep(0.3)
        assert peer.call("register_timed", 4096, timeout=10) < 5
        other = peer.alloc(MiB, seed=13)
        buf = np.zeros(MiB, np.uint8)
        eng.register(buf)
        eng.read(peer.segment, buf.ctypes.data, other, MiB)
        assert sha(buf) == peer.sha(other, MiB)
        t0 = time.monotonic()
        peer.call("unregister", raddr, timeout=30)  # cuts that reply, does not wait for it
        assert time.monotonic() - t0 < 20
    finally:
        s.close()


# -- recovery, timeouts and silence -------------------------------------------------------------

# -- descriptors are data from strangers ----------------------------------------------------------

def _forger(desc_for):
    """A fake engine: an RPC server whose segment.describe answers a forged descriptor."""
    srv = RpcServer("127.0.0.1", [0], 1 << 20)
    seg = f"127.0.0.1:{srv.port}"
    srv.add_handler("segment.describe", lambda args: desc_for(seg))
    return srv, seg


@pytest.mark.parametrize("field,value", [
    ("data_port", 70000), ("data_port", 2**70), ("data_port", "80"), ("host", 5),
    ("host", "x" * 300), ("version", 2),
])
def test_out_of_range_transport_fields_are_refused(eng, field, value):
    def desc(seg):
        tcp = {"host": "127.0.0.1", "data_port": 1, "version": 1, field: value}
        return {"name": seg, "host_id": "x", "pid": 1, "timestamp": 1.0,
                "transports": {"tcp": tcp},
                "buffers": [{"addr": 1 << 30, "length": 4096, "location": "cpu:0"}]}

    srv, seg = _forger(desc)
    try:
        buf = np.zeros(4096, np.uint8)
        eng.register(buf)
        with pytest.raises(SegmentNotFound, match=f"tcp.{field}"):
            eng.write(seg, buf, 1 << 30)
        assert eng.transfer_sync_write(seg, buf.ctypes.data, 1 << 30, 4096) == -1
    finally:
        srv.close()


@pytest.mark.parametrize("bad", [{"pid": 2**40}, {"pid": -1}, {"timestamp": float("nan")},
                                 {"buffers": [{"addr": 4096, "length": 1, "location": 7}]},
                                 {"buffers": [{"addr": 4096, "length": 1, "location": "cpu",
                                               "access": "all"}]}])
def test_out_of_range_descriptor_fields_are_refused(eng, bad):
    def desc(seg):
        return {"name": seg, "host_id": "x", "pid": 1, "timestamp": 1.0, "transports": {},
                "buffers": [], **bad}

    srv, seg = _forger(desc)
    try:
        with pytest.raises(SegmentNotFound, match="malformed descriptor"):
            eng.segment(seg)
        assert eng.get_first_buffer_address(seg) == 0
    finally:
        srv.close()


def test_notifications_are_bounded(eng, peer):
    """MC_MAX_NOTIFIES / MC_MAX_NOTIFY_BYTES bound the queue; each drop is counted."""
    t = TransferEngine("127.0.0.1", protocol="tcp", MC_MAX_NOTIFIES=64,
                       MC_MAX_NOTIFY_BYTES=64 * 1024)
    try:
        for i in range(64):
            eng.notify(t.segment_name, "n", str(i))
        with pytest.raises(Exception, match="queue full"):
            eng.notify(t.segment_name, "n", "one too many")
        assert t.notifies_dropped == 1
        assert len(t.get_notifies()) == 64
        eng.notify(t.segment_name, "n", "room again")
        assert [n.msg for n in t.get_notifies()] == ["room again"]
        eng.notify(t.segment_name, "n", "x" * 60000)  # bytes: the second one does not fit
        with pytest.raises(Exception, match="queue full"):
            eng.notify(t.segment_name, "n", "y" * 10000)
        assert t.notifies_dropped == 2
    finally:
        t.close()


def test_failed_statuses_carry_integer_codes(eng, peer):
    raddr = peer.call("alloc_ro", 4096, 1)
    src = np.zeros(4096, np.uint8)
    eng.register(src)
    eng.segment(peer.segment)
    entry = eng._segments.get(peer.segment)
    entry.read_only = False  # pretend we did not know: the target must say DENIED itself
    entry.table.remove(raddr)
    entry.table.add(raddr, 4096)
    with pytest.raises(TransferFailed) as ei:
        eng.write(peer.segment, src, raddr)
    st = ei.value.statuses[0]
    assert (st.code, st.code_name) == (_core.E_DENIED, "DENIED")


def test_registration_keeps_numpy_memory_alive(eng, peer):
    raddr = peer.alloc(MiB, seed=21)
    arr = np.zeros(MiB, np.uint8)
    r = eng.register(arr)
    addr = arr.ctypes.data
    del arr  # our last reference: the registration keeps the memory
    eng.read(peer.segment, addr, raddr, MiB)
    assert sha(ctypes.string_at(addr, MiB)) == peer.sha(raddr, MiB)
    eng.unregister(r)
