"""The operators' tools on real verbs (Soft-RoCE in the VM): topology discovery, the TENT dump
and ``mooncake doctor`` read the VM's live sysfs and libibverbs, not fixtures.

* discovery finds ``RXE_DEV`` with an ACTIVE Ethernet port, its netdev, and picks the RoCE v2
  GID index the harness configured (``RXE_GID_INDEX``); the dump tool lists it as a NIC;
* ``mooncake doctor`` judges that port and GID ``ok`` and says rdma can run;
* ``mooncake doctor --peer`` against an rdma engine in another process moves a checksummed MiB
  over rdma (and restores the peer's bytes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rdma_util import RXE_DEV, RXE_GID_INDEX, needs_rxe

from mooncake import topology as T
from mooncake.testing.peer import Peer

pytestmark = needs_rxe
ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # the RPC address; RoCE itself routes by the GIDs each device publishes


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MC_")}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=180)


def test_discovery_finds_the_soft_roce_device():
    topo = T.discover("/")
    dev = next(d for d in topo.rdma_devices if d.name == RXE_DEV)
    assert dev.kind == "soft"
    port = dev.ports[0]
    assert port.active and port.link_layer == "Ethernet" and port.netdev
    assert port.gid_index == RXE_GID_INDEX and port.gid(RXE_GID_INDEX).type == "RoCE v2"
    assert port.active_mtu in (1024, 2048, 4096) and port.mtu_source == "verbs"


def test_topology_dump_lists_the_device_as_a_nic():
    r = _run("mooncake.transfer_engine_topology_dump")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert RXE_DEV in [n["name"] for n in doc["nics"]]


def _doctor(*args: str) -> tuple[int, dict]:
    r = _run("mooncake", "doctor", "--json", "--host", HOST, *args)
    assert r.returncode in (0, 1, 2), r.stderr
    rep = json.loads(r.stdout)
    assert rep["exit_status"] == r.returncode
    return r.returncode, rep


def _find(rep: dict, check: str) -> list[dict]:
    return [f for f in rep["findings"] if f["check"] == check]


def test_doctor_judges_the_live_port_and_gid():
    rc, rep = _doctor()
    ports = [f for f in _find(rep, "rdma.port") if f["subject"].startswith(RXE_DEV)]
    assert ports and all(f["severity"] == "ok" for f in ports), ports
    gids = [f for f in _find(rep, "rdma.gid") if RXE_DEV in f["subject"]]
    assert gids and gids[0]["severity"] == "ok", gids
    assert str(RXE_GID_INDEX) in gids[0]["seen"]
    assert not [f for f in rep["findings"] if f["check"] == "transports.rdma"]  # rdma can run


@pytest.fixture(scope="module")
def rdma_peer():
    p = Peer(protocol="rdma", device_name=RXE_DEV, _start_timeout=120)
    yield p
    p.close()


def test_doctor_moves_checksummed_bytes_over_rdma(rdma_peer):
    addr = rdma_peer.alloc(1 << 20, seed=3)
    before = rdma_peer.sha(addr, 1 << 20)
    try:
        rc, rep = _doctor("--peer", rdma_peer.segment, "--write")
        moved = [f for f in _find(rep, "peer.transfer") if f["subject"].endswith("via rdma")]
        assert moved and moved[0]["severity"] == "ok", rep["findings"]
        assert "equal" in moved[0]["seen"] and "restored" in moved[0]["seen"]
        assert rdma_peer.sha(addr, 1 << 20) == before
    finally:
        rdma_peer.free(addr)
