"""Several hosts made of network namespaces: engines in each, a metadata server in one.

Every engine runs in its own process inside a namespace (``python tests/test_multihost.py
worker``) and is driven over its stdin/stdout with one JSON command per line.  Needs root; the
namespaces, bridge and veths are made by each test and removed afterwards (tests/netns.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402
import servers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUF = 8 << 20  # each engine registers this much; the upper half stays pristine
HALF = BUF // 2
TTL = 3.0  # MC_METADATA_TTL of the engines: a dead engine's descriptor is gone within ~TTL

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]


def pattern(seed: int, n: int) -> bytes:
    """The bytes a worker fills its buffer with: distinct per seed, cheap to recompute."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# ------------------------------------------------------------------------------- the worker


def _worker() -> None:
    """Engine process: answer one JSON command per stdin line with one JSON line on stdout."""
    import logging

    import numpy as np

    from mooncake.engine import TransferEngine

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the real stdout
    eng: Any = None
    buf: Any = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "init":
                eng = TransferEngine(cmd["host"], metadata=cmd["metadata"],
                                     protocol=cmd["protocol"], **cmd.get("config", {}))
                buf = np.frombuffer(bytearray(pattern(cmd["seed"], cmd["size"])), np.uint8)
                eng.register(buf)
                res: Any = {"segment": eng.segment_name, "addr": buf.ctypes.data}
            elif op in ("write", "read"):
                getattr(eng, op)(cmd["segment"], buf.ctypes.data + cmd["off"],
                                 cmd["remote"], cmd["length"], timeout=cmd.get("xfer_timeout"))
                res = None
            elif op == "sha":
                res = hashlib.sha256(buf[cmd["off"]:cmd["off"] + cmd["length"]]).hexdigest()
            elif op == "explain":
                res = eng.explain(cmd["segment"])
            elif op == "close":
                eng.close()
                res = None
            else:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, "result": res}
        except Exception as e:
            reply = {"ok": False, "type": type(e).__name__, "error": str(e),
                     "mro": [c.__name__ for c in type(e).__mro__]}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if op == "close":
            return


class Worker:
    """Test-side handle of an engine process in a namespace."""

    def __init__(self, host: netns.Host, logdir: Path, tag: str) -> None:
        self.host = host
        self.log = logdir / f"worker-{tag}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log, "wb") as log:
            self.proc = host.popen([sys.executable, str(Path(__file__).resolve()), "worker"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                   env=env, cwd=str(REPO))
        self._q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.segment = ""
        self.addr = 0
        self.seed = 0

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.decode())
        self._q.put("")

    def call(self, op: str, timeout: float = 120.0, **kw: Any) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        try:
            line = self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker on {self.host.ip}: no answer to {op} in {timeout}s; "
                                 f"log: {self.tail()}") from None
        if not line:
            raise AssertionError(f"worker on {self.host.ip} died; log: {self.tail()}")
        return json.loads(line)

    def ok(self, op: str, **kw: Any) -> Any:
        r = self.call(op, **kw)
        assert r["ok"], f"{op} on {self.host.ip} failed: {r['type']}: {r['error']}"
        return r["result"]

    def init(self, metadata: str, protocol: str = "tcp", seed: int = 0,
             **config: Any) -> Worker:
        self.seed = seed
        config = {"MC_METADATA_TTL": TTL, **config}
        r = self.ok("init", host=self.host.ip, metadata=metadata, protocol=protocol, seed=seed,
                    size=BUF, config=config)
        self.segment, self.addr = r["segment"], r["addr"]
        return self

    def sha(self, off: int, length: int) -> str:
        return self.ok("sha", off=off, length=length)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def expected_sha(seed: int, off: int, length: int) -> str:
    return hashlib.sha256(pattern(seed, BUF)[off:off + length]).hexdigest()


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture
def net() -> Iterator[netns.Net]:
    why = netns.why_no_netns()
    if why:
        pytest.skip(why)
    with netns.hosts(3) as n:
        yield n
    assert n.leftovers() == []


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    return tmp_path


def meta_server(kind: str, net: netns.Net, tmp: Path) -> servers.Server:
    h0 = net.hosts[0]
    return servers.SERVERS[kind](tmp, host=h0.ip, port=servers.free_port(), netns=h0.ns).start()


def key_of(w: Worker) -> str:
    return f"mooncake/ram/{w.segment}"


def stored(srv: servers.Server, key: str) -> bool:
    """Whether the metadata server holds ``key`` (read from the root namespace via the bridge)."""
    if srv.kind == "http":
        try:
            urllib.request.urlopen(f"http://{srv.host}:{srv.port}/metadata?key={key}", timeout=5)
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise
    store = servers.make_store(srv.kind, srv.address, MC_METADATA_TTL=0)
    try:
        return key in store.list_keys(key)
    finally:
        store.close()


def wait_until(pred, timeout: float = 60.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached within {timeout}s")


def cross_check(src: Worker, dst: Worker, off: int, length: int, dst_off: int) -> None:
    """src writes its [off, +length) to dst at dst_off; dst's bytes must equal src's."""
    src.ok("write", segment=dst.segment, off=off, remote=dst.addr + dst_off, length=length)
    assert dst.sha(dst_off, length) == expected_sha(src.seed, off, length)


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["http", "etcd", "redis"])
def test_tcp_across_hosts_with_integrity(net: netns.Net, logdir: Path, kind: str) -> None:
    srv = meta_server(kind, net, logdir)
    try:
        ws = [Worker(h, logdir, f"h{i}").init(srv.address, "tcp", seed=i + 1)
              for i, h in enumerate(net.hosts)]
        assert len({w.segment.rsplit(":", 1)[0] for w in ws}) == 3  # three hosts
        # every ordered pair: from the source's pristine upper half into a fresh slot of the
        # destination's lower half (odd sizes and offsets to exercise slicing tails)
        slot = {w.segment: 0 for w in ws}
        for i, a in enumerate(ws):
            for b in ws:
                if a is b:
                    continue
                length = (1 << 20) + 12345 + i
                cross_check(a, b, off=HALF + 777 * i, length=length,
                            dst_off=slot[b.segment] * 1_200_000 + 3)
                slot[b.segment] += 1
        # reads: h0 pulls a range of h2's pristine upper half into its own lower half
        ws[0].ok("read", segment=ws[2].segment, off=3 << 20, remote=ws[2].addr + HALF + 5,
                 length=512 << 10)
        assert ws[0].sha(3 << 20, 512 << 10) == expected_sha(3, HALF + 5, 512 << 10)
        for w in ws:
            assert stored(srv, key_of(w))
            w.ok("close")
        wait_until(lambda: not any(stored(srv, key_of(w)) for w in ws), 30,
                   "descriptors removed on clean shutdown")
    finally:
        srv.kill()


def test_shm_never_chosen_across_hosts(net: netns.Net, logdir: Path) -> None:
    srv = meta_server("http", net, logdir)
    try:
        h0, h1 = net.hosts[0], net.hosts[1]
        a = Worker(h0, logdir, "a").init(srv.address, "auto", seed=1)
        same = Worker(h0, logdir, "same").init(srv.address, "auto", seed=2)
        far = Worker(h1, logdir, "far").init(srv.address, "auto", seed=3)
        ex = a.ok("explain", segment=far.segment)
        assert ex["chosen"] == "tcp", ex
        shm = [c for c in ex["candidates"] if c["transport"] == "shm"]
        if shm:
            assert not shm[0]["reachable"] and shm[0]["reason"] != "ok"
            # the control: on the same host, auto does pick shm
            assert a.ok("explain", segment=same.segment)["chosen"] == "shm"
        cross_check(a, far, off=HALF, length=3 << 20, dst_off=4096)
        # an engine that may only use shm cannot reach another host, and says so
        only_shm = Worker(h0, logdir, "shm")
        r = only_shm.call("init", host=h0.ip, metadata=srv.address, protocol="shm", seed=4,
                          size=BUF, config={"MC_METADATA_TTL": TTL})
        if r["ok"]:
            only_shm.segment, only_shm.addr = r["result"]["segment"], r["result"]["addr"]
            r = only_shm.call("write", segment=far.segment, off=0, remote=far.addr, length=64)
            assert not r["ok"] and r["type"] == "TransportUnavailable", r
            assert far.segment in r["error"]
        else:
            assert r["type"] == "TransportUnavailable", r
    finally:
        srv.kill()


@pytest.mark.parametrize("kind", ["http", "etcd", "redis"])
def test_killed_host_fails_promptly_and_expires(net: netns.Net, logdir: Path,
                                                kind: str) -> None:
    srv = meta_server(kind, net, logdir)
    try:
        ws = [Worker(h, logdir, f"h{i}").init(srv.address, "tcp", seed=i + 1,
                                               MC_TRANSFER_TIMEOUT=120)
              for i, h in enumerate(net.hosts)]
        a, b, dead = ws
        cross_check(a, dead, off=HALF, length=1 << 20, dst_off=0)
        dead.kill()  # SIGKILL: no clean shutdown, the descriptor stays behind for now
        # the peer's kernel refuses the connection: a prompt, typed failure, not a timeout
        r = a.call("write", segment=dead.segment, off=0, remote=dead.addr, length=1 << 20,
                   timeout=150)
        assert not r["ok"]
        assert "TransferTimeout" not in r["mro"], r
        assert {"PeerUnreachable", "TransferFailed", "SegmentNotFound"} & set(r["mro"]), r
        wait_until(lambda: not stored(srv, key_of(dead)), 60, "the dead engine's descriptor "
                   "expiring")
        # a peer that never cached it now finds no such segment
        r = b.call("write", segment=dead.segment, off=0, remote=dead.addr, length=4096)
        assert not r["ok"] and "SegmentNotFound" in r["mro"], r
        assert dead.segment in r["error"]
        cross_check(a, b, off=HALF, length=1 << 20, dst_off=1 << 20)  # the living still talk
        wait_until(lambda: stored(srv, key_of(a)) and stored(srv, key_of(b)), 30,
                   "the living engines' descriptors (kept by their heartbeats)")
    finally:
        srv.kill()


@pytest.mark.parametrize("kind", ["http", "etcd", "redis"])
def test_metadata_server_restart_engines_republish(net: netns.Net, logdir: Path,
                                                   kind: str) -> None:
    srv = meta_server(kind, net, logdir)
    try:
        h0, h1, h2 = net.hosts
        b = Worker(h1, logdir, "b").init(srv.address, "tcp", seed=2)
        c = Worker(h2, logdir, "c").init(srv.address, "tcp", seed=3)
        cross_check(b, c, off=HALF, length=1 << 20, dst_off=0)  # now c is cached in b
        srv.kill()
        # outage: cached peers keep moving bytes
        cross_check(b, c, off=HALF + (1 << 20), length=1 << 20, dst_off=1 << 20)
        srv.restart(wipe=True)  # back, empty
        wait_until(lambda: stored(srv, key_of(b)) and stored(srv, key_of(c)), 60,
                   "engines re-publishing")
        # a new engine, which knows nobody, finds both through the restarted server
        a = Worker(h0, logdir, "a").init(srv.address, "tcp", seed=1)
        cross_check(a, b, off=HALF, length=2 << 20, dst_off=2 << 20)
        cross_check(a, c, off=HALF, length=2 << 20, dst_off=2 << 20)
        cross_check(c, a, off=HALF + (2 << 20), length=1 << 20, dst_off=0)
    finally:
        srv.kill()


def test_netns_cleanup_after_failure() -> None:
    """A test that fails half-way still leaves no namespace, veth or bridge behind."""
    why = netns.why_no_netns()
    if why:
        pytest.skip(why)
    net = netns.Net(2)
    with pytest.raises(RuntimeError, match="boom"):
        with netns.hosts(2) as net:
            p = net.hosts[0].popen(["sleep", "600"])
            assert net.leftovers()
            raise RuntimeError("boom")
    assert net.leftovers() == []
    assert p.poll() is not None  # the process it started is gone too


# ------------------------------------------------------------------------------- faults


@pytest.fixture
def pair(net: netns.Net, logdir: Path) -> Iterator[tuple[netns.Net, Worker, Worker]]:
    srv = meta_server("http", net, logdir)
    try:
        a = Worker(net.hosts[1], logdir, "a").init(srv.address, "tcp", seed=1,
                                                    MC_TRANSFER_TIMEOUT=20)
        b = Worker(net.hosts[2], logdir, "b").init(srv.address, "tcp", seed=2,
                                                    MC_TRANSFER_TIMEOUT=20)
        cross_check(a, b, off=BUF - 4096, length=4096, dst_off=BUF - 4096)  # lanes up
        yield net, a, b
    finally:
        srv.kill()


def transfers_under_fault(a: Worker, b: Worker, rounds: int = 3) -> tuple[int, list[dict]]:
    """Rounds of a 1 MiB write and a 1 MiB read, each between pristine and untouched ranges:
    completed ones must be exact, failed ones typed."""
    done, failed = 0, []
    mib = 1 << 20
    for i in range(rounds):
        r = a.call("write", segment=b.segment, off=HALF + i * mib, remote=b.addr + i * mib,
                   length=mib)
        if r["ok"]:
            assert b.sha(i * mib, mib) == expected_sha(a.seed, HALF + i * mib, mib), "corrupt"
            done += 1
        else:
            failed.append(r)
        r = a.call("read", segment=b.segment, off=i * mib, remote=b.addr + HALF + i * mib,
                   length=mib)
        if r["ok"]:
            assert a.sha(i * mib, mib) == expected_sha(b.seed, HALF + i * mib, mib), "corrupt"
            done += 1
        else:
            failed.append(r)
    for r in failed:
        assert {"TransferTimeout", "TransferFailed", "PeerUnreachable"} & set(r["mro"]), r
        assert r["error"], r
    return done, failed


@pytest.mark.netem
@pytest.mark.parametrize("spec", ["delay 20ms 10ms", "loss 3%", "delay 5ms reorder 25% 50%",
                                  "duplicate 5% corrupt 0.5%"])
def test_netem_faults(pair: tuple[netns.Net, Worker, Worker], spec: str) -> None:
    net, a, b = pair
    why = netns.why_no_netem()
    if why:
        pytest.skip(why)
    for h in (a.host, b.host):
        net.netem(h, spec)
    done, failed = transfers_under_fault(a, b)
    assert done > 0, failed  # these faults slow TCP down, they do not stop it


def test_random_loss_nftables(pair: tuple[netns.Net, Worker, Worker]) -> None:
    """5% of TCP packets dropped both ways (nftables: works without sch_netem)."""
    net, a, b = pair
    why = netns.why_no_nft()
    if why:
        pytest.skip(why)
    net.drop(a.host, 5)
    net.drop(b.host, 5)
    done, failed = transfers_under_fault(a, b)
    assert done > 0, failed
    net.clear_drop(a.host)
    net.clear_drop(b.host)
    cross_check(a, b, off=BUF - (1 << 20), length=1 << 20, dst_off=3 << 20)


def test_rate_limit_timeout_is_clear_and_recoverable(
        pair: tuple[netns.Net, Worker, Worker]) -> None:
    """A link too slow for the deadline: TransferTimeout naming the deadline, no bad bytes."""
    net, a, b = pair
    net.rate(a.host, rate="2mbit", burst="16kbit", latency="2s")
    r = a.call("write", segment=b.segment, off=0, remote=b.addr, length=3 << 20,
               xfer_timeout=1.0)
    assert not r["ok"] and "TransferTimeout" in r["mro"], r
    assert r["error"]
    net.clear_qdisc(a.host)
    cross_check(a, b, off=HALF, length=3 << 20, dst_off=0)  # the engine recovers, bytes exact


def test_link_down_mid_flight(pair: tuple[netns.Net, Worker, Worker]) -> None:
    """The peer's host vanishes (carrier down): a typed error, not a hang; back up: works."""
    net, a, b = pair
    net.link(b.host, up=False)
    r = a.call("write", segment=b.segment, off=0, remote=b.addr, length=2 << 20,
               xfer_timeout=3.0)
    assert not r["ok"], r
    assert {"TransferTimeout", "TransferFailed", "PeerUnreachable"} & set(r["mro"]), r
    net.link(b.host, up=True)
    wait_until(lambda: a.call("write", segment=b.segment, off=0, remote=b.addr,
                              length=4096)["ok"], 60, "transfers after the link is back")
    cross_check(a, b, off=HALF, length=2 << 20, dst_off=0)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker()
