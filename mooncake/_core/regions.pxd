# cython: language_level=3
from cpython.buffer cimport Py_buffer
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

cdef extern from "mc_errors.h" nogil:
    enum:
        MC_E_REFUSED
        MC_E_DENIED

cdef extern from "mc_regions.h" nogil:
    enum:
        MC_REG_LOCAL_WRITE
        MC_REG_REMOTE_READ
        MC_REG_REMOTE_WRITE
        MC_REG_ALL
    ctypedef struct mc_reg_t:
        uint32_t flags
        uint64_t addr
        uint64_t len
    ctypedef struct mc_regions_t:
        pass
    mc_reg_t *mc_reg_new(uint64_t addr, uint64_t len, uint32_t flags)
    void mc_reg_ref(mc_reg_t *r)
    void mc_reg_unref(mc_reg_t *r)
    void mc_reg_release(mc_reg_t *r)
    int mc_reg_revoked(const mc_reg_t *r)
    int64_t mc_reg_inflight(mc_reg_t *r)
    int mc_reg_wait_idle(mc_reg_t *r, double timeout_s)
    mc_regions_t *mc_regions_new()
    void mc_regions_free(mc_regions_t *t)
    int mc_regions_add(mc_regions_t *t, mc_reg_t *reg)
    mc_reg_t *mc_regions_remove(mc_regions_t *t, uint64_t addr)
    mc_reg_t *mc_regions_acquire(mc_regions_t *t, uint64_t addr, uint64_t len, uint32_t need,
                                 int32_t *err)
    int mc_regions_contains(mc_regions_t *t, uint64_t addr, uint64_t len)
    int mc_regions_flags(mc_regions_t *t, uint64_t addr, uint64_t len)
    size_t mc_regions_count(mc_regions_t *t)


cdef class RegionTable:
    cdef mc_regions_t *t


cdef class Registration:
    cdef mc_reg_t *r
    cdef RegionTable table
    cdef Py_buffer view
    cdef bint has_view
    cdef bint in_table
    cdef readonly object owner
    cdef _drop_view(self)
