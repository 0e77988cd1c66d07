"""The rdma transport against perftest on Soft-RoCE, in one run inside tools/rxe-vm.sh.

    tools/rxe-vm.sh -- python -m pytest bench/test_bench_rdma.py -m rdma -p no:cacheprovider
    RXE_VM_TOPO=numa2 tools/rxe-vm.sh -- python -m pytest bench/test_bench_rdma.py ...

Both sides of every row sit on the same rxe device (``RXE_DEV``), as our two engines would be:
perftest's server and client, and the engine here (the initiator) with a target engine in
another process (:class:`mooncake.testing.peer.Peer`).  perftest runs right before and right
after each engine row and the baseline is the mean of the two, so drift in this emulated VM hits
both alike.  Rows (issue 9's targets; reported, never asserted):

* batch WRITE/READ, 64 KiB and 1 MiB: one ``batch_transfer_sync_*`` of ``BATCH_BYTES`` per round
  vs ``ib_write_bw``/``ib_read_bw -s BLOCK`` (its default depth).  Target >= 0.9x.
* sync 64 KiB: one ``transfer_sync_*`` per block vs the same perftest rows.  Target >= 0.8x.
* 4 KiB sync write round trip p50 vs twice ``ib_write_lat -s 4096``'s t_typical (a one-way
  figure).  Target <= 1.2x.  The same row for a raw depth-1 WRITE loop through our own nogil
  kernel (``verbs_kernel.post_poll_loop``, busy polling) shows the device's floor.
* With two devices (``RXE_VM_TOPO=numa2``): a 64 MiB transfer through engines on every device
  vs engines on ``rxe0`` only, each variant's packets per device from the kernel's
  ``hw_counters``; and perftest's own two-device and across-the-wire figures.  Target >= 1.6x.

perftest computes rates from the TSC at the frequency it measures itself (it warns when that
differs from /proc/cpuinfo; the warning is kept in ``extra_info``).  Decimal GB/s (1e9 B/s).
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import LAT_N, WSET, KiB, MiB, Pair, percentile, stats_of

from mooncake.testing.verbs import loopback_qps

DEV = os.environ.get("RXE_DEV", "")
GIDX = int(os.environ.get("RXE_GID_INDEX", "1"))
DEV1 = os.environ.get("RXE_DEV1", "")
GIDX1 = int(os.environ.get("RXE_GID_INDEX1", "1"))
IP0 = os.environ.get("RXE_IP0", os.environ.get("RXE_IP", "127.0.0.1"))
pytestmark = [
    pytest.mark.rdma,
    pytest.mark.skipif(not (os.environ.get("IN_RXE_VM") or DEV),
                       reason="needs a verbs device: run inside tools/rxe-vm.sh"),
    pytest.mark.skipif(shutil.which("ib_write_bw") is None,
                       reason="needs perftest (apt-get install perftest)"),
]

BATCH_BYTES = 16 * MiB            # per batch round
SYNC_BYTES = 4 * MiB              # per sync round (64 one-block calls)
PERF_BYTES = 64 * MiB             # per perftest bandwidth run
STRIPE = 64 * MiB
ROUNDS = int(os.environ.get("MC_BENCH_RDMA_ROUNDS", "5"))
BW_TARGET = ("ratio>=", 0.9)
SYNC_TARGET = ("ratio>=", 0.8)
LAT_TARGET = ("ratio<=", 1.2)
STRIPE_TARGET = ("ratio>=", 1.6)


def _bid(n: int) -> str:
    return f"{n >> 20}MiB" if n >= MiB else f"{n >> 10}KiB"


# -- perftest --------------------------------------------------------------------------------

_ports = iter(range(18700 + os.getpid() % 1000, 65000))


def _listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (state 0A), IPv4 or IPv6."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                rows = [ln.split() for ln in f.readlines()[1:]]
        except FileNotFoundError:
            continue
        if any(r[1].endswith(f":{port:04X}") and r[3] == "0A" for r in rows):
            return True
    return False


def perftest(tool: str, size: int, **kw: Any) -> dict:
    """:func:`perftest_once`, run again (up to twice) when it reports a zero rate: under TCG
    perftest now and then prints 0.00 for a run that moved data (``zero_runs`` counts them)."""
    zeros = 0
    while True:
        r = perftest_once(tool, size, **kw)
        if r.get("gbps", r.get("t_typical_us")) or zeros == 2:
            r["zero_runs"] = zeros
            return r
        zeros += 1


def perftest_once(tool: str, size: int, *, server: tuple[str, int] | None = None,
                  client: tuple[str, int] | None = None, duration: float | None = None) -> dict:
    """One perftest run: the server on ``server`` (device, GID index), the client on
    ``client`` (default: both on ``RXE_DEV``); its figures.  Bandwidth runs move
    ``PERF_BYTES`` (``-n``) unless ``duration`` (``-D``) is given."""
    server, client = server or (DEV, GIDX), client or (DEV, GIDX)
    port = next(_ports)
    args = ["-s", str(size), "-p", str(port), "-F"]
    lat = tool.endswith("_lat")
    if lat:
        args += ["-n", str(LAT_N)]
    else:
        args += ["--report_gbits"]
        args += ["-D", f"{duration:g}"] if duration else \
            ["-n", str(max(256, PERF_BYTES // size))]
    srv = subprocess.Popen([tool, "-d", server[0], "-x", str(server[1]), *args],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 30
        while not _listening(port):
            if srv.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{tool} server did not listen: {srv.stdout.read()[-800:]}")
            time.sleep(0.05)
        host = "127.0.0.1" if server[0] == client[0] else IP0
        cli = subprocess.run([tool, "-d", client[0], "-x", str(client[1]), *args, host],
                             capture_output=True, text=True, timeout=300)
        srv.wait(60)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    out = cli.stdout + cli.stderr
    if cli.returncode:
        raise RuntimeError(f"{tool} client exited {cli.returncode}: {out[-800:]}")
    rows = [ln.split() for ln in out.splitlines()
            if re.match(rf"\s*{size}\s+\d+\s", ln)]
    if not rows:
        raise RuntimeError(f"no result line in {tool}'s output: {out[-800:]}")
    cols = [float(x) for x in rows[-1]]
    res: dict[str, Any] = {"tool": tool, "size": size, "iterations": int(cols[1])}
    warn = [ln.strip() for ln in out.splitlines() if re.search(r"(?i)conflicting|differs", ln)]
    if warn:
        res["warning"] = warn[0]
    if lat:
        res.update(t_min_us=cols[2], t_typical_us=cols[4], t_avg_us=cols[5], t_p99_us=cols[7])
    else:
        res["gbps"] = cols[3] / 8   # Gb/s (1e9 bit/s) -> GB/s (1e9 B/s)
    return res


def bracket(run: Callable[[], dict], key: str, body: Callable[[], Any]) -> tuple[Any, dict]:
    """perftest, then ``body``, then perftest again: ``body``'s result and the baseline (the
    mean of the two runs' ``key``, both kept)."""
    a = run()
    out = body()
    b = run()
    return out, {"value": (a[key] + b[key]) / 2, "runs": [a, b]}


# -- engines ---------------------------------------------------------------------------------


def counters() -> dict[str, tuple[int, int]]:
    """(sent_pkts, rcvd_pkts) of every RDMA device, from the kernel's hw_counters."""
    out = {}
    base = "/sys/class/infiniband"
    for d in sorted(os.listdir(base)):
        p = f"{base}/{d}/ports/1/hw_counters"
        with open(f"{p}/sent_pkts") as s, open(f"{p}/rcvd_pkts") as r:
            out[d] = (int(s.read()), int(r.read()))
    return out


def moved(before: dict, after: dict) -> dict[str, dict[str, int]]:
    return {d: {"sent_pkts": after[d][0] - before[d][0], "rcvd_pkts": after[d][1] - before[d][1]}
            for d in after}


def _engine(device_name: str, **cfg: Any) -> Any:
    from mooncake.engine import TransferEngine

    return TransferEngine("127.0.0.1", metadata="p2p", protocol="rdma",
                          device_name=device_name, **cfg)


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[str, Any]]:
    """Target engines in their own processes, started together (each Python start costs
    seconds under TCG): ``one`` on RXE_DEV, and with a second device ``all`` on every one."""
    from mooncake.testing.peer import Peer

    want = {"one": DEV, **({"all": ""} if DEV1 else {})}
    got: dict[str, Any] = {}
    errors: list[BaseException] = []

    def start(k: str, dn: str) -> None:
        try:
            got[k] = Peer(protocol="rdma", metadata="p2p", device_name=dn, _start_timeout=300)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=start, args=kv) for kv in want.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield got
    finally:
        for p in got.values():
            p.close()


@pytest.fixture(scope="module")
def pair(targets: dict[str, Any]) -> Iterator[Pair]:
    """This process's engine on RXE_DEV, its WSET buffer, and the ``one`` target's."""
    peer = targets["one"]
    remote = peer.alloc(WSET)
    eng = _engine(DEV)
    try:
        buf = np.full(WSET, 0x5A, np.uint8)
        eng.register(buf)
        eng.write(peer.segment, buf.ctypes.data, remote, WSET)  # connect, fault pages in
        eng.read(peer.segment, buf.ctypes.data, remote, WSET)
        yield Pair(eng, peer.segment, buf.ctypes.data, remote)
    finally:
        eng.close()


def _fail(what: str, rc: int) -> None:
    raise RuntimeError(f"{what} returned {rc} (see the mooncake.engine log)")


def _batch_fn(p: Pair, op: str, block: int, count: int) -> Callable[[], None]:
    many = p.eng.batch_transfer_sync_write if op == "write" else p.eng.batch_transfer_sync_read
    loc = [p.local + (i * block) % WSET for i in range(count)]
    rem = [p.remote + (i * block) % WSET for i in range(count)]
    lens = [block] * count

    def fn() -> None:
        rc = many(p.segment, loc, rem, lens)
        if rc:
            _fail(f"batch_transfer_sync_{op}", rc)
    return fn


def _sync_fn(p: Pair, op: str, block: int, count: int) -> Callable[[], None]:
    one = p.eng.transfer_sync_write if op == "write" else p.eng.transfer_sync_read
    work = [(p.local + (i * block) % WSET, p.remote + (i * block) % WSET) for i in range(count)]

    def fn() -> None:
        for la, ra in work:
            rc = one(p.segment, la, ra, block)
            if rc:
                _fail(f"transfer_sync_{op}", rc)
    return fn


def _timed(benchmark: Any, fn: Callable[[], None], rounds: int) -> list[float] | None:
    fn()  # warm-up
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0)
    st = stats_of(benchmark)
    return None if st is None else sorted(st.data)


# -- rows ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("api", "block"), [("batch", 64 * KiB), ("batch", MiB),
                                             ("sync", 64 * KiB)],
                         ids=["batch-64KiB", "batch-1MiB", "sync-64KiB"])
@pytest.mark.parametrize("op", ["write", "read"])
def test_rdma_bw(benchmark, results, pair, op, block, api):
    """Engine GB/s vs ib_{op}_bw at the same block size, on the same device."""
    nbytes = BATCH_BYTES if api == "batch" else SYNC_BYTES
    count = nbytes // block
    fn = (_batch_fn if api == "batch" else _sync_fn)(pair, op, block, count)
    benchmark.group = f"rdma {_bid(block)}"
    before = counters()
    data, base = bracket(lambda: perftest(f"ib_{op}_bw", block), "gbps",
                         lambda: _timed(benchmark, fn, ROUNDS))
    if data is None:
        return
    gbps = nbytes / percentile(data, 0.5) / 1e9
    benchmark.extra_info.update(
        op=op, api=api, block=block, count=count, bytes_per_round=nbytes, gbps_median=gbps,
        gbps_best=nbytes / data[0] / 1e9, perftest=base["runs"], packets=moved(before, counters()))
    results.row(f"rdma {op} {_bid(block)} {api}", gbps, "GB/s", base["value"],
                f"ib_{op}_bw -s {block}", BW_TARGET if api == "batch" else SYNC_TARGET,
                benchmark.extra_info)


def _raw_rtt(n: int) -> float:
    """Seconds per 4 KiB RDMA WRITE posted and completed one at a time (depth 1) by our nogil
    kernel, busy polling, between two QPs on RXE_DEV at MTU 4096 (ib_write_lat's)."""
    from mooncake._core import verbs as V
    from mooncake._core import verbs_kernel as K

    dev = V.Device(DEV)
    cq = V.CQ(dev, 64)
    qa, _qb = loopback_qps(dev, cq, GIDX, 16, mtu=4096)
    buf = np.zeros(16 * KiB, np.uint8)
    mr = V.MR(dev, buf.ctypes.data, buf.nbytes, V.ACCESS_RW)
    done, errors, secs = K.post_poll_loop(qa, cq, V.WR_RDMA_WRITE, buf.ctypes.data, mr.lkey,
                                          buf.ctypes.data + 8 * KiB, mr.rkey, 4 * KiB, n, 1)
    if (done, errors) != (n, 0):
        raise RuntimeError(f"raw loop: {done} done, {errors} errors of {n}")
    return secs / n


def test_rdma_write_latency(benchmark, results, pair):
    """4 KiB transfer_sync_write round trip p50 vs 2x ib_write_lat's typical one-way latency;
    and the raw depth-1 loop's round trip against the same baseline."""
    eng, seg, la, ra = pair.eng, pair.segment, pair.local, pair.remote
    n = 4 * KiB

    def once() -> None:
        rc = eng.transfer_sync_write(seg, la, ra, n)
        if rc:
            _fail("transfer_sync_write", rc)

    def body() -> tuple[list[float] | None, float]:
        for _ in range(200):
            once()
        benchmark.pedantic(once, rounds=LAT_N, warmup_rounds=0)
        st = stats_of(benchmark)
        return (None if st is None else sorted(st.data)), _raw_rtt(LAT_N)
    benchmark.group = "4KiB latency"
    (data, raw), base = bracket(lambda: perftest("ib_write_lat", n), "t_typical_us", body)
    if data is None:
        return
    rtt = 2 * base["value"]
    p50, p99 = percentile(data, 0.5) * 1e6, percentile(data, 0.99) * 1e6
    benchmark.extra_info.update(p50_us=p50, p99_us=p99, raw_rtt_us=raw * 1e6,
                                ib_write_lat=base["runs"], baseline_rtt_us=rtt)
    results.row("rdma 4KiB sync write round trip p50", p50, "us", rtt,
                f"2x ib_write_lat t_typical; p99 {p99:.0f} us", LAT_TARGET, benchmark.extra_info)
    results.row("raw verbs 4KiB WRITE depth-1 round trip", raw * 1e6, "us", rtt,
                "2x ib_write_lat t_typical", None, {"raw_rtt_us": raw * 1e6})


# -- two devices (RXE_VM_TOPO=numa2) ---------------------------------------------------------

#: name -> (engine devices, engine config, local halves bound to NUMA nodes 0 and 1)
_PAIRED = {"MC_ENABLE_HCA_PEER_AFFINITY": True, "MC_NIC_PEER_AFFINITY": "rxe0=rxe0;rxe1=rxe1"}
STRIPE_VARIANTS: dict[str, tuple[str, dict, bool]] = {
    "rxe0 only": ("rxe0", {}, True),
    "every device, one buffer": ("", {}, False),
    "every device, halves on nodes 0/1": ("", {}, True),
    "every device, halves on nodes 0/1, rxeN->rxeN": ("", _PAIRED, True),
}


@pytest.mark.skipif(not DEV1, reason="needs two devices: RXE_VM_TOPO=numa2 tools/rxe-vm.sh")
def test_rdma_two_devices(benchmark, results, targets):
    """64 MiB WRITE as two 32 MiB batches through engines on both devices vs on rxe0 only,
    rounds interleaved, and which devices carried it (hw_counters).  The rdma transport picks
    the NICs on the local buffer's NUMA node, so the halves are bound to nodes 0 and 1
    (:func:`mooncake.numa.bind`) and registered apart; "one buffer" is a single 64 MiB region
    on one node.  perftest's own view: two concurrent self-looped pairs (rxe0, rxe1) vs one,
    and rxe1 -> rxe0 across the two NICs' wire."""
    from mooncake import numa

    half = STRIPE // 2
    peers = {"rxe0": targets["one"], "": targets["all"]}
    remote = {k: p.alloc(STRIPE) for k, p in peers.items()}
    whole = np.full(STRIPE, 0xA5, np.uint8)
    maps = [mmap.mmap(-1, half) for _ in range(2)]   # page-aligned, as mbind wants
    halves = [np.frombuffer(m, np.uint8) for m in maps]
    for node, h in enumerate(halves):
        h[:] = 0x5A + node
        numa.bind(h.ctypes.data, h.nbytes, node)
    engines: dict[str, Any] = {}
    try:
        for name, (devs, cfg, split) in STRIPE_VARIANTS.items():
            e = engines[name] = _engine(devs, **cfg)
            for b in (halves if split else [whole]):
                e.register(b)

        def go(name: str) -> tuple[float, dict]:
            devs, _, split = STRIPE_VARIANTS[name]
            e, seg, rem = engines[name], peers[devs].segment, remote[devs]
            src = [h.ctypes.data for h in halves] if split else \
                [whole.ctypes.data, whole.ctypes.data + half]
            c0 = counters()
            t0 = time.perf_counter()
            bs = [e.submit(seg, "write", [a], [rem + i * half], [half])
                  for i, a in enumerate(src)]
            for b in bs:
                b.wait()
            dt = time.perf_counter() - t0
            return dt, moved(c0, counters())
        for name in engines:
            go(name)  # connect every rail, fault pages in
        times: dict[str, list[float]] = {k: [] for k in engines}
        pkts: dict[str, dict] = {}
        for _ in range(max(2, ROUNDS // 2)):
            for name in engines:
                dt, pkts[name] = go(name)
                times[name].append(dt)
        main = "every device, halves on nodes 0/1, rxeN->rxeN"
        benchmark.pedantic(lambda: go(main), rounds=1, warmup_rounds=0)
    finally:
        for e in engines.values():
            e.close()
    gbps = {k: STRIPE / percentile(sorted(v), 0.5) / 1e9 for k, v in times.items()}
    one = gbps["rxe0 only"]
    for name in STRIPE_VARIANTS:
        results.row(f"rdma 64MiB write, {name}", gbps[name], "GB/s",
                    None if name == "rxe0 only" else one, "rxe0 only",
                    STRIPE_TARGET if name == main else None, {"packets": pkts[name]})
    benchmark.extra_info.update(gbps=gbps, packets=pkts)
    # perftest: what the VM itself allows with two devices and across the wire
    single = perftest("ib_write_bw", 64 * KiB, duration=3)
    both: list[dict] = []
    other = threading.Thread(target=lambda: both.append(
        perftest("ib_write_bw", 64 * KiB, server=(DEV1, GIDX1), client=(DEV1, GIDX1),
                 duration=3)))
    other.start()
    both.append(perftest("ib_write_bw", 64 * KiB, duration=3))
    other.join()
    agg = sum(r["gbps"] for r in both)
    results.row("perftest 64KiB write, rxe0 and rxe1 pairs at once", agg, "GB/s",
                single["gbps"], "one pair", None, {"runs": both, "single": single})
    c0 = counters()
    wire = perftest("ib_write_bw", 64 * KiB, server=(DEV, GIDX), client=(DEV1, GIDX1))
    results.row(f"perftest 64KiB write {DEV1} -> {DEV} over the wire", wire["gbps"], "GB/s",
                single["gbps"], f"{DEV} to itself", None,
                {"run": wire, "packets": moved(c0, counters())})
