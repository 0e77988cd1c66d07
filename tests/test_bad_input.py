"""Bad input: typed errors on the Pythonic face, Mooncake's codes on the compatible face."""

from __future__ import annotations

import ctypes
import socket
import struct

import numpy as np
import pytest
from peer import raw_connect, sha

from mooncake.engine import TransferEngine
from mooncake.errors import (
    InvalidAddress,
    InvalidBatch,
    MooncakeError,
    SegmentNotFound,
    TransferFailed,
    TransportUnavailable,
)

KiB = 1024


@pytest.fixture(scope="module")
def remote(peer):
    return peer.alloc(64 * KiB, seed=2)


@pytest.fixture
def local(engine):
    buf = np.arange(64 * KiB, dtype=np.uint8)
    engine.register(buf)
    return buf


def test_unregistered_local_range(engine, peer, remote):
    stray = np.zeros(4096, np.uint8)
    with pytest.raises(InvalidAddress, match="local range .* not inside registered memory"):
        engine.write(peer.segment, stray.ctypes.data, remote, 4096)
    assert engine.transfer_sync_write(peer.segment, stray.ctypes.data, remote, 4096) == -1


def test_local_range_running_past_its_region(engine, peer, remote, local):
    with pytest.raises(InvalidAddress, match="local range"):
        engine.write(peer.segment, local.ctypes.data + 60 * KiB, remote, 8 * KiB)


def test_remote_range_outside_peer_buffers(engine, peer, remote, local):
    before = peer.sha(remote, 64 * KiB)
    for raddr, n in ((remote + 64 * KiB, 1), (remote - 1, 2), (remote + 60 * KiB, 8 * KiB),
                     (1 << 47, 4096)):
        with pytest.raises(InvalidAddress, match="remote range .* outside"):
            engine.write(peer.segment, local.ctypes.data, raddr, n)
        assert engine.transfer_sync_write(peer.segment, local.ctypes.data, raddr, n) == -1
    assert peer.sha(remote, 64 * KiB) == before


@pytest.mark.parametrize("n", [0, -1, -4096, 1 << 60, 2.5, "4096", None])
def test_bad_lengths(engine, peer, remote, local, n):
    with pytest.raises(InvalidAddress, match="length"):
        engine.write(peer.segment, local.ctypes.data, remote, n)
    assert engine.transfer_sync_read(peer.segment, local.ctypes.data, remote, n) == -1
    with pytest.raises(InvalidAddress, match="length"):
        engine.transfer(peer.segment, "write", [local.ctypes.data] * 2, [remote] * 2, [8, n])


def test_unknown_segment(engine, local):
    with pytest.raises(SegmentNotFound):
        engine.write("127.0.0.1:1", local.ctypes.data, 4096, 16)
    with pytest.raises(SegmentNotFound, match="host:port"):
        engine.write("no-port-here", local.ctypes.data, 4096, 16)
    assert engine.transfer_sync_write("127.0.0.1:1", local.ctypes.data, 4096, 16) == -1
    assert engine.batch_transfer_async_write("127.0.0.1:1", [local.ctypes.data], [4096],
                                             [16]) == 0
    assert engine.get_first_buffer_address("127.0.0.1:1") == 0


@pytest.mark.parametrize("bid", [0, 1, 12345, -1, 2**64 - 1, "x", None])
def test_unknown_batch_id(engine, bid):
    with pytest.raises(InvalidBatch, match="unknown batch id"):
        engine.batch(bid)
    assert engine.get_batch_transfer_status([bid]) == -1
    assert engine.transfer_check_status(bid) == -1


def test_batch_id_is_freed_once(engine, peer, remote, local):
    bid = engine.batch_transfer_async_write(peer.segment, [local.ctypes.data], [remote], [64])
    assert bid > 0
    assert engine.get_batch_transfer_status([bid]) == 0
    assert engine.get_batch_transfer_status([bid]) == -1  # freed: an error, never a crash
    bid = engine.transfer_submit_write(peer.segment, local.ctypes.data, remote, 64)
    while (rc := engine.transfer_check_status(bid)) == 0:
        pass
    assert rc == 1 and engine.transfer_check_status(bid) == -1


def test_unequal_list_lengths(engine, peer, remote, local):
    a = local.ctypes.data
    with pytest.raises(InvalidAddress, match="differ in length"):
        engine.transfer(peer.segment, "write", [a, a], [remote], [8, 8])
    assert engine.batch_transfer_sync_write(peer.segment, [a, a], [remote], [8, 8]) == -1
    assert engine.batch_transfer_async_read(peer.segment, [a], [remote, remote], [8]) == 0
    with pytest.raises(InvalidAddress, match="empty batch"):
        engine.transfer(peer.segment, "write", [], [], [])


def test_bad_opcode(engine, peer, remote, local):
    with pytest.raises(InvalidAddress, match="op must be"):
        engine.transfer(peer.segment, "erase", [local.ctypes.data], [remote], [8])


def test_registration_errors(engine):
    buf = np.zeros(8192, np.uint8)
    engine.register(buf)
    with pytest.raises(InvalidAddress, match="overlaps"):
        engine.register(buf.ctypes.data + 4096, 8192)
    assert engine.register_memory(buf.ctypes.data, 100) != 0
    for addr, n in ((0, 10), (-5, 10), (buf.ctypes.data + 100000, 0), (12345, -1)):
        assert engine.register_memory(addr, n) != 0
    with pytest.raises(InvalidAddress, match="not the start of a registered region"):
        engine.unregister(buf.ctypes.data + 1)
    assert engine.unregister_memory(424242) != 0
    with pytest.raises(InvalidAddress, match="cannot take the address"):
        engine.register(object())
    with pytest.raises(InvalidAddress, match="C-contiguous"):
        engine.register(np.zeros((64, 64), np.uint8)[:, ::2])
    assert engine.batch_register_memory([buf.ctypes.data], [1, 2]) != 0


def test_batch_register_rolls_back(engine):
    a = np.zeros(4096, np.uint8)
    b = np.zeros(4096, np.uint8)
    engine.register(b)
    assert engine.batch_register_memory([a.ctypes.data, b.ctypes.data], [4096, 4096]) != 0
    assert not engine.regions.contains(a.ctypes.data, 1)  # the first was rolled back


def test_byte_helpers_check_registration(engine):
    buf = np.zeros(4096, np.uint8)
    engine.register(buf)
    assert engine.write_bytes_to_buffer(buf.ctypes.data, b"hello", 5) == 0
    assert engine.read_bytes_from_buffer(buf.ctypes.data, 5) == b"hello"
    stray = ctypes.create_string_buffer(64)
    assert engine.write_bytes_to_buffer(ctypes.addressof(stray), b"x", 1) == -1
    assert engine.read_bytes_from_buffer(ctypes.addressof(stray), 1) == b""
    assert engine.write_bytes_to_buffer(buf.ctypes.data, b"ab", 5) == -1


def test_protocol_is_obeyed_or_fails():
    with pytest.raises(TransportUnavailable, match="no transport named 'bogus'"):
        TransferEngine("127.0.0.1", protocol="bogus")
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "bogus", "") == -1
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    assert list(e.transports) == ["tcp"]
    e.close()


def test_unknown_metadata_scheme_is_config_error():
    from mooncake.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown scheme 'ftp'"):
        TransferEngine("127.0.0.1", metadata="ftp://x:1")


def test_calls_before_initialize_raise():
    e = TransferEngine()
    with pytest.raises(MooncakeError, match="not initialized"):
        e.write("127.0.0.1:1", 1, 1, 1)
    assert e.transfer_sync_write("127.0.0.1:1", 1, 1, 1) == -1
    assert e.get_rpc_port() == -1


def test_target_refuses_raw_request_outside_registered_memory(peer, remote):
    """A raw client bypassing every initiator check: the target answers REFUSED, memory intact."""
    from mooncake.engine import TransferEngine

    with TransferEngine("127.0.0.1", protocol="tcp") as e:
        info = e.segment(peer.segment).transports["tcp"]
    before = peer.sha(remote, 64 * KiB)
    s = raw_connect((info["host"], info["data_port"]))
    for addr, n in ((remote + 64 * KiB - 8, 16), (remote - 16, 16), (8, 16)):
        hdr = struct.pack("<IBBHIIQQ", 0x3154434D, 1, 0, 0, 7, 0, addr, n)
        s.sendall(hdr + b"\xee" * n)
        magic, status, seq, _ = struct.unpack("<IIII", _recv(s, 16))
        assert (magic, status, seq) == (0x3152434D, 1, 7)
        s.sendall(struct.pack("<IBBHIIQQ", 0x3154434D, 0, 0, 0, 8, 0, addr, n))  # READ
        assert struct.unpack("<IIII", _recv(s, 16))[1] == 1
    s.close()
    assert peer.sha(remote, 64 * KiB) == before


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "connection closed"
        out += chunk
    return out


def test_failed_transfer_error_is_typed(engine, peer, remote, local):
    entry = engine._segments.get(peer.segment)
    entry.table.add(remote + (1 << 30), 4096)  # the target never registered this
    try:
        with pytest.raises(TransferFailed, match="refused"):
            engine.write(peer.segment, local.ctypes.data, remote + (1 << 30), 4096)
    finally:
        engine._segments.drop(peer.segment)
    engine.write(peer.segment, local.ctypes.data, remote, 4096)  # the lane is still usable
    assert peer.sha(remote, 4096) == sha(local[:4096])


def test_device_memory_over_tcp_is_refused_not_corrupted(engine, peer, remote):
    """TCP moves host memory only: a range registered as CUDA memory gets a clear error."""
    fake_gpu = np.zeros(4096, np.uint8)  # host memory labelled cuda:0: TCP must refuse, not move
    engine.register(fake_gpu, location="cuda:0")
    with pytest.raises(TransportUnavailable, match="cannot move cuda memory .local range"):
        engine.write(peer.segment, fake_gpu, remote)
    host = np.zeros(4096, np.uint8)
    engine.register(host, location="segments:4096:0,0")  # Mooncake's NUMA layout: still host
    engine.write(peer.segment, host, remote)
