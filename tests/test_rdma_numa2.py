"""Rails on a host with real NUMA and two NICs: the Soft-RoCE VM's ``RXE_VM_TOPO=numa2`` mode
(two NUMA nodes; rxe0 on a NIC of node 0, rxe1 on a NIC of node 1; tools/ci-rdma.sh runs this
file there).  The kernel's own per-device counters (``hw_counters``) say which NIC moved what:

* a buffer whose pages are on node 1, towards a remote buffer on node 1 with
  ``MC_ENABLE_DEST_DEVICE_AFFINITY``, goes through rxe1 and never touches rxe0;
* a ``cluster-topology.json`` partition naming rxe0 -> rxe0 wins for node-1 buffers;
* ``rail_topo_path`` direct pairs rxe0->rxe0 and rxe1->rxe1 stripe one transfer over both;
* an ``MC_CUSTOM_TOPO_JSON`` priority matrix picks the local NIC (and the NICs opened);
* each NIC's CQs and QPs sit on its NUMA node (``/proc/self/numa_maps``);
* taking rxe1's netdev down in the middle of such a transfer: its failed slices are re-posted on
  rxe0 (re-keyed for it) and the batch completes; with both netdevs down a synchronous transfer
  completes over tcp (every rail paused, a failover in the metrics).
Every transfer is checked byte for byte.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from rdma_util import needs_rxe

from mooncake import numa

pytestmark = [*needs_rxe, pytest.mark.skipif(
    os.environ.get("RXE_VM_TOPO") != "numa2", reason="needs the two-NIC NUMA VM "
    "(RXE_VM_TOPO=numa2 tools/rxe-vm.sh)")]
MiB = 1 << 20
SIZE = 16 * MiB
DEVS = ("rxe0", "rxe1")


def sent(dev: str) -> int:
    return int(Path(f"/sys/class/infiniband/{dev}/ports/1/hw_counters/sent_pkts").read_text())


def _buffer(node: int, seed: int) -> np.ndarray:
    """A buffer whose pages the kernel placed on ``node``: a fresh mapping (heap memory may be
    a closed engine's pages that are still pinned, and pinned pages cannot move)."""
    buf = np.frombuffer(mmap.mmap(-1, SIZE), np.uint8)  # it keeps the mapping alive
    numa.bind(buf.ctypes.data, SIZE, node)
    buf[:] = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)
    assert numa.node_of(buf.ctypes.data, SIZE) == node
    return buf


@contextmanager
def _pair(node: int, protocol: str = "rdma", **cfg):
    """An initiator and a target engine (every rdma device), each with a buffer on ``node``;
    closed afterwards."""
    from mooncake.engine import TransferEngine

    kw = {"transports/shm/enable": False, "transports/cxl/enable": False, **cfg}
    target = TransferEngine("127.0.0.1", metadata="p2p", protocol=protocol, **kw)
    try:
        init = TransferEngine("127.0.0.1", metadata="p2p", protocol=protocol, **kw)
        try:
            tbuf, lbuf = _buffer(node, 1), _buffer(node, 2)
            target.register(tbuf)
            init.register(lbuf)
            yield init, target, lbuf, tbuf
        finally:
            init.close()
    finally:
        target.close()


def _rails(init, target, lbuf, tbuf) -> dict:
    return init.explain(target.segment_name, lbuf.ctypes.data, tbuf.ctypes.data)["path"]


def _moved(init, target, lbuf, tbuf) -> dict[str, int]:
    """Write then read back the whole buffer; packets each device sent meanwhile."""
    before = {d: sent(d) for d in DEVS}
    seg = target.segment_name
    init.write(seg, lbuf.ctypes.data, tbuf.ctypes.data, SIZE)
    assert zlib.crc32(tbuf) == zlib.crc32(lbuf)
    tbuf[:4096] ^= 0xFF  # the read must bring these back
    init.read(seg, lbuf.ctypes.data, tbuf.ctypes.data, SIZE)
    assert zlib.crc32(tbuf) == zlib.crc32(lbuf)
    return {d: sent(d) - before[d] for d in DEVS}


def test_the_two_nics_sit_on_two_nodes():
    from mooncake import topology as T

    topo = T.discover("/")
    assert {d.name: topo.numa_of(d) for d in topo.rdma_devices
            if d.name in DEVS} == {"rxe0": 0, "rxe1": 1}


def test_a_node1_buffer_goes_through_the_node1_nic():
    with _pair(1, MC_ENABLE_DEST_DEVICE_AFFINITY=True) as engines:
        why = _rails(*engines)
        assert why["pairs"] == ["rxe1->rxe1"], why
        moved = _moved(*engines)
        assert moved["rxe1"] > 0 and moved["rxe0"] == 0, moved


def test_partition_matchings_name_the_pair(tmp_path):
    f = tmp_path / "cluster-topology.json"
    f.write_text(json.dumps({"partition_matchings": {"1-1": [
        {"src_dev": "rxe0", "dst_dev": "rxe0", "src_numa": 1, "dst_numa": 1,
         "bandwidth": 1000.0, "latency": 10.0}]}}))
    with _pair(1, **{"topology/cluster_topology_path": str(f)}) as engines:
        why = _rails(*engines)
        assert why["pairs"] == ["rxe0->rxe0"] and why["rule"] == "cluster topology partition 1-1"
        moved = _moved(*engines)
        assert moved["rxe0"] > 0 and moved["rxe1"] == 0, moved


def test_direct_rails_stripe_one_transfer_over_both_nics(tmp_path):
    f = tmp_path / "rails.json"
    f.write_text(json.dumps({"direct": [{"local": "rxe0", "remote": "rxe0"},
                                        {"local": "rxe1", "remote": "rxe1"}]}))
    with _pair(0, MC_PATH_ROUNDROBIN=True,
               **{"transports/rdma/workers/rail_topo_path": str(f)}) as engines:
        assert _rails(*engines)["rule"] == "rail_topo_path direct pairs"
        moved = _moved(*engines)
        assert moved["rxe0"] > 0 and moved["rxe1"] > 0, moved
        share = moved["rxe0"] / (moved["rxe0"] + moved["rxe1"])
        assert 0.3 < share < 0.7, moved  # round robin: about half each


def test_a_custom_priority_matrix_picks_the_local_nic(tmp_path):
    """MC_CUSTOM_TOPO_JSON (the classic format) reverses the NUMA rule: node-1 buffers leave
    through rxe0; a matrix naming only rxe0 (TENT's format) opens only rxe0."""
    f = tmp_path / "matrix.json"
    f.write_text(json.dumps({"cpu:0": [["rxe1"], ["rxe0"]], "cpu:1": [["rxe0"], ["rxe1"]]}))
    paired = {"MC_ENABLE_HCA_PEER_AFFINITY": True, "MC_NIC_PEER_AFFINITY": "rxe0=rxe0;rxe1=rxe1"}
    with _pair(1, MC_CUSTOM_TOPO_JSON=str(f), **paired) as engines:
        why = _rails(*engines)
        assert why["pairs"] == ["rxe0->rxe0"], why
        assert why["rule"].startswith("MC_CUSTOM_TOPO_JSON cpu:1: its preferred NICs"), why
        moved = _moved(*engines)
        assert moved["rxe0"] > 0 and moved["rxe1"] == 0, moved
    f.write_text(json.dumps({"nics": [{"name": "rxe0"}], "mems": [
        {"name": "*", "device_list": {"rank0": [0]}}]}))
    with _pair(1, MC_CUSTOM_TOPO_JSON=str(f)) as (init, target, lbuf, tbuf):
        assert [d.name for d in init.transports["rdma"].devs] == ["rxe0"]
        assert _rails(init, target, lbuf, tbuf)["rule"].startswith("MC_CUSTOM_TOPO_JSON *")

def _direct_rails(tmp_path) -> dict:
    f = tmp_path / "rails.json"
    f.write_text(json.dumps({"direct": [{"local": "rxe0", "remote": "rxe0"},
                                        {"local": "rxe1", "remote": "rxe1"}]}))
    return {"MC_PATH_ROUNDROBIN": True, "transports/rdma/workers/rail_topo_path": str(f)}


@contextmanager
def _links_down(*netdevs: str):
    """Take netdevs down (their rxe ports go DOWN, their QPs fail); up again afterwards."""
    try:
        for nd in netdevs:
            subprocess.run(["ip", "link", "set", nd, "down"], check=True)
        yield
    finally:
        for nd in netdevs:
            subprocess.run(["ip", "link", "set", nd, "up"], check=True)
        for nd in netdevs:  # back to ACTIVE before the next test
            dev = "rxe0" if nd == os.environ["RXE_NETDEV0"] else "rxe1"
            state = Path(f"/sys/class/infiniband/{dev}/ports/1/state")
            for _ in range(100):
                if "ACTIVE" in state.read_text():
                    break
                time.sleep(0.1)


ROUNDS = 16  # the batch writes the 16 MiB buffer this many times over, 1 MiB a slice


def _big_batch(init, target, lbuf, tbuf):
    n = SIZE // MiB
    return init.submit(target.segment_name, "write",
                       [lbuf.ctypes.data + k * MiB for k in range(n)] * ROUNDS,
                       [tbuf.ctypes.data + k * MiB for k in range(n)] * ROUNDS, [MiB] * n * ROUNDS)


def test_a_nic_going_down_mid_transfer_completes_on_the_other(tmp_path, caplog):
    def rails() -> dict:
        return {(r["local"], r["remote"]): r for r in init.transports["rdma"].rails()}

    with _pair(0, **_direct_rails(tmp_path)) as (init, target, lbuf, tbuf):
        _moved(init, target, lbuf, tbuf)  # both rails connected and carrying
        before, done0 = {d: sent(d) for d in DEVS}, rails()[("rxe0", "rxe0")]["completions"]
        b = _big_batch(init, target, lbuf, tbuf)
        time.sleep(0.05)
        with caplog.at_level("WARNING", logger="mooncake.transports.rdma"), \
                _links_down(os.environ["RXE_NETDEV1"]):
            b.wait(120)  # every task COMPLETED, or this raises with each one's status
            moved = {d: sent(d) - before[d] for d in DEVS}
            assert zlib.crc32(tbuf) == zlib.crc32(lbuf)
        after = rails()
        # round robin gives each rail half the slices; rxe0 completed more: rxe1's leftovers
        slices = ROUNDS * SIZE // min(init.transports["rdma"].slice_size, MiB)
        assert after[("rxe0", "rxe0")]["completions"] - done0 > slices // 2, (slices, after)
        assert moved["rxe0"] > moved["rxe1"], moved
        assert after[("rxe1", "rxe1")]["errors"] >= 1, after
        assert any("re-posted on rxe0->rxe0" in r.getMessage() for r in caplog.records)


def test_both_nics_down_fails_over_to_tcp(tmp_path):
    with _pair(0, protocol="auto", **_direct_rails(tmp_path)) as (init, target, lbuf, tbuf):
        seg = target.segment_name
        assert init.explain(seg)["chosen"] == "rdma"
        _moved(init, target, lbuf, tbuf)
        tbuf[:] = 0
        with _links_down(os.environ["RXE_NETDEV0"], os.environ["RXE_NETDEV1"]):
            init.write(seg, lbuf.ctypes.data, tbuf.ctypes.data, SIZE)  # sync: one retry
            assert zlib.crc32(tbuf) == zlib.crc32(lbuf)
            why = init.explain(seg)
            assert why["chosen"] == "tcp", why
            assert "every RDMA rail" in next(c["reason"] for c in why["candidates"]
                                             if c["transport"] == "rdma")
        assert any(f["from"] == "rdma" and f["to"] == "tcp"
                   for f in init.metrics()["failovers"])


def _queue_pages(dev: str) -> dict[int, int]:
    """Pages per NUMA node of this process's mappings of ``dev``'s verbs file (Soft-RoCE maps
    each CQ's and QP's queue from it), from /proc/self/numa_maps."""
    uverbs = next(p.name for p in Path("/sys/class/infiniband_verbs").iterdir()
                  if (p / "ibdev").exists() and (p / "ibdev").read_text().strip() == dev)
    out: dict[int, int] = {}
    for line in Path("/proc/self/numa_maps").read_text().splitlines():
        if f"file=/dev/infiniband/{uverbs}" in line:
            for tok in line.split()[2:]:
                if tok[:1] == "N" and "=" in tok:
                    node, n = tok[1:].split("=")
                    out[int(node)] = out.get(int(node), 0) + int(n)
    return out


def test_each_nic_s_queues_sit_on_its_node(tmp_path):
    """Created from a thread running on node 0, rxe1's CQs and QPs still sit on node 1."""
    from mooncake import topology as T

    node0 = set(next(n.cpus for n in T.discover("/").numa_nodes if n.id == 0))
    was = os.sched_getaffinity(0)
    os.sched_setaffinity(0, node0)
    try:
        with _pair(0, **_direct_rails(tmp_path)) as engines:  # CQs and QPs on both devices
            _moved(*engines)
            for dev, node in (("rxe0", 0), ("rxe1", 1)):
                pages = _queue_pages(dev)
                assert pages and max(pages, key=pages.get) == node, (dev, pages)
    finally:
        os.sched_setaffinity(0, was)
