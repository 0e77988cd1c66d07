"""The same-host copy kernel (mooncake._core.copy) on its own: tables, pool, checks, faults."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mooncake._core import copy as kc
from mooncake._core.batch import Batch, slice_requests

COMPLETED, TIMEOUT, FAILED = 4, 5, 6
E_REFUSED, E_PEER, E_TIMEOUT = 1000, 1001, 1002
READ, WRITE = 0, 1


def addr(a: np.ndarray) -> int:
    return a.ctypes.data


def direct(a: np.ndarray, slot=None) -> tuple:
    sm, so, sv = slot or (None, 0, 0)
    return (addr(a), a.nbytes, kc.KIND_MEM, None, 0, sm, so, sv)


@pytest.fixture
def pool():
    p = kc.CopyPool(2)
    yield p
    p.close()


def run(pool, table, op, local, remote, length, peer=None, inline_max=0, slice_size=65536):
    b = Batch(len(local))
    s = slice_requests(b, op, local, remote, length, slice_size, 4)
    pool.submit(s, peer or kc.Peer(os.getpid()), table, inline_max)
    assert b.wait(30)
    return b.statuses()


@pytest.mark.parametrize("inline_max", [0, 1 << 30])
@pytest.mark.parametrize("kind", ["mem", "pv"])
def test_write_and_read_round_trip(pool, kind, inline_max):
    rng = np.random.default_rng(1)
    src = rng.integers(0, 255, 3 * (1 << 20) + 123, dtype=np.uint8)
    dst = np.zeros_like(src)
    k = kc.KIND_MEM if kind == "mem" else kc.KIND_PV
    table = kc.Table([(addr(dst), dst.nbytes, k, None, 0, None, 0, 0)])
    st = run(pool, table, WRITE, [addr(src)], [addr(dst)], [src.nbytes], inline_max=inline_max)
    assert st == [(COMPLETED, src.nbytes, 0)]
    assert np.array_equal(src, dst)
    back = np.zeros_like(src)
    st = run(pool, table, READ, [addr(back)], [addr(dst)], [src.nbytes], inline_max=inline_max)
    assert st == [(COMPLETED, src.nbytes, 0)] and np.array_equal(back, src)


def test_mapping_relocates_remote_addresses(pool, tmp_path):
    """A MEM entry with a mapping: remote addresses are translated into the local view."""
    path = f"/dev/shm/mc_test_map_{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        m = kc.Mapping.from_fd(fd, 1 << 20)
    finally:
        os.close(fd)
        os.unlink(path)
    fake_remote = 0x7000_0000_0000
    table = kc.Table([(fake_remote, 1 << 20, kc.KIND_MEM, m, 0, None, 0, 0)])
    src = np.arange(4096, dtype=np.uint8)
    st = run(pool, table, WRITE, [addr(src)], [fake_remote + 4096], [4096])
    assert st[0][0] == COMPLETED
    view = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * (1 << 20)).from_address(m.addr))
    assert np.array_equal(view[4096:8192], src)
    m.close()  # the table still holds the mapping: no fault on a later copy
    st = run(pool, table, READ, [addr(src)], [fake_remote], [4096])
    assert st[0][0] == COMPLETED and not src.any()


def test_range_outside_table_is_refused(pool):
    dst = np.zeros(1 << 20, dtype=np.uint8)
    src = np.ones(1 << 20, dtype=np.uint8)
    table = kc.Table([direct(dst)])
    st = run(pool, table, WRITE, [addr(src), addr(src)], [addr(dst), addr(dst) + 4096],
             [1 << 16, 1 << 20])
    assert st[0] == (COMPLETED, 1 << 16, 0)
    assert st[1][0] == FAILED and st[1][2] == E_REFUSED
    assert dst[: 1 << 16].all()


@pytest.mark.parametrize("inline_max", [0, 1 << 30])
def test_slot_change_fails_copies(pool, inline_max):
    """Ops re-check their registration slot: a buffer unregistered since lookup is not touched."""
    fd = os.memfd_create("slots")
    os.ftruncate(fd, 4096)
    slots = kc.Mapping.from_fd(fd, 4096)
    os.close(fd)
    slots.store_u64(64, 3)
    dst = np.zeros(1 << 20, dtype=np.uint8)
    src = np.ones_like(dst)
    table = kc.Table([direct(dst, (slots, 64, 3))])
    assert run(pool, table, WRITE, [addr(src)], [addr(dst)], [4096], inline_max=inline_max)[0][
        0] == COMPLETED
    slots.store_u64(64, 4)  # unregistered
    dst[:] = 0
    st = run(pool, table, WRITE, [addr(src)], [addr(dst)], [dst.nbytes], inline_max=inline_max)
    assert st[0][0] == FAILED and st[0][2] == E_REFUSED
    assert not dst.any()


def test_exited_peer_fails_and_does_not_write(pool):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    peer = kc.Peer(child.pid)
    child.wait()
    assert not peer.alive
    dst = np.zeros(1 << 20, dtype=np.uint8)
    src = np.ones_like(dst)
    st = run(pool, kc.Table([direct(dst)]), WRITE, [addr(src)], [addr(dst)], [dst.nbytes],
             peer=peer)
    assert st[0][0] == FAILED and st[0][2] == E_PEER
    assert not dst.any()


def test_attach_to_missing_process_fails():
    buf = np.zeros(8, dtype=np.uint8)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    rc = kc.pv_copy(child.pid, READ, addr(buf), 0x1000, 8)
    assert rc != 0


def test_cancel_fails_queued_ops_only(pool):
    """abort: everything queued before cancel() ends COMPLETED (ran) or TIMEOUT (cancelled)."""
    src = np.ones(8 << 20, dtype=np.uint8)
    dsts = [np.zeros_like(src) for _ in range(24)]
    table = kc.Table([direct(d) for d in dsts])
    peer = kc.Peer(os.getpid())
    b = Batch(len(dsts))
    s = slice_requests(b, WRITE, [addr(src)] * len(dsts), [addr(d) for d in dsts],
                       [src.nbytes] * len(dsts), 65536, 4)
    pool.submit(s, peer, table, 0)
    peer.cancel()
    assert b.wait(60)
    st = b.statuses()
    assert {x[0] for x in st} <= {COMPLETED, TIMEOUT}
    assert any(x[2] == E_TIMEOUT for x in st), "nothing was cancelled"
    for (code, nbytes, err), d in zip(st, dsts, strict=True):
        if code == COMPLETED:
            assert nbytes == src.nbytes and d.all()
        else:
            assert err == E_TIMEOUT
    assert peer.wait_idle(10) and peer.inflight == 0
    # a submit after the cancel is unaffected
    assert run(pool, table, WRITE, [addr(src)], [addr(dsts[0])], [4096], peer=peer)[0][0] == \
        COMPLETED


def test_close_fails_queued_ops():
    p = kc.CopyPool(1)
    src = np.ones(8 << 20, dtype=np.uint8)
    dsts = [np.zeros_like(src) for _ in range(16)]
    b = Batch(len(dsts))
    s = slice_requests(b, WRITE, [addr(src)] * len(dsts), [addr(d) for d in dsts],
                       [src.nbytes] * len(dsts), 65536, 4)
    p.submit(s, kc.Peer(os.getpid()), kc.Table([direct(d) for d in dsts]), 0)
    p.close()
    assert b.wait(10)
    assert {x[0] for x in b.statuses()} <= {COMPLETED, FAILED}
    with pytest.raises(RuntimeError, match="closed"):
        p.submit(s, kc.Peer(os.getpid()), kc.Table([]), 0)


def test_many_threads_submit_at_once(pool):
    rng = np.random.default_rng(7)
    nthreads, per = 6, 20
    srcs = [rng.integers(0, 255, 256 * 1024 + 17 * i, dtype=np.uint8) for i in range(nthreads)]
    dsts = [np.zeros_like(s) for s in srcs]
    table = kc.Table([direct(d) for d in dsts])
    errors = []

    def worker(i):
        try:
            for _ in range(per):
                st = run(pool, table, WRITE, [addr(srcs[i])], [addr(dsts[i])], [srcs[i].nbytes],
                         slice_size=16384)
                assert st[0] == (COMPLETED, srcs[i].nbytes, 0)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    th = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
    for t in th:
        t.start()
    for t in th:
        t.join(60)
    assert not errors
    for s, d in zip(srcs, dsts, strict=True):
        assert np.array_equal(s, d)
    assert pool.drain(5) and pool.inflight == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="nworkers"):
        kc.CopyPool(0)
    a = np.zeros(4096, dtype=np.uint8)
    with pytest.raises(ValueError, match="overlap"):
        kc.Table([direct(a), (addr(a) + 100, 10, kc.KIND_MEM, None, 0, None, 0, 0)])
    with pytest.raises(ValueError, match="length"):
        kc.Table([(addr(a), 0, kc.KIND_MEM, None, 0, None, 0, 0)])
    m = kc.Mapping.view(addr(a), 4096)
    with pytest.raises(ValueError, match="exceeds"):
        kc.Table([(0x1000, 8192, kc.KIND_MEM, m, 0, None, 0, 0)])
    with pytest.raises(IndexError):
        m.load_u64(4093)
    with pytest.raises(TypeError):
        kc.Mapping()
    with pytest.raises(OSError):
        kc.Mapping.from_fd(-1, 4096)


# -- silence, writability and hygiene (issue 8) -------------------------------------------------

E_UNREGISTERED, E_DENIED, E_CANCELED = 1006, 1007, 1008


def memfd_map(size: int, writable: bool = True) -> kc.Mapping:
    fd = os.memfd_create("kc_test")
    try:
        os.ftruncate(fd, size)
        return kc.Mapping.from_fd(fd, size, 0, writable)
    finally:
        os.close(fd)


@pytest.mark.parametrize("inline_max", [0, 1 << 30])
@pytest.mark.parametrize("kind", ["mem", "pv"])
def test_write_into_read_only_entry_is_denied_untouched(pool, kind, inline_max):
    dst = np.zeros(1 << 20, dtype=np.uint8)
    src = np.ones_like(dst)
    k = kc.KIND_MEM if kind == "mem" else kc.KIND_PV
    table = kc.Table([(addr(dst), dst.nbytes, k, None, 0, None, 0, 0, None, 0, False)])
    assert not table.writable(0)
    st = run(pool, table, WRITE, [addr(src)], [addr(dst)], [dst.nbytes], inline_max=inline_max)
    assert st[0][0] == FAILED and st[0][2] == E_DENIED
    assert not dst.any()
    dst[:] = 5  # READs from it still work
    st = run(pool, table, READ, [addr(src)], [addr(dst)], [dst.nbytes], inline_max=inline_max)
    assert st[0][0] == COMPLETED and (src == 5).all()


def test_read_only_mapping_makes_a_read_only_entry(pool):
    m = memfd_map(1 << 16, writable=False)
    assert not m.writable
    table = kc.Table([(0x5000_0000_0000, 1 << 16, kc.KIND_MEM, m, 0, None, 0, 0)])
    assert not table.writable(0)
    src = np.ones(4096, dtype=np.uint8)
    st = run(pool, table, WRITE, [addr(src)], [0x5000_0000_0000], [4096])
    assert st[0][2] == E_DENIED  # a PROT_READ mapping is never written (no SIGSEGV)
    with pytest.raises(ValueError, match="read-only"):
        m.store_u64(0, 1)


def test_busy_counter_brackets_every_chunk(pool):
    """Each chunk raises the lane's counter and drops it again; nothing is left over."""
    busy = memfd_map(4096)
    dst = np.zeros(8 << 20, dtype=np.uint8)
    src = np.arange(dst.nbytes, dtype=np.uint8)
    slots = memfd_map(4096)
    slots.store_u64(64, 3)
    table = kc.Table([(addr(dst), dst.nbytes, kc.KIND_MEM, None, 0, slots, 64, 3, busy, 12)])
    st = run(pool, table, WRITE, [addr(src)], [addr(dst)], [dst.nbytes], slice_size=8 << 20)
    assert st[0] == (COMPLETED, dst.nbytes, 0) and np.array_equal(src, dst)
    assert busy.load_u32(12) == 0
    with pytest.raises(ValueError, match="read-only"):
        kc.Table([direct(dst) + (memfd_map(4096, writable=False), 0)])


def test_wait_busy_waits_for_live_holders_only():
    area = memfd_map(4 * 4096)
    assert kc.wait_busy(area, 4096, 4096, 8, [0, 1], [-1, -1], 0.05) == []  # all idle
    area.add_u32(4096 + 4096 + 8, 1)  # lane 1 is inside a chunk on slot 2
    me = os.pidfd_open(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = os.pidfd_open(child.pid)
    child.wait()
    try:
        assert kc.wait_busy(area, 4096, 4096, 8, [0, 1], [-1, me], 0.05) == [1]
        assert kc.wait_busy(area, 4096, 4096, 8, [1], [dead], 5.0) == []  # its owner exited
        t = threading.Timer(0.05, lambda: area.add_u32(4096 + 4096 + 8, -1))
        t.start()
        assert kc.wait_busy(area, 4096, 4096, 8, [1], [me], 30.0) == []  # it left the chunk
        t.join()
    finally:
        os.close(me)
        os.close(dead)
    with pytest.raises(ValueError):
        kc.wait_busy(area, 4096, 4096, 8, [3], [-1], 0.0)  # lane outside the area
    with pytest.raises(ValueError):
        kc.wait_busy(area, 4096, 4096, 4094, [0], [-1], 0.0)  # counter outside a lane


@pytest.mark.parametrize("inline_max", [0, 1 << 30])
def test_cancelled_batch_is_not_touched(pool, inline_max):
    dst = np.zeros(4 << 20, dtype=np.uint8)
    src = np.ones_like(dst)
    b = Batch(1)
    s = slice_requests(b, WRITE, [addr(src)], [addr(dst)], [dst.nbytes], 65536, 4)
    b.cancel()
    pool.submit(s, kc.Peer(os.getpid()), kc.Table([direct(dst)]), inline_max)
    assert b.wait(30)
    assert b.status(0) == (FAILED, 0, E_CANCELED)
    assert not dst.any()


def test_unregistered_local_region_is_not_touched(pool):
    from mooncake._core.regions import RegionTable

    regions = RegionTable()
    dst = np.zeros(4 << 20, dtype=np.uint8)
    src = np.ones_like(dst)
    reg = regions.register(addr(dst), dst.nbytes, owner=dst)
    b = Batch(1)
    s = slice_requests(b, READ, [addr(dst)], [addr(src)], [dst.nbytes], 65536, 4, regions)
    reg.revoke()
    pool.submit(s, kc.Peer(os.getpid()), kc.Table([direct(src)]), 0)
    assert b.wait(30)
    assert b.status(0) == (FAILED, 0, E_UNREGISTERED)
    assert not dst.any() and reg.wait_idle(5)


def test_unregister_mid_copy_stops_at_the_next_chunk():
    """A long READ into a local region that is revoked while it runs: once the region's pins
    are gone, the memory is ours again and stays as we leave it."""
    p = kc.CopyPool(1)
    try:
        from mooncake._core.regions import RegionTable

        regions = RegionTable()
        n = 64 << 20
        dst = np.zeros(n, dtype=np.uint8)
        src = np.ones_like(dst)
        reg = regions.register(addr(dst), n, owner=dst)
        b = Batch(1)
        s = slice_requests(b, READ, [addr(dst)], [addr(src)], [n], n, 4, regions)
        p.submit(s, kc.Peer(os.getpid()), kc.Table([direct(src)]), 0)
        reg.revoke()
        assert reg.wait_idle(30)
        dst[:] = 0x55  # ours again
        assert b.wait(30)
        code, nbytes, err = b.status(0)
        assert (code, err) in ((COMPLETED, 0), (FAILED, E_UNREGISTERED))
        assert (dst == 0x55).all()
    finally:
        p.close()


def test_offsets_near_two_to_the_64_are_refused():
    a = np.zeros(4096, dtype=np.uint8)
    m = kc.Mapping.view(addr(a), 4096)
    for off in ((1 << 64) - 8, (1 << 64) - 4096):
        with pytest.raises(IndexError):
            m.load_u64(off)
        with pytest.raises(IndexError):
            m.store_u64(off, 1)
    with pytest.raises(IndexError):
        m.zero(8, (1 << 64) - 4)
    with pytest.raises(ValueError, match="exceeds"):
        kc.Table([(0x1000, 16, kc.KIND_MEM, m, (1 << 64) - 8, None, 0, 0)])
    with pytest.raises(ValueError, match="wraps"):
        kc.Table([((1 << 64) - 4096, 8192, kc.KIND_MEM, None, 0, None, 0, 0)])
    with pytest.raises(IndexError):
        kc.Table([direct(a, (m, (1 << 64) - 8, 0))])
    with pytest.raises(ValueError, match="wraps"):
        kc.Mapping.view((1 << 64) - 4096, 8192)
    fd = os.memfd_create("kc_off")
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(ValueError, match="offset"):
            kc.Mapping.from_fd(fd, 4096, 1 << 63)
    finally:
        os.close(fd)


def test_typed_arguments_must_not_be_none(pool):
    b = Batch(1)
    dst = np.zeros(16, dtype=np.uint8)
    s = slice_requests(b, WRITE, [addr(dst)], [addr(dst)], [16], 65536, 4)
    table = kc.Table([direct(dst)])
    for args in ((None, kc.Peer(0), table), (s, None, table), (s, kc.Peer(0), None)):
        with pytest.raises(TypeError):
            pool.submit(*args)
    with pytest.raises(TypeError):
        kc.wait_busy(None, 0, 4096, 0, [], [], 0.0)
    pool.submit(s, kc.Peer(0), table)
    assert b.wait(10)


@pytest.mark.parametrize("grace", [0.0, 0.3])
def test_grace_period_workers_copy_then_sleep(grace):
    """A pool with a grace period copies like any other, and its workers sleep once the grace
    period after their last work has passed (the CPU it costs is bounded by it)."""
    p = kc.CopyPool(2, grace)
    try:
        src = np.arange(1 << 20, dtype=np.uint8)
        dst = np.zeros_like(src)
        table = kc.Table([direct(dst)])
        for _ in range(3):
            assert run(p, table, WRITE, [addr(src)], [addr(dst)], [src.nbytes]) == \
                [(COMPLETED, src.nbytes, 0)]
        assert np.array_equal(src, dst)
        import time

        from cpu import other_threads_cpu

        time.sleep(grace + 0.2)  # past the grace period
        before = other_threads_cpu()
        time.sleep(1.0)
        assert other_threads_cpu() - before < 0.1  # asleep, not polling
    finally:
        p.close()


def _sync(pool, table, op, local, remote, length, inline_max, timeout=30.0):
    b = Batch(len(local))
    s = slice_requests(b, op, local, remote, length, 65536, 4)
    done = pool.transfer(s, kc.Peer(os.getpid()), table, inline_max, timeout)
    return done, b


def test_sync_at_or_below_the_threshold_copies_in_the_calling_thread():
    """A synchronous call of at most ``inline_max`` bytes is copied by the caller alone: every
    slice is reported when it returns and no worker copied any of it."""
    p = kc.CopyPool(2)
    try:
        src = np.random.default_rng(3).integers(0, 255, 8 << 20, dtype=np.uint8)
        dst = np.zeros_like(src)
        table = kc.Table([direct(dst)])
        for _ in range(20):
            done, b = _sync(p, table, WRITE, [addr(src)], [addr(dst)], [src.nbytes], src.nbytes)
            assert done and b.statuses() == [(COMPLETED, src.nbytes, 0)]  # no wait needed
        assert np.array_equal(src, dst)
        assert p.copied_by == {"workers": 0, "callers": 20 * 128}  # 64 KiB slices
    finally:
        p.close()


def test_sync_above_the_threshold_splits_between_caller_and_workers():
    """Above ``inline_max`` the caller claims chunks alongside the workers: both spend CPU on
    the copies, the bytes are exact, and each task ends COMPLETED when the call returns."""
    p = kc.CopyPool(2)
    try:
        n, parts = 16 << 20, 4
        src = np.random.default_rng(4).integers(0, 255, n, dtype=np.uint8)
        dst = np.zeros_like(src)
        table = kc.Table([direct(dst)])
        step = n // parts
        local = [addr(src) + i * step for i in range(parts)]
        remote = [addr(dst) + i * step for i in range(parts)]
        calls = 0
        while calls < 10 or (min(p.copied_by.values()) == 0 and calls < 200):
            # (a loaded machine may wake the workers late: the caller then copies more)
            done, b = _sync(p, table, WRITE, local, remote, [step] * parts, 0)
            assert done and b.statuses() == [(COMPLETED, step, 0)] * parts
            calls += 1
        assert np.array_equal(src, dst)
        by = p.copied_by
        assert by["workers"] > 0 and by["callers"] > 0 and sum(by.values()) == calls * 256
        back = np.zeros_like(src)
        done, b = _sync(p, table, READ, [addr(back)], [addr(dst)], [n], 0)
        assert done and b.statuses() == [(COMPLETED, n, 0)] and np.array_equal(back, src)
    finally:
        p.close()


def test_sync_refused_and_denied_slices_are_reported_without_copying():
    p = kc.CopyPool(1)
    try:
        src = np.ones(1 << 20, np.uint8)
        dst = np.zeros_like(src)
        ro = kc.Table([(addr(dst), dst.nbytes, kc.KIND_MEM, None, 0, None, 0, 0, None, 0, False)])
        done, b = _sync(p, ro, WRITE, [addr(src), addr(src)], [addr(dst), addr(src)],
                        [src.nbytes, 4096], 0)
        assert done
        assert [s[0] for s in b.statuses()] == [FAILED, FAILED]
        assert [s[2] for s in b.statuses()] == [1007, E_REFUSED]  # DENIED, outside the table
        assert not dst.any()
    finally:
        p.close()


def test_sync_caller_and_pool_close_race():
    """Closing the pool while synchronous callers are splitting work with it: every slice is
    reported exactly once (completed or ECANCELED), nothing hangs or crashes."""
    p = kc.CopyPool(2)
    src = np.ones(32 << 20, np.uint8)
    dst = np.zeros_like(src)
    table = kc.Table([direct(dst)])
    errors: list[BaseException] = []

    def caller():
        try:
            for _ in range(50):
                try:
                    done, b = _sync(p, table, WRITE, [addr(src)], [addr(dst)], [src.nbytes], 0,
                                    timeout=10)
                except RuntimeError:
                    return  # closed
                assert b.wait(10)
                for st, nbytes, _err in b.statuses():
                    assert (st, nbytes) == (COMPLETED, src.nbytes) or st == FAILED
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=caller) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    p.close()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert not errors, errors


def test_slices_head_and_a_spun_wait_learn_the_call_time(pool):
    """``Slices.head`` names the first slice; ``Batch.wait_spun`` polls at most its gauge's cap
    and averages the waits that end in time (what rdma's small synchronous calls use)."""
    from mooncake._core.batch import SpinGauge

    src, dst = np.arange(8192, dtype=np.uint8), np.zeros(8192, np.uint8)
    table = kc.Table([direct(dst)])
    b = Batch(1)
    s = slice_requests(b, WRITE, [addr(src)], [addr(dst)], [8192], 4096, 4)
    assert s.head() == (addr(src), addr(dst), 4096)
    g = SpinGauge(0.002)
    assert (g.cap, g.avg) == (0.002, 0.0)
    pool.submit(s, kc.Peer(os.getpid()), table, 0)
    assert b.wait_spun(30, g) and 0 < g.avg < 30
    assert np.array_equal(src, dst)
    first = g.avg
    b2 = Batch(1)
    pool.submit(slice_requests(b2, WRITE, [addr(src)], [addr(dst)], [8192], 4096, 4),
                kc.Peer(os.getpid()), table, 0)
    assert b2.wait_spun(30, g) and g.avg != first  # 7/8 of the old average, 1/8 of the new
    late = Batch(1)  # a wait that times out leaves the average alone
    slice_requests(late, WRITE, [addr(src)], [addr(dst)], [8192], 4096, 4)
    before = g.avg
    assert not late.wait_spun(0.01, g) and g.avg == before
    assert SpinGauge(-1).cap == 0.0
