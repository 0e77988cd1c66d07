"""Owned memory and distrusted peers (TCP, two real processes each).

Registrations hold their buffers; unregister/free/close return only once nothing touches the
memory; after a failure no byte lands; a stalled or hostile peer stalls only its own connection.
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing as mp
import socket
import struct
import threading
import time

import numpy as np
import pytest
from peer import Peer, sha

from mooncake._core import batch as _core
from mooncake.engine import TransferEngine
from mooncake.errors import (
    InvalidAddress,
    SegmentNotFound,
    TransferFailed,
    TransferTimeout,
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

def test_unregister_with_reads_in_flight_to_a_stalled_peer(eng):
    p = Peer(protocol="tcp")
    try:
        raddr = p.alloc(32 * MiB, seed=3)
        buf = np.zeros(32 * MiB, np.uint8)
        eng.register(buf)
        eng.read(p.segment, buf.ctypes.data, raddr, MiB)  # lanes up
        p.stop()
        b = eng.submit(p.segment, "read", [buf.ctypes.data + i * MiB for i in range(32)],
                       [raddr + i * MiB for i in range(32)], [MiB] * 32)
        t0 = time.monotonic()
        eng.unregister(buf)  # the peer answers nothing: the work is failed, not waited for
        assert time.monotonic() - t0 < 15  # well inside MC_TRANSFER_TIMEOUT=20
        assert b.done
        codes = {s.code for s in b.statuses()}
        assert codes <= {0, _core.E_UNREGISTERED}, codes
        p.cont()  # now the peer sends every payload: none of it may land
        assert _settled(buf, 0xAB)
        eng.register(buf)  # and the lanes it discarded on are still good
        eng.read(p.segment, buf.ctypes.data, raddr, 32 * MiB)
        assert sha(buf) == p.sha(raddr, 32 * MiB)
    finally:
        p.kill()


def _free_during_read(segment: str, raddr: int, q) -> None:
    from mooncake.engine import TransferEngine

    e = TransferEngine("127.0.0.1", protocol="tcp")
    out = []
    for _ in range(5):
        ptr = e.allocate_managed_buffer(32 * MiB)
        bid = e.batch_transfer_async_read(segment, [ptr + i * MiB for i in range(32)],
                                          [raddr + i * MiB for i in range(32)], [MiB] * 32)
        out.append(e.free_managed_buffer(ptr, 32 * MiB))
        out.append(e.get_batch_transfer_status([bid]) in (0, -1))
        # the freed range is reused at once: nothing of the old batch may land in it
        again = np.zeros(32 * MiB, np.uint8)
        e.register(again)
        out.append(_settled(again, 0x5A, 0.2))
        e.unregister(again)
    e.close()
    q.put(out)


def test_free_managed_buffer_with_reads_in_flight(peer):
    """In a child process: a worker touching freed memory would kill it (SIGSEGV)."""
    raddr = peer.alloc(32 * MiB, seed=5)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    child = ctx.Process(target=_free_during_read, args=(peer.segment, raddr, q))
    child.start()
    child.join(120)
    assert child.exitcode == 0, f"child died with {child.exitcode}"
    assert q.get(timeout=5) == [0, True, True] * 5


def test_close_with_sync_transfer_in_another_thread():
    p = Peer(protocol="tcp")
    try:
        raddr = p.alloc(64 * MiB)
        e = TransferEngine("127.0.0.1", protocol="tcp")
        buf = np.zeros(64 * MiB, np.uint8)
        e.register(buf)
        e.read(p.segment, buf.ctypes.data, raddr, MiB)
        errors: list[BaseException] = []

        def reader():
            try:
                for _ in range(20):
                    e.read(p.segment, buf.ctypes.data, raddr, 64 * MiB)
            except Exception as ex:  # closed under it: a typed error
                errors.append(ex)

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.05)
        e.close()
        assert _settled(buf, 0x11)
        t.join(30)
        assert not t.is_alive()
        assert all(isinstance(x, Exception) for x in errors)
    finally:
        p.kill()


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
    s = socket.create_connection(_data_port(eng, peer.segment), timeout=10)
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
    s = socket.create_connection(_data_port(eng, peer.segment), timeout=10)
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
    s = socket.create_connection(_data_port(eng, peer.segment), timeout=10)
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

def test_peer_restarted_at_the_same_address_is_reached_again(eng):
    at = 0x7E0000000000
    p = Peer(protocol="tcp")
    segment = p.segment
    try:
        p.alloc(MiB, seed=1, at=at)
        buf = np.full(MiB, 4, np.uint8)
        eng.register(buf)
        eng.write(segment, buf, at)
        p.kill()
        p = Peer(protocol="tcp", _hostname=segment)  # same RPC port, new data port
        assert p.segment == segment
        p.alloc(MiB, seed=2, at=at)
        buf[:] = 5
        eng.write(segment, buf, at)  # the next call reaches it
        assert p.sha(at, MiB) == sha(buf)
    finally:
        p.kill()


def test_a_tiny_timeout_fails_only_that_transfer(eng, peer):
    raddr = peer.alloc(32 * MiB, seed=14)
    mine = np.zeros(32 * MiB, np.uint8)
    theirs = np.zeros(MiB, np.uint8)
    eng.register(mine)
    eng.register(theirs)
    eng.read(peer.segment, theirs.ctypes.data, raddr, MiB)
    failures: list[BaseException] = []
    stop = threading.Event()

    def other_caller():
        while not stop.is_set():
            try:
                eng.read(peer.segment, theirs.ctypes.data, raddr, MiB)
            except Exception as ex:
                failures.append(ex)
                return

    t = threading.Thread(target=other_caller)
    t.start()
    timeouts = 0
    try:
        for _ in range(20):
            try:
                eng.read(peer.segment, mine.ctypes.data, raddr, 32 * MiB, timeout=1e-4)
            except TransferTimeout:
                timeouts += 1
    finally:
        stop.set()
        t.join(30)
    assert timeouts > 0
    assert failures == []


def test_after_a_timeout_no_byte_lands(eng):
    p = Peer(protocol="tcp")
    try:
        raddr = p.alloc(32 * MiB, seed=15)
        buf = np.zeros(32 * MiB, np.uint8)
        eng.register(buf)
        eng.read(p.segment, buf.ctypes.data, raddr, MiB)
        p.stop()
        with pytest.raises(TransferTimeout):
            eng.read(p.segment, buf.ctypes.data, raddr, 32 * MiB, timeout=0.5)
        b = eng.submit(p.segment, "read", [buf.ctypes.data], [raddr], [32 * MiB], timeout=0.5)
        with pytest.raises(TransferTimeout):
            b.wait()
        p.cont()
        assert _settled(buf, 0xC3)
        eng.read(p.segment, buf.ctypes.data, raddr, 32 * MiB)
        assert sha(buf) == p.sha(raddr, 32 * MiB)
    finally:
        p.kill()


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
    from mooncake.engine import MAX_NOTIFIES

    t = TransferEngine("127.0.0.1", protocol="tcp")
    try:
        for i in range(MAX_NOTIFIES):
            eng.notify(t.segment_name, "n", str(i))
        with pytest.raises(Exception, match="queue full"):
            eng.notify(t.segment_name, "n", "one too many")
        assert t.notifies_dropped == 1
        assert len(t.get_notifies()) == MAX_NOTIFIES
        eng.notify(t.segment_name, "n", "room again")
        assert [n.msg for n in t.get_notifies()] == ["room again"]
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
