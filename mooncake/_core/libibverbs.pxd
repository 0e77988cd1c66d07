# cython: language_level=3
"""libibverbs, declared from mooncake's own ``mc_ibv.h`` (the rdma-core ABI subset we use).

No rdma-core header is involved: ``mc_ibv.h`` mirrors the layouts, and every library function
goes through a table that ``mc_ibv_load`` fills from ``libibverbs.so.1`` at import (dlopen).
Structs list only the members we touch; Cython emits the C type names, so the layout is the
header's.  The Cython names are libibverbs'; the C names are the header's ``mc_ibv_*`` calls
(the data-path four go straight to ``context->ops``, as verbs.h's inlines do).  Call nothing
but the loader before ``mc_ibv_loaded()`` is true.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "mc_ibv.h" nogil:
    int mc_ibv_load(const char *soname, char *err, size_t errlen)
    bint mc_ibv_loaded()
    const char *mc_ibv_loaded_path()
    const char *MC_IBV_SONAME

    cdef struct ibv_device:
        pass

    cdef struct ibv_context:
        ibv_device *device
        int async_fd
        int num_comp_vectors

    cdef struct ibv_device_attr:
        char fw_ver[64]
        uint64_t max_mr_size
        uint32_t vendor_id
        uint32_t vendor_part_id
        int max_qp
        int max_qp_wr
        unsigned int device_cap_flags
        int max_sge
        int max_cq
        int max_cqe
        int max_mr
        int max_pd
        int max_qp_rd_atom
        int max_qp_init_rd_atom
        uint8_t phys_port_cnt

    enum ibv_port_state:
        IBV_PORT_NOP
        IBV_PORT_DOWN
        IBV_PORT_INIT
        IBV_PORT_ARMED
        IBV_PORT_ACTIVE
        IBV_PORT_ACTIVE_DEFER

    enum ibv_mtu:
        IBV_MTU_256
        IBV_MTU_512
        IBV_MTU_1024
        IBV_MTU_2048
        IBV_MTU_4096

    enum:
        IBV_LINK_LAYER_UNSPECIFIED
        IBV_LINK_LAYER_INFINIBAND
        IBV_LINK_LAYER_ETHERNET

    cdef struct ibv_port_attr:
        ibv_port_state state
        ibv_mtu max_mtu
        ibv_mtu active_mtu
        int gid_tbl_len
        uint32_t port_cap_flags
        uint32_t max_msg_sz
        uint16_t lid
        uint8_t active_width
        uint8_t active_speed
        uint8_t link_layer

    cdef union ibv_gid:
        uint8_t raw[16]

    enum ibv_gid_type:
        IBV_GID_TYPE_IB
        IBV_GID_TYPE_ROCE_V1
        IBV_GID_TYPE_ROCE_V2

    cdef struct ibv_gid_entry:
        ibv_gid gid
        uint32_t gid_index
        uint32_t port_num
        uint32_t gid_type
        uint32_t ndev_ifindex

    cdef struct ibv_pd:
        ibv_context *context

    enum ibv_access_flags:
        IBV_ACCESS_LOCAL_WRITE
        IBV_ACCESS_REMOTE_WRITE
        IBV_ACCESS_REMOTE_READ
        IBV_ACCESS_REMOTE_ATOMIC
        IBV_ACCESS_RELAXED_ORDERING

    cdef struct ibv_mr:
        ibv_context *context
        ibv_pd *pd
        void *addr
        size_t length
        uint32_t handle
        uint32_t lkey
        uint32_t rkey

    cdef struct ibv_comp_channel:
        ibv_context *context
        int fd
        int refcnt

    cdef struct ibv_cq:
        ibv_context *context
        ibv_comp_channel *channel
        void *cq_context
        int cqe

    cdef struct ibv_srq:
        pass

    enum ibv_qp_state:
        IBV_QPS_RESET
        IBV_QPS_INIT
        IBV_QPS_RTR
        IBV_QPS_RTS
        IBV_QPS_SQD
        IBV_QPS_SQE
        IBV_QPS_ERR
        IBV_QPS_UNKNOWN

    enum ibv_qp_type:
        IBV_QPT_RC
        IBV_QPT_UC
        IBV_QPT_UD

    cdef struct ibv_qp:
        ibv_context *context
        void *qp_context
        ibv_pd *pd
        ibv_cq *send_cq
        ibv_cq *recv_cq
        uint32_t handle
        uint32_t qp_num
        ibv_qp_state state
        ibv_qp_type qp_type

    cdef struct ibv_qp_cap:
        uint32_t max_send_wr
        uint32_t max_recv_wr
        uint32_t max_send_sge
        uint32_t max_recv_sge
        uint32_t max_inline_data

    cdef struct ibv_qp_init_attr:
        void *qp_context
        ibv_cq *send_cq
        ibv_cq *recv_cq
        ibv_srq *srq
        ibv_qp_cap cap
        ibv_qp_type qp_type
        int sq_sig_all

    cdef struct ibv_global_route:
        ibv_gid dgid
        uint32_t flow_label
        uint8_t sgid_index
        uint8_t hop_limit
        uint8_t traffic_class

    cdef struct ibv_ah_attr:
        ibv_global_route grh
        uint16_t dlid
        uint8_t sl
        uint8_t src_path_bits
        uint8_t static_rate
        uint8_t is_global
        uint8_t port_num

    enum ibv_qp_attr_mask:
        IBV_QP_STATE
        IBV_QP_CUR_STATE
        IBV_QP_ACCESS_FLAGS
        IBV_QP_PKEY_INDEX
        IBV_QP_PORT
        IBV_QP_AV
        IBV_QP_PATH_MTU
        IBV_QP_TIMEOUT
        IBV_QP_RETRY_CNT
        IBV_QP_RNR_RETRY
        IBV_QP_RQ_PSN
        IBV_QP_MAX_QP_RD_ATOMIC
        IBV_QP_MIN_RNR_TIMER
        IBV_QP_SQ_PSN
        IBV_QP_MAX_DEST_RD_ATOMIC
        IBV_QP_CAP
        IBV_QP_DEST_QPN

    cdef struct ibv_qp_attr:
        ibv_qp_state qp_state
        ibv_qp_state cur_qp_state
        ibv_mtu path_mtu
        uint32_t qkey
        uint32_t rq_psn
        uint32_t sq_psn
        uint32_t dest_qp_num
        unsigned int qp_access_flags
        ibv_qp_cap cap
        ibv_ah_attr ah_attr
        uint16_t pkey_index
        uint8_t max_rd_atomic
        uint8_t max_dest_rd_atomic
        uint8_t min_rnr_timer
        uint8_t port_num
        uint8_t timeout
        uint8_t retry_cnt
        uint8_t rnr_retry

    cdef struct ibv_sge:
        uint64_t addr
        uint32_t length
        uint32_t lkey

    # ``wr.rdma`` is an anonymous struct inside an anonymous union in C: these names exist only
    # for Cython (never declare a variable of either type), as pyverbs does.
    cdef struct _ibv_rdma "ibv_rdma_dummy":
        uint64_t remote_addr
        uint32_t rkey

    cdef union _ibv_wr "ibv_wr_dummy":
        _ibv_rdma rdma

    enum ibv_wr_opcode:
        IBV_WR_RDMA_WRITE
        IBV_WR_RDMA_WRITE_WITH_IMM
        IBV_WR_SEND
        IBV_WR_RDMA_READ

    enum ibv_send_flags:
        IBV_SEND_FENCE
        IBV_SEND_SIGNALED
        IBV_SEND_SOLICITED
        IBV_SEND_INLINE

    cdef struct ibv_send_wr:
        uint64_t wr_id
        ibv_send_wr *next
        ibv_sge *sg_list
        int num_sge
        ibv_wr_opcode opcode
        unsigned int send_flags
        _ibv_wr wr

    cdef struct ibv_recv_wr:
        uint64_t wr_id
        ibv_recv_wr *next
        ibv_sge *sg_list
        int num_sge

    enum ibv_wc_status:
        IBV_WC_SUCCESS
        IBV_WC_LOC_LEN_ERR
        IBV_WC_LOC_QP_OP_ERR
        IBV_WC_LOC_EEC_OP_ERR
        IBV_WC_LOC_PROT_ERR
        IBV_WC_WR_FLUSH_ERR
        IBV_WC_MW_BIND_ERR
        IBV_WC_BAD_RESP_ERR
        IBV_WC_LOC_ACCESS_ERR
        IBV_WC_REM_INV_REQ_ERR
        IBV_WC_REM_ACCESS_ERR
        IBV_WC_REM_OP_ERR
        IBV_WC_RETRY_EXC_ERR
        IBV_WC_RNR_RETRY_EXC_ERR
        IBV_WC_LOC_RDD_VIOL_ERR
        IBV_WC_REM_INV_RD_REQ_ERR
        IBV_WC_REM_ABORT_ERR
        IBV_WC_INV_EECN_ERR
        IBV_WC_INV_EEC_STATE_ERR
        IBV_WC_FATAL_ERR
        IBV_WC_RESP_TIMEOUT_ERR
        IBV_WC_GENERAL_ERR

    cdef struct ibv_wc:
        uint64_t wr_id
        ibv_wc_status status
        int opcode
        uint32_t vendor_err
        uint32_t byte_len
        uint32_t qp_num

    ibv_device **ibv_get_device_list "mc_ibv_get_device_list"(int *num_devices)
    void ibv_free_device_list "mc_ibv_free_device_list"(ibv_device **list)
    const char *ibv_get_device_name "mc_ibv_get_device_name"(ibv_device *device)
    ibv_context *ibv_open_device "mc_ibv_open_device"(ibv_device *device)
    int ibv_close_device "mc_ibv_close_device"(ibv_context *context)
    int ibv_query_device "mc_ibv_query_device"(ibv_context *context, ibv_device_attr *device_attr)
    int ibv_query_port "mc_ibv_query_port"(ibv_context *context, uint8_t port_num,
                                           ibv_port_attr *port_attr)
    int ibv_query_gid "mc_ibv_query_gid"(ibv_context *context, uint8_t port_num, int index,
                                         ibv_gid *gid)
    int ibv_query_gid_ex "mc_ibv_query_gid_ex"(ibv_context *context, uint32_t port_num,
                                               uint32_t gid_index, ibv_gid_entry *entry,
                                               uint32_t flags)
    ibv_pd *ibv_alloc_pd "mc_ibv_alloc_pd"(ibv_context *context)
    int ibv_dealloc_pd "mc_ibv_dealloc_pd"(ibv_pd *pd)
    ibv_mr *ibv_reg_mr "mc_ibv_reg_mr"(ibv_pd *pd, void *addr, size_t length, int access)
    int ibv_dereg_mr "mc_ibv_dereg_mr"(ibv_mr *mr)
    ibv_comp_channel *ibv_create_comp_channel "mc_ibv_create_comp_channel"(ibv_context *context)
    int ibv_destroy_comp_channel "mc_ibv_destroy_comp_channel"(ibv_comp_channel *channel)
    ibv_cq *ibv_create_cq "mc_ibv_create_cq"(ibv_context *context, int cqe, void *cq_context,
                                             ibv_comp_channel *channel, int comp_vector)
    int ibv_destroy_cq "mc_ibv_destroy_cq"(ibv_cq *cq)
    int ibv_req_notify_cq "mc_ibv_req_notify_cq"(ibv_cq *cq, int solicited_only)
    int ibv_get_cq_event "mc_ibv_get_cq_event"(ibv_comp_channel *channel, ibv_cq **cq,
                                               void **cq_context)
    void ibv_ack_cq_events "mc_ibv_ack_cq_events"(ibv_cq *cq, unsigned int nevents)
    int ibv_poll_cq "mc_ibv_poll_cq"(ibv_cq *cq, int num_entries, ibv_wc *wc)
    ibv_qp *ibv_create_qp "mc_ibv_create_qp"(ibv_pd *pd, ibv_qp_init_attr *qp_init_attr)
    int ibv_modify_qp "mc_ibv_modify_qp"(ibv_qp *qp, ibv_qp_attr *attr, int attr_mask)
    int ibv_query_qp "mc_ibv_query_qp"(ibv_qp *qp, ibv_qp_attr *attr, int attr_mask,
                                       ibv_qp_init_attr *init_attr)
    int ibv_destroy_qp "mc_ibv_destroy_qp"(ibv_qp *qp)
    int ibv_post_send "mc_ibv_post_send"(ibv_qp *qp, ibv_send_wr *wr, ibv_send_wr **bad_wr)
    int ibv_post_recv "mc_ibv_post_recv"(ibv_qp *qp, ibv_recv_wr *wr, ibv_recv_wr **bad_wr)
    const char *ibv_wc_status_str "mc_ibv_wc_status_str"(ibv_wc_status status)
