"""Shared bandwidth quota over RDMA (``shared_quota_shm_path``): the rdma workers ask for and
charge every window of work requests; real processes on Soft-RoCE, all on the VM's one rxe0.

A target engine in this process; writer processes (a forkserver's children: one Python start
for all of them) each keep DEPTH batches of BLOCK bytes of RDMA WRITEs in flight to it:

* alone, a writer with the quota gets at least 0.9x the rate of one without it (A/B rounds);
* two writers at weights 1 and 4 share the bytes 1 : 4 within 15 % while both are busy;
* so do a writer at weight 1 and one whose engine is at weight 1 but whose batches ask for 4
  (``submit(..., priority=4)``: that class gets a worker and quota slot of its own);
* SIGKILL of the heavier one gives its share back to the other within a second;
* an engine in this process held back by a heavier rival slot: its WRITEs and READs (sync and
  async) wait for the quota and land intact; with no slot left it runs unregulated (a warning).

Run inside the VM: ``tools/rxe-vm.sh -- python -m pytest -m rdma tests/test_rdma_quota.py``.
Elsewhere they skip.  The tcp versions of these tests are in tests/test_quota.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import warnings
from collections import deque

import numpy as np
import pytest
from rdma_util import RXE_DEV, needs_rxe
from test_quota import _wait_flag

from mooncake import quota as Q

pytestmark = needs_rxe

MiB = 1 << 20
BLOCK = 1 * MiB        # one batch (16 slices of the default 64 KiB)
DEPTH = 8              # batches each writer keeps in flight: more than the quota lets it post
WEIGHTS = {"light": 1, "heavy": 4}
ROUND_S = 0.8          # one A/B round of the alone test
ROUNDS = 6             # per side (ABBA order)
SHARE_S = 4.0          # the weighted-share measurement
INTACT = 8 * MiB       # the in-process engine's transfers
#: the table's stale time: a participant that has not asked for this long stops competing.
#: 4x the default: the VM's vCPUs are emulated (TCG) on shared host cores, and a worker thread
#: descheduled for the default 50 ms would stop competing although it has work on the link
STALE = 0.2


def _writer(seg: str, raddr: int, dev: str, qpath: str | None, weight: int | None, counter,
            go, stop, ready, busy, batch_priority: int | None = None) -> None:
    """Keep DEPTH writes of BLOCK bytes to ``seg`` in flight while ``go``; ``counter``: bytes
    completed; ``busy``: batches outstanding."""
    warnings.simplefilter("ignore")
    if weight is not None:
        os.environ["MC_SHARED_QUOTA_PRIORITY"] = str(weight)
    from mooncake.engine import TransferEngine

    kw = {"shared_quota_shm_path": qpath} if qpath else {}
    e = TransferEngine("127.0.0.1", metadata="p2p", protocol="rdma", device_name=dev, **kw)
    buf = np.full(BLOCK, 7, np.uint8)
    e.register(buf)
    src = buf.ctypes.data
    e.write(seg, src, raddr, BLOCK, timeout=120,      # the endpoint (and the quota slot)
            priority=batch_priority)
    ready.value = 1
    q: deque = deque()
    while not stop.value:
        if not go.value:
            while q:
                q.popleft().wait(60)
                counter.value += BLOCK
            busy.value = 0
            time.sleep(0.005)
            continue
        busy.value = 1
        while len(q) < DEPTH:
            q.append(e.submit(seg, "write", [src], [raddr], [BLOCK], priority=batch_priority))
        q.popleft().wait(60)
        counter.value += BLOCK
    while q:
        q.popleft().wait(60)
    e.close()


class _Proc:
    """One writer process and its lock-free flags (a SIGKILLed process may die anywhere)."""

    def __init__(self, ctx, name: str, seg: str, raddr: int, qpath: str | None,
                 weight: int | None, batch_priority: int | None = None) -> None:
        self.name = name
        self.go, self.stop = ctx.RawValue("i", 0), ctx.RawValue("i", 0)
        self.ready, self.busy = ctx.RawValue("i", 0), ctx.RawValue("i", 0)
        self.bytes = ctx.RawValue("Q", 0)
        self.proc = ctx.Process(target=_writer, name=f"rdma-quota-{name}", daemon=True,
                                args=(seg, raddr, RXE_DEV, qpath, weight, self.bytes, self.go,
                                      self.stop, self.ready, self.busy, batch_priority))
        self.proc.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def park(self, timeout: float = 60) -> None:
        """Stop writing and wait until nothing of it is in flight."""
        self.go.value = 0
        deadline = time.monotonic() + timeout
        while self.busy.value and self.proc.is_alive():
            assert time.monotonic() < deadline, f"{self.name} did not drain"
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.value = 1
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


class Rig:
    def __init__(self, qpath: str, procs: dict[str, _Proc], seg: str, tbuf: np.ndarray) -> None:
        self.qpath = qpath
        self.p = procs
        self.seg = seg
        self.tbuf = tbuf     # the target's buffer: 3 writer blocks, then INTACT bytes
        self.table = Q.open_table(qpath)
        self.nic = Q.nic_key_for_rdma(RXE_DEV)

    def slot(self, name: str, weight: int | None = None) -> dict:
        pid = self.p[name].pid
        got = [s for s in self.table.slots(self.nic) if s["pid"] == pid and
               (weight is None or s["weight"] == weight)]
        assert got, f"{name} holds no quota slot on {self.nic}: {self.table.slots(self.nic)}"
        return got[0]

    def start(self, *names: str, warm: float) -> None:
        for n in names:
            self.p[n].go.value = 1
        deadline = time.monotonic() + 30
        while not all(self.p[n].busy.value for n in names):
            assert time.monotonic() < deadline, "writers did not start"
            assert all(self.p[n].proc.is_alive() for n in names)
            time.sleep(0.01)
        time.sleep(warm)

    def rates(self, seconds: float, *names: str) -> list[float]:
        """Bytes/s each writer completed over the next ``seconds``."""
        t0, b0 = time.monotonic(), [self.p[n].bytes.value for n in names]
        time.sleep(seconds)
        t1, b1 = time.monotonic(), [self.p[n].bytes.value for n in names]
        return [(y - x) / (t1 - t0) for x, y in zip(b0, b1, strict=True)]

    def park_all(self) -> None:
        for p in self.p.values():
            if p.proc.is_alive():
                p.park()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """The target (this process) and four writers: ``light`` (weight 1) and ``heavy``
    (weight 4) with the quota, ``bare`` without one, ``classed`` (weight 1, its batches 4)."""
    from mooncake.engine import TransferEngine

    warnings.simplefilter("ignore")
    qpath = str(tmp_path_factory.mktemp("rdma-quota") / "quota")
    Q.open_table(qpath, stale=STALE)
    target = TransferEngine("127.0.0.1", metadata="p2p", protocol="rdma", device_name=RXE_DEV)
    tbuf = np.zeros(4 * BLOCK + INTACT, np.uint8)
    target.register(tbuf)
    ctx = mp.get_context("forkserver")   # one interpreter start (TCG is slow), then forks
    ctx.set_forkserver_preload(["numpy", "pytest", "mooncake.engine", "mooncake.quota",
                                "mooncake.transports.rdma"])
    t0 = time.monotonic()
    procs: dict[str, _Proc] = {}
    try:
        for i, (name, w, bp) in enumerate([("light", 1, None), ("heavy", 4, None),
                                           ("bare", None, None), ("classed", 1, 4)]):
            procs[name] = _Proc(ctx, name, target.segment_name, tbuf.ctypes.data + i * BLOCK,
                                qpath if w else None, w, bp)
        for p in procs.values():
            assert _wait_flag(p.ready, 180), f"writer {p.name} did not come up"
        print(f"\nwriters up in {time.monotonic() - t0:.1f}s")
        yield Rig(qpath, procs, target.segment_name, tbuf)
    finally:
        for p in procs.values():
            p.close()
        target.close()


def test_alone_gets_the_full_rate(rig):
    """A writer alone with the quota (the others joined, or none, but idle) is never refused,
    and gets at least 0.9x the rate of a writer without a quota: A/B rounds, ABBA order."""
    rig.park_all()
    before = rig.slot("light")
    assert before["weight"] == WEIGHTS["light"]
    got: dict[str, list[float]] = {"light": [], "bare": []}
    for name in ["light", "bare", "bare", "light"] * (ROUNDS // 2):
        rig.start(name, warm=0.2)
        got[name] += rig.rates(ROUND_S, name)
        rig.p[name].park()
    after = rig.slot("light")
    # adjacent rounds pair up (ABBA): the median of their ratios ignores a round the host's load
    # slowed down (the VM shares its cores); the sums are printed too
    pairs = sorted(a / b for a, b in zip(got["light"], got["bare"], strict=True))
    median = (pairs[(len(pairs) - 1) // 2] + pairs[len(pairs) // 2]) / 2
    print(f"alone, MB/s per round: with the quota {[round(r / 1e6, 1) for r in got['light']]}, "
          f"without {[round(r / 1e6, 1) for r in got['bare']]}: median ratio of the pairs "
          f"{median:.3f}, of the sums {sum(got['light']) / sum(got['bare']):.3f}; slot "
          f"{after['bytes'] - before['bytes']} B charged, {after['waits'] - before['waits']} "
          f"refusals")
    assert after["bytes"] - before["bytes"] >= ROUNDS * ROUND_S * min(got["light"]) * 0.5
    assert after["waits"] == before["waits"] and after["forced"] == before["forced"]
    assert median >= 0.9


def test_two_processes_share_by_weight(rig):
    """Weights 1 and 4 on one rxe device: the bytes completed while both are busy are 1 : 4
    within 15 % (and so are the bytes the quota granted)."""
    rig.park_all()
    rig.start("light", "heavy", warm=1.0)
    s0 = [rig.slot(n) for n in ("light", "heavy")]
    rl, rh = rig.rates(SHARE_S, "light", "heavy")
    s1 = [rig.slot(n) for n in ("light", "heavy")]
    rig.park_all()
    charged = [b["bytes"] - a["bytes"] for a, b in zip(s0, s1, strict=True)]
    waits = [b["waits"] - a["waits"] for a, b in zip(s0, s1, strict=True)]
    ratio, granted = rh / rl, charged[1] / charged[0]
    print(f"weights 1 : 4, MB/s {rl / 1e6:.1f} : {rh / 1e6:.1f} = 1 : {ratio:.2f} "
          f"(shares {rl / (rl + rh):.3f} : {rh / (rl + rh):.3f}); charged {charged} = 1 : "
          f"{granted:.2f}; refusals {waits}")
    assert waits[0] > 0                  # the light one was held back by the quota
    assert ratio == pytest.approx(4, rel=0.15)
    assert granted == pytest.approx(4, rel=0.15)


def test_a_batch_priority_is_its_own_quota_class(rig):
    """Engines both at weight 1; one's batches ask for priority 4: its class has a slot of
    weight 4 on the NIC and takes 4 : 1 of the bytes within 15 %."""
    rig.park_all()
    rig.start("light", "classed", warm=1.0)
    rl, rc = rig.rates(SHARE_S, "light", "classed")
    rig.park_all()
    own = rig.slot("classed", 4)
    print(f"engine weight 1 vs batches at 4: MB/s {rl / 1e6:.1f} : {rc / 1e6:.1f} = 1 : "
          f"{rc / rl:.2f}; the class's slot {own}")
    assert own["bytes"] > 0
    assert rc / rl == pytest.approx(4, rel=0.15)


def test_sigkilled_participant_frees_its_share_within_a_second(rig):
    """SIGKILL of the heavy writer mid-stream: within a second (after the table's stale time)
    the light one is no longer held back, and for the rest of that second runs at several
    times its contended rate."""
    rig.park_all()
    rig.start("light", "heavy", warm=1.0)
    before = rig.rates(1.0, "light", "heavy")
    assert rig.slot("light")["contended"]
    heavy = rig.p["heavy"]
    os.kill(heavy.pid, signal.SIGKILL)
    t0 = time.monotonic()
    while rig.slot("light")["contended"]:
        assert time.monotonic() - t0 < 1.0, "a dead competitor still holds the share"
        time.sleep(0.002)
    freed = time.monotonic() - t0
    time.sleep(0.05)
    start = time.monotonic() - t0
    after = rig.rates(max(0.2, 1.0 - start), "light")[0]
    heavy.proc.join(10)
    dead = [s for s in rig.table.slots(rig.nic) if s["pid"] == heavy.pid]
    print(f"before the kill MB/s {[round(r / 1e6, 1) for r in before]}; light freed "
          f"{freed * 1e3:.0f} ms after SIGKILL (stale {STALE}s), {after / 1e6:.1f} MB/s "
          f"{start:.2f}-1.0 s after ({after / before[0]:.1f}x)")
    assert dead and not dead[0]["competing"]
    assert after > 3 * before[0]


def _engine(**cfg):
    from mooncake.engine import TransferEngine

    return TransferEngine("127.0.0.1", metadata="p2p", protocol="rdma", device_name=RXE_DEV,
                          **cfg)


def test_refused_windows_wait_and_complete_intact(rig):
    """A heavier rival slot on the same NIC makes this process's workers wait for the quota
    (WRITE, READ, an async batch of READs): every byte lands, and the workers did wait."""
    import threading

    rig.park_all()
    rival = rig.table.join(rig.nic, "foreground_get")     # weight 8
    stop = threading.Event()

    def compete() -> None:        # claims ~100 MB/s at weight 8: the engine (1) gets ~1/8 of it
        rival.enter()
        while not stop.is_set():
            if rival.wait_ns(MiB) == 0:
                rival.charge(MiB)
            time.sleep(0.01)
        rival.leave()

    th = threading.Thread(target=compete, daemon=True)
    th.start()
    off = 4 * BLOCK
    raddr = rig.tbuf.ctypes.data + off
    try:
        t_up = time.monotonic()
        e = _engine(shared_quota_shm_path=rig.qpath, MC_SHARED_QUOTA_PRIORITY="low")
        t_up = time.monotonic() - t_up
        try:
            src = np.frombuffer(np.random.default_rng(5).bytes(INTACT), np.uint8)
            dst = np.zeros(INTACT, np.uint8)
            e.register(src)
            e.register(dst)
            t0 = time.monotonic()
            e.write(rig.seg, src, raddr, timeout=120)
            assert np.array_equal(rig.tbuf[off:off + INTACT], src)
            rig.tbuf[off:off + INTACT] = src[::-1]
            e.read(rig.seg, dst, raddr, timeout=120)
            assert np.array_equal(dst, src[::-1])
            dst[:] = 0
            n = INTACT // MiB
            b = e.submit(rig.seg, "read", [dst.ctypes.data + i * MiB for i in range(n)],
                         [raddr + i * MiB for i in range(n)], [MiB] * n)
            b.wait(120)
            assert np.array_equal(dst, src[::-1])
            took = time.monotonic() - t0
            pid = os.getpid()
            mine = [s for s in rig.table.slots(rig.nic) if s["pid"] == pid and
                    s["sid"] != rival.sid]
            ws = e.transports["rdma"].stats()[RXE_DEV]["workers"]
            print(f"engine up in {t_up:.1f}s; 3 x {INTACT >> 20} MiB under a weight-8 rival in "
                  f"{took:.1f}s; slot "
                  f"{mine}; workers {[(w['quota_waits'], w['quota_held']) for w in ws]}")
            assert mine and mine[0]["weight"] == 1
            assert mine[0]["waits"] > 0 and mine[0]["bytes"] >= 3 * INTACT
            assert sum(w["quota_waits"] for w in ws) > 0
        finally:
            t_close = time.monotonic()
            e.close()
            print(f"engine closed in {time.monotonic() - t_close:.1f}s")
        assert not [s for s in rig.table.slots(rig.nic) if s["pid"] == os.getpid() and
                    s["sid"] != rival.sid], "close did not give the slot back"
    finally:
        stop.set()
        th.join(5)
        rival.release()


def test_full_table_runs_unregulated(rig, tmp_path, caplog):
    """No slot left on the NIC: the device runs without the quota, says so once, and the
    bytes land."""
    path = str(tmp_path / "q1")
    t = Q.open_table(path, slots=1)
    hog = t.join(rig.nic, 1)                    # this process holds the NIC's only slot
    off = 4 * BLOCK
    try:
        e = _engine(shared_quota_shm_path=path)
        try:
            src = np.frombuffer(np.random.default_rng(6).bytes(MiB), np.uint8)
            e.register(src)
            with caplog.at_level("WARNING", logger="mooncake.quota"):
                for _ in range(2):
                    e.write(rig.seg, src, rig.tbuf.ctypes.data + off, timeout=60)
            assert np.array_equal(rig.tbuf[off:off + MiB], src)
            assert caplog.text.count("runs without the shared quota") == 1, caplog.text
            assert all(w.quota_slot is None for w in e.transports["rdma"].devs[0].workers)
        finally:
            e.close()
    finally:
        hog.release()
