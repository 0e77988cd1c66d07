# cython: language_level=3
"""libibverbs control path: devices, ports and GIDs, PD, MR, completion channels, CQs, RC QPs.

Objects hold references to what they were made from (a QP keeps its CQ and Device alive), so
destruction runs children first.  Errors raise ``OSError(errno, "<verb> on <device>: ...")``,
with the errno read right after the failing verb.  Typed arguments refuse None, and a closed MR
or QP raises ValueError instead of handing the provider a NULL.
The data path (posting and polling without the GIL) is in ``verbs_kernel``.

Built from mooncake's own declarations (``mc_ibv.h``), never rdma-core's headers: the library is
opened at import (``dlopen`` of ``libibverbs.so.1``, or of ``$MOONCAKE_IBVERBS``: a soname or a
path, for a private rdma-core build and for tests that point it at a missing library).  Without
it the module still imports: :func:`library` says why, and every verb raises
``OSError(ELIBACC)`` with that reason instead of touching an empty table.
"""

import os

cimport cython
from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset, strerror

from mooncake._core.libibverbs cimport (
    MC_IBV_SONAME,
    IBV_ACCESS_LOCAL_WRITE,
    IBV_ACCESS_RELAXED_ORDERING,
    IBV_ACCESS_REMOTE_READ,
    IBV_ACCESS_REMOTE_WRITE,
    IBV_GID_TYPE_IB,
    IBV_GID_TYPE_ROCE_V1,
    IBV_GID_TYPE_ROCE_V2,
    IBV_LINK_LAYER_ETHERNET,
    IBV_MTU_1024,
    IBV_MTU_2048,
    IBV_MTU_256,
    IBV_MTU_4096,
    IBV_MTU_512,
    IBV_PORT_ACTIVE,
    IBV_QPS_ERR,
    IBV_QPS_INIT,
    IBV_QPS_RESET,
    IBV_QPS_RTR,
    IBV_QPS_RTS,
    IBV_QPT_RC,
    IBV_QP_ACCESS_FLAGS,
    IBV_QP_AV,
    IBV_QP_DEST_QPN,
    IBV_QP_MAX_DEST_RD_ATOMIC,
    IBV_QP_MAX_QP_RD_ATOMIC,
    IBV_QP_MIN_RNR_TIMER,
    IBV_QP_PATH_MTU,
    IBV_QP_PKEY_INDEX,
    IBV_QP_PORT,
    IBV_QP_RETRY_CNT,
    IBV_QP_RNR_RETRY,
    IBV_QP_RQ_PSN,
    IBV_QP_SQ_PSN,
    IBV_QP_STATE,
    IBV_QP_TIMEOUT,
    IBV_SEND_SIGNALED,
    IBV_WC_REM_ACCESS_ERR,
    IBV_WC_RETRY_EXC_ERR,
    IBV_WC_SUCCESS,
    IBV_WC_WR_FLUSH_ERR,
    IBV_WR_RDMA_READ,
    IBV_WR_RDMA_WRITE,
    ibv_alloc_pd,
    ibv_close_device,
    ibv_create_comp_channel,
    ibv_create_cq,
    ibv_create_qp,
    ibv_dealloc_pd,
    ibv_dereg_mr,
    ibv_destroy_comp_channel,
    ibv_destroy_cq,
    ibv_destroy_qp,
    ibv_device,
    ibv_device_attr,
    ibv_free_device_list,
    ibv_get_device_list,
    ibv_get_device_name,
    ibv_gid,
    ibv_gid_entry,
    ibv_modify_qp,
    ibv_mr,
    ibv_mtu,
    ibv_open_device,
    ibv_poll_cq,
    ibv_port_attr,
    ibv_post_send,
    ibv_qp,
    ibv_qp_attr,
    ibv_qp_init_attr,
    ibv_query_device,
    ibv_query_gid,
    ibv_query_gid_ex,
    ibv_query_port,
    ibv_query_qp,
    ibv_reg_mr,
    ibv_send_wr,
    ibv_sge,
    ibv_wc,
    ibv_wc_status,
    ibv_wc_status_str,
    ibv_wr_opcode,
    mc_ibv_load,
    mc_ibv_loaded,
    mc_ibv_loaded_path,
)

cdef extern from "fcntl.h" nogil:
    int fcntl(int fd, int cmd, ...)
    enum:
        F_GETFL
        F_SETFL
        O_NONBLOCK

#: where the verbs declarations come from (no rdma-core header is used to build)
DECLARATIONS = "shipped (mooncake/_core/mc_ibv.h, rdma-core's IBVERBS_1.1 ABI)"
#: the environment variable naming the library to open instead of libibverbs.so.1
LIBRARY_ENV = "MOONCAKE_IBVERBS"

cdef char _load_err[1024]
_SONAME = os.environ.get(LIBRARY_ENV) or MC_IBV_SONAME.decode()
_LOAD_ERROR = None
if mc_ibv_load(_SONAME.encode(), _load_err, sizeof(_load_err)) != 0:
    _LOAD_ERROR = _load_err.decode(errors="replace")


def library():
    """The loader's outcome: ``soname`` asked for, ``path`` it was loaded from (None when it
    was not), ``error`` (None, or why the library or one of its functions is missing)."""
    path = mc_ibv_loaded_path().decode(errors="replace") if mc_ibv_loaded() else None
    return {"soname": _SONAME, "path": path, "error": _LOAD_ERROR}


def library_error():
    """Why libibverbs could not be used, or None when it was loaded."""
    return _LOAD_ERROR


cdef int _need_library() except -1:
    if not mc_ibv_loaded():
        raise OSError(79, f"libibverbs unavailable: {_LOAD_ERROR}")  # ELIBACC
    return 0


ACCESS_LOCAL_WRITE = IBV_ACCESS_LOCAL_WRITE
ACCESS_REMOTE_WRITE = IBV_ACCESS_REMOTE_WRITE
ACCESS_REMOTE_READ = IBV_ACCESS_REMOTE_READ
ACCESS_RELAXED_ORDERING = IBV_ACCESS_RELAXED_ORDERING
ACCESS_RW = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ
GID_TYPE_IB = IBV_GID_TYPE_IB
GID_TYPE_ROCE_V1 = IBV_GID_TYPE_ROCE_V1
GID_TYPE_ROCE_V2 = IBV_GID_TYPE_ROCE_V2
WR_RDMA_WRITE = IBV_WR_RDMA_WRITE
WR_RDMA_READ = IBV_WR_RDMA_READ
WC_SUCCESS = IBV_WC_SUCCESS
WC_WR_FLUSH_ERR = IBV_WC_WR_FLUSH_ERR
WC_REM_ACCESS_ERR = IBV_WC_REM_ACCESS_ERR
WC_RETRY_EXC_ERR = IBV_WC_RETRY_EXC_ERR
PORT_ACTIVE = IBV_PORT_ACTIVE
LINK_LAYER_ETHERNET = IBV_LINK_LAYER_ETHERNET
QPS_RESET = IBV_QPS_RESET
QPS_INIT = IBV_QPS_INIT
QPS_RTR = IBV_QPS_RTR
QPS_RTS = IBV_QPS_RTS
QPS_ERR = IBV_QPS_ERR

#: path MTU in bytes -> ibv_mtu enum, and back
MTU_ENUM = {256: IBV_MTU_256, 512: IBV_MTU_512, 1024: IBV_MTU_1024, 2048: IBV_MTU_2048,
            4096: IBV_MTU_4096}
MTU_BYTES = {v: k for k, v in MTU_ENUM.items()}


def wc_status_str(int status):
    """libibverbs' name of a work-completion status."""
    _need_library()
    return ibv_wc_status_str(<ibv_wc_status>status).decode()


cdef _err(str what, int e):
    """The OSError for a failed verb; ``e`` is its errno (read by the caller right after the
    call, before anything can clobber it) or its positive return code."""
    if e <= 0:
        e = 5  # EIO: the provider failed without setting errno
    return OSError(e, f"{what}: {strerror(e).decode()}")


def device_names():
    """Names of the RDMA devices libibverbs sees (``[]`` without an RDMA subsystem)."""
    cdef int n = 0, i
    _need_library()
    cdef ibv_device **lst = ibv_get_device_list(&n)
    if lst == NULL:
        return []
    try:
        return [ibv_get_device_name(lst[i]).decode() for i in range(n)]
    finally:
        ibv_free_device_list(lst)


cdef class Device:
    """An opened RDMA device with one protection domain."""

    def __cinit__(self, str name not None):
        cdef int n = 0, i, e, rc
        cdef ibv_device **lst
        cdef ibv_device_attr a
        self.name = name
        _need_library()
        lst = ibv_get_device_list(&n)
        e = errno
        if lst == NULL:
            raise _err(f"ibv_get_device_list (looking for {name!r})", e)
        try:
            for i in range(n):
                if ibv_get_device_name(lst[i]).decode() == name:
                    self.ctx = ibv_open_device(lst[i])
                    e = errno
                    if self.ctx == NULL:
                        raise _err(f"ibv_open_device {name}", e)
                    break
            else:
                raise OSError(19, f"no RDMA device named {name!r} (have: "
                                  f"{', '.join(ibv_get_device_name(lst[i]).decode() for i in range(n)) or 'none'})")
        finally:
            ibv_free_device_list(lst)
        self.pd = ibv_alloc_pd(self.ctx)
        e = errno
        if self.pd == NULL:
            raise _err(f"ibv_alloc_pd on {name}", e)
        memset(&a, 0, sizeof(a))
        rc = ibv_query_device(self.ctx, &a)
        e = errno
        if rc:
            raise _err(f"ibv_query_device {name}", rc if rc > 0 else e)
        self.limits = dict(
            max_qp=a.max_qp, max_qp_wr=a.max_qp_wr, max_sge=a.max_sge, max_cq=a.max_cq,
            max_cqe=a.max_cqe, max_mr=a.max_mr, max_mr_size=a.max_mr_size,
            max_qp_rd_atom=a.max_qp_rd_atom, max_qp_init_rd_atom=a.max_qp_init_rd_atom,
            phys_port_cnt=a.phys_port_cnt, vendor_id=a.vendor_id,
            vendor_part_id=a.vendor_part_id, fw_ver=a.fw_ver.decode(errors="replace"),
            num_comp_vectors=self.ctx.num_comp_vectors)

    def __dealloc__(self):
        if self.pd != NULL:
            ibv_dealloc_pd(self.pd)
            self.pd = NULL
        if self.ctx != NULL:
            ibv_close_device(self.ctx)
            self.ctx = NULL

    def __repr__(self):
        return f"<verbs.Device {self.name}>"

    @property
    def context_ptr(self):
        return <uintptr_t>self.ctx

    def query_port(self, int port):
        """State, LID, MTUs, link layer and GID table size of ``port``."""
        cdef ibv_port_attr p
        cdef int rc, e
        if not 1 <= port <= 255:
            raise ValueError(f"port must be 1..255, got {port}")
        memset(&p, 0, sizeof(p))
        rc = ibv_query_port(self.ctx, <uint8_t>port, &p)
        e = errno
        if rc:
            raise _err(f"ibv_query_port {self.name} port {port}", rc if rc > 0 else e)
        return dict(state=p.state, lid=p.lid, active_mtu=MTU_BYTES.get(p.active_mtu, 0),
                    max_mtu=MTU_BYTES.get(p.max_mtu, 0), gid_tbl_len=p.gid_tbl_len,
                    link_layer=p.link_layer, max_msg_sz=p.max_msg_sz)

    def query_gid(self, int port, int index):
        """The 16-byte GID at ``index`` (all zeros when the slot is empty)."""
        cdef ibv_gid g
        cdef int rc, e
        if not 1 <= port <= 255:
            raise ValueError(f"port must be 1..255, got {port}")
        rc = ibv_query_gid(self.ctx, <uint8_t>port, index, &g)
        e = errno
        if rc:
            raise _err(f"ibv_query_gid {self.name} port {port} index {index}",
                       rc if rc > 0 else e)
        return bytes(g.raw[:16])

    def gid_entry(self, int port, int index):
        """``(gid bytes, gid type)`` of a populated GID slot, or None when it is empty."""
        cdef ibv_gid_entry e
        memset(&e, 0, sizeof(e))
        cdef int rc = ibv_query_gid_ex(self.ctx, port, index, &e, 0)
        if rc != 0:
            return None  # ENODATA: empty slot
        return bytes(e.gid.raw[:16]), e.gid_type


# children keep their parents alive until their own dealloc, even inside a collected cycle
@cython.no_gc_clear
cdef class MR:
    """A registered memory region (``ibv_reg_mr``)."""

    def __cinit__(self, Device device not None, uint64_t addr, uint64_t length, int access,
                  object owner=None):
        cdef int e = 0
        self.device = device
        self.owner = owner
        with nogil:  # pinning a large region takes a while: let other threads run
            self.mr = ibv_reg_mr(device.pd, <void *><uintptr_t>addr, length, access)
            e = errno
        if self.mr == NULL:
            raise _err(f"ibv_reg_mr {device.name} [{addr:#x}, +{length}) access {access:#x}", e)

    def __dealloc__(self):
        if self.mr != NULL:
            ibv_dereg_mr(self.mr)  # nothing to report to from here
            self.mr = NULL

    def close(self):
        """Deregister: once this returns the NIC can no longer touch the memory (work requests
        still using the MR complete with a protection error).  Idempotent."""
        cdef int rc = 0, e = 0
        if self.mr != NULL:
            with nogil:  # may wait for the provider to let go of the pages
                rc = ibv_dereg_mr(self.mr)
                e = errno
            if rc:
                raise _err(f"ibv_dereg_mr {self.device.name}", rc if rc > 0 else e)
            self.mr = NULL
            self.owner = None

    cdef ibv_mr *_live(self) except NULL:
        if self.mr == NULL:
            raise ValueError("the MR is deregistered")
        return self.mr

    @property
    def closed(self):
        return self.mr == NULL

    @property
    def lkey(self):
        return self._live().lkey

    @property
    def rkey(self):
        return self._live().rkey

    @property
    def addr(self):
        return <uintptr_t>self._live().addr

    @property
    def length(self):
        return self._live().length


@cython.no_gc_clear
cdef class CompChannel:
    """A completion channel; its fd is non-blocking (poll it, then drain events)."""

    def __cinit__(self, Device device not None):
        self.device = device
        self.ch = ibv_create_comp_channel(device.ctx)
        cdef int e = errno
        if self.ch == NULL:
            raise _err(f"ibv_create_comp_channel {device.name}", e)
        fcntl(self.ch.fd, F_SETFL, fcntl(self.ch.fd, F_GETFL) | O_NONBLOCK)

    def __dealloc__(self):
        if self.ch != NULL:
            ibv_destroy_comp_channel(self.ch)
            self.ch = NULL

    @property
    def fd(self):
        return self.ch.fd


@cython.no_gc_clear
cdef class CQ:
    """A completion queue of ``cqe`` entries, optionally bound to a completion channel."""

    def __cinit__(self, Device device not None, int cqe, CompChannel channel=None,
                  int comp_vector=0):
        cdef int e
        if channel is not None and channel.device is not device:
            raise ValueError("the completion channel belongs to another device")
        if cqe < 1:
            raise ValueError(f"a CQ needs at least one entry, got {cqe}")
        self.device = device
        self.channel = channel
        nvec = device.ctx.num_comp_vectors
        if nvec > 0:
            comp_vector %= nvec
        self.cq = ibv_create_cq(device.ctx, cqe, NULL,
                                channel.ch if channel is not None else NULL, comp_vector)
        e = errno
        if self.cq == NULL:
            raise _err(f"ibv_create_cq {device.name} cqe={cqe}", e)
        self.cqe = self.cq.cqe

    def __dealloc__(self):
        if self.cq != NULL:
            ibv_destroy_cq(self.cq)
            self.cq = NULL

    def poll(self, int n=16):
        """Up to ``n`` completions as ``(wr_id, status, byte_len)`` tuples (test helper)."""
        cdef ibv_wc wcs[16]
        cdef int got, i
        if n > 16:
            n = 16
        if n < 1:
            return []
        with nogil:
            got = ibv_poll_cq(self.cq, n, wcs)
        if got < 0:
            raise _err(f"ibv_poll_cq {self.device.name}", -got)
        return [(wcs[i].wr_id, wcs[i].status, wcs[i].byte_len) for i in range(got)]


@cython.no_gc_clear
cdef class QP:
    """A reliable-connected queue pair; bring it up with ``to_init``/``to_rtr``/``to_rts``."""

    def __cinit__(self, Device device not None, CQ cq not None, int max_wr, int max_sge=1,
                  int max_inline=0):
        cdef ibv_qp_init_attr ia
        cdef int e
        if cq.device is not device:
            raise ValueError("the CQ belongs to another device")
        if max_wr < 1 or max_sge < 1 or max_inline < 0:
            raise ValueError(f"max_wr and max_sge must be >= 1 and max_inline >= 0, got "
                             f"{max_wr}, {max_sge}, {max_inline}")
        self.device = device
        self.cq = cq
        memset(&ia, 0, sizeof(ia))
        ia.send_cq = cq.cq
        ia.recv_cq = cq.cq
        ia.qp_type = IBV_QPT_RC
        ia.sq_sig_all = 0
        ia.cap.max_send_wr = max_wr
        ia.cap.max_recv_wr = 1
        ia.cap.max_send_sge = max_sge
        ia.cap.max_recv_sge = 1
        ia.cap.max_inline_data = max_inline
        self.qp = ibv_create_qp(device.pd, &ia)
        e = errno
        if self.qp == NULL:
            raise _err(f"ibv_create_qp {device.name} max_wr={max_wr} max_sge={max_sge} "
                       f"max_inline={max_inline}", e)
        # the provider may round the capabilities up: keep what it granted
        self.max_wr = ia.cap.max_send_wr
        self.max_sge = ia.cap.max_send_sge
        self.max_inline = ia.cap.max_inline_data

    def __dealloc__(self):
        self.close()

    def close(self):
        """Destroy the QP: the NIC stops processing its work requests.  Idempotent."""
        if self.qp != NULL:
            ibv_destroy_qp(self.qp)
            self.qp = NULL

    cdef ibv_qp *_live(self) except NULL:
        if self.qp == NULL:
            raise ValueError("the QP is destroyed")
        return self.qp

    @property
    def closed(self):
        return self.qp == NULL

    @property
    def qp_num(self):
        return self._live().qp_num

    @property
    def state(self):
        """The QP state as libibverbs last saw it (``ibv_query_qp``)."""
        cdef ibv_qp_attr a
        cdef ibv_qp_init_attr ia
        cdef int rc, e
        rc = ibv_query_qp(self._live(), &a, IBV_QP_STATE, &ia)
        e = errno
        if rc:
            raise _err(f"ibv_query_qp {self.device.name} qpn {self.qp.qp_num}",
                       rc if rc > 0 else e)
        return a.qp_state

    def path(self):
        """The address vector the QP sends with, as the provider reports it
        (``ibv_query_qp(IBV_QP_AV | IBV_QP_PATH_MTU)``): ``sl``, ``traffic_class``,
        ``hop_limit``, ``sgid_index``, ``is_global``, ``port_num``, ``path_mtu`` (bytes)."""
        cdef ibv_qp_attr a
        cdef ibv_qp_init_attr ia
        cdef int rc, e
        memset(&a, 0, sizeof(a))
        rc = ibv_query_qp(self._live(), &a, IBV_QP_AV | IBV_QP_PATH_MTU, &ia)
        e = errno
        if rc:
            raise _err(f"ibv_query_qp {self.device.name} qpn {self.qp.qp_num}",
                       rc if rc > 0 else e)
        mtu = next((b for b, v in MTU_ENUM.items() if v == <int>a.path_mtu), 0)
        return {"sl": a.ah_attr.sl, "traffic_class": a.ah_attr.grh.traffic_class,
                "hop_limit": a.ah_attr.grh.hop_limit, "sgid_index": a.ah_attr.grh.sgid_index,
                "is_global": a.ah_attr.is_global, "port_num": a.ah_attr.port_num,
                "path_mtu": mtu}

    cdef _modify(self, ibv_qp_attr *a, int mask, str what):
        cdef int rc = ibv_modify_qp(self._live(), a, mask)
        cdef int e = errno
        if rc:
            raise _err(f"ibv_modify_qp {what} {self.device.name} qpn {self.qp.qp_num}",
                       rc if rc > 0 else e)

    def to_init(self, int port, int access=ACCESS_RW, int pkey_index=0):
        cdef ibv_qp_attr a
        memset(&a, 0, sizeof(a))
        a.qp_state = IBV_QPS_INIT
        a.port_num = port
        a.pkey_index = pkey_index
        a.qp_access_flags = access
        self._modify(&a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS,
                     "RESET->INIT")

    def to_rtr(self, uint32_t dest_qpn, bytes dgid not None, int dlid, uint32_t rq_psn, int mtu,
               int port, int sgid_index, int traffic_class=0, int max_dest_rd_atomic=16,
               int service_level=0):
        """INIT -> RTR towards ``dest_qpn``; ``mtu`` in bytes; ``dgid`` 16 bytes (GRH used when
        it is non-zero, as RoCE needs); ``service_level`` (IB SL 0..15) and ``traffic_class``
        (the GRH's, RoCE's DSCP/ECN byte) on the address vector."""
        cdef ibv_qp_attr a
        cdef bytes g = dgid
        if mtu not in MTU_ENUM:
            raise ValueError(f"path MTU {mtu} is not one of {sorted(MTU_ENUM)}")
        if len(g) != 16:
            raise ValueError(f"GID must be 16 bytes, got {len(g)}")
        memset(&a, 0, sizeof(a))
        a.qp_state = IBV_QPS_RTR
        a.path_mtu = <ibv_mtu>MTU_ENUM[mtu]
        a.dest_qp_num = dest_qpn
        a.rq_psn = rq_psn & 0xFFFFFF
        a.max_dest_rd_atomic = max_dest_rd_atomic
        a.min_rnr_timer = 12
        if not 0 <= service_level <= 15 or not 0 <= traffic_class <= 255:
            raise ValueError(f"service level {service_level} (0..15) or traffic class "
                             f"{traffic_class} (0..255) out of range")
        a.ah_attr.dlid = dlid
        a.ah_attr.sl = service_level
        a.ah_attr.port_num = port
        if g != bytes(16):
            a.ah_attr.is_global = 1
            memcpy(a.ah_attr.grh.dgid.raw, <const char *>g, 16)
            a.ah_attr.grh.sgid_index = sgid_index
            a.ah_attr.grh.hop_limit = 64
            a.ah_attr.grh.traffic_class = traffic_class
        self._modify(&a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                     IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER,
                     "INIT->RTR")

    def to_rts(self, uint32_t sq_psn, int timeout=14, int retry_cnt=7, int rnr_retry=7,
               int max_rd_atomic=16):
        cdef ibv_qp_attr a
        memset(&a, 0, sizeof(a))
        a.qp_state = IBV_QPS_RTS
        a.sq_psn = sq_psn & 0xFFFFFF
        a.timeout = timeout
        a.retry_cnt = retry_cnt
        a.rnr_retry = rnr_retry
        a.max_rd_atomic = max_rd_atomic
        self._modify(&a, IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                     IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC, "RTR->RTS")

    def to_error(self):
        """Move to ERR: every posted work request completes with a flush error."""
        cdef ibv_qp_attr a
        memset(&a, 0, sizeof(a))
        a.qp_state = IBV_QPS_ERR
        self._modify(&a, IBV_QP_STATE, "->ERR")

    def post_rdma(self, int opcode, uint64_t local, uint32_t length, uint32_t lkey,
                  uint64_t remote, uint32_t rkey, uint64_t wr_id=0, bint signaled=True):
        """Post one RDMA WRITE/READ work request (test helper; the kernel posts chains)."""
        cdef ibv_sge sge
        cdef ibv_send_wr wr
        cdef ibv_send_wr *bad = NULL
        cdef int rc
        memset(&wr, 0, sizeof(wr))
        sge.addr = local
        sge.length = length
        sge.lkey = lkey
        wr.wr_id = wr_id
        wr.sg_list = &sge
        wr.num_sge = 1
        wr.opcode = <ibv_wr_opcode>opcode
        wr.send_flags = IBV_SEND_SIGNALED if signaled else 0
        wr.wr.rdma.remote_addr = remote
        wr.wr.rdma.rkey = rkey
        cdef ibv_qp *qp = self._live()
        with nogil:
            rc = ibv_post_send(qp, &wr, &bad)
        if rc:
            raise _err(f"ibv_post_send {self.device.name} qpn {self.qp.qp_num}", rc)
