"""Per-batch deadlines on the Pythonic face (TENT's max_timeout_ns as the default), TCP, two
processes: a task past its deadline ends TIMEOUT and no byte of it lands afterwards."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from peer import Peer, sha

from mooncake.batch import CANCEL_GRACE, Status
from mooncake.engine import TransferEngine
from mooncake.errors import ConfigError, TransferTimeout

MiB = 1 << 20


@pytest.fixture
def eng():
    e = TransferEngine("127.0.0.1", protocol="tcp", MC_TRANSFER_TIMEOUT=60)
    yield e
    e.close()


def test_a_deadline_already_past_moves_nothing(eng, peer):
    raddr = peer.alloc(MiB, seed=31)
    before = peer.sha(raddr, MiB)
    src = np.full(MiB, 9, np.uint8)
    eng.register(src)
    b = eng.submit(peer.segment, "write", [src.ctypes.data], [raddr], [MiB],
                   deadline=time.monotonic() - 1)
    with pytest.raises(TransferTimeout):
        b.wait()
    assert [s.status for s in b.statuses()] == [Status.TIMEOUT]
    assert peer.sha(raddr, MiB) == before
    with pytest.raises(TransferTimeout):
        eng.write(peer.segment, src, raddr, deadline=time.monotonic() - 1)
    assert peer.sha(raddr, MiB) == before
    eng.write(peer.segment, src, raddr, deadline=time.monotonic() + 30)  # one in the future
    assert peer.sha(raddr, MiB) == sha(src)


def _against_a_stopped_peer(e: TransferEngine, call) -> np.ndarray:
    """``call(peer, buf, raddr)`` against a SIGSTOPped peer must end TransferTimeout well before
    MC_TRANSFER_TIMEOUT (60 s); returns the buffer after the peer resumed and had time to send."""
    p = Peer(protocol="tcp")
    try:
        raddr = p.alloc(16 * MiB, seed=32)
        buf = np.zeros(16 * MiB, np.uint8)
        e.register(buf)
        e.read(p.segment, buf.ctypes.data, raddr, MiB)
        p.stop()
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout):
            call(p, buf, raddr)
        assert time.monotonic() - t0 < 0.5 + CANCEL_GRACE + 10  # not MC_TRANSFER_TIMEOUT=60
        p.cont()
        buf[:] = 0x42
        time.sleep(0.5)
        return buf
    finally:
        p.kill()


def test_a_deadline_bounds_a_stalled_transfer_and_silences_it(eng):
    buf = _against_a_stopped_peer(eng, lambda p, buf, raddr: eng.read(
        p.segment, buf.ctypes.data, raddr, 16 * MiB, deadline=time.monotonic() + 0.5))
    assert (buf == 0x42).all()  # nothing of the timed-out READ landed


def test_max_timeout_ns_is_the_default_deadline():
    conf = json.dumps({"transports": {"rdma": {"max_timeout_ns": 500_000_000}}})
    e = TransferEngine("127.0.0.1", protocol="tcp", MC_TRANSFER_TIMEOUT=60, MC_TENT_CONF=conf)
    try:
        _against_a_stopped_peer(e, lambda p, buf, raddr: e.write(p.segment, buf, raddr))
    finally:
        e.close()


@pytest.mark.parametrize("bad", [math.nan, math.inf, "soon", True, None.__class__])
def test_bad_deadlines_are_typed_errors(eng, peer, bad):
    raddr = peer.alloc(4096)
    src = np.zeros(4096, np.uint8)
    eng.register(src)
    with pytest.raises(ConfigError, match="deadline"):
        eng.write(peer.segment, src, raddr, deadline=bad)
