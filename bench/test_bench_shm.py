"""Same-host throughput: shm (mapped managed buffer and cross-memory attach), cxl (tmpfs window)
and TCP, against single-thread memcpy measured in the same run on the same working set.

Every benchmark moves WORKING_SET bytes per round as BLOCK-sized requests in one batch and reports
decimal GB/s in ``extra_info``; the last one reports the ratios.  Run:
``pytest bench/test_bench_shm.py --benchmark-only -s``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mooncake._core import copy as kc
from mooncake.engine import TransferEngine

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
WORKING_SET = 64 * MiB
BLOCK = int(os.environ.get("MC_BENCH_BLOCK", 4 * MiB))
ROUNDS = 15
RESULTS: dict[str, float] = {}

PEER = r"""
import json, os, sys
import numpy as np
from mooncake.engine import TransferEngine
from mooncake.transports import cxl
n = int(sys.argv[1])
e = TransferEngine("127.0.0.1", protocol="auto")
a = np.ones(n, dtype=np.uint8)
e.register(a)
m = e.allocate(n)
out = {"segment": e.segment_name, "array": a.ctypes.data, "managed": m.addr}
if os.environ.get("MC_CXL_DEV_PATH"):
    w = cxl.window()
    e.register(w.address(0), n, "cxl")
    out["cxl"] = w.address(0)
print(json.dumps(out), flush=True)
sys.stdin.read()
e.close()
"""


@pytest.fixture(scope="module")
def cxl_file():
    path = f"/dev/shm/mc_bench_cxl_{os.getpid()}"
    with open(path, "wb") as f:
        f.truncate(WORKING_SET)
    yield path
    os.unlink(path)


@pytest.fixture(scope="module")
def peer(cxl_file):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MC_CXL_DEV_PATH": cxl_file}
    p = subprocess.Popen([sys.executable, "-c", PEER, str(WORKING_SET)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    info = json.loads(p.stdout.readline())
    yield info
    p.stdin.close()
    p.wait(30)


@pytest.fixture(scope="module")
def src():
    a = np.random.default_rng(0).integers(0, 255, WORKING_SET, dtype=np.uint8)
    return a


def record(benchmark, key: str, nbytes: int) -> float:
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing measured
        return 0.0
    gbps = nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update({"GB/s": round(gbps, 2), "block": BLOCK,
                                 "working_set": WORKING_SET})
    RESULTS[key] = gbps
    return gbps


def test_memcpy_baseline(benchmark, src):
    dst = np.zeros_like(src)
    s, d = src.ctypes.data, dst.ctypes.data

    def run():
        for off in range(0, WORKING_SET, BLOCK):
            kc.memcpy(d + off, s + off, BLOCK)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)
    record(benchmark, "memcpy", WORKING_SET)
    assert np.array_equal(src, dst)


def _engine_write(benchmark, key, src, segment, remote, **cfg):
    with TransferEngine("127.0.0.1", **cfg) as e:
        e.register(src)
        offs = list(range(0, WORKING_SET, BLOCK))
        local = [src.ctypes.data + o for o in offs]
        rem = [remote + o for o in offs]
        lens = [BLOCK] * len(offs)
        chosen = e.explain(segment)["chosen"]
        benchmark.pedantic(lambda: e.transfer(segment, "write", local, rem, lens),
                           rounds=ROUNDS, warmup_rounds=2)
        benchmark.extra_info["transport"] = chosen
        return record(benchmark, key, WORKING_SET)


@pytest.mark.parametrize("workers", [1, 2])
def test_shm_mapped(benchmark, src, peer, workers):
    _engine_write(benchmark, f"shm_mapped_w{workers}", src, peer["segment"], peer["managed"],
                  protocol="shm", MC_WORKERS_PER_CTX=workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_shm_attach(benchmark, src, peer, workers):
    _engine_write(benchmark, f"shm_attach_w{workers}", src, peer["segment"], peer["array"],
                  protocol="shm", MC_WORKERS_PER_CTX=workers)


def test_cxl_window(benchmark, src, peer, cxl_file):
    _engine_write(benchmark, "cxl_w1", src, peer["segment"], peer["cxl"], protocol="cxl",
                  MC_WORKERS_PER_CTX=1, MC_CXL_DEV_PATH=cxl_file)


def test_tcp_same_transfer(benchmark, src, peer):
    _engine_write(benchmark, "tcp", src, peer["segment"], peer["managed"], protocol="tcp")


def test_ratios(benchmark):
    base = RESULTS.get("memcpy")
    if not base:
        pytest.skip("memcpy baseline did not run")
    r = {}
    for k in ("shm_mapped_w1", "shm_attach_w1", "cxl_w1"):
        if k in RESULTS:
            r[f"{k}/memcpy"] = RESULTS[k] / base
    for k in ("shm_mapped", "shm_attach"):
        if f"{k}_w1" in RESULTS and f"{k}_w2" in RESULTS:
            r[f"{k} w2/w1"] = RESULTS[f"{k}_w2"] / RESULTS[f"{k}_w1"]
    if "tcp" in RESULTS and "shm_mapped_w2" in RESULTS:
        r["shm_mapped_w2/tcp"] = RESULTS["shm_mapped_w2"] / RESULTS["tcp"]
    benchmark.extra_info.update({k: round(v, 3) for k, v in r.items()})
    benchmark.extra_info.update({f"{k} GB/s": round(v, 2) for k, v in RESULTS.items()})
    print("\n" + json.dumps(benchmark.extra_info, indent=1))
    benchmark.pedantic(lambda: None, rounds=1)
