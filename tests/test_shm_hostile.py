"""``shm`` against peers that lie: forged names and paths, borrowed identities, memfds that shrink,
read-only buffers, and a target that unregisters while a peer is still writing.

Each test runs the peer in a real second process (a ShmTransport with its own RPC listener, as an
engine would run it) and forges descriptors the way a stranger could: they are data.  The
initiator is this process, except where a crash (SIGBUS) must be observed from outside.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
from jsonpeer import JsonPeer

from mooncake._core.batch import Batch, slice_requests
from mooncake.config import load_config
from mooncake.errors import SegmentNotFound
from mooncake.rpc import RpcClient, RpcServer
from mooncake.segments import decode, host_identity
from mooncake.transport import Region, TransportContext
from mooncake.transports.shm import NSLOTS, ShmTransport

COMPLETED, FAILED = 4, 6
E_REFUSED, E_PEER, E_DENIED = 1000, 1001, 1007
EFAULT = 14
READ, WRITE = 0, 1
MiB = 1 << 20

RPC = r"""
import encodings.idna, socket  # noqa: E401
from mooncake.rpc import RpcClient, RpcServer
from mooncake.segments import host_identity
from mooncake.transport import TransportContext
def rpc_ctx(cfg):
    srv = RpcServer("127.0.0.1", [0], 1 << 20)
    cli = RpcClient(1 << 20, 5.0)
    return TransportContext(cfg, "127.0.0.1:%d" % srv.port, "127.0.0.1", host_identity(), None,
                            srv.add_handler, cli.call), srv
"""

# The peer: owns memory, serves shm.prove, and does what a hostile process can do to its own
# files.  Replies one JSON line per command.
PEER = RPC + r"""
import ctypes, json, mmap, os, sys, zlib
import numpy as np
from mooncake.config import load_config
from mooncake.memory import allocate_shm
from mooncake.transport import Region
from mooncake.transports.shm import ShmTransport
cfg = load_config({"MC_SLICE_SIZE": 65536, "MC_FRAGMENT_RATIO": 4, "MC_WORKERS_PER_CTX": 2,
                   **json.loads(sys.argv[1])})
ctx, srv = rpc_ctx(cfg)
t = ShmTransport(ctx)
fields = t.start()
regions, fds = {}, {}
def out(x):
    sys.stdout.write(json.dumps(x) + "\n"); sys.stdout.flush()
def reg(addr, n, owner, shm_name=None, flags=7):
    r = Region(addr, n, "cpu:0", shm_name, owner, flags=flags)
    f = t.register(r)
    if f is not None: r.fields["shm"] = f
    regions[addr] = r
    return addr
out(ctx.segment_name)
for line in sys.stdin:
    c = json.loads(line)
    op = c["op"]
    try:
        if op == "array":
            a = np.zeros(c["n"], dtype=np.uint8)
            out(reg(a.ctypes.data, a.nbytes, a, flags=c.get("flags", 7)))
        elif op == "managed":
            mb = allocate_shm(c["n"])
            out(reg(mb.addr, c["n"], mb, mb.shm_name, flags=c.get("flags", 7)))
        elif op == "unsealed":  # a memfd its owner can still shrink
            fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
            os.ftruncate(fd, c["n"])
            m = mmap.mmap(fd, c["n"])
            addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
            fds[addr] = fd
            out(reg(addr, c["n"], m, "/proc/%d/fd/%d" % (os.getpid(), fd)))
        elif op == "truncate":
            r = regions[c["addr"]]
            fd = fds.get(c["addr"], getattr(r.owner, "fd", -1))
            try:
                os.ftruncate(fd, 0)
                out(True)
            except OSError as e:
                out(e.strerror)
        elif op == "open":  # hold a path open, as the fd a forged name points to
            out(os.open(c["path"], os.O_RDONLY | os.O_NONBLOCK))
        elif op == "desc":
            out({"name": ctx.segment_name, "host_id": host_identity(), "pid": os.getpid(),
                 "timestamp": 0, "buffers": [r.describe() for r in regions.values()],
                 "transports": {"shm": fields}})
        elif op == "crc":
            out(zlib.crc32(ctypes.string_at(c["addr"], c["n"])))
        elif op == "fill":
            ctypes.memset(c["addr"], c["byte"], c["n"])
            out(True)
        elif op == "unregister_fill":  # the memory is ours again once unregister returned
            r = regions.pop(c["addr"])
            try:
                t.unregister(r)
            except Exception as e:
                out({"error": "%s: %s" % (type(e).__name__, e)})
                continue
            ctypes.memset(r.addr, c["byte"], r.length)
            out({"ok": True})
        elif op == "exit":
            t.close()
            srv.close()
            out(True)
            break
    except Exception as e:
        out({"error": "%s: %s" % (type(e).__name__, e)})
"""

# An initiator in a process of its own, for faults that would kill it.
INITIATOR = RPC + r"""
import json, sys
import numpy as np
from mooncake._core.batch import Batch, slice_requests
from mooncake.config import load_config
from mooncake.segments import decode
from mooncake.transports.shm import ShmTransport
cfg = load_config({"MC_SLICE_SIZE": 65536, "MC_FRAGMENT_RATIO": 4, "MC_WORKERS_PER_CTX": 2})
ctx, srv = rpc_ctx(cfg)
t = ShmTransport(ctx)
t.start()
def out(x):
    sys.stdout.write(json.dumps(x) + "\n"); sys.stdout.flush()
out("ready")
for line in sys.stdin:
    c = json.loads(line)
    if c["op"] == "exit":
        t.close(); srv.close(); out(True); break
    d = decode(c["desc"]["name"], c["desc"])
    if c["op"] == "reach":
        out(t.can_reach(d))
    elif c["op"] == "maps":
        link = t._link(d)
        t._table(link, d)
        out(len(link.maps))
    elif c["op"] == "move":
        buf = np.full(c["n"], 7, dtype=np.uint8)
        b = Batch(1)
        s = slice_requests(b, c["rw"], [buf.ctypes.data], [c["addr"]], [c["n"]], 65536, 4)
        t.transfer(d, s, 30)
        out(list(b.status(0)))
    elif c["op"] == "hold":  # enter a chunk on the buffer's slot, then get killed
        link = t._link(d)
        slot = d.find_buffer(c["addr"], 1).transports["shm"]["slot"]
        link.busy.add_u32(4 * slot, 1)
        out(True)
"""


class Peer(JsonPeer):
    def __init__(self, **cfg) -> None:
        super().__init__(PEER, json.dumps(cfg))
        self.name = self.read()
        self.pid = self.p.pid

    def __call__(self, op: str, **kw):
        r = super().__call__(op, **kw)
        if isinstance(r, dict) and "error" in r and op != "unregister_fill":
            raise RuntimeError(r["error"])
        return r

    def send(self, op: str, **kw) -> None:
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()

    def ready(self, timeout: float) -> bool:
        """A reply is waiting (without reading it)."""
        return bool(select.select([self.p.stdout], [], [], timeout)[0])

    def raw(self) -> dict:
        return self("desc")


class Initiator(JsonPeer):
    def __init__(self) -> None:
        super().__init__(INITIATOR)
        assert self.read() == "ready"


class RpcShm(ShmTransport):
    def close(self) -> None:
        super().close()
        self._srv.close()
        self._cli.close()


def make_transport(**cfg) -> ShmTransport:
    base = load_config({"MC_SLICE_SIZE": 65536, "MC_FRAGMENT_RATIO": 4, "MC_WORKERS_PER_CTX": 2,
                        **cfg})
    srv = RpcServer("127.0.0.1", [0], 1 << 20)
    cli = RpcClient(1 << 20, 5.0)
    t = RpcShm(TransportContext(base, f"127.0.0.1:{srv.port}", "127.0.0.1", host_identity(),
                                None, srv.add_handler, cli.call))
    t._srv, t._cli = srv, cli
    t.start()
    return t


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


@pytest.fixture
def shm():
    t = make_transport()
    yield t
    t.close()


def move(t, desc, op, local, remote, length, slice_size=65536):
    b = Batch(len(local))
    s = slice_requests(b, op, local, remote, length, slice_size, 4)
    assert t.transfer(desc, s, 60)
    return b.statuses()


def decoded(name: str, raw: dict):
    """The descriptor, or None when the one validator already refuses it (a typed error)."""
    try:
        return decode(name, raw)
    except SegmentNotFound:
        return None


def forge_buffer(raw: dict, **changes) -> dict:
    return dict(raw, buffers=[dict(raw["buffers"][0], **changes)])


# -- 1. forged names and paths -------------------------------------------------------------------

def test_forged_shm_name_never_opens_a_local_file(peer, shm, tmp_path):
    """A buffer's shm_name naming a file of ours (directly, or as the peer's /proc fd of it, or
    as an fd of our own process) is never opened for writing: the WRITE goes by cross-memory
    attach into the peer's memory, where the descriptor says the buffer is, or fails."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"V" * MiB)
    raddr = peer("array", n=MiB)
    raw = peer.raw()
    held = peer("open", path=str(victim))
    with open(victim, "rb") as ours:
        names = [str(victim), f"/proc/{peer.pid}/fd/{held}",
                 f"/proc/{os.getpid()}/fd/{ours.fileno()}", "../../" + str(victim)]
        src = np.full(MiB, 7, dtype=np.uint8)
        for name in names:
            d = decoded(peer.name, forge_buffer(raw, shm_name=name))
            if d is None:
                continue  # refused by the validator: typed error, nothing opened
            assert shm.can_reach(d) is None
            st = move(shm, d, WRITE, [src.ctypes.data], [raddr], [MiB])
            assert st[0][0] in (COMPLETED, FAILED)
            if st[0][0] == COMPLETED:
                assert peer("crc", addr=raddr, n=MiB) == zlib.crc32(src)
            assert not shm._link(d).maps, f"{name} was mapped"
            assert victim.read_bytes() == b"V" * MiB, f"{name}: the WRITE landed in the file"
            peer("fill", addr=raddr, n=MiB, byte=0)


def _reach_in_thread(t, d, limit: float = 30.0) -> str | None:
    out: list = []
    th = threading.Thread(target=lambda: out.append(t.can_reach(d)), daemon=True)
    th.start()
    th.join(limit)
    assert not th.is_alive(), "can_reach hung on the forged control page"
    return out[0]


def test_fifo_as_control_page_never_hangs(peer, shm, tmp_path):
    fifo = tmp_path / "ctl.fifo"
    os.mkfifo(fifo)
    held = peer("open", path=str(fifo))  # the peer holds its read end: an open(O_RDONLY) blocks
    peer("array", n=4096)
    raw = peer.raw()
    info = raw["transports"]["shm"]
    for ctl in (str(fifo), f"/proc/{peer.pid}/fd/{held}"):
        forged = dict(raw, transports={"shm": dict(info, ctl=ctl)})
        d = decoded(peer.name, forged)
        if d is None:
            continue
        why = _reach_in_thread(shm, d)
        assert why and ("FIFO" in why or "/proc/<pid>/fd/<n>" in why or "ctl" in why), why
        src = np.ones(4096, dtype=np.uint8)
        st = move(shm, d, WRITE, [src.ctypes.data], [raw["buffers"][0]["addr"]], [4096])
        assert st[0][0] == FAILED and st[0][2] == E_PEER


def test_control_page_of_a_regular_file_or_wrong_size_is_refused(peer, shm, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    held = peer("open", path=str(junk))
    peer("array", n=4096)
    raw = peer.raw()
    forged = dict(raw, transports={"shm": dict(raw["transports"]["shm"],
                                               ctl=f"/proc/{peer.pid}/fd/{held}")})
    why = shm.can_reach(decode(peer.name, forged))
    assert "holds 4096 bytes" in why or "sealed" in why, why
    assert junk.read_bytes() == b"\0" * 4096


# -- 2. borrowed identity -------------------------------------------------------------------------

def test_descriptor_copying_our_identity_copies_nothing_inside_us(peer, shm):
    """Another engine publishes *our* pid, host id, control page and a buffer of ours with its
    real slot (all public in our descriptor).  The proof fails (the other engine cannot write a
    nonce into our page), so no copy runs inside this process."""
    mine = np.full(MiB, 0x11, dtype=np.uint8)
    r = Region(mine.ctypes.data, MiB, "cpu:0", None, mine)
    r.fields["shm"] = shm.register(r)
    ours = {"ctl": shm.ctl.name, "pid": os.getpid(), "token_addr": shm.ctl.token_addr}
    forged = {"name": peer.name, "host_id": host_identity(), "pid": os.getpid(), "timestamp": 0,
              "buffers": [r.describe()], "transports": {"shm": ours}}
    d = decode(peer.name, forged)
    why = shm.can_reach(d)
    assert why and "failed the shm proof" in why, why
    src = np.full(MiB, 0x22, dtype=np.uint8)
    st = move(shm, d, WRITE, [src.ctypes.data], [mine.ctypes.data], [MiB])
    assert st[0][0] == FAILED and st[0][2] == E_PEER
    assert (mine == 0x11).all()
    # the same fields served by ourselves are proven: the loopback path still works
    me = shm.ctx.segment_name
    d = decode(me, dict(forged, name=me))
    assert shm.can_reach(d) is None
    assert move(shm, d, WRITE, [src.ctypes.data], [mine.ctypes.data], [MiB])[0][0] == COMPLETED
    assert (mine == 0x22).all()


def test_descriptor_copying_another_peers_identity_is_refused(shm):
    """Engine B publishes engine A's shm fields (same host, both real): B fails the proof."""
    a, b = Peer(), Peer()
    try:
        a_addr = a("array", n=4096)
        raw_a, raw_b = a.raw(), b.raw()
        forged = dict(raw_b, pid=raw_a["pid"], buffers=raw_a["buffers"],
                      transports=raw_a["transports"])
        d = decode(b.name, forged)
        assert "failed the shm proof" in shm.can_reach(d)
        src = np.ones(4096, dtype=np.uint8)
        assert move(shm, d, WRITE, [src.ctypes.data], [a_addr], [4096])[0][0] == FAILED
        assert a("crc", addr=a_addr, n=4096) == zlib.crc32(b"\0" * 4096)
        assert shm.can_reach(decode(a.name, raw_a)) is None  # A itself is fine
    finally:
        a.close()
        b.close()


# -- 3. memory that shrinks under us --------------------------------------------------------------

def test_truncated_unsealed_memfd_fails_the_transfer_without_sigbus(peer):
    """The peer publishes a memfd it did not seal and truncates it: the initiator never mapped
    it (cross-memory attach instead), so the next transfer fails with EFAULT and the initiator
    lives on."""
    raddr = peer("unsealed", n=4 * MiB)
    raw = peer.raw()
    ini = Initiator()
    try:
        assert ini("reach", desc=raw) is None
        assert ini("maps", desc=raw) == 0  # unsealed: not mapped
        assert ini("move", desc=raw, rw=WRITE, addr=raddr, n=4 * MiB)[0] == COMPLETED
        assert peer("truncate", addr=raddr) is True
        for rw in (WRITE, READ):
            st = ini("move", desc=raw, rw=rw, addr=raddr, n=4 * MiB)
            assert st[0] == FAILED and st[2] == EFAULT, st
        assert ini.p.poll() is None, "the initiator died"
    finally:
        ini.close()
    assert ini.p.returncode == 0


def test_sealed_managed_buffer_cannot_shrink_and_is_mapped(peer, shm):
    raddr = peer("managed", n=4 * MiB)
    d = decode(peer.name, peer.raw())
    assert peer("truncate", addr=raddr) == "Operation not permitted"  # F_SEAL_SHRINK
    assert shm.can_reach(d) is None
    link = shm._link(d)
    shm._table(link, d)
    assert len(link.maps) == 1
    src = np.full(4 * MiB, 3, dtype=np.uint8)
    assert move(shm, d, WRITE, [src.ctypes.data], [raddr], [4 * MiB])[0][0] == COMPLETED
    assert peer("crc", addr=raddr, n=4 * MiB) == zlib.crc32(src)


# -- 4. target-side silence -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["managed", "array"])
def test_unregister_on_target_waits_for_peers_in_flight_writes(kind):
    """The initiator keeps large WRITEs in flight; the target unregisters, then re-fills the
    buffer at once: once unregister returned, no byte of the initiator's copy lands."""
    n = 32 * MiB
    t = make_transport(MC_WORKERS_PER_CTX=2)
    p = Peer()
    try:
        src = np.full(n, 0x01, dtype=np.uint8)
        for _ in range(2):
            raddr = p(kind, n=n)
            d = decode(p.name, p.raw())
            assert t.can_reach(d) is None
            nreq = 12
            b = Batch(nreq)
            s = slice_requests(b, WRITE, [src.ctypes.data] * nreq, [raddr] * nreq, [n] * nreq,
                               n, 4)  # one 32 MiB op per request: 32 chunks each
            t.submit(d, s)
            assert p("unregister_fill", addr=raddr, byte=0xAB) == {"ok": True}
            assert b.wait(60)
            assert {x[0] for x in b.statuses()} <= {COMPLETED, FAILED}
            assert all(x[2] in (0, E_REFUSED) for x in b.statuses())
            assert p("crc", addr=raddr, n=n) == zlib.crc32(b"\xab" * n), \
                "a peer's copy landed after unregister returned"
    finally:
        p.close()
        t.close()


def test_unregister_waits_for_a_peer_inside_a_chunk(peer, shm):
    """A peer that is inside a chunk on the buffer (its busy counter up) holds unregister back
    until it leaves; a peer that dies inside a chunk does not."""
    raddr = peer("array", n=MiB)
    d = decode(peer.name, peer.raw())
    assert shm.can_reach(d) is None
    link = shm._link(d)
    slot = d.find_buffer(raddr, 1).transports["shm"]["slot"]
    link.busy.add_u32(4 * slot, 1)  # as a worker does before copying a chunk
    peer.send("unregister_fill", addr=raddr, byte=0x5A)
    assert not peer.ready(1.0), "unregister returned while a peer was inside a chunk"
    link.busy.add_u32(4 * slot, -1)
    assert peer.read() == {"ok": True}

    raddr = peer("array", n=MiB)
    raw = peer.raw()
    ini = Initiator()
    assert ini("hold", desc=raw, addr=raddr) is True
    ini.p.send_signal(signal.SIGKILL)
    ini.p.wait()
    assert peer("unregister_fill", addr=raddr, byte=0x5A) == {"ok": True}  # dead holder


def test_unregister_times_out_on_a_stuck_peer_and_says_so(shm):
    p = Peer(MC_TRANSFER_TIMEOUT=0.5)
    try:
        raddr = p("array", n=MiB)
        d = decode(p.name, p.raw())
        assert shm.can_reach(d) is None
        link = shm._link(d)
        slot = d.find_buffer(raddr, 1).transports["shm"]["slot"]
        link.busy.add_u32(4 * slot, 1)
        r = p("unregister_fill", addr=raddr, byte=0)
        link.busy.add_u32(4 * slot, -1)
        assert "TransferTimeout" in r["error"] and str(os.getpid()) in r["error"], r
    finally:
        p.close()


# -- 5. read-only buffers -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["array", "managed"])
def test_write_into_read_only_peer_buffer_is_refused(peer, shm, kind):
    raddr = peer(kind, n=MiB, flags=2)  # REMOTE_READ only: published "access": "ro"
    peer("fill", addr=raddr, n=MiB, byte=0x33)
    raw = peer.raw()
    assert raw["buffers"][0]["access"] == "ro"
    d = decode(peer.name, raw)
    assert d.find_buffer(raddr, 1).writable is False
    assert shm.can_reach(d) is None
    src = np.full(MiB, 0x44, dtype=np.uint8)
    st = move(shm, d, WRITE, [src.ctypes.data], [raddr], [MiB])
    assert st[0][0] == FAILED and st[0][2] == E_DENIED
    assert peer("crc", addr=raddr, n=MiB) == zlib.crc32(b"\x33" * MiB)
    dst = np.zeros(MiB, dtype=np.uint8)
    assert move(shm, d, READ, [dst.ctypes.data], [raddr], [MiB])[0][0] == COMPLETED
    assert (dst == 0x33).all()
    for m in shm._link(d).maps.values():
        assert not m.writable  # mapped PROT_READ


# -- 6. fields a stranger sends -------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"slot": NSLOTS}, {"slot": -1}, {"slot": "0"}, {"gen": 0}, {"gen": 1 << 70}, {"slot": None},
])
def test_out_of_range_buffer_fields_make_the_buffer_unreachable(peer, shm, change):
    raddr = peer("array", n=4096)
    raw = peer.raw()
    b = raw["buffers"][0]
    forged = forge_buffer(raw, transports={"shm": dict(b["transports"]["shm"], **change)})
    d = decoded(peer.name, forged)
    if d is None:
        return  # the one validator refused it
    src = np.ones(4096, dtype=np.uint8)
    st = move(shm, d, WRITE, [src.ctypes.data], [raddr], [4096])
    assert st[0][0] == FAILED and st[0][2] == E_REFUSED
    assert peer("crc", addr=raddr, n=4096) == zlib.crc32(b"\0" * 4096)


@pytest.mark.parametrize("change", [
    {"pid": 1 << 40}, {"pid": "1"}, {"pid": 0}, {"token_addr": 1 << 64}, {"ctl": "/etc/passwd"},
    {"ctl": "/proc/self/fd/3"}, {"ctl": 5}, {"ctl": "/proc/1/fd/3" + "0" * 300},
])
def test_out_of_range_segment_fields_are_refused(peer, shm, change):
    peer("array", n=4096)
    raw = peer.raw()
    forged = dict(raw, transports={"shm": dict(raw["transports"]["shm"], **change)})
    d = decoded(peer.name, forged)
    if d is None:
        return
    why = shm.can_reach(d)
    assert why and "malformed" in why, why


def test_lanes_of_exited_initiators_are_reclaimed_and_exhaustion_is_a_reason(peer):
    """Every lane of the peer's page taken: by processes that exited (an initiator reclaims
    one), then by live ones (shm says why it cannot reach the peer; the engine falls back)."""
    from mooncake._core import copy as kc
    from mooncake.transports.shm import NLANES, OFF_OWNERS

    raddr = peer("array", n=MiB)
    raw = peer.raw()
    fd = os.open(raw["transports"]["shm"]["ctl"], os.O_RDWR)
    owners = kc.Mapping.from_fd(fd, 8 * NLANES, OFF_OWNERS, True)
    os.close(fd)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    try:
        for k in range(NLANES):
            owners.store_u64(8 * k, child.pid)  # exited
        ini = Initiator()
        try:
            assert ini("move", desc=raw, rw=WRITE, addr=raddr, n=MiB)[0] == COMPLETED
        finally:
            ini.close()
        assert sum(owners.load_u64(8 * k) == ini.p.pid for k in range(NLANES)) == 1
        for k in range(NLANES):
            owners.store_u64(8 * k, 1)  # init: alive, and never one of ours
        ini = Initiator()
        try:
            assert "lanes" in ini("reach", desc=raw)
        finally:
            ini.close()
    finally:
        for k in range(NLANES):
            owners.store_u64(8 * k, 0)
        owners.close()
    assert peer("crc", addr=raddr, n=MiB) == zlib.crc32(b"\x07" * MiB)


# -- 7. the same through engines ------------------------------------------------------------------

ENGINE_PEER = r"""
import ctypes, json, sys, zlib
import numpy as np
from mooncake.engine import TransferEngine
e = TransferEngine("127.0.0.1", protocol="shm", **json.loads(sys.argv[1]))
keep = {}
def out(x):
    sys.stdout.write(json.dumps(x) + "\n"); sys.stdout.flush()
out(e.segment_name)
for line in sys.stdin:
    c = json.loads(line)
    try:
        if c["op"] == "array":
            a = np.full(c["n"], c.get("byte", 0), dtype=np.uint8)
            if c.get("access") == "ro":
                a.flags.writeable = False
            e.register(a, access=c.get("access", "auto"))
            keep[a.ctypes.data] = a
            out(a.ctypes.data)
        elif c["op"] == "managed":
            out(e.allocate(c["n"]).addr)
        elif c["op"] == "crc":
            out(zlib.crc32(ctypes.string_at(c["addr"], c["n"])))
        elif c["op"] == "unregister_fill":
            e.unregister(c["addr"])
            ctypes.memset(c["addr"], c["byte"], c["n"])  # still alive: kept here / managed
            out({"ok": True})
        elif c["op"] == "exit":
            e.close(); out(True); break
    except Exception as x:
        out({"error": "%s: %s" % (type(x).__name__, x)})
"""


class EnginePeer(JsonPeer):
    def __init__(self, **cfg) -> None:
        super().__init__(ENGINE_PEER, json.dumps(cfg))
        self.segment = self.read()


@pytest.fixture
def engine_peer():
    p = EnginePeer()
    yield p
    p.close()

