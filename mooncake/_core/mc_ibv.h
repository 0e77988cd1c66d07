/* The libibverbs ABI subset mooncake uses, and a loader that opens libibverbs.so.1 at run time.
 *
 * The verbs kernels (verbs.pyx, verbs_kernel.pyx) build against this header alone: no
 * rdma-core headers (libibverbs-dev) and no -libverbs link.  At import each module calls
 * mc_ibv_load(), which dlopen()s the runtime library and resolves every function below with
 * dlvsym() at the symbol version whose ABI this file mirrors; a missing library or symbol leaves
 * the table empty and the module reports why (the rdma transport is then unavailable).
 *
 * Layouts mirror rdma-core's <infiniband/verbs.h> (BSD/GPL dual-licensed; the IBVERBS_1.1 ABI,
 * unchanged since 2006 for these structs): every struct mooncake allocates is complete; the
 * library-owned objects (context, PD, MR, CQ, QP, channel) list their members up to the last
 * one read here.  tests/test_ibv_loader.py compiles a check of sizeof/offsetof and enum values
 * against the system header wherever one is installed.
 *
 * The data path needs no symbol: ibv_post_send/ibv_post_recv/ibv_poll_cq/ibv_req_notify_cq are
 * `static inline` in verbs.h and call the provider through context->ops, as these do.
 * ibv_reg_mr and ibv_query_port are macros over inline functions in verbs.h; here they are what
 * those inlines do for a non-constant access mask (ibv_reg_mr_iova2 with iova = addr) and the
 * exported compat entry point (into a zeroed buffer with room to spare).
 *
 * Every function table is `static`: each extension module loads its own (dlopen is reference
 * counted, so they share one library).  Call nothing but mc_ibv_load() before it returned 0.
 */
#ifndef MC_IBV_H
#define MC_IBV_H

#ifdef INFINIBAND_VERBS_H
#error "mc_ibv.h replaces <infiniband/verbs.h>: include one or the other"
#endif

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* dlvsym */
#endif
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* ---- enums (values are ABI) ------------------------------------------------------------- */

enum ibv_gid_type { IBV_GID_TYPE_IB, IBV_GID_TYPE_ROCE_V1, IBV_GID_TYPE_ROCE_V2 };

enum ibv_mtu {
    IBV_MTU_256 = 1,
    IBV_MTU_512 = 2,
    IBV_MTU_1024 = 3,
    IBV_MTU_2048 = 4,
    IBV_MTU_4096 = 5
};

enum ibv_port_state {
    IBV_PORT_NOP = 0,
    IBV_PORT_DOWN = 1,
    IBV_PORT_INIT = 2,
    IBV_PORT_ARMED = 3,
    IBV_PORT_ACTIVE = 4,
    IBV_PORT_ACTIVE_DEFER = 5
};

enum { IBV_LINK_LAYER_UNSPECIFIED, IBV_LINK_LAYER_INFINIBAND, IBV_LINK_LAYER_ETHERNET };

enum ibv_wc_status {
    IBV_WC_SUCCESS,
    IBV_WC_LOC_LEN_ERR,
    IBV_WC_LOC_QP_OP_ERR,
    IBV_WC_LOC_EEC_OP_ERR,
    IBV_WC_LOC_PROT_ERR,
    IBV_WC_WR_FLUSH_ERR,
    IBV_WC_MW_BIND_ERR,
    IBV_WC_BAD_RESP_ERR,
    IBV_WC_LOC_ACCESS_ERR,
    IBV_WC_REM_INV_REQ_ERR,
    IBV_WC_REM_ACCESS_ERR,
    IBV_WC_REM_OP_ERR,
    IBV_WC_RETRY_EXC_ERR,
    IBV_WC_RNR_RETRY_EXC_ERR,
    IBV_WC_LOC_RDD_VIOL_ERR,
    IBV_WC_REM_INV_RD_REQ_ERR,
    IBV_WC_REM_ABORT_ERR,
    IBV_WC_INV_EECN_ERR,
    IBV_WC_INV_EEC_STATE_ERR,
    IBV_WC_FATAL_ERR,
    IBV_WC_RESP_TIMEOUT_ERR,
    IBV_WC_GENERAL_ERR
};

enum ibv_access_flags {
    IBV_ACCESS_LOCAL_WRITE = 1,
    IBV_ACCESS_REMOTE_WRITE = 1 << 1,
    IBV_ACCESS_REMOTE_READ = 1 << 2,
    IBV_ACCESS_REMOTE_ATOMIC = 1 << 3,
    IBV_ACCESS_RELAXED_ORDERING = 1 << 20 /* IB_UVERBS_ACCESS_OPTIONAL_FIRST */
};

enum ibv_qp_type { IBV_QPT_RC = 2, IBV_QPT_UC, IBV_QPT_UD };

enum ibv_qp_attr_mask {
    IBV_QP_STATE = 1 << 0,
    IBV_QP_CUR_STATE = 1 << 1,
    IBV_QP_ACCESS_FLAGS = 1 << 3,
    IBV_QP_PKEY_INDEX = 1 << 4,
    IBV_QP_PORT = 1 << 5,
    IBV_QP_AV = 1 << 7,
    IBV_QP_PATH_MTU = 1 << 8,
    IBV_QP_TIMEOUT = 1 << 9,
    IBV_QP_RETRY_CNT = 1 << 10,
    IBV_QP_RNR_RETRY = 1 << 11,
    IBV_QP_RQ_PSN = 1 << 12,
    IBV_QP_MAX_QP_RD_ATOMIC = 1 << 13,
    IBV_QP_MIN_RNR_TIMER = 1 << 15,
    IBV_QP_SQ_PSN = 1 << 16,
    IBV_QP_MAX_DEST_RD_ATOMIC = 1 << 17,
    IBV_QP_CAP = 1 << 19,
    IBV_QP_DEST_QPN = 1 << 20
};

enum ibv_qp_state {
    IBV_QPS_RESET,
    IBV_QPS_INIT,
    IBV_QPS_RTR,
    IBV_QPS_RTS,
    IBV_QPS_SQD,
    IBV_QPS_SQE,
    IBV_QPS_ERR,
    IBV_QPS_UNKNOWN
};

enum ibv_wr_opcode {
    IBV_WR_RDMA_WRITE,
    IBV_WR_RDMA_WRITE_WITH_IMM,
    IBV_WR_SEND,
    IBV_WR_SEND_WITH_IMM,
    IBV_WR_RDMA_READ
};

enum ibv_send_flags {
    IBV_SEND_FENCE = 1 << 0,
    IBV_SEND_SIGNALED = 1 << 1,
    IBV_SEND_SOLICITED = 1 << 2,
    IBV_SEND_INLINE = 1 << 3
};

/* ---- structs ---------------------------------------------------------------------------- */

struct ibv_device; /* opaque: only passed back to the library */
struct ibv_srq;
struct ibv_ah;
struct ibv_mw;
struct ibv_context;
struct ibv_cq;
struct ibv_qp;

union ibv_gid {
    uint8_t raw[16];
    struct {
        uint64_t subnet_prefix; /* big endian */
        uint64_t interface_id;
    } global;
};

struct ibv_gid_entry {
    union ibv_gid gid;
    uint32_t gid_index;
    uint32_t port_num;
    uint32_t gid_type; /* enum ibv_gid_type */
    uint32_t ndev_ifindex;
};

struct ibv_device_attr {
    char fw_ver[64];
    uint64_t node_guid;
    uint64_t sys_image_guid;
    uint64_t max_mr_size;
    uint64_t page_size_cap;
    uint32_t vendor_id;
    uint32_t vendor_part_id;
    uint32_t hw_ver;
    int max_qp;
    int max_qp_wr;
    unsigned int device_cap_flags;
    int max_sge;
    int max_sge_rd;
    int max_cq;
    int max_cqe;
    int max_mr;
    int max_pd;
    int max_qp_rd_atom;
    int max_ee_rd_atom;
    int max_res_rd_atom;
    int max_qp_init_rd_atom;
    int max_ee_init_rd_atom;
    int atomic_cap; /* enum ibv_atomic_cap */
    int max_ee;
    int max_rdd;
    int max_mw;
    int max_raw_ipv6_qp;
    int max_raw_ethy_qp;
    int max_mcast_grp;
    int max_mcast_qp_attach;
    int max_total_mcast_qp_attach;
    int max_ah;
    int max_fmr;
    int max_map_per_fmr;
    int max_srq;
    int max_srq_wr;
    int max_srq_sge;
    uint16_t max_pkeys;
    uint8_t local_ca_ack_delay;
    uint8_t phys_port_cnt;
};

struct ibv_port_attr {
    enum ibv_port_state state;
    enum ibv_mtu max_mtu;
    enum ibv_mtu active_mtu;
    int gid_tbl_len;
    uint32_t port_cap_flags;
    uint32_t max_msg_sz;
    uint32_t bad_pkey_cntr;
    uint32_t qkey_viol_cntr;
    uint16_t pkey_tbl_len;
    uint16_t lid;
    uint16_t sm_lid;
    uint8_t lmc;
    uint8_t max_vl_num;
    uint8_t sm_sl;
    uint8_t subnet_timeout;
    uint8_t init_type_reply;
    uint8_t active_width;
    uint8_t active_speed;
    uint8_t phys_state;
    uint8_t link_layer;
    uint8_t flags;
    uint16_t port_cap_flags2;
};

struct ibv_wc {
    uint64_t wr_id;
    enum ibv_wc_status status;
    int opcode; /* enum ibv_wc_opcode */
    uint32_t vendor_err;
    uint32_t byte_len;
    union {
        uint32_t imm_data; /* big endian */
        uint32_t invalidated_rkey;
    };
    uint32_t qp_num;
    uint32_t src_qp;
    unsigned int wc_flags;
    uint16_t pkey_index;
    uint16_t slid;
    uint8_t sl;
    uint8_t dlid_path_bits;
};

struct ibv_mw_bind_info {
    struct ibv_mr *mr;
    uint64_t addr;
    uint64_t length;
    unsigned int mw_access_flags;
};

struct ibv_pd {
    struct ibv_context *context;
    uint32_t handle;
};

struct ibv_mr {
    struct ibv_context *context;
    struct ibv_pd *pd;
    void *addr;
    size_t length;
    uint32_t handle;
    uint32_t lkey;
    uint32_t rkey;
};

struct ibv_global_route {
    union ibv_gid dgid;
    uint32_t flow_label;
    uint8_t sgid_index;
    uint8_t hop_limit;
    uint8_t traffic_class;
};

struct ibv_ah_attr {
    struct ibv_global_route grh;
    uint16_t dlid;
    uint8_t sl;
    uint8_t src_path_bits;
    uint8_t static_rate;
    uint8_t is_global;
    uint8_t port_num;
};

struct ibv_qp_cap {
    uint32_t max_send_wr;
    uint32_t max_recv_wr;
    uint32_t max_send_sge;
    uint32_t max_recv_sge;
    uint32_t max_inline_data;
};

struct ibv_qp_init_attr {
    void *qp_context;
    struct ibv_cq *send_cq;
    struct ibv_cq *recv_cq;
    struct ibv_srq *srq;
    struct ibv_qp_cap cap;
    enum ibv_qp_type qp_type;
    int sq_sig_all;
};

struct ibv_qp_attr {
    enum ibv_qp_state qp_state;
    enum ibv_qp_state cur_qp_state;
    enum ibv_mtu path_mtu;
    int path_mig_state; /* enum ibv_mig_state */
    uint32_t qkey;
    uint32_t rq_psn;
    uint32_t sq_psn;
    uint32_t dest_qp_num;
    unsigned int qp_access_flags;
    struct ibv_qp_cap cap;
    struct ibv_ah_attr ah_attr;
    struct ibv_ah_attr alt_ah_attr;
    uint16_t pkey_index;
    uint16_t alt_pkey_index;
    uint8_t en_sqd_async_notify;
    uint8_t sq_draining;
    uint8_t max_rd_atomic;
    uint8_t max_dest_rd_atomic;
    uint8_t min_rnr_timer;
    uint8_t port_num;
    uint8_t timeout;
    uint8_t retry_cnt;
    uint8_t rnr_retry;
    uint8_t alt_port_num;
    uint8_t alt_timeout;
    uint32_t rate_limit;
};

struct ibv_sge {
    uint64_t addr;
    uint32_t length;
    uint32_t lkey;
};

struct ibv_send_wr {
    uint64_t wr_id;
    struct ibv_send_wr *next;
    struct ibv_sge *sg_list;
    int num_sge;
    enum ibv_wr_opcode opcode;
    unsigned int send_flags;
    union {
        uint32_t imm_data; /* big endian */
        uint32_t invalidate_rkey;
    };
    union {
        struct {
            uint64_t remote_addr;
            uint32_t rkey;
        } rdma;
        struct {
            uint64_t remote_addr;
            uint64_t compare_add;
            uint64_t swap;
            uint32_t rkey;
        } atomic;
        struct {
            struct ibv_ah *ah;
            uint32_t remote_qpn;
            uint32_t remote_qkey;
        } ud;
    } wr;
    union {
        struct {
            uint32_t remote_srqn;
        } xrc;
    } qp_type;
    union {
        struct {
            struct ibv_mw *mw;
            uint32_t rkey;
            struct ibv_mw_bind_info bind_info;
        } bind_mw;
        struct {
            void *hdr;
            uint16_t hdr_sz;
            uint16_t mss;
        } tso;
    };
};

struct ibv_recv_wr {
    uint64_t wr_id;
    struct ibv_recv_wr *next;
    struct ibv_sge *sg_list;
    int num_sge;
};

struct ibv_comp_channel {
    struct ibv_context *context;
    int fd;
    int refcnt;
};

struct ibv_cq {
    struct ibv_context *context;
    struct ibv_comp_channel *channel;
    void *cq_context;
    uint32_t handle;
    int cqe;
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    uint32_t comp_events_completed;
    uint32_t async_events_completed;
};

struct ibv_qp {
    struct ibv_context *context;
    void *qp_context;
    struct ibv_pd *pd;
    struct ibv_cq *send_cq;
    struct ibv_cq *recv_cq;
    struct ibv_srq *srq;
    uint32_t handle;
    uint32_t qp_num;
    enum ibv_qp_state state;
    enum ibv_qp_type qp_type;
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    uint32_t events_completed;
};

/* The provider's entry points; only the four the data path calls are typed, the rest keep
 * their slots (verbs.h calls most of them `_compat_*`). */
struct ibv_context_ops {
    void *_slot0_query_device;
    void *_slot1_query_port;
    void *_slot2_7[6];       /* alloc_pd .. dereg_mr, alloc_mw */
    void *_slot8_9[2];       /* bind_mw, dealloc_mw */
    void *_slot10_create_cq;
    int (*poll_cq)(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc);
    int (*req_notify_cq)(struct ibv_cq *cq, int solicited_only);
    void *_slot13_20[8];     /* cq_event .. post_srq_recv */
    void *_slot21_24[4];     /* create_qp .. destroy_qp */
    int (*post_send)(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr);
    int (*post_recv)(struct ibv_qp *qp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr);
    void *_slot27_31[5];     /* create_ah .. async_event */
};

struct ibv_context {
    struct ibv_device *device;
    struct ibv_context_ops ops;
    int cmd_fd;
    int async_fd;
    int num_comp_vectors;
    pthread_mutex_t mutex;
    void *abi_compat;
};

/* ---- the function table ------------------------------------------------------------------ */

/* X(return type, name, version, parameters): every library function mooncake calls */
#define MC_IBV_FUNCS(X)                                                                       \
    X(struct ibv_device **, ibv_get_device_list, "IBVERBS_1.1", (int *num_devices))           \
    X(void, ibv_free_device_list, "IBVERBS_1.1", (struct ibv_device **list))                  \
    X(const char *, ibv_get_device_name, "IBVERBS_1.1", (struct ibv_device *device))          \
    X(struct ibv_context *, ibv_open_device, "IBVERBS_1.1", (struct ibv_device *device))      \
    X(int, ibv_close_device, "IBVERBS_1.1", (struct ibv_context *context))                    \
    X(int, ibv_query_device, "IBVERBS_1.1",                                                   \
      (struct ibv_context *context, struct ibv_device_attr *attr))                            \
    X(int, ibv_query_port, "IBVERBS_1.1",                                                     \
      (struct ibv_context *context, uint8_t port_num, struct ibv_port_attr *attr))            \
    X(int, ibv_query_gid, "IBVERBS_1.1",                                                      \
      (struct ibv_context *context, uint8_t port_num, int index, union ibv_gid *gid))         \
    X(int, _ibv_query_gid_ex, "IBVERBS_1.11",                                                 \
      (struct ibv_context *context, uint32_t port_num, uint32_t gid_index,                    \
       struct ibv_gid_entry *entry, uint32_t flags, size_t entry_size))                       \
    X(struct ibv_pd *, ibv_alloc_pd, "IBVERBS_1.1", (struct ibv_context *context))            \
    X(int, ibv_dealloc_pd, "IBVERBS_1.1", (struct ibv_pd *pd))                                \
    X(struct ibv_mr *, ibv_reg_mr_iova2, "IBVERBS_1.8",                                       \
      (struct ibv_pd *pd, void *addr, size_t length, uint64_t iova, unsigned int access))     \
    X(int, ibv_dereg_mr, "IBVERBS_1.1", (struct ibv_mr *mr))                                  \
    X(struct ibv_comp_channel *, ibv_create_comp_channel, "IBVERBS_1.0",                      \
      (struct ibv_context *context))                                                          \
    X(int, ibv_destroy_comp_channel, "IBVERBS_1.0", (struct ibv_comp_channel *channel))       \
    X(struct ibv_cq *, ibv_create_cq, "IBVERBS_1.1",                                          \
      (struct ibv_context *context, int cqe, void *cq_context,                                \
       struct ibv_comp_channel *channel, int comp_vector))                                    \
    X(int, ibv_destroy_cq, "IBVERBS_1.1", (struct ibv_cq *cq))                                \
    X(int, ibv_get_cq_event, "IBVERBS_1.1",                                                   \
      (struct ibv_comp_channel *channel, struct ibv_cq **cq, void **cq_context))              \
    X(void, ibv_ack_cq_events, "IBVERBS_1.1", (struct ibv_cq *cq, unsigned int nevents))      \
    X(struct ibv_qp *, ibv_create_qp, "IBVERBS_1.1",                                          \
      (struct ibv_pd *pd, struct ibv_qp_init_attr *attr))                                     \
    X(int, ibv_modify_qp, "IBVERBS_1.1",                                                      \
      (struct ibv_qp *qp, struct ibv_qp_attr *attr, int attr_mask))                           \
    X(int, ibv_query_qp, "IBVERBS_1.1",                                                       \
      (struct ibv_qp *qp, struct ibv_qp_attr *attr, int attr_mask,                            \
       struct ibv_qp_init_attr *init_attr))                                                   \
    X(int, ibv_destroy_qp, "IBVERBS_1.1", (struct ibv_qp *qp))                                \
    X(const char *, ibv_wc_status_str, "IBVERBS_1.1", (enum ibv_wc_status status))

#define MC_IBV_FIELD(ret, name, ver, params) ret(*name) params;
static struct {
    MC_IBV_FUNCS(MC_IBV_FIELD)
} mc_ibv_fn;
#undef MC_IBV_FIELD

/* the default soname: what a program linked with -libverbs would need */
#define MC_IBV_SONAME "libibverbs.so.1"

static void *mc_ibv_handle;
static char mc_ibv_path[4096]; /* the file the library was loaded from */

/* Open `soname` (a soname or a path; NULL: MC_IBV_SONAME) and resolve every function.
 * 0 on success (idempotent); -1 with a one-line reason in err (the table stays empty). */
static int mc_ibv_load(const char *soname, char *err, size_t errlen) {
    void *h;
    const char *e;
    void *sym;
    Dl_info info;
    if (mc_ibv_handle != NULL)
        return 0;
    if (soname == NULL || soname[0] == '\0')
        soname = MC_IBV_SONAME;
    h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        e = dlerror();
        snprintf(err, errlen,
                 "%s not found or not loadable (%s): install rdma-core's runtime library "
                 "(Debian/Ubuntu: libibverbs1 and ibverbs-providers; RHEL/Fedora: libibverbs)",
                 soname, e != NULL ? e : "dlopen failed");
        return -1;
    }
    /* bind each function at the version whose ABI is declared here; a library built without
     * symbol versions answers dlvsym() with nothing: take its only definition then */
#define MC_IBV_RESOLVE(ret, name, ver, params)                                                \
    sym = dlvsym(h, #name, ver);                                                              \
    if (sym == NULL)                                                                          \
        sym = dlsym(h, #name);                                                                \
    if (sym == NULL) {                                                                        \
        snprintf(err, errlen,                                                                 \
                 "%s has no %s@%s: rdma-core v32 or newer is needed (the rdma transport "     \
                 "uses it)",                                                                  \
                 soname, #name, ver);                                                         \
        memset(&mc_ibv_fn, 0, sizeof(mc_ibv_fn));                                             \
        dlclose(h);                                                                           \
        return -1;                                                                            \
    }                                                                                         \
    memcpy(&mc_ibv_fn.name, &sym, sizeof(sym));
    MC_IBV_FUNCS(MC_IBV_RESOLVE)
#undef MC_IBV_RESOLVE
    mc_ibv_path[0] = '\0';
    if (dladdr((void *)mc_ibv_fn.ibv_get_device_list, &info) && info.dli_fname != NULL)
        snprintf(mc_ibv_path, sizeof(mc_ibv_path), "%s", info.dli_fname);
    mc_ibv_handle = h;
    return 0;
}

static inline int mc_ibv_loaded(void) { return mc_ibv_handle != NULL; }
static inline const char *mc_ibv_loaded_path(void) { return mc_ibv_path; }

/* ---- the calls mooncake makes --------------------------------------------------------------- */

#define mc_ibv_get_device_list(n) (mc_ibv_fn.ibv_get_device_list(n))
#define mc_ibv_free_device_list(l) (mc_ibv_fn.ibv_free_device_list(l))
#define mc_ibv_get_device_name(d) (mc_ibv_fn.ibv_get_device_name(d))
#define mc_ibv_open_device(d) (mc_ibv_fn.ibv_open_device(d))
#define mc_ibv_close_device(c) (mc_ibv_fn.ibv_close_device(c))
#define mc_ibv_query_device(c, a) (mc_ibv_fn.ibv_query_device(c, a))
#define mc_ibv_query_gid(c, p, i, g) (mc_ibv_fn.ibv_query_gid(c, p, i, g))
#define mc_ibv_alloc_pd(c) (mc_ibv_fn.ibv_alloc_pd(c))
#define mc_ibv_dealloc_pd(p) (mc_ibv_fn.ibv_dealloc_pd(p))
#define mc_ibv_dereg_mr(m) (mc_ibv_fn.ibv_dereg_mr(m))
#define mc_ibv_create_comp_channel(c) (mc_ibv_fn.ibv_create_comp_channel(c))
#define mc_ibv_destroy_comp_channel(c) (mc_ibv_fn.ibv_destroy_comp_channel(c))
#define mc_ibv_create_cq(c, n, x, ch, v) (mc_ibv_fn.ibv_create_cq(c, n, x, ch, v))
#define mc_ibv_destroy_cq(q) (mc_ibv_fn.ibv_destroy_cq(q))
#define mc_ibv_get_cq_event(ch, q, x) (mc_ibv_fn.ibv_get_cq_event(ch, q, x))
#define mc_ibv_ack_cq_events(q, n) (mc_ibv_fn.ibv_ack_cq_events(q, n))
#define mc_ibv_create_qp(p, a) (mc_ibv_fn.ibv_create_qp(p, a))
#define mc_ibv_modify_qp(q, a, m) (mc_ibv_fn.ibv_modify_qp(q, a, m))
#define mc_ibv_query_qp(q, a, m, i) (mc_ibv_fn.ibv_query_qp(q, a, m, i))
#define mc_ibv_destroy_qp(q) (mc_ibv_fn.ibv_destroy_qp(q))
#define mc_ibv_wc_status_str(s) (mc_ibv_fn.ibv_wc_status_str(s))

/* verbs.h's inline ibv_query_gid_ex: the entry size tells the library our struct's extent */
static inline int mc_ibv_query_gid_ex(struct ibv_context *context, uint32_t port_num,
                                      uint32_t gid_index, struct ibv_gid_entry *entry,
                                      uint32_t flags) {
    return mc_ibv_fn._ibv_query_gid_ex(context, port_num, gid_index, entry, flags,
                                       sizeof(*entry));
}

/* verbs.h's ibv_reg_mr macro with an access mask it cannot see at compile time */
static inline struct ibv_mr *mc_ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t length,
                                           int access) {
    return mc_ibv_fn.ibv_reg_mr_iova2(pd, addr, length, (uint64_t)(uintptr_t)addr,
                                      (unsigned int)access);
}

/* ibv_query_port@IBVERBS_1.1 fills at least the fields up to link_layer (newer libraries fill
 * more, some into members added after this header's): hand it a zeroed buffer with room */
static inline int mc_ibv_query_port(struct ibv_context *context, uint8_t port_num,
                                    struct ibv_port_attr *attr) {
    union {
        struct ibv_port_attr a;
        char room[512];
    } buf;
    int rc;
    memset(&buf, 0, sizeof(buf));
    rc = mc_ibv_fn.ibv_query_port(context, port_num, &buf.a);
    memcpy(attr, &buf.a, sizeof(*attr));
    return rc;
}

/* verbs.h's static inline data path: straight into the provider */
static inline int mc_ibv_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr,
                                   struct ibv_send_wr **bad_wr) {
    return qp->context->ops.post_send(qp, wr, bad_wr);
}

static inline int mc_ibv_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr,
                                   struct ibv_recv_wr **bad_wr) {
    return qp->context->ops.post_recv(qp, wr, bad_wr);
}

static inline int mc_ibv_poll_cq(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc) {
    return cq->context->ops.poll_cq(cq, num_entries, wc);
}

static inline int mc_ibv_req_notify_cq(struct ibv_cq *cq, int solicited_only) {
    return cq->context->ops.req_notify_cq(cq, solicited_only);
}

#endif /* MC_IBV_H */
