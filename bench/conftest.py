"""Fixtures for the TCP benchmarks: a target engine and a raw-socket peer, each in its own process;
a calibrated pedantic runner; and the end-of-session table (engine, baseline, ratio, target).

Placement (2 vCPUs here): throughput rows run wherever the scheduler puts the three processes
(this one, the engine target, the raw peer), or on ``MC_BENCH_CPUS`` (e.g. ``0`` or ``0,1``) when
set; the latency rows run twice, once so ("float") and once with every thread of all three
processes pinned to one vCPU ("1cpu"), engine and baseline always under the same placement.

Knobs: ``MC_BENCH_TIME`` seconds of timed rounds per benchmark (default 1.0),
``MC_BENCH_LAT_N`` ping-pongs per latency row (default 2000), ``--mc-summary PATH`` also writes
the table as Markdown.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

KiB, MiB = 1 << 10, 1 << 20
WSET = 32 * MiB  # working set on both sides, engine and raw alike (= bench CLI's 64K*128*4)
ROUND_TIME = float(os.environ.get("MC_BENCH_TIME", "1.0"))
LAT_N = int(os.environ.get("MC_BENCH_LAT_N", "2000"))
CMD = struct.Struct("<4sQQ4x")
HERE = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--mc-summary", default=None, metavar="PATH",
                     help="also write the engine-vs-baseline table as Markdown to PATH")


# -- results table ---------------------------------------------------------------------------


@dataclass
class Row:
    """One engine measurement and the baseline measured interleaved with it."""

    name: str
    value: float
    unit: str
    baseline: float | None
    baseline_what: str
    target: tuple | None          # ("ratio>=" | "ratio<=" | "value>=" | "value<=", x)
    info: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None

    @property
    def verdict(self) -> str:
        if not self.target:
            return ""
        kind, x = self.target
        if kind == "value>=":
            return "ok" if self.value >= x else "MISS"
        if kind == "value<=":
            return "ok" if self.value <= x else "MISS"
        r = self.ratio
        if r is None:
            return "?"
        return "ok" if (r >= x if kind == "ratio>=" else r <= x) else "MISS"

    @property
    def target_text(self) -> str:
        if not self.target:
            return ""
        kind, x = self.target
        if kind in ("value>=", "value<="):
            return f"{kind[-2:]} {_fmt(x, self.unit)}"
        return f"ratio {'>=' if kind == 'ratio>=' else '<='} {x:g}"


class Results:
    """The rows measured in this session."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def row(self, name: str, value: float, unit: str, baseline: float | None,
            baseline_what: str, target: tuple | None, info: dict) -> Row:
        r = Row(name, value, unit, baseline, baseline_what, target, info)
        self.rows.append(r)
        info.update(row=name, value=value, unit=unit, baseline=baseline,
                    baseline_what=baseline_what)
        if r.ratio is not None:
            info["ratio"] = round(r.ratio, 4)
        if r.target:
            info.update(target=r.target_text, target_met=r.verdict)
        return r

    def table(self) -> list[list[str]]:
        out = [["row", "engine", "baseline", "ratio", "target", ""]]
        for r in self.rows:
            out.append([r.name, _fmt(r.value, r.unit),
                        f"{_fmt(r.baseline, r.unit)} ({r.baseline_what})" if r.baseline else "",
                        f"{r.ratio:.2f}" if r.ratio is not None else "",
                        r.target_text, r.verdict])
        return out


def _fmt(v: float, unit: str) -> str:
    if unit == "req/s":
        return f"{v:,.0f} req/s"
    if unit == "us":
        return f"{v:.1f} us"
    return f"{v:.3f} {unit}"


RESULTS = Results()


@pytest.fixture(scope="session")
def results() -> Results:
    return RESULTS


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not RESULTS.rows:
        return
    rows = RESULTS.table()
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    tr = terminalreporter
    tr.write_sep("=", "mooncake engine vs physical baseline (decimal GB/s = 1e9 B/s)")
    for i, r in enumerate(rows):
        tr.write_line("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            tr.write_line("  ".join("-" * w for w in widths))
    tr.write_line(f"placement: {_placement_note()}; working set {WSET >> 20} MiB each side")
    path = config.getoption("--mc-summary")
    if path:
        md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        Path(path).write_text("\n".join(md) + f"\n\nplacement: {_placement_note()}\n")


# -- placement -------------------------------------------------------------------------------


def _placement_note() -> str:
    cpus = os.environ.get("MC_BENCH_CPUS")
    return (f"throughput pinned to CPUs {cpus}" if cpus else
            "throughput unpinned (scheduler's choice)") + \
        f"; latency rows both unpinned and all on 1 vCPU; {os.cpu_count()} vCPUs"


def _cpus(spec: str) -> set[int]:
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def pin(pids: list[int], cpus: set[int]) -> None:
    """Set the affinity of every thread of every process (new threads inherit it)."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except (ProcessLookupError, PermissionError):
                pass


# -- processes -------------------------------------------------------------------------------


class RawClient:
    """Client side of ``bench/_peer.py``: streaming and ping-pong over one connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.settimeout(None)  # blocking, like the engine's lanes (a timeout means poll+send)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(WSET)
        self.mv = memoryview(self.buf)
        self._ack = memoryview(bytearray(8))

    def _recv(self, view: memoryview) -> None:
        n, got = len(view), 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
            if k == 0:
                raise ConnectionError("raw peer closed the connection")
            got += k

    def stream_write(self, block: int, count: int) -> None:
        """``count`` blocks back-to-back with ``sendall``, then wait for the peer's ack."""
        s, mv = self.sock, self.mv
        s.sendall(CMD.pack(b"STRW", block, count))
        for i in range(count):
            off = (i * block) % WSET
            s.sendall(mv[off:off + block])
        self._recv(self._ack)

    def stream_read(self, block: int, count: int) -> None:
        """The peer sends ``count`` blocks; ``recv_into`` each at its working-set offset."""
        self.sock.sendall(CMD.pack(b"STRR", block, count))
        mv = self.mv
        for i in range(count):
            off = (i * block) % WSET
            self._recv(mv[off:off + block])

    def start_ping(self, req: int, resp: int) -> Callable[[], None]:
        self.sock.sendall(CMD.pack(b"PING", req, resp))
        out, back = self.mv[:req], self.mv[WSET - resp:]
        s, recv = self.sock, self._recv

        def once() -> None:
            s.sendall(out)
            recv(back)
        return once

    def close(self) -> None:
        self.sock.close()


@dataclass
class Peers:
    target: subprocess.Popen
    segment: str
    remote: int
    raw: subprocess.Popen
    raw_port: int

    @property
    def pids(self) -> list[int]:
        return [os.getpid(), self.target.pid, self.raw.pid]


@pytest.fixture(scope="session")
def peers() -> Iterator[Peers]:
    """The engine target (``mooncake bench --mode target``) and the raw peer, both spawned."""
    from mooncake.bench import start_target, stop_target

    a = argparse.Namespace(protocol="tcp", metadata_server="P2PHANDSHAKE",
                           local_server_name="127.0.0.1", device_name="", buffer_size=WSET)
    target, info = start_target(a)
    raw = subprocess.Popen([sys.executable, str(HERE / "_peer.py")], stdout=subprocess.PIPE,
                           stdin=subprocess.PIPE, text=True,
                           env={**os.environ, "MC_BENCH_WSET": str(WSET)})
    try:
        line = raw.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"raw peer did not start: {line!r}")
        p = Peers(target, info["segment"], info["buffer"], raw, int(line))
        if os.environ.get("MC_BENCH_CPUS"):
            pin(p.pids, _cpus(os.environ["MC_BENCH_CPUS"]))
        yield p
    finally:
        stop_target(target)
        raw.terminate()
        try:
            raw.wait(10)
        except subprocess.TimeoutExpired:
            raw.kill()
            raw.wait()


@dataclass
class Pair:
    """The initiator engine in this process, its local buffer and the target's buffer."""

    eng: Any
    segment: str
    local: int
    remote: int


@pytest.fixture(scope="session")
def pair(peers: Peers) -> Iterator[Pair]:
    from mooncake.engine import TransferEngine

    eng = TransferEngine("127.0.0.1", protocol="tcp")
    try:
        buf = eng.allocate(WSET)
        ctypes.memset(buf.addr, 0x5A, WSET)
        remote = eng.get_first_buffer_address(peers.segment)
        assert remote == peers.remote, (hex(remote), hex(peers.remote))
        eng.write(peers.segment, buf.addr, remote, WSET)  # connect lanes, fault pages in
        eng.read(peers.segment, buf.addr, remote, WSET)
        if os.environ.get("MC_BENCH_CPUS"):
            pin(peers.pids, _cpus(os.environ["MC_BENCH_CPUS"]))
        yield Pair(eng, peers.segment, buf.addr, remote)
    finally:
        eng.close()


@pytest.fixture
def raw(peers: Peers) -> Iterator[RawClient]:
    c = RawClient(peers.raw_port)
    yield c
    c.close()


@pytest.fixture(params=["float", "1cpu"])
def placement(request: pytest.FixtureRequest, peers: Peers) -> Iterator[str]:
    """Run the test unpinned ("float") or with all three processes on one vCPU ("1cpu")."""
    full = os.sched_getaffinity(0)
    if os.environ.get("MC_BENCH_CPUS"):
        full = _cpus(os.environ["MC_BENCH_CPUS"])
    if request.param == "1cpu":
        pin(peers.pids, {max(full)})
    else:
        pin(peers.pids, full)
    try:
        yield request.param
    finally:
        pin(peers.pids, full)


# -- running ---------------------------------------------------------------------------------


@dataclass
class Paired:
    """Per-round times (seconds) of the engine and of its baseline, taken alternately."""

    engine: list[float]
    baseline: list[float]

    def median(self, which: str) -> float:
        return percentile(sorted(getattr(self, which)), 0.5)


def run_paired(benchmark: Any, fn: Callable[[], None], base: Callable[[], None], *,
               rounds: int | None = None, warmup: int = 1, max_rounds: int = 300) -> Paired | None:
    """Alternate ``base`` and ``fn`` round by round (A/B interleaving, so load changes on this
    shared machine hit both alike); pytest-benchmark times ``fn``, ``base`` runs in the
    untimed ``setup`` and is timed here.  ``rounds`` defaults to as many as fit in
    ``MC_BENCH_TIME`` seconds.  None under ``--benchmark-disable``."""
    t = time.perf_counter()
    for _ in range(warmup):
        fn()
    t1 = time.perf_counter()
    for _ in range(warmup):
        base()
    t2 = time.perf_counter()
    if rounds is None:
        per = max((t2 - t) / max(warmup, 1), 1e-6)
        rounds = max(5, min(max_rounds, int(ROUND_TIME / per)))
    del t1
    btimes: list[float] = []
    clock = time.perf_counter

    def setup() -> None:
        s = clock()
        base()
        btimes.append(clock() - s)
    benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=0)
    stats = stats_of(benchmark)
    if stats is None:
        return None
    return Paired(list(stats.data), btimes[-len(stats.data):])


def stats_of(benchmark: Any) -> Any:
    meta = getattr(benchmark, "stats", None)
    return getattr(meta, "stats", None) if meta is not None else None


def percentile(sorted_data: list[float], q: float) -> float:
    return sorted_data[min(len(sorted_data) - 1, int(q * len(sorted_data)))]
