# cython: language_level=3
"""Same-host copy kernel: mappings, peer handles, buffer tables and a pthread copy pool.

Transports (``shm``, ``cxl``) describe a peer once (:class:`Peer`, :class:`Table`) and hand each
:class:`~mooncake._core.batch.Slices` to :meth:`CopyPool.submit`, which resolves every slice in C,
runs small submits inline and queues the rest for the workers; each slice is reported through the
batch table.  No Python runs per slice.
"""

from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc
from libc.errno cimport errno
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy as c_memcpy

from mooncake._core.batch cimport Batch, Slices, mc_batch_t, mc_slice_done, MC_E_REFUSED

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

KIND_MEM = MC_CP_MEM
KIND_PV = MC_CP_PV
MAX_WORKERS = MC_CP_MAX_THREADS


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
        with nogil:
            base = mmap(NULL, length, prot, flags, fd, <long>offset)
        if base == MAP_FAILED:
            e = errno
            raise OSError(e, "mmap of %d bytes at offset %d failed: %s" % (length, offset,
                                                                         os.strerror(e)))
        cdef Mapping self = Mapping.__new__(Mapping)
        self.m = mc_map_new(<char *>base, length, 1)
        if self.m == NULL:
            munmap(base, length)
            raise MemoryError()
        return self

    @staticmethod
    def view(uint64_t addr, size_t length):
        """A non-owning view of memory that is already ours (never unmapped by the kernel)."""
        cdef Mapping self = Mapping.__new__(Mapping)
        self.m = mc_map_new(<char *><size_t>addr, length, 0)
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

    def _check(self, uint64_t off):
        self._live()
        if off % 8 or off + 8 > self.m.len:
            raise IndexError("offset %d is not an aligned u64 inside %d bytes" % (off, self.m.len))

    def load_u64(self, uint64_t off):
        """Atomic acquire load of the u64 at ``off``."""
        self._check(off)
        return mc_load_u64(self.m.base + off)

    def store_u64(self, uint64_t off, uint64_t value):
        """Atomic release store of ``value`` at ``off``."""
        self._check(off)
        mc_store_u64(self.m.base + off, value)

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
        if pid > 0 and pid != getpid():
            fd = mc_pidfd_open(pid)
        if ctl is not None:
            ctl._check(alive_off)
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
    slot_val)``; ``kind`` is ``KIND_MEM`` (``mapping`` is where the bytes live here, ``None`` when
    ``start`` is already a local address) or ``KIND_PV`` (cross-memory attach).  When
    ``slot_mapping`` is given, every op first checks that the u64 at ``slot_off`` still equals
    ``slot_val`` (the peer did not unregister the buffer).
    """

    def __cinit__(self, entries):
        rows = sorted(entries, key=lambda r: r[0])
        self.t = mc_table_new(len(rows))
        if self.t == NULL:
            raise MemoryError()
        self._keep = []
        cdef mc_entry_t *e
        cdef Mapping m, sm
        cdef uint64_t prev_end = 0
        cdef int i
        for i, row in enumerate(rows):
            start, length, kind, mapping, map_off, slot_map, slot_off, slot_val = row
            if length <= 0:
                raise ValueError("entry %d has length %d" % (i, length))
            if i and start < prev_end:
                raise ValueError("entries overlap at 0x%x" % start)
            prev_end = start + length
            e = mc_table_entry(self.t, i)
            e.start = start
            e.end = start + length
            e.kind = kind
            e.map_off = map_off
            if mapping is not None:
                m = mapping
                m._live()
                if map_off + length > m.m.len:
                    raise ValueError("entry %d (%d bytes at %d) exceeds its %d-byte mapping"
                                     % (i, length, map_off, m.m.len))
                mc_map_ref(m.m)
                e.map = m.m
            if slot_map is not None:
                sm = slot_map
                sm._check(slot_off)
                self._keep.append(sm)  # slot pointers stay valid while the table lives
                e.slot = sm.m.base + <uint64_t>slot_off
                e.slot_val = slot_val

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


cdef class CopyPool:
    """``nworkers`` pthreads that run queued copy groups without the GIL."""

    def __cinit__(self, int nworkers):
        if nworkers < 1 or nworkers > MC_CP_MAX_THREADS:
            raise ValueError("nworkers must be in 1..%d, got %d" % (MC_CP_MAX_THREADS, nworkers))
        self.p = <mc_pool_t *>PyMem_RawMalloc(sizeof(mc_pool_t))
        if self.p == NULL:
            raise MemoryError()
        cdef int rc = mc_pool_start(self.p, nworkers)
        if rc:
            PyMem_RawFree(self.p)
            self.p = NULL
            raise OSError(rc, "cannot start copy workers: %s" % os.strerror(rc))
        self.nworkers = nworkers

    def __dealloc__(self):
        if self.p != NULL:
            with nogil:
                mc_pool_stop(self.p, ECANCELED)
            PyMem_RawFree(self.p)
            self.p = NULL

    @property
    def inflight(self):
        return mc_load64(mc_pool_inflight(self.p)) if self.p != NULL else 0

    def submit(self, Slices s, Peer peer, Table table, uint64_t inline_max=0,
               uint64_t chunk=1 << 20):
        """Resolve every slice against ``table`` and copy it.

        A slice whose remote range is not inside one entry is reported at once as
        ``MC_E_REFUSED``.  When the resolved bytes are at most ``inline_max`` the copies run here
        (GIL released) before returning; otherwise they are queued, ``chunk`` bytes per claim.
        Returns the number of slices accepted.
        """
        if self.p == NULL:
            raise RuntimeError("copy pool is closed")
        cdef Py_ssize_t n = len(s), i
        if n == 0:
            return 0
        cdef mc_batch_t *b = (<Batch>s.batch).b
        cdef mc_group_t *g = mc_group_new(n)
        if g == NULL:
            raise MemoryError()
        cdef const mc_entry_t *e
        cdef mc_op_t *o
        cdef int64_t k = 0, claim
        cdef uint64_t total = 0, rem, target
        cdef mc_table_t *t = table.t
        cdef int pushed = 0
        with nogil:
            for i in range(n):
                rem = s.remote[i]
                e = mc_table_find(t, rem, s.length[i])
                if e == NULL:
                    mc_slice_done(b, s.task[i], 0, MC_E_REFUSED)
                    continue
                o = mc_group_op(g, k)
                o.local = s.local[i]
                o.len = s.length[i]
                o.task = s.task[i]
                o.op = s.op[i]
                o.kind = <uint8_t>e.kind
                o.slot = e.slot
                o.slot_val = e.slot_val
                if e.kind == MC_CP_MEM and e.map != NULL:
                    o.remote = <uint64_t><size_t>e.map.base + e.map_off + (rem - e.start)
                else:
                    o.remote = rem
                total += o.len
                k += 1
            mc_group_set_n(g, k)
            if k > 0:
                target = total // <uint64_t>(2 * self.nworkers)
                if target > chunk:
                    target = chunk
                claim = <int64_t>(target // (total // <uint64_t>k + 1))
                mc_group_arm(g, b, peer.p, t, mc_pool_inflight(self.p), claim)
                if total <= inline_max:
                    mc_group_run(g, 0, k)
                elif mc_pool_push(self.p, g) != 0:
                    mc_group_fail(g, 0, k, ECANCELED)
        if k == 0:
            _free_group(g)
        return k

    def drain(self, double timeout):
        """Wait until nothing queued or running is left; False on timeout."""
        if self.p == NULL:
            return True
        cdef int rc
        with nogil:
            rc = mc_wait_zero(mc_pool_inflight(self.p), timeout)
        return rc == 0

    def close(self):
        """Stop the workers; ops not started yet end FAILED (ECANCELED)."""
        if self.p != NULL:
            with nogil:
                mc_pool_stop(self.p, ECANCELED)
            PyMem_RawFree(self.p)
            self.p = NULL


cdef extern from "<stdlib.h>" nogil:
    void free(void *p)


cdef inline void _free_group(mc_group_t *g) noexcept nogil:
    free(g)
