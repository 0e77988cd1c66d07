# cython: language_level=3
from libc.stdint cimport uint64_t

cdef extern from "mc_regions.h" nogil:
    ctypedef struct mc_regions_t:
        pass
    mc_regions_t *mc_regions_new()
    void mc_regions_free(mc_regions_t *t)
    int mc_regions_add(mc_regions_t *t, uint64_t addr, uint64_t len)
    uint64_t mc_regions_remove(mc_regions_t *t, uint64_t addr)
    int mc_regions_contains(mc_regions_t *t, uint64_t addr, uint64_t len)


cdef class RegionTable:
    cdef mc_regions_t *t
