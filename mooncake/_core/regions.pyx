# cython: language_level=3
"""The engine's table of registered ranges, shared with the kernels that validate peers' access."""

from libc.stdint cimport uint64_t


cdef class RegionTable:
    """Sorted, non-overlapping ``[addr, addr+len)`` ranges; lookups take a read lock."""

    def __cinit__(self):
        self.t = mc_regions_new()
        if self.t == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.t != NULL:
            mc_regions_free(self.t)
            self.t = NULL

    def add(self, uint64_t addr, uint64_t length):
        """Insert a range; ValueError if it overlaps one already present or wraps."""
        cdef int rc = mc_regions_add(self.t, addr, length)
        if rc == 1:
            raise ValueError("range 0x%x+%d overlaps a registered region" % (addr, length))
        if rc == 3:
            raise ValueError("range 0x%x+%d wraps around the address space" % (addr, length))
        if rc:
            raise MemoryError()

    def remove(self, uint64_t addr):
        """Remove the range starting at ``addr`` (waits for in-progress accesses); its length or 0."""
        cdef uint64_t n
        with nogil:
            n = mc_regions_remove(self.t, addr)
        return n

    def contains(self, uint64_t addr, uint64_t length):
        return bool(mc_regions_contains(self.t, addr, length))


def first_outside(RegionTable table, addrs, lengths):
    """Index of the first ``[addrs[i], addrs[i]+lengths[i])`` not inside one region, else -1."""
    import numpy as np
    cdef const uint64_t[:] a = np.ascontiguousarray(addrs, dtype=np.uint64)
    cdef const uint64_t[:] n = np.ascontiguousarray(lengths, dtype=np.uint64)
    cdef Py_ssize_t i, bad = -1
    with nogil:
        for i in range(a.shape[0]):
            if not mc_regions_contains(table.t, a[i], n[i]):
                bad = i
                break
    return bad
