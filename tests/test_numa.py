"""mooncake.numa on this host (one node here; the two-node VM runs tests/test_rdma_numa2.py):
the node of touched pages, moving pages, and a thread's preferred node set and restored."""

from __future__ import annotations

import ctypes
import mmap
import threading

import numpy as np
import pytest

from mooncake import numa

SIZE = 1 << 20


def _fresh() -> np.ndarray:
    return np.frombuffer(mmap.mmap(-1, SIZE), np.uint8)


def _policy() -> int:
    mode, mask = ctypes.c_int(-1), (ctypes.c_ulong * 16)()
    assert numa._libc.syscall(numa._nr(3), ctypes.byref(mode), mask, ctypes.c_ulong(1024), None,
                              ctypes.c_ulong(0)) == 0
    return mode.value


def test_untouched_pages_have_no_node_and_touched_ones_do():
    buf = _fresh()
    assert numa.node_of(buf.ctypes.data, SIZE) is None
    buf[:] = 1
    assert numa.node_of(buf.ctypes.data, SIZE) == 0


def test_bind_moves_pages_and_refuses_bad_ranges():
    buf = _fresh()
    buf[: SIZE // 2] = 1  # pages there now are moved, pages touched later follow the policy
    numa.bind(buf.ctypes.data, SIZE, 0)
    buf[SIZE // 2:] = 1
    assert numa.node_of(buf.ctypes.data, SIZE // 2) == 0
    assert numa.node_of(buf.ctypes.data + SIZE // 2, SIZE // 2) == 0
    with pytest.raises(ValueError, match="page-aligned"):
        numa.bind(buf.ctypes.data + 1, SIZE - 4096, 0)
    with pytest.raises(ValueError, match="out of 0..63"):
        numa.bind(buf.ctypes.data, SIZE, 64)
    absent = numa.node_count()  # the first node this host does not have
    with pytest.raises(numa.NumaError, match=f"mbind to node {absent}"):
        numa.bind(buf.ctypes.data, SIZE, absent)


def test_preferred_sets_the_thread_policy_and_restores_it():
    assert _policy() == numa._MPOL_DEFAULT
    go, seen = threading.Event(), []
    other = threading.Thread(target=lambda: (go.wait(10), seen.append(_policy())))
    other.start()
    with numa.preferred(0) as ok:
        assert ok and _policy() == numa._MPOL_PREFERRED
        go.set()
        other.join()
        assert seen == [numa._MPOL_DEFAULT]  # this thread's policy, not the process's
        buf = _fresh()
        buf[:] = 1
        assert numa.node_of(buf.ctypes.data, SIZE) == 0
    assert _policy() == numa._MPOL_DEFAULT
    for none in (None, -1):
        with numa.preferred(none) as ok:
            assert not ok and _policy() == numa._MPOL_DEFAULT
    with pytest.raises(ValueError, match="out of 0..1023"):
        with numa.preferred(1024):
            pass
