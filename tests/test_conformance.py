"""The conformance suite (:mod:`mooncake.testing.conformance`) for every first-party transport.

tcp, shm (NumPy memory reached by cross-memory attach, and managed buffers reached by mapping),
cxl (a tmpfs file standing in for the DAX window, mapped by both processes) on this host, and
rdma inside the Soft-RoCE VM (``tools/rxe-vm.sh -- python -m pytest -m rdma``; skipped elsewhere).
Each spec says which checks do not apply to its transport, and why.
"""

from __future__ import annotations

import os

import pytest
from rdma_util import RXE_DEV, needs_rxe

from mooncake.testing.conformance import Conformance, TransportSpec

MiB = 1 << 20
CXL_WINDOW = 512 * MiB  # sparse: only what the checks touch is ever allocated


class TestTcp(Conformance):
    spec = TransportSpec("tcp")


#: shm copies run in the initiator (memcpy into a mapping, or process_vm_writev): no process on
#: the other side checks a range or stalls when stopped
SHM = dict(refused_by="initiator", peer_serves=False)


def _shm_maps(world) -> int:
    """How many of the peer's buffers our shm transport maps (the rest it attaches to)."""
    eng, seg = world.eng, world.peer.segment
    rem = world.remote(world.peer, 4096, seed=3)
    buf = world.local(4096)
    eng.read(seg, buf.addr, rem.addr, 4096)
    assert eng.explain(seg)["chosen"] == "shm"
    return len(eng.transports["shm"]._links[seg].maps)


class TestShmAttach(Conformance):
    """NumPy buffers on both sides: the peer's memory is reached by cross-memory attach."""

    spec = TransportSpec("shm", **SHM)

    def test_the_peer_is_attached_not_mapped(self, cw):
        assert _shm_maps(cw) == 0


class TestShmMapped(Conformance):
    """Managed buffers (``engine.allocate``) on both sides: the peer's memfds are mapped."""

    spec = TransportSpec(
        "shm", local_memory="managed", remote_memory="managed", **SHM)

    def test_the_peers_buffers_are_mapped(self, cw):
        assert _shm_maps(cw) >= 1


#: what transports/cxl.py documents: the window has no per-range revocation word and no process
#: behind it, so nothing tells an initiator that a peer unregistered a range or died
CXL_NO_REVOCATION = ("the CXL window has no per-range revocation and no target process "
                     "(transports/cxl.py: a peer holding a stale descriptor can still copy into "
                     "a range that was unregistered, until it refreshes the descriptor)")


class TestCxl(Conformance):
    """The peer's memory is ranges of a shared window file; the initiator's is DRAM."""

    @pytest.fixture(scope="class")
    def transport_spec(self):
        from mooncake.transports import cxl

        path = f"/dev/shm/mc_conformance_cxl_{os.getpid()}"
        with open(path, "wb") as f:
            f.truncate(CXL_WINDOW)
        try:
            yield TransportSpec(
                "cxl", env={"MC_CXL_DEV_PATH": path}, remote_memory="cxl",
                refused_by="initiator", peer_serves=False,
                unsupported={
                    "target_unregister": CXL_NO_REVOCATION,
                    "peer_killed": "no target process: a killed peer's window ranges stay "
                                   "mapped, transfers through the window never involve it",
                    "stale_address": CXL_NO_REVOCATION,
                })
        finally:
            os.unlink(path)
            cxl._windows.clear()


@pytest.mark.rdma
@needs_rxe[1]
class TestRdma(Conformance):
    """On Soft-RoCE in the VM: one-sided verbs, so a stopped peer does not stall transfers."""

    spec = TransportSpec("rdma", engine_kwargs={"device_name": RXE_DEV}, refused_by="target",
                         peer_serves=False, hang_bound=120.0, peer_start_timeout=180.0)
