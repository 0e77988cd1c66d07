# cython: language_level=3
"""Same-host copy kernel: mappings, peer handles, buffer tables and a pthread copy pool.

Transports (``shm``, ``cxl``) describe a peer once (:class:`Peer`, :class:`Table`) and hand each
:class:`~mooncake._core.batch.Slices` to :meth:`CopyPool.submit`, which resolves every slice in C,
runs small submits inline and queues the rest for the workers; each slice is reported through the
batch table.  No Python runs per slice.

Silence (see mc_copy.h): copies run in chunks of at most 1 MiB; before each chunk a worker checks
that the batch was not cancelled and the local region not unregistered (``mc_slice_live``), and
around each chunk it bumps its busy counter for the target's registration slot and re-checks the
slot, so a target that released the slot and ran :func:`wait_busy` is not written afterwards.
"""

from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc
from libc.errno cimport errno
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy as c_memcpy

from mooncake._core.batch cimport Batch, Slices, mc_batch_t

import os

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)
    void *MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_SHARED, MAP_POPULATE

cdef extern from "<unistd.h>" nogil:
    int getpid()

cdef extern from "<errno.h>" nogil:
    enum:
        ECANCELED

cdef extern from "<string.h>" nogil:
    void *c_memset "memset"(void *s, int c, size_t n)

cdef extern from "<limits.h>" nogil:
    long LONG_MAX

KIND_MEM = MC_CP_MEM
KIND_PV = MC_CP_PV
MAX_WORKERS = MC_CP_MAX_THREADS
#: bytes a worker copies between two liveness checks
CHUNK = MC_CP_CHUNK


def memcpy(uint64_t dst, uint64_t src, uint64_t n):
    """Raw ``memcpy(dst, src, n)`` without the GIL (addresses are trusted: benchmarks, tests)."""
    with nogil:
        c_memcpy(<void *><size_t>dst, <const void *><size_t>src, n)


def pv_copy(int pid, int op, uint64_t local, uint64_t remote, uint64_t n):
    """One cross-memory-attach copy (``op`` 0 READ remote→local, 1 WRITE); 0 or an errno."""
    cdef int32_t rc
    with nogil:
        rc = mc_pv_copy(pid, op, local, remote, n)
    return rc


cdef class Mapping:
    """One refcounted local mapping; ``close()`` drops our reference and the memory is unmapped
    once no queued copy uses it any more."""

    def __cinit__(self):
        self.m = NULL

    def __init__(self):
        raise TypeError("use Mapping.from_fd() or Mapping.view()")

    @staticmethod
    def from_fd(int fd, size_t length, uint64_t offset=0, bint writable=True,
                bint populate=False):
        """``mmap(MAP_SHARED)`` of ``fd``; ``OSError`` with the kernel's errno on failure."""
        cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
        cdef int flags = MAP_SHARED | (MAP_POPULATE if populate else 0)
        cdef void *base
        if length == 0:
            raise ValueError("cannot map 0 bytes")
        if offset > <uint64_t>LONG_MAX:
            raise ValueError("offset %d is out of range" % offset)
        with nogil:
            base = mmap(NULL, length, prot, flags, fd, <long>offset)
        if base == MAP_FAILED:
            e = errno
            raise OSError(e, "mmap of %d bytes at offset %d failed: %s" % (length, offset,
                                                                         os.strerror(e)))
        cdef Mapping self = Mapping.__new__(Mapping)
        self.m = mc_map_new(<char *>base, length, 1, 1 if writable else 0)
        if self.m == NULL:
            munmap(base, length)
            raise MemoryError()
        return self

    @staticmethod
    def view(uint64_t addr, size_t length):
        """A non-owning view of memory that is already ours (never unmapped by the kernel)."""
        if length == 0 or <uint64_t>length > ~addr:
            raise ValueError("view 0x%x+%d is empty or wraps" % (addr, length))
        cdef Mapping self = Mapping.__new__(Mapping)
        self.m = mc_map_new(<char *><size_t>addr, length, 0, 1)
        if self.m == NULL:
            raise MemoryError()
        return self

    def __dealloc__(self):
        if self.m != NULL:
            mc_map_unref(self.m)
            self.m = NULL

    cdef int _live(self) except -1:
        if self.m == NULL:
            raise ValueError("mapping is closed")
        return 0

    @property
    def addr(self):
        self._live()
        return <uint64_t><size_t>self.m.base

    @property
    def length(self):
        self._live()
        return self.m.len

    @property
    def closed(self):
        return self.m == NULL

    @property
    def writable(self):
        """Mapped with PROT_WRITE (views of our own memory are writable)."""
        self._live()
        return bool(self.m.writable)

    cdef int _check_word(self, uint64_t off, uint64_t size) except -1:
        self._live()
        if off % size or self.m.len < size or off > self.m.len - size:
            raise IndexError("offset %d is not an aligned %d-byte word inside %d bytes"
                             % (off, size, self.m.len))
        return 0

    def _check(self, uint64_t off):
        self._check_word(off, 8)

    def load_u64(self, uint64_t off):
        """Atomic acquire load of the u64 at ``off``."""
        self._check_word(off, 8)
        return mc_load_u64(self.m.base + off)

    def store_u64(self, uint64_t off, uint64_t value):
        """Atomic seq_cst store of ``value`` at ``off``."""
        self._check_word(off, 8)
        if not self.m.writable:
            raise ValueError("mapping is read-only")
        mc_store_u64(self.m.base + off, value)

    def cas_u64(self, uint64_t off, uint64_t expect, uint64_t value):
        """Atomic compare-and-swap of the u64 at ``off``; True when it held ``expect``."""
        self._check_word(off, 8)
        if not self.m.writable:
            raise ValueError("mapping is read-only")
        return bool(mc_cas_u64(self.m.base + off, expect, value))

    def load_u32(self, uint64_t off):
        """Atomic seq_cst load of the u32 at ``off``."""
        self._check_word(off, 4)
        return mc_load_u32(self.m.base + off)

    def add_u32(self, uint64_t off, int32_t delta):
        """Atomic ``+= delta`` of the u32 at ``off``; returns the old value."""
        self._check_word(off, 4)
        if not self.m.writable:
            raise ValueError("mapping is read-only")
        return mc_add_u32(self.m.base + off, delta)

    def zero(self, uint64_t off, uint64_t n):
        """Zero ``[off, off+n)`` (bounds-checked)."""
        self._live()
        if off > self.m.len or n > self.m.len - off:
            raise IndexError("range %d+%d is outside %d bytes" % (off, n, self.m.len))
        if not self.m.writable:
            raise ValueError("mapping is read-only")
        c_memset(self.m.base + off, 0, n)

    def close(self):
        if self.m != NULL:
            mc_map_unref(self.m)
            self.m = NULL


cdef class Peer:
    """The process behind a segment: exit detection (pidfd + its control page's alive word),
    abort generations and in-flight accounting.  ``pid=0`` means no process (a CXL window)."""

    def __cinit__(self, int pid=0, Mapping ctl=None, uint64_t alive_off=0):
        cdef int fd = -1
        self.pid = pid
        if pid < 0:
            raise ValueError("pid %d is negative" % pid)
        if ctl is not None:
            ctl._check_word(alive_off, 8)
        if pid > 0 and pid != getpid():
            fd = mc_pidfd_open(pid)
        self.p = mc_peer_new(pid, fd, ctl.m if ctl is not None else NULL, alive_off)
        if self.p == NULL:
            if fd >= 0:
                os.close(fd)
            raise MemoryError()

    def __dealloc__(self):
        if self.p != NULL:
            mc_peer_unref(self.p)
            self.p = NULL

    @property
    def alive(self):
        """False once the process exited or closed its transport."""
        return mc_peer_check(self.p, mc_peer_gen(self.p)) == 0

    @property
    def inflight(self):
        return mc_peer_inflight(self.p)

    def cancel(self):
        """Fail every op queued for this peer so far (MC_E_TIMEOUT); later submits are unaffected."""
        mc_peer_cancel(self.p)

    def wait_idle(self, double timeout):
        """Wait until no op for this peer is queued or running; False on timeout."""
        cdef int rc
        with nogil:
            rc = mc_wait_zero(mc_peer_inflight_ptr(self.p), timeout)
        return rc == 0


cdef class Table:
    """A peer's reachable buffers, sorted and checked for overlap.

    ``entries``: iterable of ``(start, length, kind, mapping, map_off, slot_mapping, slot_off,
    slot_val[, busy_mapping, busy_off[, writable]])``; ``kind`` is ``KIND_MEM`` (``mapping`` is
    where the bytes live here, ``None`` when ``start`` is already a local address) or ``KIND_PV``
    (cross-memory attach).  When ``slot_mapping`` is given, every chunk first checks that the u64
    at ``slot_off`` still equals ``slot_val`` (the peer did not unregister the buffer); with
    ``busy_mapping`` (writable) the u32 at ``busy_off`` is raised around each chunk (the target
    waits for it to drop before its unregister returns).  ``writable`` False (or a read-only
    ``mapping``) refuses WRITEs into the entry with ``MC_E_DENIED``, untouched.
    """

    def __cinit__(self, entries):
        rows = sorted(entries, key=lambda r: r[0])
        self.t = mc_table_new(len(rows))
        if self.t == NULL:
            raise MemoryError()
        cdef mc_entry_t *e
        cdef Mapping m, sm, bm
        cdef uint64_t prev_end = 0, start, length, map_off, slot_off, busy_off
        cdef int i
        for i, row in enumerate(rows):
            if not 8 <= len(row) <= 11:
                raise ValueError("entry %d has %d fields, expected 8 to 11" % (i, len(row)))
            start, length, kind, mapping, map_off, slot_map, slot_off, slot_val = row[:8]
            busy_map = row[8] if len(row) > 8 else None
            busy_off = row[9] if len(row) > 9 else 0
            writable = row[10] if len(row) > 10 else True
            if length == 0:
                raise ValueError("entry %d has length 0" % i)
            if length > ~start:
                raise ValueError("entry %d (0x%x+%d) wraps the address space" % (i, start, length))
            if kind != MC_CP_MEM and kind != MC_CP_PV:
                raise ValueError("entry %d has unknown kind %r" % (i, kind))
            if i and start < prev_end:
                raise ValueError("entries overlap at 0x%x" % start)
            prev_end = start + length
            e = mc_table_entry(self.t, i)
            e.start = start
            e.end = start + length
            e.kind = kind
            e.map_off = map_off
            e.writable = 1 if writable else 0
            if mapping is not None:
                m = mapping
                m._live()
                if map_off > m.m.len or length > m.m.len - map_off:
                    raise ValueError("entry %d (%d bytes at %d) exceeds its %d-byte mapping"
                                     % (i, length, map_off, m.m.len))
                mc_map_ref(m.m)
                e.map = m.m
                if not m.m.writable:
                    e.writable = 0
            if slot_map is not None:
                sm = slot_map
                sm._check_word(slot_off, 8)
                mc_map_ref(sm.m)
                e.slot_map = sm.m
                e.slot = sm.m.base + slot_off
                e.slot_val = slot_val
            if busy_map is not None:
                bm = busy_map
                bm._check_word(busy_off, 4)
                if not bm.m.writable:
                    raise ValueError("entry %d: the busy counter's mapping is read-only" % i)
                mc_map_ref(bm.m)
                e.busy_map = bm.m
                e.busy = bm.m.base + busy_off

    def __dealloc__(self):
        if self.t != NULL:
            mc_table_unref(self.t)
            self.t = NULL

    def __len__(self):
        return self.t.n

    def find(self, uint64_t addr, uint64_t length):
        """Index of the entry holding the range, or -1."""
        cdef const mc_entry_t *e = mc_table_find(self.t, addr, length)
        if e == NULL:
            return -1
        return <int>(e - <const mc_entry_t *>mc_table_entry(self.t, 0))

    def writable(self, int i):
        """Whether entry ``i`` accepts WRITEs."""
        if not 0 <= i < self.t.n:
            raise IndexError(i)
        return bool(mc_table_entry(self.t, i).writable)


def wait_busy(Mapping area not None, uint64_t first, uint64_t lane_size, uint64_t slot_off,
              lanes, pidfds, double timeout):
    """Target side of the busy protocol (call after storing the slot's new value): wait, without
    the GIL, until every lane's u32 counter at ``first + lane * lane_size + slot_off`` of
    ``area`` was seen at 0 or the lane's process exited (``pidfds[i]``: a pidfd, -1 unknown).
    Returns the lanes still busy at ``timeout`` (empty: done)."""
    cdef Py_ssize_t n = len(lanes), i
    if len(pidfds) != n:
        raise ValueError("lanes and pidfds must have equal lengths")
    if n == 0:
        return []
    area._live()
    if lane_size == 0 or slot_off % 4 or slot_off > lane_size - 4 or first > area.m.len:
        raise ValueError("bad busy-area geometry")
    cdef uint64_t room = area.m.len - first
    cdef int *lv = <int *>PyMem_RawMalloc(2 * n * sizeof(int))
    if lv == NULL:
        raise MemoryError()
    cdef int *pv = lv + n
    cdef int rc
    try:
        for i in range(n):
            lane = lanes[i]
            if lane < 0 or lane >= room // lane_size:
                raise ValueError("lane %d is outside the busy area" % lane)
            lv[i] = lane
            pv[i] = pidfds[i]
        with nogil:
            rc = mc_busy_wait(area.m.base + first, lane_size, slot_off, lv, pv, <int>n, timeout)
        return [lv[i] for i in range(n) if lv[i] >= 0] if rc else []
    finally:
        PyMem_RawFree(lv)


def fd_readable(int fd):
    """True when ``fd`` (a pidfd) is readable: its process exited."""
    return bool(mc_fd_readable(fd))


cdef class CopyPool:
    """``nworkers`` pthreads that run queued copy groups without the GIL.

    ``grace`` (seconds, TENT's ``grace_period_ns``): a worker that just finished work polls for
    more (yielding the CPU) for that long before it sleeps, trading idle CPU for wake-up latency.
    """

    def __cinit__(self, int nworkers, double grace=0.0):
        if nworkers < 1 or nworkers > MC_CP_MAX_THREADS:
            raise ValueError("nworkers must be in 1..%d, got %d" % (MC_CP_MAX_THREADS, nworkers))
        self.p = <mc_pool_t *>PyMem_RawMalloc(sizeof(mc_pool_t))
        if self.p == NULL:
            raise MemoryError()
        cdef int rc = mc_pool_start(self.p, nworkers, grace)
        if rc:
            PyMem_RawFree(self.p)
            self.p = NULL
            raise OSError(rc, "cannot start copy workers: %s" % os.strerror(rc))
        self.nworkers = nworkers

    def __dealloc__(self):
        self._stop()

    cdef void _stop(self, int err=ECANCELED) noexcept:
        """Stop the workers, fail what is queued with ``err``, free the pool once no caller is
        inside."""
        cdef mc_pool_t *p = self.p
        if p == NULL:
            return
        self.p = NULL   # under the GIL: no new caller enters
        with nogil:
            mc_pool_stop(p, err)
            mc_pool_wait_users(p)
        PyMem_RawFree(p)

    @property
    def inflight(self):
        return mc_load64(mc_pool_inflight(self.p)) if self.p != NULL else 0

    @property
    def copied_by(self):
        """Slices copied so far by the ``workers`` and by the ``callers``' own threads."""
        if self.p == NULL:
            return {"workers": 0, "callers": 0}
        return {"workers": mc_pool_by_workers(self.p), "callers": mc_pool_by_callers(self.p)}

    def submit(self, Slices s not None, Peer peer not None, Table table not None,
               uint64_t inline_max=0, uint64_t chunk=1 << 20):
        """Resolve every slice against ``table`` and start copying it; returns at once.

        A slice whose remote range is not inside one entry is reported at once as
        ``MC_E_REFUSED``, a WRITE into a read-only entry as ``MC_E_DENIED`` (untouched).  When
        the resolved bytes are at most ``inline_max`` the copies run here (GIL released) before
        returning; otherwise they are queued, about ``chunk`` bytes per claim.
        """
        self._copy(s, peer, table, inline_max, chunk, 0, 0.0)

    def transfer(self, Slices s not None, Peer peer not None, Table table not None,
                 uint64_t inline_max=0, double timeout=10.0, uint64_t chunk=1 << 20):
        """:meth:`submit` for a synchronous caller, which copies its share itself: all of it at
        most ``inline_max`` bytes, else it claims chunks alongside the workers.  Returns when
        every slice was reported (True) or ``timeout`` seconds passed (False)."""
        return self._copy(s, peer, table, inline_max, chunk, 1, timeout) == 0

    cdef int _copy(self, Slices s, Peer peer, Table table, uint64_t inline_max, uint64_t chunk,
                   int sync, double timeout) except -1:
        if self.p == NULL:
            raise RuntimeError("copy pool is closed")
        if s.n == 0:
            return 0
        if s.batch is None:
            raise ValueError("slices have no batch")
        cdef mc_batch_t *b = (<Batch>s.batch).b
        cdef mc_group_t *g = mc_group_new(s.n)
        if g == NULL:
            raise MemoryError()
        cdef uint64_t total = 0
        cdef int rc
        cdef mc_pool_t *p = self.p
        mc_pool_enter(p)
        with nogil:
            mc_group_fill(g, b, table.t, s.n, s.task, s.op, s.local, s.remote, s.length, &total)
            rc = mc_pool_copy(p, g, b, peer.p, table.t, total, inline_max, chunk, sync, timeout)
            mc_pool_exit(p)
        return rc

    def drain(self, double timeout):
        """Wait until nothing queued or running is left; False on timeout."""
        cdef mc_pool_t *p = self.p
        if p == NULL:
            return True
        cdef int rc
        mc_pool_enter(p)
        with nogil:
            rc = mc_wait_zero(mc_pool_inflight(p), timeout)
            mc_pool_exit(p)
        return rc == 0

    def close(self, int err=ECANCELED):
        """Stop the workers; ops not started yet end FAILED with ``err`` (a transport closing
        under its engine passes the engine's MC_E_CLOSED)."""
        self._stop(err)

