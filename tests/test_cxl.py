"""The ``cxl`` transport on a tmpfs file standing in for a DAX window: devdax rules, offset
addressing, bad paths and sizes, and two processes exchanging data through the window."""

from __future__ import annotations

import ctypes
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from jsonpeer import JsonPeer

from mooncake._core.batch import Batch, slice_requests
from mooncake.config import load_config
from mooncake.errors import ConfigError, InvalidAddress, TransportUnavailable
from mooncake.segments import decode, host_identity
from mooncake.transport import Region, TransportContext
from mooncake.transports import cxl
from mooncake.transports.cxl import CxlTransport

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
COMPLETED, FAILED = 4, 6
E_REFUSED, E_DENIED = 1000, 1007
READ, WRITE = 0, 1

PEER = r"""
import ctypes, json, os, sys, zlib
from mooncake.segments import host_identity
from mooncake.transport import Region, TransportContext
from mooncake.transports.cxl import CxlTransport
path, size = sys.argv[1], int(sys.argv[2])
from mooncake.config import load_config
cfg = load_config({"MC_SLICE_SIZE": 65536, "MC_FRAGMENT_RATIO": 4, "MC_CXL_DEV_PATH": path,
                   "MC_CXL_DEV_SIZE": size})
t = CxlTransport(TransportContext(cfg, "cxlpeer:1", "127.0.0.1", host_identity(), None, None,
                                  None))
fields = t.start()
w = t.window
regions = []
def out(x):
    sys.stdout.write(json.dumps(x) + "\n"); sys.stdout.flush()
for line in sys.stdin:
    c = json.loads(line)
    if c["op"] == "register":
        r = Region(w.address(c["off"]), c["n"], "cxl", flags=c.get("flags", 7))
        r.fields["cxl"] = t.register(r)
        regions.append(r)
        out(r.addr)
    elif c["op"] == "desc":
        out({"name": "cxlpeer:1", "host_id": host_identity(), "pid": os.getpid(), "timestamp": 0,
             "buffers": [r.describe() for r in regions], "transports": {"cxl": fields}})
    elif c["op"] == "crc":
        out(zlib.crc32(ctypes.string_at(w.address(c["off"]), c["n"])))
    elif c["op"] == "fill":
        ctypes.memset(w.address(c["off"]), c["byte"], c["n"])
        out(True)
    elif c["op"] == "exit":
        t.close(); out(True); break
"""


@pytest.fixture
def win_file():
    path = f"/dev/shm/mc_test_cxl_{os.getpid()}"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    yield path
    os.unlink(path)
    cxl._windows.clear()


def ctx(**cfg) -> TransportContext:
    base = load_config({"MC_SLICE_SIZE": 65536, "MC_FRAGMENT_RATIO": 4,
                        "MC_WORKERS_PER_CTX": 2, **cfg})
    return TransportContext(base, "me:1", "127.0.0.1", host_identity(), None, None, None)


@pytest.fixture
def xport(win_file):
    t = CxlTransport(ctx(MC_CXL_DEV_PATH=win_file, MC_CXL_DEV_SIZE=16 * MiB))
    t.start()
    yield t
    t.close()


class Peer(JsonPeer):
    def __init__(self, path: str, size: int) -> None:
        super().__init__(PEER, path, str(size))


def move(t, desc, op, local, remote, length):
    b = Batch(len(local))
    s = slice_requests(b, op, local, remote, length, t.slice_size, t.fragment_ratio)
    assert t.transfer(desc, s, 30)
    return b.statuses()


def test_two_processes_exchange_through_the_window(win_file, xport):
    peer = Peer(win_file, 16 * MiB)
    try:
        raddr = peer("register", off=4 * MiB, n=4 * MiB)
        d = decode("cxlpeer:1", peer("desc"))
        assert xport.can_reach(d) is None
        assert d.find_buffer(raddr, 1).transports["cxl"]["offset"] == 4 * MiB
        src = np.random.default_rng(5).integers(0, 255, 3 * MiB + 5, dtype=np.uint8)
        st = move(xport, d, WRITE, [src.ctypes.data], [raddr + 100], [src.nbytes])
        assert st == [(COMPLETED, src.nbytes, 0)]
        # the peer sees it in its own mapping of the window
        assert peer("crc", off=4 * MiB + 100, n=src.nbytes) == zlib.crc32(src)
        assert peer("fill", off=5 * MiB, n=MiB, byte=0xAB)
        dst = np.zeros(MiB, dtype=np.uint8)
        st = move(xport, d, READ, [dst.ctypes.data], [raddr + MiB], [MiB])
        assert st[0][0] == COMPLETED and (dst == 0xAB).all()
        # Mooncake-style: the remote address is an offset from cxl_base_addr
        dst[:] = 0
        st = move(xport, d, READ, [dst.ctypes.data], [5 * MiB], [MiB])
        assert st[0][0] == COMPLETED and (dst == 0xAB).all()
        assert xport.peer_address(d, 5 * MiB) == raddr + MiB
    finally:
        peer.close()


def test_outside_registered_range_or_window_is_refused(win_file, xport):
    peer = Peer(win_file, 16 * MiB)
    try:
        raddr = peer("register", off=2 * MiB, n=2 * MiB)
        d = decode("cxlpeer:1", peer("desc"))
        src = np.ones(MiB, dtype=np.uint8)
        st = move(xport, d, WRITE, [src.ctypes.data] * 3,
                  [raddr + 2 * MiB, raddr - 4096, 15 * MiB], [4096, 4096, 4096])
        assert all(s[0] == FAILED and s[2] == E_REFUSED for s in st)
        assert peer("crc", off=0, n=16 * MiB) == zlib.crc32(bytes(16 * MiB))
    finally:
        peer.close()


def test_registration_rules(xport):
    w = xport.window
    ok = Region(w.address(2 * MiB), 4 * MiB, "cxl")
    assert xport.register(ok) == {"offset": 2 * MiB}
    with pytest.raises(InvalidAddress, match="not aligned"):
        xport.register(Region(w.address(2 * MiB + 4096), 2 * MiB, "cxl"))
    with pytest.raises(InvalidAddress, match="not aligned"):
        xport.register(Region(w.address(2 * MiB), MiB, "cxl"))
    dram = np.zeros(MiB, dtype=np.uint8)
    with pytest.raises(InvalidAddress, match="not inside the CXL window"):
        xport.register(Region(dram.ctypes.data, MiB, "cxl"))
    assert xport.register(Region(dram.ctypes.data, MiB, "cpu:0")) is None
    with pytest.raises(InvalidAddress, match="outside the CXL window"):
        w.address(16 * MiB)
    with pytest.raises(InvalidAddress, match="outside"):
        w.offset(w.addr + 15 * MiB, 2 * MiB)


def test_window_is_shared_mapping(xport, win_file):
    w = xport.window
    ctypes.memset(w.address(8 * MiB), 0x5A, 4096)
    with open(win_file, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(4096) == b"\x5a" * 4096
    assert cxl.window(win_file, 16 * MiB) is w  # one mapping per process


def test_bad_paths_and_sizes(tmp_path, win_file):
    with pytest.raises(ConfigError, match="directory"):
        cxl.window(str(tmp_path))
    with pytest.raises(ConfigError, match="No such file"):
        cxl.window(str(tmp_path / "missing"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a file or device"):
        cxl.window(str(fifo))
    with pytest.raises(ConfigError, match="too small"):
        cxl.window(win_file, 32 * MiB)
    with pytest.raises(ConfigError, match="multiple of the device alignment"):
        cxl.window(win_file, 3 * MiB)
    empty = tmp_path / "empty"
    empty.touch()
    with pytest.raises(ConfigError, match="MC_CXL_DEV_SIZE is unset"):
        cxl.window(str(empty))
    # size taken from the file when unset
    assert cxl.window(win_file).size == 16 * MiB


def test_not_started_without_path():
    t = CxlTransport(ctx())
    with pytest.raises(TransportUnavailable, match="MC_CXL_DEV_PATH"):
        t.start()
    t = CxlTransport(ctx(**{"MC_CXL_DEV_PATH": "/x", "transports/cxl/enable": False}))
    with pytest.raises(TransportUnavailable, match="disabled"):
        t.start()


def test_reach_reasons(xport, win_file):
    peer = Peer(win_file, 16 * MiB)
    try:
        raw = peer("desc")
        assert xport.can_reach(decode("cxlpeer:1", raw)) is None
        other = json.loads(json.dumps(raw))
        other["transports"]["cxl"]["size"] = 32 * MiB
        assert "another CXL window" in xport.can_reach(decode("cxlpeer:1", other))
        other = dict(raw, host_id="elsewhere/1")
        assert "another host" in xport.can_reach(decode("cxlpeer:1", other))
        nocxl = dict(raw, transports={})
        assert "does not publish cxl" in xport.can_reach(decode("cxlpeer:1", nocxl))
    finally:
        peer.close()


def test_write_into_read_only_range_is_refused_untouched(win_file, xport):
    """A range the peer registered read-only ("access": "ro") is a READ source only."""
    peer = Peer(win_file, 16 * MiB)
    try:
        raddr = peer("register", off=2 * MiB, n=2 * MiB, flags=2)  # REMOTE_READ only
        assert peer("fill", off=2 * MiB, n=2 * MiB, byte=0x21)
        raw = peer("desc")
        assert raw["buffers"][0]["access"] == "ro"
        d = decode("cxlpeer:1", raw)
        src = np.full(MiB, 0x42, dtype=np.uint8)
        for remote in (raddr, 2 * MiB):  # by peer address and by raw window offset
            st = move(xport, d, WRITE, [src.ctypes.data], [remote], [MiB])
            assert st[0][0] == FAILED and st[0][2] == E_DENIED
        assert peer("crc", off=2 * MiB, n=2 * MiB) == zlib.crc32(b"\x21" * (2 * MiB))
        st = move(xport, d, READ, [src.ctypes.data], [raddr], [MiB])
        assert st[0][0] == COMPLETED and (src == 0x21).all()
    finally:
        peer.close()


@pytest.mark.parametrize("where,change", [
    ("segment", {"size": "16"}), ("segment", {"cxl_base_addr": -1}),
    ("segment", {"align": 0}), ("segment", {"cxl_name": "a\nb"}), ("segment", {"ident": "x"}),
    ("buffer", {"offset": 1 << 70}), ("buffer", {"offset": -4096}), ("buffer", {"offset": "0"}),
    ("buffer", {"offset": 15 * MiB}),
])
def test_malformed_or_outside_fields_are_refused(win_file, xport, where, change):
    from mooncake.errors import SegmentNotFound

    peer = Peer(win_file, 16 * MiB)
    try:
        raddr = peer("register", off=4 * MiB, n=2 * MiB)
        raw = json.loads(json.dumps(peer("desc")))
        if where == "segment":
            raw["transports"]["cxl"].update(change)
        else:
            raw["buffers"][0]["transports"]["cxl"].update(change)
        try:
            d = decode("cxlpeer:1", raw)
        except SegmentNotFound:
            return  # the one validator refused it
        why = xport.can_reach(d)
        src = np.ones(4096, dtype=np.uint8)
        if why is None:
            st = move(xport, d, WRITE, [src.ctypes.data], [raddr], [4096])
            assert st[0][0] == FAILED and st[0][2] == E_REFUSED
        else:
            assert "malformed" in why or "another" in why, why
        assert peer("crc", off=0, n=16 * MiB) == zlib.crc32(bytes(16 * MiB))
    finally:
        peer.close()
