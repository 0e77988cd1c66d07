"""The ``shm`` transport between real processes: mapped managed buffers, cross-memory attach,
reachability reasons (host identity, EPERM), and faults (unregister, exit, bad ranges).

Every transport here has a real RPC listener (the ``shm.prove`` handshake runs over it), so
descriptors are named ``127.0.0.1:<port>`` like an engine's segment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from jsonpeer import JsonPeer

from mooncake._core.batch import Batch, slice_requests
from mooncake.config import load_config
from mooncake.rpc import RpcClient, RpcServer
from mooncake.segments import decode, host_identity
from mooncake.transport import Region, TransportContext
from mooncake.transports.shm import ShmTransport

ROOT = Path(__file__).resolve().parents[1]
COMPLETED, FAILED = 4, 6
E_REFUSED, E_PEER = 1000, 1001
READ, WRITE = 0, 1

# A peer process driven over stdin/stdout, one JSON command per line.  It imports everything
# first and may then drop to another uid (`--uid`), optionally staying dumpable (`--dumpable`).
# How a transport without an engine gets the RPC listener the shm proof runs over (prepended to
# the scripts of child processes; imports everything before a uid change).
RPC = r"""
import encodings.idna, socket  # noqa: E401  (lazy imports fail after dropping to nobody)
import mooncake.config; mooncake.config.all_options()  # noqa: E702  (reads the entry points)
from mooncake.rpc import RpcClient, RpcServer
from mooncake.segments import host_identity
from mooncake.transport import TransportContext
def rpc_ctx(cfg):
    srv = RpcServer("127.0.0.1", [0], 1 << 20)
    cli = RpcClient(1 << 20, 5.0)
    name = "127.0.0.1:%d" % srv.port
    return TransportContext(cfg, name, "127.0.0.1", host_identity(), None, srv.add_handler,
                            cli.call), srv
"""

PEER = RPC + r"""
import ctypes, json, mmap, os, sys, zlib
import numpy as np
from mooncake.config import load_config  # before any uid change: stdlib lives under /root
from mooncake.memory import allocate_shm
from mooncake.transport import Region
from mooncake.transports.shm import ShmTransport
args = sys.argv[1:]
if "--uid" in args:
    uid = int(args[args.index("--uid") + 1])
    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
    if "--dumpable" in args:
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
cfg = load_config({"MC_SLICE_SIZE": 65536, "MC_FRAGMENT_RATIO": 4, "MC_WORKERS_PER_CTX": 2})
ctx, srv = rpc_ctx(cfg)
NAME = ctx.segment_name
t = ShmTransport(ctx)
fields = t.start()
regions, keep = {}, {}
def out(x):
    sys.stdout.write(json.dumps(x) + "\n"); sys.stdout.flush()
def desc():
    return {"name": NAME, "host_id": host_identity(), "pid": os.getpid(), "timestamp": 0,
            "buffers": [r.describe() for r in regions.values()], "transports": {"shm": fields}}
out(NAME)
def reg(addr, n, owner, shm_name=None):
    r = Region(addr, n, "cpu:0", shm_name, owner)
    f = t.register(r)
    if f is not None: r.fields["shm"] = f
    regions[addr] = r
    return addr
for line in sys.stdin:
    c = json.loads(line)
    op = c["op"]
    if op == "array":
        a = np.zeros(c["n"], dtype=np.uint8)
        out(reg(a.ctypes.data, a.nbytes, a))
    elif op == "managed":
        mb = allocate_shm(c["n"])
        a = np.frombuffer(mb.mm, dtype=np.uint8, count=c["n"])
        keep[mb.addr] = mb
        out(reg(mb.addr, c["n"], (mb, a), mb.shm_name))
    elif op == "desc":
        out(desc())
    elif op == "fill":
        a = regions[c["addr"]].owner
        a = a[1] if isinstance(a, tuple) else a
        a[:] = np.random.default_rng(c["seed"]).integers(0, 255, a.nbytes, dtype=np.uint8)
        out(zlib.crc32(a))
    elif op == "crc":
        a = ctypes.string_at(c["addr"], c["n"])
        out(zlib.crc32(a))
    elif op == "unregister":
        r = regions.pop(c["addr"])
        t.unregister(r)
        out(True)
    elif op == "exit":
        t.close()
        srv.close()
        out(True)
        break
"""


class Peer(JsonPeer):
    def __init__(self, *args: str) -> None:
        super().__init__(PEER, *args)
        self.name = self.read()

    def desc(self):
        return decode(self.name, self("desc"))


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


class RpcShm(ShmTransport):
    """A transport with an RPC listener of its own, as an engine would give it."""

    def close(self) -> None:
        super().close()
        self._srv.close()
        self._cli.close()


def make_transport(**cfg) -> ShmTransport:
    base = load_config({"MC_SLICE_SIZE": 65536, "MC_FRAGMENT_RATIO": 4,
                        "MC_WORKERS_PER_CTX": 2, **cfg})
    srv = RpcServer("127.0.0.1", [0], 1 << 20)
    cli = RpcClient(1 << 20, 5.0)
    ctx = TransportContext(base, f"127.0.0.1:{srv.port}", "127.0.0.1", host_identity(), None,
                           srv.add_handler, cli.call)
    t = RpcShm(ctx)
    t._srv, t._cli = srv, cli
    t.start()
    return t


@pytest.fixture
def shm():
    t = make_transport()
    yield t
    t.close()


def move(t, desc, op, local, remote, length, timeout=30.0):
    b = Batch(len(local))
    s = slice_requests(b, op, local, remote, length, t.slice_size, t.fragment_ratio)
    assert t.transfer(desc, s, timeout)
    return b.statuses()


def test_managed_buffers_are_mapped_arrays_are_attached(peer, shm):
    a = peer("array", n=1 << 20)
    m = peer("managed", n=1 << 20)
    d = peer.desc()
    assert shm.can_reach(d) is None
    link = shm._link(d)
    table = shm._table(link, d)
    assert len(table) == 2 and len(link.maps) == 1
    (name, addr, *_), = link.maps
    assert addr == m and name == d.find_buffer(m, 1).shm_name
    assert table.find(a, 16) >= 0 and table.find(m, 16) >= 0


@pytest.mark.parametrize("kind", ["array", "managed"])
def test_peer_unregistered_buffer_fails_no_write(peer, shm, kind):
    """A stale descriptor still lists the buffer: the slot check refuses the copy."""
    raddr = peer(kind, n=1 << 20)
    d = peer.desc()
    src = np.ones(1 << 20, dtype=np.uint8)
    assert move(shm, d, WRITE, [src.ctypes.data], [raddr], [4096])[0][0] == COMPLETED
    assert peer("unregister", addr=raddr)
    src[:] = 2
    st = move(shm, d, WRITE, [src.ctypes.data], [raddr], [1 << 20])
    assert st[0][0] == FAILED and st[0][2] == E_REFUSED
    assert peer("crc", addr=raddr, n=4096) == zlib.crc32(b"\x01" * 4096)


def test_peer_unregisters_while_copies_are_queued(peer):
    t = make_transport(MC_WORKERS_PER_CTX=1)
    try:
        raddr = peer("array", n=32 << 20)
        d = peer.desc()
        src = np.ones(32 << 20, dtype=np.uint8)
        n = 24
        b = Batch(n)
        s = slice_requests(b, WRITE, [src.ctypes.data] * n, [raddr] * n, [32 << 20] * n,
                           65536, 4)
        t.submit(d, s)
        assert peer("unregister", addr=raddr)
        assert b.wait(60)
        st = b.statuses()
        assert {x[0] for x in st} <= {COMPLETED, FAILED}
        assert st[-1] == (FAILED, 0, E_REFUSED) or st[-1][0] == COMPLETED
        assert any(x[0] == FAILED and x[2] == E_REFUSED for x in st)
    finally:
        t.close()


def test_peer_killed(peer, shm):
    raddr = peer("managed", n=1 << 20)
    d = peer.desc()
    src = np.ones(1 << 20, dtype=np.uint8)
    assert move(shm, d, WRITE, [src.ctypes.data], [raddr], [1 << 20])[0][0] == COMPLETED
    peer.p.send_signal(signal.SIGKILL)
    peer.p.wait()
    st = move(shm, d, WRITE, [src.ctypes.data], [raddr], [1 << 20])
    assert st[0][0] == FAILED and st[0][2] == E_PEER
    assert "exited" in shm.can_reach(d)


def test_peer_closed_cleanly_fails(peer, shm):
    raddr = peer("array", n=1 << 20)
    d = peer.desc()
    dst = np.zeros(1 << 20, dtype=np.uint8)
    assert move(shm, d, READ, [dst.ctypes.data], [raddr], [4096])[0][0] == COMPLETED
    peer.close()
    st = move(shm, d, READ, [dst.ctypes.data], [raddr], [4096])
    assert st[0][0] == FAILED


def test_same_process_loopback(shm):
    a = np.arange(1 << 20, dtype=np.uint8)
    r = Region(a.ctypes.data, a.nbytes, "cpu:0", None, a)
    r.fields["shm"] = shm.register(r)
    me = shm.ctx.segment_name
    d = decode(me, {"name": me, "host_id": host_identity(), "pid": os.getpid(),
                    "timestamp": 0,
                    "buffers": [r.describe()],
                    "transports": {"shm": {"ctl": shm.ctl.name, "pid": os.getpid(),
                                           "token_addr": shm.ctl.token_addr}}})
    assert shm.can_reach(d) is None
    dst = np.zeros_like(a)
    assert move(shm, d, READ, [dst.ctypes.data], [a.ctypes.data], [a.nbytes])[0][0] == COMPLETED
    assert np.array_equal(dst, a)


def test_reach_reasons(peer, shm):
    peer("array", n=4096)
    raw = peer("desc")
    assert shm.can_reach(decode(peer.name, raw)) is None
    other = dict(raw, host_id="another-boot/123")
    assert "another host" in shm.can_reach(decode(peer.name, other))
    nosh = dict(raw, transports={})
    assert "does not publish shm" in shm.can_reach(decode(peer.name, nosh))
    noctl = dict(raw, name="127.0.0.1:2",
                 transports={"shm": {**raw["transports"]["shm"],
                                     "ctl": "mooncake_nonexistent_ctl"}})
    assert "ctl" in shm.can_reach(decode("127.0.0.1:2", noctl))
    wrongpid = dict(raw, name="127.0.0.1:3", pid=1,
                    transports={"shm": {**raw["transports"]["shm"], "pid": 1}})
    assert "not an fd of the peer's pid 1" in shm.can_reach(decode("127.0.0.1:3", wrongpid))


def test_disabled_by_config():
    ctx = TransportContext(load_config({"transports/shm/enable": False}), "me:1", "127.0.0.1",
                           host_identity(), None, None, None)
    t = ShmTransport(ctx)
    from mooncake.errors import TransportUnavailable

    with pytest.raises(TransportUnavailable, match="transports/shm/enable"):
        t.start()


UNPRIV = 65534  # nobody


def _initiator(peer_desc: dict, raddr: int) -> subprocess.CompletedProcess:
    """can_reach + one write from a process running as `nobody`, not dumpable."""
    code = RPC + r"""
import json, os, sys
import numpy as np
from mooncake._core.batch import Batch, slice_requests
from mooncake.segments import decode
from mooncake.transports.shm import ShmTransport
from mooncake.config import load_config
cfg = load_config({"MC_SLICE_SIZE": 65536, "MC_FRAGMENT_RATIO": 4})
raw = json.loads(sys.argv[1]); d = decode(raw["name"], raw); raddr = int(sys.argv[2])
os.setgroups([]); os.setresgid(UID, UID, UID); os.setresuid(UID, UID, UID)
ctx, srv = rpc_ctx(cfg)
t = ShmTransport(ctx)
t.start()
why = t.can_reach(d)
src = np.full(4096, 7, dtype=np.uint8)
b = Batch(1)
s = slice_requests(b, 1, [src.ctypes.data], [raddr], [4096], 65536, 4)
t.submit(d, s); b.wait(10)
print(json.dumps({"why": why, "status": b.status(0)}))
t.close()
""".replace("UID", str(UNPRIV))
    return subprocess.run([sys.executable, "-c", code, json.dumps(peer_desc), str(raddr)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the peers as another user")
@pytest.mark.parametrize("dumpable", [False, True])
def test_attach_refused_is_reported_not_silent(dumpable):
    """Both ends run as `nobody`; a peer that is not dumpable (the kernel's default after a uid
    change) refuses cross-memory attach: can_reach says EPERM and the copy FAILs.  The same setup
    with a dumpable peer works, which shows the refusal comes from the kernel's ptrace check."""
    p = Peer("--uid", str(UNPRIV), *(["--dumpable"] if dumpable else []))
    try:
        raddr = p("array", n=4096)
        r = _initiator(p("desc"), raddr)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if dumpable:
            assert res["why"] is None and res["status"][0] == COMPLETED
            assert p("crc", addr=raddr, n=4096) == zlib.crc32(b"\x07" * 4096)
        else:
            assert "EPERM" in res["why"] and "refused" in res["why"]
            assert res["status"][0] == FAILED
            assert p("crc", addr=raddr, n=4096) == zlib.crc32(b"\x00" * 4096)
    finally:
        p.close()


def test_many_processes_write_at_once(peer):
    """Four initiator processes write disjoint quarters of one peer buffer concurrently."""
    nproc, part = 4, 4 << 20
    raddr = peer("managed", n=nproc * part)
    araddr = peer("array", n=nproc * part)
    raw = json.dumps(peer("desc"))
    code = RPC + r"""
import json, sys, zlib
import numpy as np
from mooncake._core.batch import Batch, slice_requests
from mooncake.segments import decode
from mooncake.transports.shm import ShmTransport
raw = json.loads(sys.argv[1]); d = decode(raw["name"], raw)
i = int(sys.argv[2]); part = int(sys.argv[3])
from mooncake.config import load_config
cfg = load_config({"MC_SLICE_SIZE": 65536, "MC_FRAGMENT_RATIO": 4, "MC_WORKERS_PER_CTX": 2,
                   "transports/shm/async_memcpy_threshold": 0})
ctx, srv = rpc_ctx(cfg)
t = ShmTransport(ctx)
t.start()
src = np.random.default_rng(i).integers(0, 255, part, dtype=np.uint8)
for rep in range(5):
    for base in map(int, sys.argv[4:]):
        b = Batch(1)
        s = slice_requests(b, 1, [src.ctypes.data], [base + i * part], [part], 65536, 4)
        assert t.transfer(d, s, 30) and b.status(0)[0] == 4, b.status(0)
print(zlib.crc32(src))
t.close()
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, raw, str(i), str(part), str(raddr),
                               str(araddr)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
             for i in range(nproc)]
    crcs = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        crcs.append(int(out.strip()))
    for i, crc in enumerate(crcs):
        assert peer("crc", addr=raddr + i * part, n=part) == crc
        assert peer("crc", addr=araddr + i * part, n=part) == crc


# -- through the engine ------------------------------------------------------------------------

ENGINE_PEER = r"""
import ctypes, json, os, sys, zlib
import numpy as np
from mooncake import registry
from mooncake.engine import TransferEngine
for n in registry.transport_names():
    try: registry.get_transport(n)
    except Exception: pass
registry.get_metadata("p2p")
import encodings.idna, socket  # noqa: E401  (lazy imports fail after dropping to nobody)
socket.gethostbyname("127.0.0.1")
args = sys.argv[1:]
if "--uid" in args:
    uid = int(args[args.index("--uid") + 1])
    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
cfg = json.loads(args[0])
e = TransferEngine("127.0.0.1", protocol=cfg.pop("protocol", "auto"), **cfg)
a = np.zeros(4 << 20, dtype=np.uint8)
e.register(a)
m = e.allocate(4 << 20)
print(json.dumps({"segment": e.segment_name, "array": a.ctypes.data, "managed": m.addr}),
      flush=True)
for line in sys.stdin:
    c = json.loads(line)
    if c["op"] == "crc":
        print(zlib.crc32(ctypes.string_at(c["addr"], c["n"])), flush=True)
    elif c["op"] == "unregister":
        e.unregister(c["addr"]); print("true", flush=True)
    elif c["op"] == "exit":
        break
e.close()
"""


class EnginePeer(JsonPeer):
    def __init__(self, *args: str, **cfg) -> None:
        super().__init__(ENGINE_PEER, json.dumps(cfg), *args)
        info = self.read()
        self.segment, self.array, self.managed = info["segment"], info["array"], info["managed"]


@pytest.fixture
def engine_peer():
    p = EnginePeer()
    yield p
    p.close()


@pytest.mark.parametrize("protocol", ["auto", "shm"])
def test_engine_uses_shm_for_same_host(engine_peer, protocol):
    from mooncake.engine import TransferEngine

    with TransferEngine("127.0.0.1", protocol=protocol) as e:
        info = e.explain(engine_peer.segment)
        assert info["chosen"] == "shm", info
        src = np.random.default_rng(11).integers(0, 255, 3 << 20, dtype=np.uint8)
        e.register(src)
        for remote in (engine_peer.array, engine_peer.managed):
            e.write(engine_peer.segment, src, remote + 5)
            assert engine_peer("crc", addr=remote + 5, n=src.nbytes) == zlib.crc32(src)
            back = np.zeros_like(src)
            e.register(back)
            e.read(engine_peer.segment, back, remote + 5)
            assert np.array_equal(back, src)
            e.unregister(back)
        # the Mooncake-compatible face
        assert e.transfer_sync_write(engine_peer.segment, src.ctypes.data,
                                     engine_peer.managed, 4096) == 0
        assert e.transfer_sync_write(engine_peer.segment, src.ctypes.data,
                                     engine_peer.managed + (4 << 20), 4096) < 0


def test_engine_peer_unregistered_fails_cleanly(engine_peer):
    from mooncake.engine import TransferEngine
    from mooncake.errors import InvalidAddress, MooncakeError

    with TransferEngine("127.0.0.1", protocol="shm") as e:
        src = np.ones(1 << 20, dtype=np.uint8)
        e.register(src)
        e.write(engine_peer.segment, src, engine_peer.array)
        assert engine_peer("unregister", addr=engine_peer.array) is True
        with pytest.raises((InvalidAddress, MooncakeError)):
            e.write(engine_peer.segment, src, engine_peer.array)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the engines as another user")
def test_engine_falls_back_to_tcp_when_attach_is_refused():
    """A non-dumpable peer owned by `nobody` refuses attach: auto picks TCP and says why."""
    p = EnginePeer("--uid", str(UNPRIV))
    code = r"""
import json, os, sys, zlib
import numpy as np
from mooncake import registry
from mooncake.engine import TransferEngine
from mooncake.errors import TransportUnavailable
for n in registry.transport_names():
    try: registry.get_transport(n)
    except Exception: pass
registry.get_metadata("p2p")
import encodings.idna, socket  # noqa: E401  (lazy imports fail after dropping to nobody)
socket.gethostbyname("127.0.0.1")
seg, remote = sys.argv[1], int(sys.argv[2])
os.setgroups([]); os.setresgid(UID, UID, UID); os.setresuid(UID, UID, UID)
out = {}
with TransferEngine("127.0.0.1", protocol="auto") as e:
    info = e.explain(seg)
    out["chosen"] = info["chosen"]
    out["shm"] = [c["reason"] for c in info["candidates"] if c["transport"] == "shm"][0]
    src = np.full(1 << 20, 9, dtype=np.uint8)
    e.register(src)
    e.write(seg, src, remote)
    out["crc"] = zlib.crc32(src)
with TransferEngine("127.0.0.1", protocol="shm") as e:
    try:
        z = np.zeros(16, dtype=np.uint8)
        e.register(z)
        e.write(seg, z, remote)
    except TransportUnavailable as x:
        out["explicit"] = str(x)
    except Exception as x:
        out["explicit"] = "%s: %s" % (type(x).__name__, x)
print(json.dumps(out))
""".replace("UID", str(UNPRIV))
    try:
        r = subprocess.run([sys.executable, "-c", code, p.segment, str(p.array)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["chosen"] == "tcp", out
        assert "EPERM" in out["shm"]
        assert p("crc", addr=p.array, n=1 << 20) == out["crc"]
        assert "EPERM" in out.get("explicit", ""), out
    finally:
        p.close()
