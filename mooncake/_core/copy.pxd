# cython: language_level=3
"""C view of the same-host copy kernel (mc_copy.h) for other kernel modules."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from mooncake._core.batch cimport Slices, mc_batch_t

cdef extern from "mc_copy.h" nogil:
    enum:
        MC_CP_READ
        MC_CP_WRITE
        MC_CP_MEM
        MC_CP_PV
        MC_CP_MAX_THREADS
    uint64_t MC_CP_CHUNK
    ctypedef struct mc_map_t:
        char *base
        size_t len
        int writable
    ctypedef struct mc_peer_t:
        int pid
        int pidfd
    ctypedef struct mc_entry_t:
        uint64_t start
        uint64_t end
        int kind
        int writable
        mc_map_t *map
        uint64_t map_off
        const void *slot
        uint64_t slot_val
        void *busy
        mc_map_t *slot_map
        mc_map_t *busy_map
    ctypedef struct mc_table_t:
        int n
    ctypedef struct mc_op_t:
        uint64_t local
        uint64_t remote
        uint64_t len
        const mc_entry_t *e
        uint32_t task
        uint8_t kind
        uint8_t op
    ctypedef struct mc_group_t:
        int64_t n
    ctypedef struct mc_pool_t:
        int nthreads

    mc_map_t *mc_map_new(char *base, size_t len, int owned, int writable)
    void mc_map_ref(mc_map_t *m)
    void mc_map_unref(mc_map_t *m)
    mc_peer_t *mc_peer_new(int pid, int pidfd, mc_map_t *ctl, uint64_t alive_off)
    void mc_peer_unref(mc_peer_t *p)
    int32_t mc_peer_check(mc_peer_t *p, int32_t gen)
    int32_t mc_peer_gen(mc_peer_t *p)
    void mc_peer_cancel(mc_peer_t *p)
    int64_t mc_peer_inflight(mc_peer_t *p)
    int64_t *mc_peer_inflight_ptr(mc_peer_t *p)
    mc_table_t *mc_table_new(int n)
    void mc_table_unref(mc_table_t *t)
    mc_entry_t *mc_table_entry(mc_table_t *t, int i)
    const mc_entry_t *mc_table_find(const mc_table_t *t, uint64_t addr, uint64_t len)
    mc_group_t *mc_group_new(int64_t n)
    void mc_group_fill(mc_group_t *g, mc_batch_t *b, const mc_table_t *t, int64_t n,
                       const uint32_t *task, const uint8_t *op, const uint64_t *local,
                       const uint64_t *remote, const uint64_t *len, uint64_t *total)
    int mc_pool_start(mc_pool_t *p, int nthreads, double grace_s)
    int mc_pool_copy(mc_pool_t *p, mc_group_t *g, mc_batch_t *b, mc_peer_t *peer, mc_table_t *t,
                     uint64_t total, uint64_t inline_max, uint64_t chunk, int sync,
                     double timeout_s)
    void mc_pool_stop(mc_pool_t *p, int32_t err)
    int64_t *mc_pool_inflight(mc_pool_t *p)
    int64_t mc_pool_by_workers(mc_pool_t *p)
    void mc_pool_enter(mc_pool_t *p)
    void mc_pool_exit(mc_pool_t *p)
    void mc_pool_wait_users(mc_pool_t *p)
    int64_t mc_pool_by_callers(mc_pool_t *p)
    int mc_wait_zero(int64_t *counter, double timeout_s)
    int mc_busy_wait(char *area, uint64_t lane_size, uint64_t slot_off, int *lanes,
                     const int *pidfds, int n, double timeout_s)
    int mc_fd_readable(int fd)
    int64_t mc_load64(const int64_t *counter)
    uint64_t mc_load_u64(const void *addr)
    void mc_store_u64(void *addr, uint64_t v)
    int mc_cas_u64(void *addr, uint64_t expect, uint64_t v)
    uint32_t mc_load_u32(const void *addr)
    uint32_t mc_add_u32(void *addr, int32_t d)
    int32_t mc_pv_copy(int pid, int op, uint64_t local, uint64_t remote, uint64_t len)
    int mc_pidfd_open(int pid)


cdef class Mapping:
    cdef mc_map_t *m
    cdef int _live(self) except -1
    cdef int _check_word(self, uint64_t off, uint64_t size) except -1


cdef class Peer:
    cdef mc_peer_t *p
    cdef readonly int pid


cdef class Table:
    cdef mc_table_t *t


cdef class CopyPool:
    cdef mc_pool_t *p
    cdef readonly int nworkers
    cdef int _copy(self, Slices s, Peer peer, Table table, uint64_t inline_max, uint64_t chunk,
                   int sync, double timeout) except -1
    cdef void _stop(self, int err=*) noexcept
