"""``mooncake bench``: loopback, initiator + target in two processes, flag validation."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from png import png_size

from mooncake.bench import parse_args, parse_size
from mooncake.plot import SIZE

SMALL = ["--buffer_size", "8M", "--batch_size", "16", "--threads", "2"]
RESULT_LINE = re.compile(r"^(read|write) tcp block=(\d+) batch=(\d+) threads=(\d+): "
                         r"\d+\.\d+ GB/s, [\d,]+ req/s, p50 batch latency \d+\.\d+ ms$", re.M)


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mooncake", "bench", *args],
                          capture_output=True, text=True, timeout=timeout)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_loopback_prints_result_line():
    r = bench("--mode", "loopback", "--duration", "1.5", "--operation", "write", *SMALL,
              "--progress", "on")  # > 1 s: the first progress tick comes at 1 s
    assert r.returncode == 0, r.stderr
    m = RESULT_LINE.search(r.stdout)
    assert m, r.stdout
    assert m.groups() == ("write", "65536", "16", "2")
    assert "GB/s" in r.stderr  # the progress line(s)


def test_loopback_json_read_and_child_reaped():
    r = bench("--duration", "1", "--operation", "read", "--block_size", "4K",
              "--report_unit", "MiB", "--json", *SMALL)  # no --mode, no --segment_id: loopback
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["mode"] == "loopback" and d["operation"] == "read" and d["protocol"] == "tcp"
    assert d["block_size"] == 4096 and d["batch_size"] == 16 and d["threads"] == 2
    assert d["batches"] > 0 and d["requests"] == 16 * d["batches"]
    assert d["bytes"] == 4096 * d["requests"]
    assert d["unit"] == "MiB/s" and d["value"] > 0 and d["error"] is None
    assert abs(d["value"] * (1 << 20) - d["gbps"] * 1e9) <= 1e-6 * d["gbps"] * 1e9
    assert d["batch_latency_ms"]["p50"] > 0
    assert d["target_exit"] == 0  # SIGTERM: clean exit
    assert gone(d["target_pid"])
    assert not glob.glob(f"/dev/shm/mooncake_{d['target_pid']}_*")


def test_json_and_plot_together(tmp_path):
    png = tmp_path / "run.png"
    r = bench("--duration", "0.5", "--operation", "write", "--json", "--plot", str(png), *SMALL)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)  # stdout is the one JSON document, nothing else
    assert d["plot"] == str(png) and d["batches"] > 0 and d["error"] is None
    assert png_size(png) == SIZE


def test_plot_without_matplotlib_names_the_extra(tmp_path):
    hide = tmp_path / "hide" / "matplotlib"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    r = subprocess.run([sys.executable, "-m", "mooncake", "bench", "--plot",
                        str(tmp_path / "x.png")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(hide.parent)})
    assert r.returncode == 2
    assert "pip install 'mooncake[plot]'" in r.stderr and not (tmp_path / "x.png").exists()


def _start_target(*extra: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "mooncake", "bench", "--mode", "target",
                          "--buffer_size", "8M", *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    return p, p.stdout.readline()


def _stop(p: subprocess.Popen, sig: int) -> int:
    if p.poll() is None:
        p.send_signal(sig)
    try:
        return p.wait(20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_initiator_and_target_in_two_processes():
    target, line = _start_target("--json")
    try:
        info = json.loads(line)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", info["segment"])
        assert info["buffer"] > 0 and info["length"] == 8 << 20
        r = bench("--mode", "initiator", "--segment_id", info["segment"], "--duration", "1",
                  "--operation", "write", "--block_size", "4096", "--json", *SMALL)
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert d["mode"] == "initiator" and d["segment"] == info["segment"]
        assert d["bytes"] > 0 and d["error"] is None
        # the target keeps serving: a second initiator run works too
        r2 = bench("--segment_id", info["segment"], "--duration", "0.5", *SMALL)
        assert r2.returncode == 0, r2.stderr
        assert RESULT_LINE.search(r2.stdout), r2.stdout
    finally:
        rc = _stop(target, signal.SIGTERM)
    assert rc == 0, target.stderr.read()
    assert not glob.glob(f"/dev/shm/mooncake_{target.pid}_*")


def test_target_plain_output_and_sigint():
    target, line = _start_target()
    try:
        m = re.match(r"target ready: segment (127\.0\.0\.1:\d+) buffer 0x[0-9a-f]+ "
                     r"length 8388608", line)
        assert m, line
    finally:
        rc = _stop(target, signal.SIGINT)
    assert rc == 0


def test_unreachable_segment_is_an_error():
    t0 = time.monotonic()
    r = bench("--mode", "initiator", "--segment_id", "127.0.0.1:1", "--duration", "1", *SMALL)
    assert r.returncode == 1
    assert "SegmentNotFound" in r.stderr and "127.0.0.1:1" in r.stderr
    assert time.monotonic() - t0 < 60


def test_auto_protocol_names_the_chosen_transport():
    r = bench("--protocol", "auto", "--duration", "0.5", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["protocol"].startswith("auto:") and d["protocol"] != "auto:None"


@pytest.mark.parametrize("args, message", [
    (["--mode", "bogus"], "invalid choice: 'bogus'"),
    (["--operation", "copy"], "invalid choice: 'copy'"),
    (["--block_size", "0"], "must be > 0"),
    (["--block_size", "12Q"], "is not a size"),
    (["--batch_size", "0"], "must be >= 1"),
    (["--threads", "x"], "is not an integer"),
    (["--duration", "-1"], "positive number of seconds"),
    (["--report_unit", "GBs"], "invalid choice: 'GBs'"),
    (["--report_precision", "12"], "allowed 0..9"),
    (["--protocol", "nosuch"], "'nosuch' is not an installed transport (allowed: auto, "),
    (["--mode", "initiator"], "needs --segment_id"),
    (["--mode", "target", "--segment_id", "127.0.0.1:1"], "only for --mode initiator"),
    (["--buffer_size", "1M", "--block_size", "1M", "--batch_size", "2"], "is too small"),
    (["--plot", "run.svg"], "allowed: a path ending in .png"),
    (["--plot", "/nonexistent/dir/run.png"], "does not exist"),
    (["--mode", "target", "--plot", "run.png"], "--plot is for a measuring run"),
])
def test_bad_flags_name_the_problem(args, message):
    r = bench(*args)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr


def test_parse_defaults_and_spellings():
    a = parse_args([])
    assert (a.mode, a.operation, a.protocol, a.metadata_server, a.local_server_name) == (
        "loopback", "read", "tcp", "P2PHANDSHAKE", "127.0.0.1")
    assert (a.batch_size, a.block_size, a.buffer_size, a.duration, a.threads) == (
        128, 65536, 256 << 20, 10.0, 4)
    assert (a.report_unit, a.report_precision, a.json) == ("GB", 2, False)
    b = parse_args(["--segment_id", "h:1", "--batch-size", "8", "--block-size=1MiB"])
    assert (b.mode, b.batch_size, b.block_size) == ("initiator", 8, 1 << 20)


@pytest.mark.parametrize("text, n", [("65536", 65536), ("64K", 65536), ("64KiB", 65536),
                                     ("64kb", 65536), ("256M", 256 << 20), ("1G", 1 << 30),
                                     ("2T", 2 << 40)])
def test_parse_size(text, n):
    assert parse_size(text) == n
