# cython: language_level=3
"""Control-path verbs objects (verbs.pyx), shared with the data-path kernel (verbs_kernel.pyx)."""

from mooncake._core.libibverbs cimport (
    ibv_comp_channel,
    ibv_context,
    ibv_cq,
    ibv_mr,
    ibv_pd,
    ibv_qp,
    ibv_qp_attr,
)


cdef class Device:
    cdef ibv_context *ctx
    cdef ibv_pd *pd
    cdef readonly str name
    cdef readonly dict limits


cdef class MR:
    cdef ibv_mr *mr
    cdef readonly Device device
    cdef readonly object owner
    cdef ibv_mr *_live(self) except NULL


cdef class CompChannel:
    cdef ibv_comp_channel *ch
    cdef readonly Device device


cdef class CQ:
    cdef ibv_cq *cq
    cdef readonly Device device
    cdef readonly CompChannel channel
    cdef readonly int cqe


cdef class QP:
    cdef ibv_qp *qp
    cdef readonly Device device
    cdef readonly CQ cq
    cdef readonly int max_wr
    cdef readonly int max_sge
    cdef readonly int max_inline
    cdef ibv_qp *_live(self) except NULL
    cdef _modify(self, ibv_qp_attr *a, int mask, str what)
