# cython: language_level=3
"""C view of the shared quota table (mc_quota.h) for other kernel modules."""

from libc.stdint cimport int32_t, uint32_t, uint64_t

cdef extern from "mc_quota.h" nogil:
    ctypedef struct mc_quota_t:
        char *base
        uint64_t size
        uint32_t max_nics
        uint32_t max_slots
        uint64_t stride
        uint64_t stale_ns
        uint64_t burst
        uint64_t credit
        uint64_t max_wait_ns
    void mc_quota_enter(const mc_quota_t *q, int32_t sid)
    void mc_quota_leave(const mc_quota_t *q, int32_t sid)
    uint64_t mc_quota_wait_ns(const mc_quota_t *q, int32_t sid, uint64_t nbytes)
    void mc_quota_charge(const mc_quota_t *q, int32_t sid, uint64_t nbytes)


cdef class Table:
    cdef mc_quota_t q
    cdef bint mapped
    cdef readonly str path
