"""``mooncake bench``: Mooncake's ``transfer_engine_bench``, same flags, same loop.

Three modes:

* ``target``: start an engine, allocate and register ``--buffer_size`` bytes, print the segment
  name and buffer address, serve until SIGINT/SIGTERM.
* ``initiator``: connect to ``--segment_id``, find its first buffer
  (``get_first_buffer_address``) and run ``--threads`` threads, each repeating: submit
  ``--batch_size`` requests of ``--block_size`` bytes, wait for the batch, count the bytes.
* ``loopback`` (the default without ``--segment_id``): start a target as a child process, run
  the initiator against it, stop the child.

The result is one line (or ``--json``); a progress bar on stderr (rich's, or without rich a
plain line a second); ``--plot PATH.png`` draws the run: throughput over time, batch latency CDF.
Throughput is in decimal units (GB = 1e9 bytes) unless ``--report_unit`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mooncake.config import parse_size as config_size

__all__ = ["main", "parse_size", "UNITS"]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

#: ``--report_unit`` values: name -> (bytes per unit, True if the unit counts bits).
UNITS: dict[str, tuple[float, bool]] = {
    "GB": (1e9, False), "GiB": (GiB, False), "Gb": (1e9, True),
    "MB": (1e6, False), "MiB": (MiB, False), "Mb": (1e6, True),
    "KB": (1e3, False), "KiB": (KiB, False), "Kb": (1e3, True),
}

def parse_size(text: str) -> int:
    """Bytes from ``65536``, ``64K``, ``64KiB``, ``256M``, ``1G`` (the config's size syntax:
    binary suffixes)."""
    try:
        n = config_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (allowed: bytes, or a number with K/M/G/T, e.g. 64K, 256MiB)"
        ) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be > 0")
    return n


def _bounded(cast: type, lo: float, hi: float, allowed: str):
    """An argparse type: ``cast(text)`` within ``[lo, hi]`` (finite), else a message naming
    ``allowed``."""
    noun = "an integer" if cast is int else "a number"

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not lo <= v <= hi:  # also rejects NaN
            raise argparse.ArgumentTypeError(f"{text!r}: {allowed}")
        return v
    return parse


_positive_int = _bounded(int, 1, float("inf"), "must be >= 1")
_seconds = _bounded(float, 1e-9, 1e12, "must be a positive number of seconds")
_precision = _bounded(int, 0, 9, "allowed 0..9 digits")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mooncake bench",
        description="Transfer benchmark with transfer_engine_bench's flags (a flag may also be "
                    "spelled with dashes: --batch-size).",
        epilog="examples:\n"
               "  mooncake bench --mode loopback --duration 5\n"
               "  mooncake bench --mode target                      # prints its segment name\n"
               "  mooncake bench --mode initiator --segment_id 127.0.0.1:15123 --operation write",
        formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name: str, **kw: Any) -> None:
        names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        p.add_argument(*names, dest=name, **kw)

    add("mode", choices=("initiator", "target", "loopback"), default=None,
        help="initiator, target, or loopback (target child + initiator); default: initiator "
             "when --segment_id is given, else loopback")
    add("operation", choices=("read", "write"), default="read",
        help="read pulls from the target, write pushes to it (default: read, as Mooncake)")
    add("protocol", default="tcp",
        help="transport: tcp, shm, cxl, rdma, auto or any installed plugin (default: tcp)")
    add("metadata_server", default="P2PHANDSHAKE",
        help="P2PHANDSHAKE (default), http://host:port, etcd://host:port, redis://host:port")
    add("local_server_name", default="127.0.0.1",
        help="this engine's host (or host:port) (default: 127.0.0.1)")
    add("segment_id", default=None, help="initiator: the target's segment name host:port")
    add("device_name", default="", help="NIC list for RDMA (passed to initialize)")
    add("batch_size", type=_positive_int, default=128, help="requests per batch (default: 128)")
    add("block_size", type=parse_size, default=65536, help="bytes per request (default: 65536)")
    add("buffer_size", type=parse_size, default=256 * MiB,
        help="bytes allocated and registered on each side (default: 256MiB); must hold "
             "block_size * batch_size * threads")
    add("duration", type=_seconds, default=10.0, help="seconds to run (default: 10)")
    add("threads", type=_positive_int, default=4, help="submitting threads (default: 4)")
    add("report_unit", choices=tuple(UNITS), default="GB",
        help="throughput unit; GB = 1e9 bytes, Gb = 1e9 bits (default: GB)")
    add("report_precision", type=_precision, default=2, help="digits after the point (default: 2)")
    add("json", action="store_true", help="print the result (target: its address) as JSON")
    add("plot", default=None, metavar="PATH.png",
        help="also draw the run as a PNG: throughput over time and the batch latency CDF "
             "(needs matplotlib: pip install 'mooncake[plot]')")
    add("progress", choices=("auto", "on", "off"), default="auto",
        help="per-second progress line on stderr (auto: on unless --json)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    from mooncake.registry import transport_names

    a.protocol = (a.protocol or "").lower()
    known = transport_names()
    if a.protocol not in known + ["auto"]:
        p.error(f"--protocol {a.protocol!r} is not an installed transport (allowed: auto, "
                f"{', '.join(known)}; see `mooncake transports`)")
    if a.mode is None:
        a.mode = "initiator" if a.segment_id else "loopback"
    if a.mode == "initiator" and not a.segment_id:
        p.error("--mode initiator needs --segment_id (the target's host:port, as printed by "
                "`mooncake bench --mode target`)")
    if a.mode != "initiator" and a.segment_id:
        p.error(f"--segment_id is only for --mode initiator (this is --mode {a.mode})")
    if a.plot is not None:
        if a.mode == "target":
            p.error("--plot is for a measuring run (--mode initiator or loopback), not a target")
        from mooncake import plot
        from mooncake.errors import ConfigError

        try:
            plot.require()
            plot.check_path(a.plot)
        except ConfigError as e:
            p.error(str(e))
    need = a.block_size * a.batch_size * a.threads
    if a.mode != "target" and need > a.buffer_size:
        p.error(f"--buffer_size {a.buffer_size} is too small: block_size * batch_size * threads "
                f"= {a.block_size} * {a.batch_size} * {a.threads} = {need} bytes (raise "
                "--buffer_size or lower one of the others)")
    return a


# -- result ----------------------------------------------------------------------------------


@dataclass
class Result:
    """What one initiator run measured."""

    operation: str
    protocol: str
    segment: str
    block_size: int
    batch_size: int
    threads: int
    elapsed_s: float
    bytes: int
    batches: int
    latencies_s: list[float] = field(default_factory=list)
    error: str = ""
    #: when each batch completed, seconds after the start
    completions_s: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return self.batches * self.batch_size

    @property
    def gbps(self) -> float:
        """Decimal GB/s."""
        return self.bytes / self.elapsed_s / 1e9 if self.elapsed_s > 0 else 0.0

    def rate(self, unit: str) -> float:
        per, bits = UNITS[unit]
        b = self.bytes * (8 if bits else 1)
        return b / per / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_s:
            return 0.0
        s = sorted(self.latencies_s)
        return s[min(len(s) - 1, int(q * len(s)))]

    def line(self, unit: str, precision: int) -> str:
        req = self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (f"{self.operation} {self.protocol} block={self.block_size} "
                f"batch={self.batch_size} threads={self.threads}: "
                f"{self.rate(unit):.{precision}f} {unit}/s, {req:,.0f} req/s, "
                f"p50 batch latency {self.percentile(0.5) * 1e3:.{max(precision - 1, 1)}f} ms")

    def as_dict(self, unit: str) -> dict[str, Any]:
        return {
            "operation": self.operation, "protocol": self.protocol, "segment": self.segment,
            "block_size": self.block_size, "batch_size": self.batch_size,
            "threads": self.threads, "duration_s": round(self.elapsed_s, 6),
            "bytes": self.bytes, "batches": self.batches, "requests": self.requests,
            "gbps": self.gbps, "value": self.rate(unit), "unit": f"{unit}/s",
            "req_per_s": self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0,
            "batch_latency_ms": {"p50": self.percentile(0.5) * 1e3,
                                 "p99": self.percentile(0.99) * 1e3,
                                 "max": max(self.latencies_s, default=0.0) * 1e3},
            "error": self.error or None,
        }


# -- initiator -------------------------------------------------------------------------------


class _Progress:
    """A bar over the run's seconds (:class:`mooncake.console.Progress`: rich, or a plain
    line per second), the throughput so far after it."""

    def __init__(self, counter: list[int], duration: float, unit: str, precision: int,
                 enabled: bool) -> None:
        from mooncake.console import Progress, have_rich

        self.counter, self.unit, self.precision = counter, unit, precision
        self.bar = Progress(duration, "bench", enabled, seconds=True)
        self.period = 0.25 if have_rich() else 1.0
        self.enabled = enabled
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="mc-bench-progress", daemon=True)

    def start(self) -> None:
        self.t0 = time.monotonic()
        if self.enabled:
            self.bar.__enter__()
            self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            self._show()

    def _show(self) -> None:
        per, bits = UNITS[self.unit]
        dt = time.monotonic() - self.t0
        rate = self.counter[0] * (8 if bits else 1) / per / dt
        self.bar.update(dt, f"{rate:.{self.precision}f} {self.unit}/s")

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
            if self.bar.uses_rich:  # the bar's last state: the whole run
                self._show()
            self.bar.__exit__(None, None, None)


def run_initiator(a: argparse.Namespace, segment: str, progress: bool,
                  config: Mapping[str, Any] | None = None) -> Result:
    """Run the transfer loop against ``segment`` on an engine started with ``config`` (option
    names to values, over the environment); raises :class:`MooncakeError` on setup failure."""
    from mooncake.engine import TransferEngine
    from mooncake.errors import MooncakeError

    eng = TransferEngine(a.local_server_name, a.metadata_server, a.protocol, a.device_name,
                         **dict(config or {}))
    try:
        local = eng.allocate(a.buffer_size)
        _touch(local.addr, a.block_size * a.batch_size * a.threads)
        bufs = eng.segment(segment, refresh=True).buffers  # as get_first_buffer_address
        if not bufs:
            raise MooncakeError(f"segment {segment!r} publishes no buffer (is it a "
                                "`mooncake bench --mode target`?)")
        rbuf = min(bufs, key=lambda b: b.addr)
        remote = rbuf.addr
        span = a.block_size * a.batch_size * a.threads
        if rbuf.length < span:
            raise MooncakeError(f"the target's buffer has {rbuf.length} bytes; this run needs "
                                f"block_size * batch_size * threads = {span}")
        # Mooncake's layout: request i of thread t at offset block * (i * threads + t).
        plans = []
        for t in range(a.threads):
            offs = [a.block_size * (i * a.threads + t) for i in range(a.batch_size)]
            plans.append(([local.addr + o for o in offs], [remote + o for o in offs],
                          [a.block_size] * a.batch_size))
        # Warm-up: connect lanes and fault pages in, outside the measurement.
        eng.transfer(segment, a.operation, *plans[0])

        counter = [0]
        lock = threading.Lock()
        lats: list[list[float]] = [[] for _ in range(a.threads)]
        ends: list[list[float]] = [[] for _ in range(a.threads)]
        done = [0] * a.threads
        errors: list[str] = []
        stop = threading.Event()
        go = threading.Barrier(a.threads + 1)
        nbytes = a.block_size * a.batch_size

        def worker(t: int) -> None:
            loc, rem, lens = plans[t]
            mine, fin = lats[t], ends[t]
            go.wait()
            end = t0 + a.duration
            try:
                while not stop.is_set():
                    s = time.perf_counter()
                    b = eng.submit(segment, a.operation, loc, rem, lens)
                    try:
                        b.wait()
                    finally:
                        b.close()
                    e = time.perf_counter()
                    mine.append(e - s)
                    fin.append(e)
                    done[t] += 1
                    with lock:
                        counter[0] += nbytes
                    if time.monotonic() >= end:
                        break
            except MooncakeError as e:
                errors.append(f"{type(e).__name__}: {e}")
                stop.set()

        workers = [threading.Thread(target=worker, args=(t,), name=f"mc-bench-{t}", daemon=True)
                   for t in range(a.threads)]
        for w in workers:
            w.start()
        prog = _Progress(counter, a.duration, a.report_unit, a.report_precision, progress)
        t0 = time.monotonic()
        p0 = time.perf_counter()
        go.wait()
        prog.start()
        try:
            for w in workers:
                while w.is_alive():
                    w.join(0.2)
        except KeyboardInterrupt:
            stop.set()
            for w in workers:
                w.join()
        elapsed = time.monotonic() - t0
        prog.close()
        proto = a.protocol
        if proto == "auto":
            proto = f"auto:{eng.explain(segment)['chosen']}"
        return Result(a.operation, proto, segment, a.block_size, a.batch_size, a.threads, elapsed,
                      sum(done) * nbytes, sum(done), [x for lt in lats for x in lt],
                      "; ".join(errors), sorted(x - p0 for f in ends for x in f))
    finally:
        eng.close()


def _touch(addr: int, length: int) -> None:
    """Fault the pages in (a first touch inside the timed loop would be measured)."""
    import ctypes

    ctypes.memset(addr, 0x5A, length)


# -- target ----------------------------------------------------------------------------------


def run_target(a: argparse.Namespace) -> int:
    from mooncake.engine import TransferEngine

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        eng = TransferEngine(a.local_server_name, a.metadata_server, a.protocol, a.device_name)
        try:
            buf = eng.allocate(a.buffer_size)
            _touch(buf.addr, buf.length)
            info = {"segment": eng.segment_name, "buffer": buf.addr, "length": buf.length,
                    "protocol": a.protocol, "transports": list(eng.transports),
                    "pid": os.getpid()}
            if a.json:
                print(json.dumps(info), flush=True)
            else:
                print(f"target ready: segment {eng.segment_name} buffer 0x{buf.addr:x} "
                      f"length {buf.length} ({', '.join(eng.transports)})\n"
                      f"run: mooncake bench --mode initiator --segment_id {eng.segment_name} "
                      f"--protocol {a.protocol}\nCtrl-C (or SIGTERM) stops.", flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            eng.close()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0


# -- loopback --------------------------------------------------------------------------------


def _target_argv(a: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "mooncake", "bench", "--mode", "target", "--json",
            "--protocol", a.protocol, "--metadata_server", a.metadata_server,
            "--local_server_name", a.local_server_name.split(":")[0],
            "--device_name", a.device_name, "--buffer_size", str(a.buffer_size)]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start_target(a: argparse.Namespace, timeout: float = 60.0) -> tuple[subprocess.Popen, dict]:
    """Start ``mooncake bench --mode target`` as a child; return it and its ready message."""
    proc = subprocess.Popen(_target_argv(a), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, preexec_fn=_die_with_parent)
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    line = box[0] if box else ""
    try:
        info = json.loads(line)
    except ValueError:
        running = proc.poll() is None
        stop_target(proc)
        err = proc.stderr.read() if proc.stderr else ""
        why = (f"did not report ready within {timeout:g} s" if running else
               f"exited with {proc.returncode}")
        raise RuntimeError(f"target process {why}: "
                           f"{err.strip()[-2000:] or line.strip()}") from None
    # Drain stderr so a chatty child never blocks on a full pipe.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, info


def stop_target(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the child."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- entry -----------------------------------------------------------------------------------


def _report(a: argparse.Namespace, r: Result, extra: dict[str, Any]) -> int:
    if a.plot is not None:
        from mooncake import plot

        plot.bench_run(r.completions_s, r.latencies_s, r.block_size * r.batch_size, r.elapsed_s,
                       f"mooncake bench: {r.line(a.report_unit, a.report_precision)}", a.plot)
        extra = {**extra, "plot": os.path.abspath(a.plot)}
    if a.json:
        d = r.as_dict(a.report_unit)
        d.update(extra)
        print(json.dumps(d))
    else:
        print(r.line(a.report_unit, a.report_precision))
        if a.plot is not None:
            print(f"plot: {extra['plot']}")
        if r.error:
            print(f"error: {r.error}", file=sys.stderr)
    return 1 if r.error else 0


def main(argv: list[str]) -> int:
    """``mooncake bench [flags]``; returns the process exit status."""
    from mooncake.errors import MooncakeError

    a = parse_args(argv)
    progress = a.progress == "on" or (a.progress == "auto" and not a.json)
    try:
        if a.mode == "target":
            return run_target(a)
        if a.mode == "initiator":
            return _report(a, run_initiator(a, a.segment_id, progress), {"mode": "initiator"})
        proc, info = start_target(a)
        try:
            r = run_initiator(a, info["segment"], progress)
        finally:
            stop_target(proc)
        return _report(a, r, {"mode": "loopback", "target_pid": proc.pid,
                              "target_exit": proc.returncode})
    except (MooncakeError, RuntimeError, OSError) as e:
        print(f"mooncake bench: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
