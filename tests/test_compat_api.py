"""The Mooncake-compatible face end to end, plus segment naming, descriptor refresh and the CLI."""

from __future__ import annotations

import ctypes
import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from peer import Peer, sha

from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode

KiB = 1024


def test_two_process_flow_like_mooncake_docs(peer):
    raddr = peer.alloc(256 * KiB, seed=3)
    eng = TransferEngine()
    assert eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    try:
        assert 1024 <= eng.get_rpc_port() <= 65535
        buf = (ctypes.c_uint8 * (256 * KiB))()
        ptr = ctypes.addressof(buf)
        assert eng.register_memory(ptr, len(buf)) == 0
        assert eng.get_first_buffer_address(peer.segment) == raddr
        ctypes.memset(ptr, 0x5A, len(buf))
        assert eng.transfer_sync_write(peer.segment, ptr, raddr, 64 * KiB) == 0
        assert peer.sha(raddr, 64 * KiB) == sha(b"\x5a" * (64 * KiB))
        assert eng.transfer_sync_read(peer.segment, ptr + 64 * KiB, raddr + 128 * KiB,
                                      64 * KiB) == 0
        assert sha(bytes(buf)[64 * KiB:128 * KiB]) == peer.sha(raddr + 128 * KiB, 64 * KiB)
        ptrs = [ptr + i * 4 * KiB for i in range(8)]
        peers = [raddr + i * 4 * KiB for i in range(8)]
        assert eng.batch_transfer_sync_write(peer.segment, ptrs, peers, [4 * KiB] * 8) == 0
        bid = eng.batch_transfer_async_read(peer.segment, ptrs, peers, [4 * KiB] * 8)
        assert bid > 0 and eng.get_batch_transfer_status([bid]) == 0
        bid = eng.batch_transfer_async(peer.segment, ptrs, peers, [KiB] * 8, TransferOpcode.Write)
        assert eng.get_batch_transfer_status([bid]) == 0
        assert eng.unregister_memory(ptr) == 0
        assert eng.transfer_sync_write(peer.segment, ptr, raddr, 16) == -1  # now unregistered
    finally:
        eng.close()


def test_notify_travels_with_the_transfer(engine, peer):
    raddr = peer.alloc(KiB)
    buf = np.ones(KiB, np.uint8)
    engine.register(buf)
    peer.call("notifies")  # drain
    rc = engine.transfer_sync(peer.segment, buf.ctypes.data, raddr, KiB, TransferOpcode.Write,
                              TransferNotify("kv-done", "req-17"))
    assert rc == 0
    assert peer.call("notifies") == [("kv-done", "req-17")]
    engine.batch_transfer_sync(peer.segment, [buf.ctypes.data], [raddr], [KiB],
                               TransferOpcode.Write, TransferNotify("n2", "m2"))
    assert peer.call("notifies") == [("n2", "m2")]


def test_probe_topology_and_byte_helpers(engine, peer):
    assert engine.send_probe(peer.segment) == 0
    assert engine.send_probe("127.0.0.1:1") == -1
    topo = json.loads(engine.get_local_topology())
    assert any(m["name"].startswith("cpu:") for m in topo["mems"]) and "tcp" in topo["transports"]
    assert "nics" in topo  # TENT's shape (mooncake.topology over sysfs)
    ptr = engine.allocate_managed_buffer(8 * KiB)
    assert ptr != 0
    assert engine.write_bytes_to_buffer(ptr, b"abcdef", 6) == 0
    assert engine.read_bytes_from_buffer(ptr, 6) == b"abcdef"
    assert engine.free_managed_buffer(ptr, 8 * KiB) == 0
    assert engine.free_managed_buffer(ptr, 8 * KiB) == -1
    assert engine.allocate_managed_buffer(0) == 0


def test_port_in_local_hostname_is_bound_as_given():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with TransferEngine(f"127.0.0.1:{port}", protocol="tcp") as e:
        assert e.get_rpc_port() == port and e.segment_name == f"127.0.0.1:{port}"
        with pytest.raises(Exception, match="cannot bind the RPC listener"):
            TransferEngine(f"127.0.0.1:{port}", protocol="tcp")


def test_rpc_port_range_is_obeyed():
    with TransferEngine("127.0.0.1", protocol="tcp", MC_MIN_RPC_PORT=23100,
                        MC_MAX_RPC_PORT=23120) as e:
        assert 23100 <= e.get_rpc_port() <= 23120
        assert e.config.source("MC_MIN_RPC_PORT") == "argument"


def test_descriptor_refreshed_after_peer_registers_more(engine):
    p = Peer(protocol="tcp")
    try:
        a = p.alloc(KiB)
        buf = np.arange(KiB, dtype=np.uint8)
        engine.register(buf)
        engine.write(p.segment, buf, a)  # caches the descriptor
        b = p.alloc(KiB, seed=9)  # registered after we cached
        engine.write(p.segment, buf, b)
        assert p.sha(b, KiB) == sha(buf)
    finally:
        p.close()


def test_peer_restart_on_same_port_is_picked_up(engine):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    buf = np.arange(KiB, dtype=np.uint8)
    engine.register(buf)
    first = _peer_on(port)
    try:
        a = first.alloc(KiB)
        engine.write(first.segment, buf, a)
    finally:
        first.kill()
    second = _peer_on(port)
    try:
        a2 = second.alloc(KiB, seed=5)
        # the lanes still point at the dead process: the engine refetches and retries once
        assert engine.transfer_sync_write(second.segment, buf.ctypes.data, a2, KiB) == 0
        assert second.sha(a2, KiB) == sha(buf)
    finally:
        second.close()


def _peer_on(port: int) -> Peer:
    return Peer(protocol="tcp", _hostname=f"127.0.0.1:{port}")


def test_cli_config_show_and_transports():
    r = subprocess.run([sys.executable, "-m", "mooncake", "config", "show", "--json"],
                       capture_output=True, text=True, timeout=60,
                       env={"MC_SLICE_SIZE": "131072", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    opts = data["options"] if "options" in data else data
    row = opts["MC_SLICE_SIZE"] if isinstance(opts, dict) else next(
        o for o in opts if o["name"] == "MC_SLICE_SIZE")
    assert row["value"] == 131072 and row["source"] == "env:MC_SLICE_SIZE"
    r = subprocess.run([sys.executable, "-m", "mooncake", "transports"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "tcp" in r.stdout


def test_te_metric_logs_throughput(peer, caplog):
    import logging
    import time

    raddr = peer.alloc(MiB := 1 << 20)
    with caplog.at_level(logging.INFO, logger="mooncake"):
        with TransferEngine("127.0.0.1", protocol="tcp", MC_TE_METRIC=True,
                            MC_TE_METRIC_INTERVAL_SECONDS=0.3) as e:
            buf = np.ones(MiB, np.uint8)
            e.register(buf)
            e.write(peer.segment, buf, raddr)
            e.submit(peer.segment, "write", [buf.ctypes.data], [raddr], [MiB]).close()
            time.sleep(0.8)
    lines = [r.getMessage() for r in caplog.records if "throughput" in r.getMessage()]
    assert lines and any(not ln.startswith("throughput 0.000") for ln in lines)
