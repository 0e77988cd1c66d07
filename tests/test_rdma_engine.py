"""Engine-level RDMA tests on Soft-RoCE: this process and peer processes, all on one rxe0.

Run inside the VM: ``tools/rxe-vm.sh -- python -m pytest -m rdma``.  Elsewhere they skip.
"""

from __future__ import annotations

import copy
import logging
import threading
import time

import numpy as np
import pytest
from rdma_peer import pattern, sha
from rdma_util import RXE_DEV, RXE_GID_INDEX, Peer, needs_rxe

pytestmark = needs_rxe

MiB = 1 << 20
PEER_SIZE = 64 * MiB + 8192
FAILED = 6  # Mooncake's TransferStatusEnum.FAILED


def engine(**cfg):
    from mooncake.engine import TransferEngine

    return TransferEngine("127.0.0.1", metadata="p2p", protocol="rdma", device_name=RXE_DEV,
                          **cfg)


@pytest.fixture(scope="module")
def procs():
    """Peer processes, started together at once (a Python start costs ~10-30 s under TCG)."""
    ps = {"peer": Peer("rdma_peer.py", str(PEER_SIZE)), "victim": Peer("rdma_peer.py", str(MiB))}
    yield ps
    for p in ps.values():
        p.close()


@pytest.fixture(scope="module")
def peer(procs):
    return procs["peer"]


@pytest.fixture(scope="module")
def eng():
    e = engine()
    yield e
    e.close()


@pytest.fixture(scope="module")
def local(eng):
    buf = np.zeros(PEER_SIZE, np.uint8)
    eng.register(buf)
    return buf


def roundtrip(eng, local, peer, n, lo, ro, seed):
    """WRITE local[lo:lo+n] to the peer at ro, check it there; then READ a fresh remote
    pattern back into local and check it here."""
    seg, base = peer.info["segment"], peer.info["addr"]
    local[lo:lo + n] = pattern(seed, n)
    eng.write(seg, local.ctypes.data + lo, base + ro, n)
    assert peer.ask(cmd="sha", off=ro, len=n)["sha"] == sha(local[lo:lo + n])
    peer.ask(cmd="fill", seed=seed + 1)
    local[lo:lo + n] = 0
    eng.read(seg, local.ctypes.data + lo, base + ro, n)
    assert sha(local[lo:lo + n]) == sha(pattern(seed + 1, PEER_SIZE)[ro:ro + n])


def test_rkeys_and_devices_published(eng, local):
    """What we publish is flat, typed and passes our own declared Field rows."""
    from mooncake.fields import check_fields
    from mooncake.transports.rdma import RdmaTransport

    d = eng.describe()
    seg = d["transports"]["rdma"]
    assert seg["ndevs"] == 1 and seg["dev0"] == RXE_DEV
    assert len(bytes.fromhex(seg["gid0"])) == 16
    assert eng.transports["rdma"].devs[0].gid_index == RXE_GID_INDEX
    check_fields(seg, RdmaTransport.segment_fields, "segment")
    buf = next(b for b in d["buffers"] if b["addr"] == local.ctypes.data)
    rd = buf["transports"]["rdma"]
    assert isinstance(rd["rkey0"], int) and "rkey1" not in rd
    check_fields(rd, RdmaTransport.buffer_fields, "buffer")


def test_several_qps_per_endpoint(peer):
    e = engine(MC_NUM_QP_PER_EP=4, MC_WORKERS_PER_CTX=4, MC_NUM_CQ_PER_CTX=4,
               MC_NUM_COMP_CHANNELS_PER_CTX=2, MC_SLICE_SIZE=16384)
    try:
        buf = np.zeros(2 * MiB, np.uint8)
        e.register(buf)
        roundtrip(e, buf, peer, 2 * MiB - 5, 5, 123, seed=41)
        t = e.transports["rdma"]
        eps = t.endpoints()
        assert eps and all(len(ep.qps) == 4 for _, _, ep in eps)
        posted = sum(w["posted"] for w in t.stats()[RXE_DEV]["workers"])
        assert posted >= 2 * (2 * MiB // 16384)
    finally:
        e.close()


class LocalPeer:
    """An engine in this process standing in for a peer (same interface as ``Peer``)."""

    def __init__(self, size: int) -> None:
        self.e = engine()
        self.buf = np.zeros(size, np.uint8)
        self.e.register(self.buf)
        self.info = {"segment": self.e.segment_name, "addr": self.buf.ctypes.data, "size": size}

    def ask(self, cmd: str, off: int = 0, len: int = 0, **_) -> dict:  # noqa: A002
        return {"sha": sha(self.buf[off:off + len])}

    def close(self) -> None:
        self.e.close()


@pytest.fixture(scope="module")
def three_peers(peer):
    more = [LocalPeer(2 * MiB) for _ in range(2)]
    yield [peer] + more
    for p in more:
        p.close()


@pytest.mark.parametrize("policy", ["SIEVE", "FIFO"])
def test_endpoint_eviction_under_load(three_peers, policy):
    """Three peers, room for two endpoints, transfers running in three threads: endpoints are
    evicted (drained first) and rebuilt, and every byte arrives."""
    e = engine(MC_MAX_EP_PER_CTX=2, MC_ENDPOINT_STORE_TYPE=policy, MC_NUM_QP_PER_EP=2)
    errors: list[BaseException] = []
    n = 256 * 1024
    try:
        bufs = [np.zeros(n, np.uint8) for _ in three_peers]
        for i, b in enumerate(bufs):
            b[:] = pattern(100 + i, n)
            e.register(b)

        def run(i: int) -> None:
            p = three_peers[i]
            try:
                for r in range(6):
                    e.write(p.info["segment"], bufs[i].ctypes.data, p.info["addr"] + r * 512, n,
                            timeout=120)
            except BaseException as ex:  # reported below
                errors.append(ex)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        t = e.transports["rdma"]
        st = t.stats()[RXE_DEV]
        assert st["evictions"] > 0 and st["endpoints"] <= 2
        for i, p in enumerate(three_peers):
            assert p.ask(cmd="sha", off=5 * 512, len=n)["sha"] == sha(bufs[i])
    finally:
        e.close()


def _slices(addr_local, addr_remote, n, op):
    from mooncake._core.batch import Batch, slice_requests

    b = Batch(1)
    return b, slice_requests(b, op, [addr_local], [addr_remote], [n], 65536, 4)


@pytest.mark.parametrize("lie", ["rkey", "length"])
def test_bad_remote_ends_failed(eng, local, peer, lie):
    """A wrong rkey, or a range past the peer's MR (its descriptor lies), ends FAILED — and the
    next honest transfer works on a rebuilt endpoint."""
    from mooncake.errors import InvalidAddress

    seg, base = peer.info["segment"], peer.info["addr"]
    with pytest.raises(InvalidAddress):
        eng.write(seg, local.ctypes.data, base + PEER_SIZE - 10, 100)
    t = eng.transports["rdma"]
    desc = copy.deepcopy(eng.segment(seg))
    buf = next(b for b in desc.buffers if b.addr == base)
    if lie == "rkey":
        buf.transports["rdma"]["rkey0"] ^= 0x5A5A00
        remote = base
    else:
        buf.length += 1 << 20
        remote = base + PEER_SIZE - 4096
    for op in (1, 0):  # WRITE, READ
        b, sl = _slices(local.ctypes.data, remote, 300000, op)
        t0 = time.monotonic()
        assert t.transfer(desc, sl, 120)
        assert b.status(0)[0] == FAILED, b.status(0)
        assert time.monotonic() - t0 < 120
    roundtrip(eng, local, peer, 100000, 0, 0, seed=5)


def test_killed_peer_fails_then_endpoint_rebuilt(eng, local, procs):
    """A peer killed mid-session: the next transfer ends FAILED (not by the timeout), and
    once a new peer process listens on the same port the endpoint is rebuilt."""
    from mooncake.errors import MooncakeError, TransferFailed, TransferTimeout

    t0 = time.monotonic()
    p = procs["victim"]
    port = p.info["segment"].rsplit(":", 1)[1]
    roundtrip(eng, local, p, 200000, 0, 0, seed=9)
    p.kill()
    t1 = time.monotonic()
    with pytest.raises(TransferFailed) as ei:
        eng.write(p.info["segment"], local.ctypes.data, p.info["addr"], 300000, timeout=60)
    t2 = time.monotonic()
    print(f"\nkilled peer: start+roundtrip {t1 - t0:.1f}s, failed after {t2 - t1:.1f}s "
          f"({type(ei.value).__name__}: {ei.value})")
    assert not isinstance(ei.value, TransferTimeout), ei.value
    p = procs["victim"] = Peer("rdma_peer.py", str(MiB), f"127.0.0.1:{port}")
    print(f"restarted in {time.monotonic() - t2:.1f}s")
    deadline = time.monotonic() + 60
    while True:  # the first calls may still meet the old descriptor or RPC connection
        try:
            roundtrip(eng, local, p, 300000, 0, 0, seed=10)
            break
        except MooncakeError:
            if time.monotonic() > deadline:
                raise


def test_clamping_and_cq_gating(peer, caplog):
    caplog.set_level(logging.WARNING)
    e = engine(MC_MAX_SGE=64, MC_MAX_CQE_PER_CTX=65535)
    try:
        t = e.transports["rdma"]
        dev = t.devs[0].dev
        assert t.clamped["MC_MAX_SGE"][:2] == (64, dev.limits["max_sge"])
        assert t.clamped["MC_MAX_CQE_PER_CTX"][:2] == (65535, dev.limits["max_cqe"])
        text = caplog.text
        assert f"MC_MAX_SGE=64 clamped to {dev.limits['max_sge']}" in text
        assert t.devs[0].gid_index == RXE_GID_INDEX  # auto picked the RoCE v2 IPv4 GID
    finally:
        e.close()
    caplog.clear()
    # a CQ shallower than one endpoint's QP depth: a warning, and posting waits for room
    e = engine(MC_MAX_CQE_PER_CTX=8, MC_MAX_WR=64, MC_SLICE_SIZE=4096)
    try:
        assert "MC_MAX_CQE_PER_CTX=8 (argument) is below" in caplog.text  # config's warning
        buf = np.zeros(MiB, np.uint8)
        e.register(buf)
        roundtrip(e, buf, peer, MiB, 0, 0, seed=21)
    finally:
        e.close()


def test_bad_gid_index_is_a_typed_error():
    from mooncake.errors import MooncakeError

    with pytest.raises(MooncakeError, match="MC_GID_INDEX=200"):
        engine(MC_GID_INDEX=200)


# ----------------------------------------------------------------- after failure, silence


def _reg(eng, n: int) -> np.ndarray:
    buf = np.zeros(n, np.uint8)
    eng.register(buf)
    return buf


def _quiet(buf: np.ndarray, secs: float = 1.0) -> bool:
    """Zero ``buf``, wait, and say whether it stayed zero (nothing landed late)."""
    buf[:] = 0
    time.sleep(secs)
    return not buf.any()


def test_abort_resets_only_the_cancelled_batch(eng, peer):
    """Two READs share one endpoint; one is cancelled and the transport aborts the peer's
    endpoints (the path the engine takes when a cancelled batch does not drain).  The
    cancelled one ends on its flush completions and stays silent; the other one is moved to a
    rebuilt endpoint and completes with the right bytes."""
    from mooncake._core import batch as _core
    from mooncake._core.batch import Batch, slice_requests

    t = eng.transports["rdma"]
    n = 16 * MiB
    seg, base = peer.info["segment"], peer.info["addr"]
    peer.ask(cmd="fill", seed=35)
    want = pattern(35, PEER_SIZE)[:n]
    a, b = _reg(eng, n), _reg(eng, n)
    desc = eng.segment(seg)
    ba, bb = Batch(1), Batch(1)
    t.submit(desc, slice_requests(ba, 0, [a.ctypes.data], [base], [n], 65536, 4))
    t.submit(desc, slice_requests(bb, 0, [b.ctypes.data], [base], [n], 65536, 4))
    ba.cancel(_core.E_TIMEOUT)
    t.abort(desc)
    assert ba.wait(60), "the cancelled batch did not end after abort"
    st, got, code = ba.status(0)
    ws = t.stats()[RXE_DEV]["workers"]
    print(f"\ncancelled batch: status {st} code {code}, {got} of {n} bytes; requeued "
          f"{sum(w['retried'] for w in ws)}, ended unposted {sum(w['canceled'] for w in ws)}")
    assert st in (4, 5), (st, code)  # COMPLETED (it won the race) or TIMEOUT
    assert _quiet(a, 0.5), "the cancelled batch wrote after it ended"
    assert bb.wait(120), "the other batch did not finish"
    assert bb.status(0) == (4, n, 0), bb.status(0)
    assert np.array_equal(b, want)
    assert not a.any(), "the cancelled batch wrote after it ended"
    eng.unregister(a)
    eng.unregister(b)


def test_read_only_region_refused_by_the_target_nic(eng, local, peer):
    """A buffer the peer registered read-only: WRITEs are refused here (the descriptor says
    so), by the kernel if a caller bypasses the engine (DENIED), and by the target's NIC when
    the descriptor lies (its MR has no remote-write access): the peer's bytes never change.
    READs from it work."""
    from mooncake._core import batch as _core
    from mooncake.errors import InvalidAddress

    seg = peer.info["segment"]
    n = 256 * 1024
    info = peer.ask(cmd="ro", seed=37, len=n)
    ro = info["addr"]
    before = peer.ask(cmd="sha_ro")["sha"]
    assert before == sha(pattern(37, n))
    desc = eng.segment(seg, refresh=True)
    rbuf = desc.find_buffer(ro, n)
    assert rbuf is not None and not rbuf.writable
    local[:n] = pattern(38, n)
    with pytest.raises(InvalidAddress, match="read-only"):
        eng.write(seg, local.ctypes.data, ro, n)
    t = eng.transports["rdma"]
    b, sl = _slices(local.ctypes.data, ro, n, 1)
    assert t.transfer(desc, sl, 60)
    assert b.status(0)[0] == FAILED and b.status(0)[2] == _core.E_DENIED, b.status(0)
    lie = copy.deepcopy(desc)
    lie.find_buffer(ro, n).writable = True
    b, sl = _slices(local.ctypes.data, ro, n, 1)
    assert t.transfer(lie, sl, 120)
    assert b.status(0)[0] == FAILED and b.status(0)[2] == _core.E_REFUSED, b.status(0)
    assert peer.ask(cmd="sha_ro")["sha"] == before, "the target NIC let a WRITE in"
    local[:n] = 0
    eng.read(seg, local.ctypes.data, ro, n)
    assert sha(local[:n]) == before


def test_register_read_only_pages(eng, peer, tmp_path):
    """A file mapped PROT_READ (weights, a checkpoint) registers: its MR has no local-write
    access (read-only pages cannot be pinned for writing: with it ibv_reg_mr fails EFAULT).  It
    is a WRITE source, and a local READ into it is refused.  (MAP_PRIVATE: Debian's 6.1 kernel
    pins read-only user memory with FOLL_FORCE, which works only for private mappings; from
    6.2 on shared read-only mappings register too.)"""
    import mmap

    from mooncake.errors import InvalidAddress

    n = 64 * 1024
    data = pattern(39, n)
    f = tmp_path / "ro.bin"
    f.write_bytes(data.tobytes())
    with open(f, "rb") as fh:
        m = mmap.mmap(fh.fileno(), n, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    r = eng.register(m)
    try:
        assert not r.writable
        seg, base = peer.info["segment"], peer.info["addr"]
        eng.write(seg, r.addr, base, n)
        assert peer.ask(cmd="sha", off=0, len=n)["sha"] == sha(data)
        with pytest.raises(InvalidAddress, match="read-only"):
            eng.read(seg, r.addr, base, n)
    finally:
        eng.unregister(r)


@pytest.mark.parametrize("field,value", [
    ("gid0", "zz" * 16), ("gid0", 5), ("lid0", 1 << 16), ("ndevs", 99), ("dev0", "../x"),
    ("instance", "not-hex"),
])
def test_forged_rdma_fields_are_refused(eng, local, field, value):
    """The engine's validator checks a peer's RDMA fields against what RdmaTransport declares
    before the transport reads them."""
    from mooncake.errors import SegmentNotFound
    from mooncake.rpc import RpcServer

    srv = RpcServer("127.0.0.1", [0], 1 << 20)
    seg = f"127.0.0.1:{srv.port}"
    rdma = {"instance": "0" * 32, "ndevs": 1, "dev0": RXE_DEV, "gid0": "0" * 32, "lid0": 0,
            field: value}
    srv.add_handler("segment.describe", lambda args: {
        "name": seg, "host_id": "x", "pid": 1, "timestamp": 1.0, "transports": {"rdma": rdma},
        "buffers": [{"addr": 1 << 30, "length": 4096, "location": "cpu:0",
                     "transports": {"rdma": {"rkey0": 1}}}]})
    try:
        with pytest.raises(SegmentNotFound, match=f"rdma.{field}"):
            eng.write(seg, local.ctypes.data, 1 << 30, 4096)
    finally:
        srv.close()


def test_cluster_token_guards_the_qp_exchange():
    """With MC_CLUSTER_TOKEN the QP exchange (over RPC) needs the token: engines sharing it
    move bytes over rdma; one without it gets AuthError before any QP is connected."""
    from mooncake.errors import AuthError

    token = {"MC_CLUSTER_TOKEN": "rdma cluster secret"}
    a, b, stranger = engine(**token), engine(**token), engine()
    try:
        src = np.frombuffer(pattern(77, MiB).tobytes(), np.uint8).copy()
        dst = np.zeros(MiB, np.uint8)
        a.register(src)
        b.register(dst)
        a.write(b.segment_name, src, dst.ctypes.data)
        assert sha(dst) == sha(src)
        assert a.explain(b.segment_name)["chosen"] == "rdma"
        probe = np.zeros(4096, np.uint8)
        stranger.register(probe)
        with pytest.raises(AuthError):
            stranger.read(b.segment_name, probe, dst.ctypes.data)
        assert not probe.any()
    finally:
        for e in (stranger, b, a):
            e.close()
