# cython: language_level=3
"""C view of the batch table (mc_batch.h) for other kernel modules."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from mooncake._core.regions cimport mc_reg_t

cdef extern from "mc_errors.h" nogil:
    enum:
        MC_E_REFUSED
        MC_E_PEER
        MC_E_TIMEOUT
        MC_E_PROTO
        MC_E_LOCAL
        MC_E_CLOSED
        MC_E_UNREGISTERED
        MC_E_DENIED
        MC_E_CANCELED
        MC_E_AUTH

cdef extern from "mc_metrics.h" nogil:
    enum:
        MC_M_BUCKETS
    ctypedef struct mc_meter_op_t:
        uint64_t armed
        uint64_t armed_bytes
        uint64_t bytes
        uint64_t failures
        uint64_t failed_bytes
        uint64_t lat_sum_ns
        uint64_t lat[64]
        uint64_t size[64]
    ctypedef struct mc_meter_t:
        uint64_t infeasible
        mc_meter_op_t op[2]
    mc_meter_t *mc_meter_new()
    void mc_meter_unref(mc_meter_t *m)
    void mc_meter_add(uint64_t *p, uint64_t v)
    void mc_meter_arm(mc_meter_t *m, unsigned op, uint64_t n, uint64_t nbytes)
    uint64_t mc_meter_load(const uint64_t *p)
    unsigned mc_meter_bucket(uint64_t v)


cdef extern from "mc_batch.h" nogil:
    enum:
        MC_WAITING
        MC_PENDING
        MC_INVALID
        MC_CANCELED
        MC_COMPLETED
        MC_TIMEOUT
        MC_FAILED
    ctypedef struct mc_task_t:
        int64_t total
    ctypedef struct mc_batch_t:
        uint32_t ntasks
    mc_batch_t *mc_batch_new(uint32_t ntasks)
    void mc_batch_ref(mc_batch_t *b)
    void mc_batch_unref(mc_batch_t *b)
    void mc_task_arm(mc_batch_t *b, uint32_t t, int64_t n)
    void mc_task_arm_req(mc_batch_t *b, uint32_t t, int64_t n, uint8_t op, uint64_t len)
    void mc_task_pin(mc_batch_t *b, uint32_t t, mc_reg_t *r)
    void mc_batch_cancel(mc_batch_t *b, int32_t err)
    int32_t mc_slice_live(mc_batch_t *b, uint32_t t)
    void mc_slice_done(mc_batch_t *b, uint32_t t, int64_t nbytes, int32_t err)
    int mc_task_status(mc_batch_t *b, uint32_t t)
    int64_t mc_task_bytes(mc_batch_t *b, uint32_t t)
    int32_t mc_task_error(mc_batch_t *b, uint32_t t)
    int64_t mc_open_tasks(mc_batch_t *b)
    int mc_batch_wait(mc_batch_t *b, double timeout_s, double spin_s)
    double mc_now()
    int mc_batch_meter(mc_batch_t *b, mc_meter_t *m)

cdef class Meter:
    """Transfer counters of one (transport, peer) of an engine (mc_metrics.h)."""
    cdef mc_meter_t *m


cdef class Batch:
    cdef mc_batch_t *b
    cdef readonly uint32_t ntasks
    #: bytes the batch was asked to move (set by the engine's validator)
    cdef public uint64_t total_bytes
    #: its priority class as a shared-quota weight (0: the engine's own class)
    cdef public uint32_t priority
    cdef int _check(self, uint32_t t) except -1


cdef class Slices:
    """Struct-of-arrays slice list: what a transport receives from the engine."""
    cdef Batch batch
    cdef Py_ssize_t n
    cdef uint32_t *task
    cdef uint8_t *op
    cdef uint64_t *local
    cdef uint64_t *remote
    cdef uint64_t *length
    cdef int _alloc(self, Py_ssize_t n) except -1
