"""Rails on a host with real NUMA and two NICs: the Soft-RoCE VM's ``RXE_VM_TOPO=numa2`` mode
(two NUMA nodes; rxe0 on a NIC of node 0, rxe1 on a NIC of node 1; tools/ci-rdma.sh runs this
file there).  The kernel's own per-device counters (``hw_counters``) say which NIC moved what:

* a buffer whose pages are on node 1, towards a remote buffer on node 1 with
  ``MC_ENABLE_DEST_DEVICE_AFFINITY``, goes through rxe1 and never touches rxe0;
* a ``cluster-topology.json`` partition naming rxe0 -> rxe0 wins for node-1 buffers;
* ``rail_topo_path`` direct pairs rxe0->rxe0 and rxe1->rxe1 stripe one transfer over both.
Every transfer is checked byte for byte.
"""

from __future__ import annotations

import json
import os
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
    """A page-aligned buffer whose pages the kernel placed on ``node``."""
    raw = np.zeros(SIZE + 4096, np.uint8)
    buf = raw[(-raw.ctypes.data) % 4096:][:SIZE]
    numa.bind(buf.ctypes.data, SIZE, node)
    buf[:] = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)
    assert numa.node_of(buf.ctypes.data, SIZE) == node
    return buf  # a view: it keeps ``raw`` alive


@contextmanager
def _pair(node: int, **cfg):
    """An initiator and a target engine (rdma, every device), each with a buffer on ``node``;
    closed afterwards."""
    from mooncake.engine import TransferEngine

    kw = {"transports/shm/enable": False, "transports/cxl/enable": False, **cfg}
    target = TransferEngine("127.0.0.1", metadata="p2p", protocol="rdma", **kw)
    try:
        init = TransferEngine("127.0.0.1", metadata="p2p", protocol="rdma", **kw)
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
