"""Metadata-store clients: hand-written against library, on the real servers the tests start.

Rows (µs per operation, median of A/B-interleaved rounds of ``OPS`` operations, one client
each, on loopback):

* etcd put / get of a 1 KiB descriptor: the store's own client (``EtcdMetadata``: stdlib
  ``http.client`` on etcd's JSON gateway, kept-alive connection) as the baseline, ``etcd3gw``
  (on ``requests``) as the row; both without a lease (``MC_METADATA_TTL=0``).
* redis SET / GET of the same value: the store (``RedisMetadata``, now on redis-py) as the row,
  a 60-line RESP2 client on a socket (what the store was before redis-py) as the baseline.
* import cost: a fresh interpreter that has already imported ``mooncake.metadata.base`` then
  imports the client library (``etcd3gw``, ``redis``) or what the hand-written client needs
  (``http.client``; ``socket``/``ssl``, loaded already); the in-process import time, median of
  ``IMPORT_RUNS`` processes.

``pytest bench/test_bench_metadata.py --benchmark-only -s`` (needs ``etcd``, ``redis-server``,
``etcd3gw`` and ``redis``; missing ones skip their rows).
"""

from __future__ import annotations

import io
import json
import os
import socket
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Results, run_paired

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import servers  # noqa: E402

OPS = 50
IMPORT_RUNS = int(os.environ.get("MC_BENCH_IMPORT_RUNS", "7"))
VALUE = json.dumps(servers.descriptor("bench:1", n=12)).encode()[:1024].ljust(1024, b" ")


class Resp:
    """A minimal RESP2 client (one socket, one command at a time): the hand-written baseline."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = io.BufferedReader(self.sock.makefile("rb", buffering=0))

    def call(self, *args: bytes | str) -> Any:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else a.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def _reply(self) -> Any:
        line = self.rfile.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.rfile.read(n + 2)[:-2]
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise ConnectionError(f"bad reply {line!r}")

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


@pytest.fixture(scope="module")
def etcd() -> Iterator[servers.Server]:
    with servers.running("etcd") as s:
        yield s


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[servers.Server]:
    with servers.running("redis") as s:
        yield s


def _per_op(results: Results, benchmark: Any, name: str, lib: Any, hand: Any,
            lib_what: str, hand_what: str) -> None:
    def batch(fn: Any) -> Any:
        return lambda: [fn() for _ in range(OPS)]

    paired = run_paired(benchmark, batch(lib), batch(hand))
    if paired is None:
        return
    value = paired.median("engine") / OPS * 1e6
    base = paired.median("baseline") / OPS * 1e6
    benchmark.extra_info.update(client=lib_what, ops_per_round=OPS)
    results.row(f"{name} ({lib_what})", value, "us", base, hand_what, None, benchmark.extra_info)


@pytest.mark.parametrize("op", ["put", "get"])
def test_etcd_roundtrip(benchmark: Any, results: Results, etcd: servers.Server, op: str) -> None:
    etcd3gw = pytest.importorskip("etcd3gw")
    ours = servers.make_store("etcd", etcd.address, MC_METADATA_TTL=0)
    lib = etcd3gw.client(host=etcd.host, port=etcd.port, timeout=10, api_path="/v3/")
    key = "mooncake/ram/bench:1"
    try:
        ours._put(key, VALUE)
        assert lib.get(key) == [VALUE] and ours._get(key) == VALUE
        if op == "put":
            _per_op(results, benchmark, "etcd put 1 KiB", lambda: lib.put(key, VALUE),
                    lambda: ours._put(key, VALUE), "etcd3gw", "hand-written")
        else:
            _per_op(results, benchmark, "etcd get 1 KiB", lambda: lib.get(key),
                    lambda: ours._get(key), "etcd3gw", "hand-written")
    finally:
        ours.close()
        lib.session.close()


@pytest.mark.parametrize("op", ["set", "get"])
def test_redis_roundtrip(benchmark: Any, results: Results, redis_srv: servers.Server,
                         op: str) -> None:
    pytest.importorskip("redis")
    ours = servers.make_store("redis", redis_srv.address, MC_METADATA_TTL=0)
    hand = Resp(redis_srv.host, redis_srv.port)
    key = "mooncake/ram/bench:1"
    try:
        ours._put(key, VALUE)
        assert hand.call("GET", key) == VALUE and ours._get(key) == VALUE
        if op == "set":
            _per_op(results, benchmark, "redis SET 1 KiB", lambda: ours._put(key, VALUE),
                    lambda: hand.call("SET", key, VALUE), "redis-py", "hand-written")
        else:
            _per_op(results, benchmark, "redis GET 1 KiB", lambda: ours._get(key),
                    lambda: hand.call("GET", key), "redis-py", "hand-written")
    finally:
        ours.close()
        hand.close()


_IMPORT = ("import time, mooncake.metadata.base\n"
           "t = time.perf_counter()\nimport {mod}\nprint(time.perf_counter() - t)")


def _import_us(mod: str) -> float:
    out = subprocess.run([sys.executable, "-c", _IMPORT.format(mod=mod)], capture_output=True,
                         text=True, timeout=60, check=True, cwd=HERE.parent)
    return float(out.stdout.split()[-1]) * 1e6


@pytest.mark.parametrize("store, lib, hand", [
    # what each hand-written client needs beyond the metadata base: http.client for etcd's
    # gateway; for RESP only socket and ssl, which the base has loaded already (~0)
    ("etcd", "etcd3gw", "http.client"),
    ("redis", "redis", "socket, ssl"),
])
def test_import_cost(benchmark: Any, results: Results, store: str, lib: str, hand: str) -> None:
    pytest.importorskip(lib)
    lib_us: list[float] = []
    hand_us: list[float] = []

    def once() -> None:
        lib_us.append(_import_us(lib))
        hand_us.append(_import_us(hand))

    benchmark.pedantic(once, rounds=IMPORT_RUNS, warmup_rounds=1)
    benchmark.extra_info.update(client=lib, processes=IMPORT_RUNS)
    results.row(f"{store} client import ({lib})", statistics.median(lib_us[-IMPORT_RUNS:]), "us",
                statistics.median(hand_us[-IMPORT_RUNS:]), f"{hand}", None,
                benchmark.extra_info)
