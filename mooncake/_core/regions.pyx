# cython: language_level=3
"""Registered memory: owned registrations in a table the kernels validate every access against.

A :class:`Registration` is the handle of one registered range.  It holds the owner's buffer
export for its whole life (a registered ``bytearray`` cannot be resized, a NumPy array cannot
drop its memory) and a C record with an in-flight pin count: every task whose local range lies
in it, and every peer request the target serves from it, holds a pin while it may touch the
memory.  :meth:`Registration.release` revokes the range (new work is refused, work in flight
stops at its next check and fails) and returns only once no pin is left.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.string cimport memcpy

LOCAL_WRITE = MC_REG_LOCAL_WRITE
REMOTE_READ = MC_REG_REMOTE_READ
REMOTE_WRITE = MC_REG_REMOTE_WRITE
ALL = MC_REG_ALL
#: a read-only buffer: a WRITE source and a READ target of peers, nothing else
READ_ONLY = MC_REG_REMOTE_READ


cdef class RegionTable:
    """Sorted, non-overlapping ``[addr, addr+len)`` ranges; lookups take a read lock briefly."""

    def __cinit__(self):
        self.t = mc_regions_new()
        if self.t == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.t != NULL:
            mc_regions_free(self.t)
            self.t = NULL

    def add(self, uint64_t addr, uint64_t length, uint32_t flags=MC_REG_ALL):
        """Insert a range (a peer's published buffer); ValueError if it overlaps or wraps."""
        cdef mc_reg_t *r = mc_reg_new(addr, length, flags)
        if r == NULL:
            raise MemoryError()
        cdef int rc
        with nogil:
            rc = mc_regions_add(self.t, r)
        mc_reg_unref(r)
        _check_add(rc, addr, length)

    def register(self, uint64_t addr, uint64_t length, uint32_t flags=MC_REG_ALL, owner=None):
        """Register ``[addr, addr+length)`` and return its :class:`Registration`.

        With ``owner`` supporting the buffer protocol, its buffer is exported (writable when
        ``flags`` let anyone write into it) for the registration's life; BufferError/TypeError
        when the object cannot give that.  Other owners (CUDA arrays) are only kept alive.
        """
        cdef Registration reg = Registration.__new__(Registration)
        cdef int want = PyBUF_SIMPLE
        if flags & (MC_REG_LOCAL_WRITE | MC_REG_REMOTE_WRITE):
            want |= PyBUF_WRITABLE
        if owner is not None and _has_buffer(owner):
            PyObject_GetBuffer(owner, &reg.view, want)
            reg.has_view = True
            if <uint64_t><size_t>reg.view.buf > addr or \
                    addr + length > <uint64_t><size_t>reg.view.buf + <uint64_t>reg.view.len:
                reg._drop_view()
                raise ValueError("range 0x%x+%d is not inside the object's buffer" % (addr, length))
        reg.owner = owner
        reg.r = mc_reg_new(addr, length, flags)
        if reg.r == NULL:
            reg._drop_view()
            raise MemoryError()
        cdef int rc
        with nogil:
            rc = mc_regions_add(self.t, reg.r)
        if rc:
            reg._drop_view()
            _check_add(rc, addr, length)
        reg.table = self
        reg.in_table = True
        return reg

    def remove(self, uint64_t addr):
        """Remove (and revoke) a peer-buffer range; True when there was one."""
        cdef mc_reg_t *r
        with nogil:
            r = mc_regions_remove(self.t, addr)
        if r == NULL:
            return False
        mc_reg_unref(r)
        return True

    def contains(self, uint64_t addr, uint64_t length):
        return bool(mc_regions_contains(self.t, addr, length))

    def copy_in(self, uint64_t addr, const unsigned char[::1] data not None):
        """Copy ``data`` into the registered, writable range at ``addr`` holding a pin, so an
        unregister waits for the copy.  0, or the refusal code (E_REFUSED/E_DENIED)."""
        cdef int32_t err = 0
        cdef uint64_t n = data.shape[0]
        if n == 0:
            return MC_E_REFUSED
        cdef mc_reg_t *r = mc_regions_acquire(self.t, addr, n, MC_REG_LOCAL_WRITE, &err)
        if r == NULL:
            return err
        with nogil:
            memcpy(<void *><size_t>addr, &data[0], n)
        mc_reg_release(r)
        return 0

    def copy_out(self, uint64_t addr, uint64_t length):
        """The bytes of the registered range, copied holding a pin; the refusal code instead."""
        cdef int32_t err = 0
        cdef mc_reg_t *r = mc_regions_acquire(self.t, addr, length, 0, &err)
        if r == NULL:
            return err
        cdef char *dst
        try:
            out = PyBytes_FromStringAndSize(NULL, length)
            dst = PyBytes_AS_STRING(out)
            with nogil:
                memcpy(dst, <const void *><size_t>addr, length)
        finally:
            mc_reg_release(r)
        return out

    def flags(self, uint64_t addr, uint64_t length):
        """Access flags of the region holding the range, or -1."""
        return mc_regions_flags(self.t, addr, length)

    def __len__(self):
        return mc_regions_count(self.t)


cdef class Registration:
    """One registered range (see the module docstring).  Not constructed directly."""

    def __cinit__(self):
        self.r = NULL
        self.has_view = False
        self.in_table = False

    def __init__(self):
        raise TypeError("use RegionTable.register()")

    cdef _drop_view(self):
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False

    def __dealloc__(self):
        if self.r != NULL:
            if self.in_table:  # never released: leave it registered only as long as we live
                mc_regions_remove(self.table.t, self.r.addr)
                mc_reg_unref(self.r)  # the table's reference
            if mc_reg_wait_idle(self.r, 0.0) == 0:
                self._drop_view()
            mc_reg_unref(self.r)
            self.r = NULL

    @property
    def addr(self):
        return self.r.addr

    @property
    def length(self):
        return self.r.len

    @property
    def flags(self):
        return self.r.flags

    @property
    def writable(self):
        """Local READs may land in it."""
        return bool(self.r.flags & MC_REG_LOCAL_WRITE)

    @property
    def revoked(self):
        return bool(mc_reg_revoked(self.r))

    @property
    def pins(self):
        """Work holding the memory right now (tasks in flight, peer requests being served)."""
        return mc_reg_inflight(self.r)

    def revoke(self):
        """Take the range out of the table: new work is refused, work in flight stops at its
        next check.  Idempotent."""
        cdef mc_reg_t *r
        if self.in_table:
            with nogil:
                r = mc_regions_remove(self.table.t, self.r.addr)
            self.in_table = False
            if r != NULL:
                mc_reg_unref(r)

    def wait_idle(self, double timeout):
        """Wait (without the GIL) until no pin is left; False on timeout."""
        cdef int rc
        with nogil:
            rc = mc_reg_wait_idle(self.r, timeout)
        return rc == 0

    def release(self, double timeout):
        """Revoke, wait for every pin to go (up to ``timeout`` s), then drop the buffer export.
        False on timeout: the export and owner are kept (the memory stays alive), call again."""
        self.revoke()
        if not self.wait_idle(timeout):
            return False
        self._drop_view()
        self.owner = None
        return True


cdef bint _has_buffer(obj):
    try:
        memoryview(obj).release()
        return True
    except TypeError:
        return False


cdef _check_add(int rc, uint64_t addr, uint64_t length):
    if rc == 1:
        raise ValueError("range 0x%x+%d overlaps a registered region" % (addr, length))
    if rc == 3:
        raise ValueError("range 0x%x+%d is empty or wraps around the address space"
                         % (addr, length))
    if rc:
        raise MemoryError()


def first_outside(RegionTable table not None, addrs, lengths, uint32_t need=0):
    """Index of the first ``[addrs[i], addrs[i]+lengths[i])`` not inside one region that grants
    ``need`` (``MC_REG_*`` bits; 0: any region), else -1."""
    import numpy as np
    cdef const uint64_t[:] a = np.ascontiguousarray(addrs, dtype=np.uint64)
    cdef const uint64_t[:] n = np.ascontiguousarray(lengths, dtype=np.uint64)
    cdef Py_ssize_t i, bad = -1
    cdef int f
    with nogil:
        for i in range(a.shape[0]):
            f = mc_regions_flags(table.t, a[i], n[i])
            if f < 0 or (<uint32_t>f & need) != need:
                bad = i
                break
    return bad
