# cython: language_level=3
"""The RDMA data path: post chains of RDMA WRITE/READ and poll CQs, all without the GIL.

Pieces (C structs owned by small cdef classes):

* ``CQSlot``: a CQ with its outstanding-CQE counter (posting stops before the CQ could overflow)
  and its poll-error counter.  A CQ belongs to exactly one worker.
* ``Worker``: one thread's nogil loop.  It takes slices from its inbox, posts them in chains to
  its endpoints' QPs (bounded by each QP's ``max_wr`` and the CQ depth), polls its CQs 64
  completions at a time, reports each slice to the batch table, and sleeps on completion
  channels + an eventfd when idle.  Before posting a slice it asks the batch table whether the
  slice may still touch memory (``mc_slice_live``: the batch was cancelled, or its region
  unregistered); if not, the slice ends with that code without being posted.  With a shared
  bandwidth quota (``set_quota``: the engine's slot on the worker's NIC, mc_quota.h) every
  window of work requests is asked for first (at most ``mc_quota_quantum`` bytes); a refusal
  holds posting back for the wait it names while the CQs are still polled.
* ``Endpoint``: ``n`` RC QPs to one peer device, polled and posted by one worker.  A slice that
  fails with a retryable status is reposted on another healthy QP of its endpoint; when none is
  left it goes to the ``Hub``, where the transport's repair thread rebuilds the endpoint (a
  handshake, in Python) and resubmits it, or fails it.  Slices carry their retry count; past
  ``retry_cnt`` they fail.  ``abort`` moves the QPs to ERR: each posted slice is reported when
  its flush completion is polled (the NIC no longer touches it), failed, or (``requeue``) handed
  to the hub for a rebuilt endpoint unless its batch was cancelled.
* ``KeyTable``: sorted address ranges -> lkey/rkey columns (and whether a peer's range takes
  WRITEs), searched per slice at submit.
* ``submit``: turn a ``Slices`` block into in-flight slices on endpoints' workers.

After failure, silence: a slice is reported only when its work request's completion (success,
error or flush) was polled, or -- at teardown, once the worker stopped -- after its QP was
destroyed (``Endpoint.teardown``).  Nothing a caller already saw end is touched by the NIC.

Completion accounting: every queued or in-flight slice holds one reference on its endpoint
struct (the ``Endpoint`` object holds another), and its job holds one reference on the batch.
The struct is freed by whoever drops the last reference; the QPs are destroyed only once no
slice is left on them (``destroy``) or the worker stopped (``teardown``).  A worker that stopped
completes whatever reaches its inbox afterwards with MC_E_CLOSED, so no slice is ever lost.
"""

cimport cython
from libc.errno cimport errno
from libc.stdint cimport UINT64_MAX, int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset

from mooncake._core.batch cimport (
    MC_E_CLOSED,
    MC_E_DENIED,
    MC_E_LOCAL,
    MC_E_PEER,
    MC_E_REFUSED,
    MC_E_TIMEOUT,
    Slices,
    mc_batch_ref,
    mc_batch_t,
    mc_batch_unref,
    mc_now,
    mc_slice_done,
    mc_slice_live,
)
from mooncake._core.libibverbs cimport (
    IBV_SEND_INLINE,
    IBV_SEND_SIGNALED,
    IBV_WC_LOC_ACCESS_ERR,
    IBV_WC_LOC_LEN_ERR,
    IBV_WC_LOC_PROT_ERR,
    IBV_WC_MW_BIND_ERR,
    IBV_WC_REM_ACCESS_ERR,
    IBV_WC_REM_INV_REQ_ERR,
    IBV_WC_REM_OP_ERR,
    IBV_WC_SUCCESS,
    IBV_WC_WR_FLUSH_ERR,
    IBV_WR_RDMA_READ,
    IBV_WR_RDMA_WRITE,
    ibv_ack_cq_events,
    ibv_comp_channel,
    ibv_cq,
    ibv_get_cq_event,
    ibv_poll_cq,
    ibv_post_send,
    ibv_qp,
    ibv_req_notify_cq,
    ibv_send_wr,
    ibv_sge,
    ibv_wc,
    ibv_wr_opcode,
    mc_ibv_load,
    mc_ibv_loaded,
)
from mooncake._core.quota cimport (
    Table,
    mc_quota_charge,
    mc_quota_enter,
    mc_quota_leave,
    mc_quota_t,
    mc_quota_wait_ns,
)
from mooncake._core.verbs cimport CQ, QP

from mooncake._core import verbs as _verbs

# this module's own table of libibverbs functions (the sleep path calls ibv_get_cq_event and
# ibv_ack_cq_events), from the library verbs.pyx opened: dlopen hands back the same handle
cdef char _load_err[1024]
mc_ibv_load(_verbs.library()["soname"].encode(), _load_err, sizeof(_load_err))

cdef extern from "mc_quota.h" nogil:
    uint64_t MC_QUOTA_QUANTUM
    uint64_t mc_quota_quantum(const mc_quota_t *q, int32_t sid)

cdef extern from *:
    """
    #include <pthread.h>
    #include <poll.h>
    #include <sched.h>
    #include <stdint.h>
    #include <sys/eventfd.h>
    #include <time.h>
    #include <unistd.h>
    #include <errno.h>
    #include "mc_quota.h"
    #define mcv_add(p, v) __atomic_add_fetch((p), (v), __ATOMIC_ACQ_REL)
    #define mcv_load(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define mcv_store(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
    static inline void mcv_kick(int fd) { uint64_t one = 1; ssize_t r = write(fd, &one, 8); (void)r; }
    static inline void mcv_drain(int fd) { uint64_t v; ssize_t r = read(fd, &v, 8); (void)r; }
    /* the quota a worker is handed while it runs: published once, read by its thread */
    static inline const mc_quota_t *mcv_loadq(const mc_quota_t **p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void mcv_storeq(const mc_quota_t **p, const mc_quota_t *v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    /* poll with a timeout in ns (the quota's waits are tens of microseconds) */
    static inline int mcv_poll_ns(struct pollfd *fds, int n, int64_t ns) {
        struct timespec ts;
        if (ns < 0) ns = 0;
        ts.tv_sec = (time_t)(ns / 1000000000LL);
        ts.tv_nsec = (long)(ns % 1000000000LL);
        return ppoll(fds, (nfds_t)n, &ts, NULL);
    }

    /* Per-thread xorshift64*: no state shared between threads that pick paths at once. */
    static __thread uint64_t mcv_rng_state;
    static inline uint32_t mcv_rand(void) {
        uint64_t x = mcv_rng_state;
        if (x == 0) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            x = ((uint64_t)(uintptr_t)&mcv_rng_state * 0x9E3779B97F4A7C15ull) ^
                ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec;
            x |= 1;
        }
        x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
        mcv_rng_state = x;
        return (uint32_t)((x * 0x2545F4914F6CDD1Dull) >> 32);
    }

    /* A condition variable on CLOCK_MONOTONIC, waited on until a deadline (mc_now() seconds);
     * the deadline is clamped so no conversion overflows. */
    static inline void mcv_cond_init_mono(pthread_cond_t *c) {
        pthread_condattr_t a;
        pthread_condattr_init(&a);
        pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
        pthread_cond_init(c, &a);
        pthread_condattr_destroy(&a);
    }
    static inline int mcv_cond_wait_until(pthread_cond_t *c, pthread_mutex_t *m, double deadline) {
        struct timespec ts;
        if (!(deadline > 0)) deadline = 0;          /* NaN too */
        if (deadline > 4.0e9) deadline = 4.0e9;     /* ~126 years of uptime */
        ts.tv_sec = (time_t)deadline;
        ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
        if (ts.tv_nsec < 0) ts.tv_nsec = 0;
        if (ts.tv_nsec > 999999999L) ts.tv_nsec = 999999999L;
        return pthread_cond_timedwait(c, m, &ts);
    }
    """
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr) nogil
    int pthread_mutex_destroy(pthread_mutex_t *m) nogil
    int pthread_mutex_lock(pthread_mutex_t *m) nogil
    int pthread_mutex_unlock(pthread_mutex_t *m) nogil
    int pthread_cond_destroy(pthread_cond_t *c) nogil
    int pthread_cond_signal(pthread_cond_t *c) nogil
    int pthread_cond_broadcast(pthread_cond_t *c) nogil
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout) nogil
    enum:
        POLLIN
        EFD_NONBLOCK
        EFD_CLOEXEC
        ENOMEM
        ETIMEDOUT
    int eventfd(unsigned int initval, int flags) nogil
    int close(int fd) nogil
    int sched_yield() nogil
    int64_t mcv_add(int64_t *p, int64_t v) nogil
    int64_t mcv_load(int64_t *p) nogil
    void mcv_store(int64_t *p, int64_t v) nogil
    void mcv_kick(int fd) nogil
    void mcv_drain(int fd) nogil
    uint32_t mcv_rand() nogil
    void mcv_cond_init_mono(pthread_cond_t *c) nogil
    const mc_quota_t *mcv_loadq(const mc_quota_t **p) nogil
    void mcv_storeq(const mc_quota_t **p, const mc_quota_t *v) nogil
    int mcv_poll_ns(pollfd *fds, int n, int64_t ns) nogil
    int mcv_cond_wait_until(pthread_cond_t *c, pthread_mutex_t *m, double deadline) nogil

cdef enum:
    CHAIN = 32       # work requests per ibv_post_send chain
    POLL_BATCH = 64  # completions per ibv_poll_cq
    STICKY = 16      # consecutive slices on one QP before moving on (keeps chains long)
    MAX_CQ = 64      # CQs one worker polls
    MAX_QP = 255     # QPs per endpoint
    MAX_PATHS = 64   # endpoints one submit spreads over
    #: under quota contention a worker keeps at most this many quanta posted and not completed:
    #: the next window is asked for as the NIC drains the last (as a socket buffer paces TCP), so
    #: the shares the quota grants are the shares the link carries.  Alone: no limit.
    QUOTA_INFLIGHT = 2
    QUOTA_WINDOW_SCAN = 64   # pending slices summed for a window's size

cdef enum:
    EP_OK = 0
    EP_ABORTED = 1

cdef enum:
    C_OP_READ = 0
    C_OP_WRITE = 1

OP_READ = C_OP_READ
OP_WRITE = C_OP_WRITE
#: the longest wait ``Hub.take`` accepts (longer values are clamped)
MAX_WAIT_S = 1e6

# --------------------------------------------------------------------------------- structs

cdef struct vjob:
    mc_batch_t *batch
    int64_t remaining

cdef struct vcq:
    ibv_cq *cq
    ibv_comp_channel *ch
    int64_t out
    int64_t cap
    int64_t errors      # ibv_poll_cq calls that failed
    int64_t last_err    # what the last failing one returned (negative)
    int owned           # taken by a Worker

cdef struct vslice:
    vslice *next        # queue link (inbox, pending, hub) or, while posted, in-flight link
    vslice *prev        # in-flight back link
    vjob *job
    vep *ep
    uint64_t local
    uint64_t remote
    uint64_t length
    uint32_t lkey
    uint32_t rkey
    uint32_t task
    uint8_t op
    uint8_t retries
    uint8_t charged     # posted under the quota: its bytes count in the worker's qinfl
    int qp

cdef struct vhub:
    pthread_mutex_t mu
    pthread_cond_t cv
    vslice *head
    vslice *tail
    int64_t count
    int closed

cdef struct vworker:
    pthread_mutex_t mu
    vslice *in_head
    vslice *in_tail
    int64_t in_count
    int evfd
    int64_t stop
    int64_t dead        # the loop has exited: _push completes slices itself
    int ncq
    vcq *cqs[MAX_CQ]
    vhub *hub
    int retry_cnt
    int spin
    double grace        # TENT's grace period (s): poll this long after the last progress
    int64_t posted
    int64_t post_calls
    int64_t completed
    int64_t failed
    int64_t retried
    int64_t canceled
    int64_t poll_errors
    int64_t sleeps
    # shared bandwidth quota (mc_quota.h); all NULL/0 without one
    const mc_quota_t *qpub   # published by Worker.set_quota (atomic), possibly while running
    const mc_quota_t *q      # the loop's copy (refreshed from qpub until set)
    int32_t qslot
    int qin             # entered: the worker has slices waiting to be posted
    double qresume      # refused: no new window before this (mc_now()), 0 = none
    int64_t qinfl       # bytes posted under the quota whose completion was not polled yet
    double qlast        # the last ask (mc_now())
    int64_t qdone       # charged slices completed since the last ask
    int64_t qwaits      # windows refused
    int64_t qheld       # passes held back by the in-flight limit (QUOTA_INFLIGHT)

cdef struct vep:
    int64_t id
    int nqp
    ibv_qp **qp
    int64_t *qp_out
    int64_t *qp_bad
    int max_wr
    int max_inline
    int rr
    int rr_left
    int64_t refs        # queued/in-flight slices, +1 while the Endpoint object lives
    int64_t state
    int64_t abort_err
    int64_t requeue     # aborted slices of live batches go to the hub instead of failing
    int64_t last_status
    int64_t done
    vslice *infl        # posted, completion not polled yet (only its worker touches the list)
    int64_t ninfl
    vworker *worker
    vcq *cq

# --------------------------------------------------------------------------------- helpers

cdef inline void _ep_unref(vep *ep) noexcept nogil:
    if mcv_add(&ep.refs, -1) == 0:
        free(ep)


cdef inline void _complete(vslice *s, int err) noexcept nogil:
    """Report a finished slice; afterwards ``s`` may be freed."""
    cdef vjob *job = s.job
    if s.ep != NULL:  # first: the transport may destroy the endpoint once it sees no users
        _ep_unref(s.ep)
    mc_slice_done(job.batch, s.task, 0 if err else <int64_t>s.length, err)
    if mcv_add(&job.remaining, -1) == 0:
        mc_batch_unref(job.batch)
        free(job)


cdef inline void _fail_chain(vslice *s, int err) noexcept nogil:
    cdef vslice *nxt
    while s != NULL:
        nxt = s.next
        s.next = NULL
        _complete(s, err)
        s = nxt


cdef inline void _infl_add(vep *ep, vslice *s) noexcept nogil:
    s.prev = NULL
    s.next = ep.infl
    if ep.infl != NULL:
        ep.infl.prev = s
    ep.infl = s
    mcv_add(&ep.ninfl, 1)


cdef inline void _infl_del(vep *ep, vslice *s) noexcept nogil:
    if s.prev != NULL:
        s.prev.next = s.next
    else:
        ep.infl = s.next
    if s.next != NULL:
        s.next.prev = s.prev
    s.next = NULL
    s.prev = NULL
    mcv_add(&ep.ninfl, -1)


cdef inline void _push(vworker *w, vslice *head, vslice *tail, int64_t n) noexcept nogil:
    """Append a chain to a worker's inbox and wake it; a stopped worker's chain ends now."""
    tail.next = NULL
    pthread_mutex_lock(&w.mu)
    if w.dead:
        pthread_mutex_unlock(&w.mu)
        _fail_chain(head, MC_E_CLOSED)
        return
    if w.in_tail == NULL:
        w.in_head = head
    else:
        w.in_tail.next = head
    w.in_tail = tail
    mcv_add(&w.in_count, n)
    pthread_mutex_unlock(&w.mu)
    mcv_kick(w.evfd)


cdef inline void _to_hub(vhub *h, vslice *s) noexcept nogil:
    s.next = NULL
    pthread_mutex_lock(&h.mu)
    if h.tail == NULL:
        h.head = s
    else:
        h.tail.next = s
    h.tail = s
    h.count += 1
    pthread_cond_signal(&h.cv)
    pthread_mutex_unlock(&h.mu)


cdef inline int _pick_qp(vep *ep) noexcept nogil:
    """A QP of ``ep`` with room: its index, -1 when all healthy QPs are full, -2 when none is
    healthy."""
    cdef int k, q, healthy = 0
    if ep.rr_left > 0 and not ep.qp_bad[ep.rr] and mcv_load(&ep.qp_out[ep.rr]) < ep.max_wr:
        ep.rr_left -= 1
        return ep.rr
    for k in range(ep.nqp):
        q = (ep.rr + 1 + k) % ep.nqp
        if mcv_load(&ep.qp_bad[q]):
            continue
        healthy += 1
        if mcv_load(&ep.qp_out[q]) < ep.max_wr:
            ep.rr = q
            ep.rr_left = STICKY - 1
            return q
    return -1 if healthy else -2


cdef inline bint _fatal(int status) noexcept nogil:
    """Statuses that another path cannot fix: the request itself is wrong."""
    return (status == IBV_WC_REM_ACCESS_ERR or status == IBV_WC_REM_INV_REQ_ERR or
            status == IBV_WC_LOC_PROT_ERR or status == IBV_WC_LOC_LEN_ERR or
            status == IBV_WC_LOC_ACCESS_ERR or status == IBV_WC_REM_OP_ERR or
            status == IBV_WC_MW_BIND_ERR)


cdef inline void _requeue(vworker *w, vslice *s) noexcept nogil:
    """An aborted endpoint's slice of a live batch: to the hub (a rebuilt endpoint), or failed
    once it has used up its retries."""
    s.retries += 1
    if s.retries > w.retry_cnt:
        w.failed += 1
        _complete(s, <int>mcv_load(&s.ep.abort_err))
        return
    w.retried += 1
    s.qp = -1
    _to_hub(w.hub, s)


cdef inline int _stopped(vslice *s) noexcept nogil:
    """Why ``s`` must end without (further) touching memory, or 0 (it may be posted)."""
    cdef int err = mc_slice_live(s.job.batch, s.task)
    if err:
        return err
    if mcv_load(&s.ep.state) == EP_ABORTED and not mcv_load(&s.ep.requeue):
        return <int>mcv_load(&s.ep.abort_err)
    return 0


cdef inline void _on_error(vworker *w, vslice *s, int status) noexcept nogil:
    """A polled error completion (``s`` is off the in-flight list: the NIC is done with it)."""
    cdef vep *ep = s.ep
    cdef int err
    mcv_store(&ep.qp_bad[s.qp], 1)   # an errored RC QP is in ERR: nothing more goes there
    if status != IBV_WC_WR_FLUSH_ERR:
        mcv_store(&ep.last_status, status)
    if _fatal(status):
        w.failed += 1
        _complete(s, MC_E_REFUSED if (status == IBV_WC_REM_ACCESS_ERR or
                                      status == IBV_WC_REM_INV_REQ_ERR or
                                      status == IBV_WC_REM_OP_ERR) else MC_E_LOCAL)
        return
    err = _stopped(s)
    if err:
        w.canceled += 1
        _complete(s, err)
    elif mcv_load(&ep.state) == EP_ABORTED:
        _requeue(w, s)
    else:
        s.retries += 1
        if s.retries > w.retry_cnt:
            w.failed += 1
            _complete(s, MC_E_PEER)
        else:
            w.retried += 1
            s.qp = -1
            _push(ep.worker, s, s, 1)   # its worker reposts it on another QP, or hands it on


cdef inline void _charge(vworker *w, ibv_send_wr *wrs, int n) noexcept nogil:
    """Charge the quota for the first ``n`` work requests of a posted chain."""
    cdef uint64_t b = 0
    cdef int i
    cdef vslice *s
    for i in range(n):
        s = <vslice *><uintptr_t>wrs[i].wr_id
        s.charged = 1
        b += s.length
    mc_quota_charge(w.q, w.qslot, b)
    w.qinfl += <int64_t>b


cdef inline void _append(vslice *s, vslice **head, vslice **tail) noexcept nogil:
    if tail[0] == NULL:
        head[0] = s
    else:
        tail[0].next = s
    tail[0] = s


cdef inline uint64_t _window(vslice *s, vslice *rest, uint64_t qmax) noexcept nogil:
    """The bytes of the window that starts with ``s`` (then ``rest``): at most ``qmax``, at
    least ``s``."""
    cdef uint64_t b = s.length
    cdef int k = 0
    while rest != NULL and b < qmax and k < QUOTA_WINDOW_SCAN:
        b += rest.length
        rest = rest.next
        k += 1
    if b > qmax:
        b = qmax if qmax > s.length else s.length
    return b


cdef int _flush(vworker *w, vep *ep, int q, ibv_send_wr *wrs, int n,
                vslice **keep_head, vslice **keep_tail) noexcept nogil:
    """Post ``wrs[0..n)`` as one chain on ``ep``'s QP ``q``; unposted slices go back to keep."""
    cdef ibv_send_wr *bad = NULL
    cdef int i, first_bad, rc
    cdef vslice *s
    if n == 0:
        return 0
    for i in range(n - 1):
        wrs[i].next = &wrs[i + 1]
    wrs[n - 1].next = NULL
    rc = ibv_post_send(ep.qp[q], wrs, &bad)
    w.post_calls += 1
    if rc == 0:
        w.posted += n
        if w.q != NULL:
            _charge(w, wrs, n)
        return n
    first_bad = <int>(bad - wrs) if bad != NULL else 0
    if w.q != NULL and first_bad > 0:
        _charge(w, wrs, first_bad)
    if rc != ENOMEM:
        mcv_store(&ep.qp_bad[q], 1)
        mcv_store(&ep.last_status, -rc)
    for i in range(first_bad, n):
        s = <vslice *><uintptr_t>wrs[i].wr_id
        _infl_del(ep, s)
        mcv_add(&ep.qp_out[q], -1)
        mcv_add(&ep.cq.out, -1)
        s.qp = -1
        if keep_tail[0] == NULL:
            keep_head[0] = s
        else:
            keep_tail[0].next = s
        keep_tail[0] = s
    w.posted += first_bad
    return first_bad


cdef int _post_pending(vworker *w, vslice **phead) noexcept nogil:
    """Post what can be posted from the pending list; the rest stays in it.

    With a quota, each window (at most ``mc_quota_quantum`` bytes) is asked for before its
    first work request is built; what is posted is charged (``_flush``).  A refusal (or, under
    contention, QUOTA_INFLIGHT quanta still in flight) keeps the rest of the list for a later
    pass; slices that must end without being posted still end now.  A worker held back by
    anything but a refusal (its in-flight limit, full QPs) while its bytes keep completing
    still asks every quarter of the table's stale time: it uses the link, so it keeps
    competing (one that completes nothing stops competing, as the table intends)."""
    cdef ibv_send_wr wrs[CHAIN]
    cdef ibv_sge sges[CHAIN]
    cdef int nwr = 0, q, cur_q = -1, posted = 0, err
    cdef vep *cur_ep = NULL
    cdef vep *ep
    cdef vslice *s = phead[0]
    cdef vslice *nxt
    cdef vslice *keep_head = NULL
    cdef vslice *keep_tail = NULL
    cdef ibv_send_wr *wr
    cdef const mc_quota_t *quota = w.q
    cdef uint64_t used = 0, budget = 0, qmax, ns
    cdef bint held = False   # the quota holds the rest of this pass back
    cdef bint asked = False
    cdef double now
    if quota != NULL and w.qresume > 0:
        if mc_now() < w.qresume:
            held = True
        else:
            w.qresume = 0
    while s != NULL:
        nxt = s.next
        s.next = NULL
        ep = s.ep
        err = _stopped(s)
        if err:   # cancelled, unregistered, or its endpoint aborted: never posted
            w.canceled += 1
            _complete(s, err)
            s = nxt
            continue
        if mcv_load(&ep.state) == EP_ABORTED:   # aborted with requeue
            _requeue(w, s)
            s = nxt
            continue
        if held:
            _append(s, &keep_head, &keep_tail)
            s = nxt
            continue
        q = _pick_qp(ep) if mcv_load(&ep.cq.out) < ep.cq.cap else -1
        if q == -2:
            _to_hub(w.hub, s)
            s = nxt
            continue
        if q == -1:
            _append(s, &keep_head, &keep_tail)
            s = nxt
            continue
        if quota != NULL and used >= budget:
            # a new window: what is built is posted (and charged) first, then ask
            if nwr:
                posted += _flush(w, cur_ep, cur_q, wrs, nwr, &keep_head, &keep_tail)
                nwr = 0
            qmax = mc_quota_quantum(quota, w.qslot)
            if qmax != UINT64_MAX and w.qinfl >= <int64_t>(QUOTA_INFLIGHT * MC_QUOTA_QUANTUM):
                w.qheld += 1     # contended, and enough in flight: ask once some of it is done
                held = True
            else:
                ns = mc_quota_wait_ns(quota, w.qslot, _window(s, nxt, qmax))
                asked = True
                now = mc_now()
                w.qlast = now
                w.qdone = 0
                if ns:
                    w.qwaits += 1
                    w.qresume = now + <double>ns * 1e-9
                    held = True
                else:
                    budget = UINT64_MAX if qmax > UINT64_MAX - used else used + qmax
            if held:
                _append(s, &keep_head, &keep_tail)
                s = nxt
                continue
        if nwr and (ep != cur_ep or q != cur_q or nwr == CHAIN):
            posted += _flush(w, cur_ep, cur_q, wrs, nwr, &keep_head, &keep_tail)
            nwr = 0
        cur_ep = ep
        cur_q = q
        s.qp = q
        mcv_add(&ep.qp_out[q], 1)
        mcv_add(&ep.cq.out, 1)
        _infl_add(ep, s)
        wr = &wrs[nwr]
        sges[nwr].addr = s.local
        sges[nwr].length = <uint32_t>s.length
        sges[nwr].lkey = s.lkey
        wr.wr_id = <uint64_t><uintptr_t>s
        wr.sg_list = &sges[nwr]
        wr.num_sge = 1
        wr.opcode = IBV_WR_RDMA_WRITE if s.op == C_OP_WRITE else IBV_WR_RDMA_READ
        wr.send_flags = IBV_SEND_SIGNALED
        if s.op == C_OP_WRITE and s.length <= <uint64_t>ep.max_inline:
            wr.send_flags = IBV_SEND_SIGNALED | IBV_SEND_INLINE
        wr.wr.rdma.remote_addr = s.remote
        wr.wr.rdma.rkey = s.rkey
        nwr += 1
        used += s.length
        s = nxt
    if nwr:
        posted += _flush(w, cur_ep, cur_q, wrs, nwr, &keep_head, &keep_tail)
    if quota != NULL and keep_head != NULL and not asked and w.qresume == 0 and w.qdone > 0:
        now = mc_now()
        if now - w.qlast >= <double>quota.stale_ns * 0.25e-9:   # keep competing
            ns = mc_quota_wait_ns(quota, w.qslot, keep_head.length)
            w.qlast = now
            w.qdone = 0
            if ns:
                w.qwaits += 1
                w.qresume = now + <double>ns * 1e-9
    phead[0] = keep_head
    return posted


cdef int _poll_cqs(vworker *w) noexcept nogil:
    cdef ibv_wc wcs[POLL_BATCH]
    cdef int c, n, i, total = 0
    cdef vcq *cq
    cdef vslice *s
    for c in range(w.ncq):
        cq = w.cqs[c]
        n = ibv_poll_cq(cq.cq, POLL_BATCH, wcs)
        if n < 0:   # the provider failed: the transport's watchdog aborts this CQ's endpoints
            mcv_add(&cq.errors, 1)
            mcv_store(&cq.last_err, n)
            w.poll_errors += 1
            continue
        for i in range(n):
            s = <vslice *><uintptr_t>wcs[i].wr_id
            if s.charged:   # posted under the quota: no longer in flight
                s.charged = 0
                w.qinfl -= <int64_t>s.length
                w.qdone += 1
            _infl_del(s.ep, s)
            mcv_add(&s.ep.done, 1)
            mcv_add(&s.ep.qp_out[s.qp], -1)
            mcv_add(&cq.out, -1)
            if wcs[i].status == IBV_WC_SUCCESS:
                w.completed += 1
                _complete(s, 0)
            else:
                _on_error(w, s, wcs[i].status)
        total += n
    return total


cdef void _arm(vworker *w) noexcept nogil:
    """Request a completion event on every CQ (then poll once more before sleeping)."""
    cdef int c
    for c in range(w.ncq):
        if w.cqs[c].ch != NULL:
            ibv_req_notify_cq(w.cqs[c].cq, 0)


cdef void _sleep(vworker *w, bint busy, double until) noexcept nogil:
    """Block until new work or a completion event; ``busy``: completions are outstanding (the
    CQs were armed and polled empty since); ``until`` > 0: the quota asked to wait until then
    (mc_now()), so never sleep past it."""
    cdef pollfd fds[MAX_CQ + 1]
    cdef int n = 1, c, k
    cdef int64_t ns
    cdef ibv_cq *ev_cq
    cdef void *ev_ctx
    fds[0].fd = w.evfd
    fds[0].events = POLLIN
    if busy:
        for c in range(w.ncq):
            if w.cqs[c].ch == NULL:
                continue
            for k in range(1, n):
                if fds[k].fd == w.cqs[c].ch.fd:
                    break
            else:
                fds[n].fd = w.cqs[c].ch.fd
                fds[n].events = POLLIN
                n += 1
        # another worker sharing a channel may take our event: never sleep long
        ns = (10 if n > 1 else 1) * 1000000
        if until > 0:
            ns = min(ns, <int64_t>((until - mc_now()) * 1e9))
        if ns > 0:
            mcv_poll_ns(fds, n, ns)
    else:
        poll(fds, 1, 200)
    w.sleeps += 1
    mcv_drain(w.evfd)
    for c in range(w.ncq):
        if w.cqs[c].ch == NULL:
            continue
        while ibv_get_cq_event(w.cqs[c].ch, &ev_cq, &ev_ctx) == 0:  # EAGAIN ends it
            ibv_ack_cq_events(ev_cq, 1)


cdef void _loop(vworker *w) noexcept nogil:
    cdef vslice *pending = NULL
    cdef vslice *tail
    cdef vslice *got
    cdef int idle = 0, did, c
    cdef bint busy, armed = False
    cdef double last = 0.0   # when work last moved (posted or completed)
    while not mcv_load(&w.stop):
        did = 0
        if mcv_load(&w.in_count) > 0:
            pthread_mutex_lock(&w.mu)
            got = w.in_head
            w.in_head = NULL
            w.in_tail = NULL
            mcv_store(&w.in_count, 0)
            pthread_mutex_unlock(&w.mu)
            if got != NULL:
                if pending == NULL:
                    pending = got
                else:
                    tail = pending
                    while tail.next != NULL:
                        tail = tail.next
                    tail.next = got
                did = 1
        if pending != NULL:
            if w.q == NULL:
                w.q = mcv_loadq(&w.qpub)   # a quota handed over while running
            if w.q != NULL and not w.qin:
                mc_quota_enter(w.q, w.qslot)   # work to send: this slot competes
                w.qin = 1
            did += _post_pending(w, &pending)
            if pending == NULL and w.qin:
                mc_quota_leave(w.q, w.qslot)   # all posted: it no longer holds anyone back
                w.qin = 0
                w.qresume = 0
        did += _poll_cqs(w)
        if did:
            idle = 0
            armed = False
            if w.grace > 0:
                last = mc_now()
            continue
        idle += 1
        if idle < w.spin or (w.grace > 0 and mc_now() - last < w.grace):
            sched_yield()   # within the grace period of the last progress: keep polling
            continue
        busy = pending != NULL
        for c in range(w.ncq):
            if mcv_load(&w.cqs[c].out) > 0:
                busy = True
        if busy and not armed:
            _arm(w)   # then one more empty poll round before sleeping
            armed = True
            continue
        _sleep(w, busy, w.qresume if pending != NULL else 0.0)
        armed = False
        idle = w.spin - 1   # after a wake-up, one poll round, then sleep again if idle
    # stopping: nothing new is accepted; whatever was never posted ends now.  Posted slices
    # stay on their endpoints until Endpoint.teardown (after the QPs are destroyed).
    if w.qin:
        mc_quota_leave(w.q, w.qslot)
        w.qin = 0
    pthread_mutex_lock(&w.mu)
    mcv_store(&w.dead, 1)
    got = w.in_head
    w.in_head = NULL
    w.in_tail = NULL
    mcv_store(&w.in_count, 0)
    pthread_mutex_unlock(&w.mu)
    _fail_chain(got, MC_E_CLOSED)
    _fail_chain(pending, MC_E_CLOSED)

# --------------------------------------------------------------------------------- classes


@cython.no_gc_clear
cdef class CQSlot:
    """A CQ as the kernel sees it: pointer, channel, outstanding-CQE budget, poll errors."""
    cdef vcq c
    cdef readonly CQ cq

    def __cinit__(self, CQ cq not None):
        if cq.cq == NULL:
            raise ValueError("the CQ is destroyed")
        if not mc_ibv_loaded():  # a CQ exists, so verbs loaded it: never seen in practice
            raise OSError(79, f"libibverbs unavailable to verbs_kernel: "
                              f"{_load_err.decode(errors='replace')}")
        self.cq = cq
        memset(&self.c, 0, sizeof(vcq))
        self.c.cq = cq.cq
        self.c.ch = cq.cq.channel
        self.c.cap = cq.cqe

    @property
    def outstanding(self):
        return mcv_load(&self.c.out)

    @property
    def errors(self):
        """How many ``ibv_poll_cq`` calls on this CQ failed."""
        return mcv_load(&self.c.errors)

    @property
    def last_error(self):
        """What the last failing ``ibv_poll_cq`` returned (negative), 0 if none failed."""
        return mcv_load(&self.c.last_err)


cdef class Hub:
    """Slices whose endpoint has no healthy QP left (or was aborted for a rebuild), waiting
    for the repair thread."""
    cdef vhub h

    def __cinit__(self):
        memset(&self.h, 0, sizeof(vhub))
        pthread_mutex_init(&self.h.mu, NULL)
        mcv_cond_init_mono(&self.h.cv)

    def __dealloc__(self):
        _fail_chain(self.h.head, MC_E_PEER)
        self.h.head = NULL
        pthread_mutex_destroy(&self.h.mu)
        pthread_cond_destroy(&self.h.cv)

    def take(self, double timeout):
        """Wait up to ``timeout`` s (clamped to 0..MAX_WAIT_S) for orphaned slices; an
        ``Orphans`` or None."""
        cdef vslice *got = NULL
        cdef double deadline
        if not timeout > 0:   # NaN too
            timeout = 0
        elif timeout > MAX_WAIT_S:
            timeout = MAX_WAIT_S
        with nogil:
            pthread_mutex_lock(&self.h.mu)
            deadline = mc_now() + timeout
            while self.h.head == NULL and not self.h.closed:
                if mcv_cond_wait_until(&self.h.cv, &self.h.mu, deadline) == ETIMEDOUT:
                    break
            got = self.h.head
            self.h.head = NULL
            self.h.tail = NULL
            self.h.count = 0
            pthread_mutex_unlock(&self.h.mu)
        if got == NULL:
            return None
        o = Orphans.__new__(Orphans)
        (<Orphans>o).head = got
        return o

    def close(self):
        pthread_mutex_lock(&self.h.mu)
        self.h.closed = 1
        pthread_cond_broadcast(&self.h.cv)
        pthread_mutex_unlock(&self.h.mu)


cdef class Orphans:
    """Slices taken from the hub: resubmit them on a new endpoint or fail them, per old
    endpoint id.  Whatever is left when this object dies fails with MC_E_PEER."""
    cdef vslice *head

    def __dealloc__(self):
        self._fail(-1, MC_E_PEER)

    def groups(self):
        """``{old endpoint id: number of slices}``."""
        cdef vslice *s = self.head
        d = {}
        while s != NULL:
            d[s.ep.id] = d.get(s.ep.id, 0) + 1
            s = s.next
        return d

    cdef vslice *_take(self, int64_t ep_id) noexcept:
        """Unlink the slices of endpoint ``ep_id`` (-1: all), in order, as one chain."""
        cdef vslice *s = self.head
        cdef vslice *prev = NULL
        cdef vslice *nxt
        cdef vslice *h = NULL
        cdef vslice *t = NULL
        while s != NULL:
            nxt = s.next
            if ep_id < 0 or s.ep.id == ep_id:
                if prev == NULL:
                    self.head = nxt
                else:
                    prev.next = nxt
                s.next = NULL
                _append(s, &h, &t)
            else:
                prev = s
            s = nxt
        return h

    cdef int _fail(self, int64_t ep_id, int err) noexcept:
        cdef vslice *s = self._take(ep_id)
        cdef vslice *nxt
        cdef int n = 0
        while s != NULL:
            nxt = s.next
            s.next = NULL
            _complete(s, err)
            n += 1
            s = nxt
        return n

    def fail(self, int64_t ep_id, int err):
        """Fail the slices of endpoint ``ep_id`` (-1: all) with ``err``; how many."""
        return self._fail(ep_id, err)

    def resubmit(self, int64_t ep_id, Endpoint ep not None):
        """Move the slices of endpoint ``ep_id`` onto ``ep`` (same peer device: rkeys stay).
        A cancelled batch's slices end on the new endpoint's worker without being posted."""
        cdef vslice *h = self._take(ep_id)
        cdef vslice *s = h
        cdef vslice *t = NULL
        cdef int64_t n = 0
        while s != NULL:
            mcv_add(&ep.ep.refs, 1)
            _ep_unref(s.ep)
            s.ep = ep.ep
            s.qp = -1
            t = s
            n += 1
            s = s.next
        if n:
            _push(ep.ep.worker, h, t, n)
        return n

    def move(self, int64_t ep_id, list eps not None, KeyTable local not None,
             list lcols not None, KeyTable remote not None, list rcols not None):
        """Move the slices of endpoint ``ep_id`` onto other rails, round-robin: ``eps[k]``
        leaves the local device whose lkeys are column ``lcols[k]`` of ``local`` for the peer
        device whose rkeys are column ``rcols[k]`` of ``remote``, and each slice is re-keyed
        for the endpoint it lands on.  A slice whose batch was cancelled (or region revoked)
        ends with that code, one whose range is in neither table ends MC_E_LOCAL /
        MC_E_REFUSED (MC_E_DENIED: a WRITE into a range now read-only), all unposted.  How
        many moved."""
        cdef int ne = len(eps), k, r, err
        if ne == 0 or ne > MAX_PATHS or len(lcols) != ne or len(rcols) != ne:
            raise ValueError(f"need 1..{MAX_PATHS} endpoints, one local and one remote column "
                             "each")
        cdef vep *veps[MAX_PATHS]
        cdef int vl[MAX_PATHS]
        cdef int vr[MAX_PATHS]
        cdef vslice *heads[MAX_PATHS]
        cdef vslice *tails[MAX_PATHS]
        cdef int64_t add[MAX_PATHS]
        for k in range(ne):
            veps[k] = (<Endpoint?>eps[k]).ep
            vl[k] = lcols[k]
            vr[k] = rcols[k]
            if not 0 <= vl[k] < local.ncols or not 0 <= vr[k] < remote.ncols:
                raise ValueError(f"path {k}: column out of range")
            heads[k] = NULL
            tails[k] = NULL
            add[k] = 0
        cdef vslice *s = self._take(ep_id)
        cdef vslice *nxt
        cdef int64_t moved = 0
        while s != NULL:
            nxt = s.next
            s.next = NULL
            k = <int>(moved % ne)
            err = mc_slice_live(s.job.batch, s.task)
            if not err:
                r = local.find_row(s.local, s.length)
                if r < 0:
                    err = MC_E_LOCAL
                else:
                    s.lkey = local.keys[r * local.ncols + vl[k]]
                    r = remote.find_row(s.remote, s.length)
                    if r < 0:
                        err = MC_E_REFUSED
                    elif s.op == C_OP_WRITE and not remote.writable[r]:
                        err = MC_E_DENIED
                    else:
                        s.rkey = remote.keys[r * remote.ncols + vr[k]]
            if err:
                _complete(s, err)
                s = nxt
                continue
            mcv_add(&veps[k].refs, 1)
            _ep_unref(s.ep)
            s.ep = veps[k]
            s.qp = -1
            _append(s, &heads[k], &tails[k])
            add[k] += 1
            moved += 1
            s = nxt
        for k in range(ne):
            if add[k]:
                _push(veps[k].worker, heads[k], tails[k], add[k])
        return moved


@cython.no_gc_clear
cdef class Worker:
    """One worker thread's state; ``run()`` (in a thread) loops without the GIL until
    ``stop()``.  Each of its CQ slots belongs to it alone."""
    cdef vworker *w
    cdef readonly list slots
    cdef readonly Hub hub
    cdef readonly Table quota   # the shared quota table this worker charges (kept mapped)

    def __cinit__(self, list slots not None, Hub hub not None, int retry_cnt=9, int spin=64,
                  double grace=0.0):
        cdef CQSlot sl
        if not slots or len(slots) > MAX_CQ:
            raise ValueError(f"a worker polls 1..{MAX_CQ} CQs, got {len(slots)}")
        for x in slots:
            sl = <CQSlot?>x
            if sl.c.owned:
                raise ValueError("a CQ slot belongs to one worker only")
        self.w = <vworker *>calloc(1, sizeof(vworker))
        if self.w == NULL:
            raise MemoryError()
        self.w.evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.w.evfd < 0:
            e = errno
            free(self.w)
            self.w = NULL
            raise OSError(e, "eventfd failed")
        pthread_mutex_init(&self.w.mu, NULL)
        self.slots = list(slots)
        self.hub = hub
        self.w.hub = &hub.h
        self.w.ncq = len(slots)
        for i, x in enumerate(slots):
            sl = <CQSlot>x
            sl.c.owned = 1
            self.w.cqs[i] = &sl.c
        self.w.retry_cnt = retry_cnt
        self.w.spin = spin
        self.w.grace = grace if grace < 10.0 else 10.0

    def __dealloc__(self):
        if self.w != NULL:
            close(self.w.evfd)
            pthread_mutex_destroy(&self.w.mu)
            free(self.w)
            self.w = NULL

    def run(self):
        """The worker loop; returns after ``stop()``.  Runs once."""
        if mcv_load(&self.w.dead):
            raise RuntimeError("this worker has stopped")
        with nogil:
            _loop(self.w)

    def stop(self):
        mcv_store(&self.w.stop, 1)
        mcv_kick(self.w.evfd)

    def set_quota(self, Table table not None, int64_t sid):
        """Ask slot ``sid`` of the shared quota ``table`` for every window this worker posts
        and charge it what was posted (mc_quota.h).  May be called while the worker runs (it
        takes the quota up on its next pass); once set, it stays for the worker's life."""
        if sid < 0 or sid >= <int64_t>table.q.max_nics * table.q.max_slots:
            raise IndexError(f"quota slot id {sid} out of range")
        if self.quota is not None:
            if self.quota is table and self.w.qslot == sid:
                return
            raise RuntimeError("this worker already charges a quota slot")
        self.quota = table
        self.w.qslot = <int32_t>sid
        mcv_storeq(&self.w.qpub, &table.q)   # publishes qslot too (release)
        mcv_kick(self.w.evfd)

    @property
    def quota_slot(self):
        """The quota slot id this worker charges, or None."""
        return None if self.quota is None else self.w.qslot

    @property
    def stopped(self):
        """The loop has exited (or never ran and ``stop()`` was called and ``run()`` returned):
        what reaches it now ends with MC_E_CLOSED."""
        return bool(mcv_load(&self.w.dead))

    def kick(self):
        mcv_kick(self.w.evfd)

    def stats(self):
        cdef vworker *w = self.w
        return dict(posted=w.posted, post_calls=w.post_calls, completed=w.completed,
                    failed=w.failed, retried=w.retried, canceled=w.canceled,
                    poll_errors=w.poll_errors, sleeps=w.sleeps, quota_waits=w.qwaits,
                    quota_held=w.qheld, quota_inflight=w.qinfl)


@cython.no_gc_clear
cdef class _Grave:
    """An endpoint struct (and its QPs) whose object died with slices still on it; kept until
    the last of them is reported (``reap_graves``)."""
    cdef vep *ep
    cdef list qps

    def __dealloc__(self):
        if self.ep != NULL and mcv_add(&self.ep.refs, -1) == 0:
            free(self.ep)
        self.ep = NULL


_graves = []


def reap_graves():
    """Free the endpoints (and QPs) of dead ``Endpoint`` objects whose slices have all been
    reported; how many are still waiting."""
    global _graves
    keep = []
    for g in _graves:
        if mcv_load(&(<_Grave>g).ep.refs) > 1:
            keep.append(g)
    _graves = keep
    return len(keep)


@cython.no_gc_clear
cdef class Endpoint:
    """``len(qps)`` connected RC QPs to one peer device, all on ``slot``'s CQ, posted and polled
    by ``worker`` (which owns that slot)."""
    cdef vep *ep
    cdef readonly list qps
    cdef readonly Worker worker
    cdef readonly CQSlot slot
    cdef public object info

    def __cinit__(self, int64_t ep_id, list qps not None, Worker worker not None,
                  CQSlot slot not None):
        cdef int n = len(qps), i
        cdef QP q
        if not 1 <= n <= MAX_QP:
            raise ValueError(f"an endpoint needs 1..{MAX_QP} QPs, got {n}")
        if not any(x is slot for x in worker.slots):
            raise ValueError("the endpoint's CQ slot must be one its worker polls")
        for x in qps:
            q = <QP?>x
            if q.qp == NULL:
                raise ValueError("a QP of the endpoint is destroyed")
            if q.cq is not slot.cq:
                raise ValueError("every QP of an endpoint must complete on the slot's CQ")
        self.ep = <vep *>calloc(1, sizeof(vep) + n * (sizeof(void *) + 2 * sizeof(int64_t)))
        if self.ep == NULL:
            raise MemoryError()
        self.ep.qp = <ibv_qp **>(self.ep + 1)
        self.ep.qp_out = <int64_t *>(self.ep.qp + n)
        self.ep.qp_bad = self.ep.qp_out + n
        self.ep.id = ep_id
        self.ep.nqp = n
        self.ep.refs = 1
        self.ep.max_wr = min((<QP>x).max_wr for x in qps)
        self.ep.max_inline = min((<QP>x).max_inline for x in qps)
        for i in range(n):
            self.ep.qp[i] = (<QP>qps[i]).qp
        self.ep.worker = worker.w
        self.ep.cq = &slot.c
        self.qps = list(qps)
        self.worker = worker
        self.slot = slot

    def __dealloc__(self):
        cdef _Grave g
        if self.ep == NULL:
            return
        if mcv_load(&self.ep.refs) == 1:  # nothing queued or in flight (none can be added)
            free(self.ep)
        else:
            # slices still point at the struct and the worker may still post on the QPs:
            # stop new posts, flush what is posted, and keep both until the last is reported
            self._abort(MC_E_CLOSED, False)
            try:
                g = _Grave.__new__(_Grave)
                g.ep = self.ep
                g.qps = self.qps
                _graves.append(g)
            except BaseException:  # interpreter shutdown: leaking beats freeing under them
                pass
        self.ep = NULL

    @property
    def id(self):
        return self.ep.id

    @property
    def users(self):
        """Slices queued or in flight on this endpoint."""
        return mcv_load(&self.ep.refs) - 1

    @property
    def inflight(self):
        """Slices posted whose completion was not polled yet."""
        return mcv_load(&self.ep.ninfl)

    @property
    def healthy(self):
        """Number of QPs not in error."""
        return sum(1 for i in range(self.ep.nqp) if not mcv_load(&self.ep.qp_bad[i]))

    @property
    def aborted(self):
        return mcv_load(&self.ep.state) == EP_ABORTED

    @property
    def requeue(self):
        """Aborted for a rebuild: live batches' slices move to a new endpoint."""
        return bool(mcv_load(&self.ep.requeue))

    @property
    def completions(self):
        """Work completions polled so far (progress, for stall detection)."""
        return mcv_load(&self.ep.done)

    @property
    def abort_error(self):
        """The error aborted slices end with (0 while not aborted)."""
        return mcv_load(&self.ep.abort_err) if self.aborted else 0

    @property
    def last_status(self):
        """The last error status seen (ibv_wc_status, or -errno of a failed post), 0 if none."""
        return mcv_load(&self.ep.last_status)

    cdef list _abort(self, int err, bint requeue):
        mcv_store(&self.ep.abort_err, err)
        mcv_store(&self.ep.requeue, 1 if requeue else 0)
        mcv_store(&self.ep.state, EP_ABORTED)
        for i in range(self.ep.nqp):
            mcv_store(&self.ep.qp_bad[i], 1)
        errors = []
        for q in self.qps:
            if (<QP>q).qp == NULL:
                continue
            try:
                (<QP>q).to_error()
            except OSError as e:
                errors.append(e)
        mcv_kick(self.ep.worker.evfd)
        return errors

    def abort(self, int err=MC_E_TIMEOUT, bint requeue=False):
        """Stop the endpoint: its QPs go to ERR, so every posted work request completes with a
        flush error and each slice is reported only then (the NIC is done with it).  Slices end
        with ``err`` (default MC_E_TIMEOUT; MC_E_PEER when the peer is gone), or with their
        batch's cancel code; with ``requeue`` the slices of batches still live go to the hub
        instead, for a rebuilt endpoint.  Returns the OSErrors of QPs that did not move to ERR
        (their posted work may never flush)."""
        return self._abort(err, requeue)

    def teardown(self, int err=MC_E_CLOSED):
        """After the worker stopped: destroy the QPs (the NIC can no longer touch what was
        posted on them), then fail every slice still posted with ``err``; how many."""
        cdef vslice *s
        cdef vslice *nxt
        cdef int n = 0
        if not mcv_load(&self.worker.w.dead):
            raise RuntimeError(f"endpoint {self.ep.id}: its worker is still running")
        if not self.aborted:
            mcv_store(&self.ep.abort_err, err)
            mcv_store(&self.ep.state, EP_ABORTED)
        for i in range(self.ep.nqp):
            mcv_store(&self.ep.qp_bad[i], 1)
        for q in self.qps:
            (<QP>q).close()
        s = self.ep.infl
        self.ep.infl = NULL
        while s != NULL:
            nxt = s.next
            s.next = NULL
            s.prev = NULL
            mcv_add(&self.ep.ninfl, -1)
            _complete(s, err)
            n += 1
            s = nxt
        return n

    def destroy(self):
        """Destroy the QPs; only once nothing is queued or in flight."""
        if mcv_load(&self.ep.refs) != 1:
            raise RuntimeError(f"endpoint {self.ep.id} still has {self.users} slices in flight")
        for q in self.qps:
            (<QP>q).close()


cdef class KeyTable:
    """Sorted, non-overlapping ``[start, end)`` ranges, each with one key per column and
    whether it takes WRITEs."""
    cdef uint64_t *starts
    cdef uint64_t *ends
    cdef uint32_t *keys
    cdef uint8_t *writable
    cdef readonly int n
    cdef readonly int ncols

    def __cinit__(self, rows, int ncols):
        """``rows``: iterable of ``(start, length, [key per column])`` or ``(start, length,
        keys, writable)``.  ValueError for an empty, wrapping or overlapping range."""
        rows = sorted(rows, key=lambda r: r[0])
        if ncols < 1:
            raise ValueError(f"a key table needs at least one column, got {ncols}")
        self.n = len(rows)
        self.ncols = ncols
        self.starts = <uint64_t *>malloc(max(1, self.n) * sizeof(uint64_t))
        self.ends = <uint64_t *>malloc(max(1, self.n) * sizeof(uint64_t))
        self.keys = <uint32_t *>malloc(max(1, self.n * ncols) * sizeof(uint32_t))
        self.writable = <uint8_t *>malloc(max(1, self.n))
        if self.starts == NULL or self.ends == NULL or self.keys == NULL or \
                self.writable == NULL:
            raise MemoryError()
        cdef uint64_t start, length
        for i, row in enumerate(rows):
            start, length, keys = row[0], row[1], row[2]
            if length == 0 or start + length < start:
                raise ValueError(f"row {i}: range {start:#x}+{length} is empty or wraps")
            if i and start < self.ends[i - 1]:
                raise ValueError(f"row {i}: range {start:#x}+{length} overlaps the previous one")
            if len(keys) != ncols:
                raise ValueError(f"row {i} has {len(keys)} keys, expected {ncols}")
            self.starts[i] = start
            self.ends[i] = start + length
            self.writable[i] = 1 if len(row) < 4 or row[3] else 0
            for j in range(ncols):
                self.keys[i * ncols + j] = keys[j]

    def __dealloc__(self):
        free(self.starts)
        free(self.ends)
        free(self.keys)
        free(self.writable)

    cdef inline int find_row(self, uint64_t addr, uint64_t length) noexcept nogil:
        """The row holding ``[addr, addr+length)``, or -1."""
        cdef int lo = 0, hi = self.n - 1, mid, hit = -1
        while lo <= hi:
            mid = (lo + hi) >> 1
            if self.starts[mid] <= addr:
                hit = mid
                lo = mid + 1
            else:
                hi = mid - 1
        if hit < 0 or addr + length > self.ends[hit] or addr + length < addr:
            return -1
        return hit

    def lookup(self, uint64_t addr, uint64_t length, int col=0):
        """The key covering ``[addr, addr+length)`` in ``col``, or None."""
        if not 0 <= col < self.ncols:
            raise ValueError(f"column {col} out of range")
        cdef int r = self.find_row(addr, length)
        return None if r < 0 else self.keys[r * self.ncols + col]

    def writable_at(self, uint64_t addr, uint64_t length):
        """Whether the range takes WRITEs (None when no row holds it)."""
        cdef int r = self.find_row(addr, length)
        return None if r < 0 else bool(self.writable[r])


def usable(list eps not None):
    """Whether every endpoint of ``eps`` may take work now: not aborted, no QP in error (what
    a cached path choice checks before each submit, without a Python loop)."""
    cdef Endpoint e
    cdef int i
    for x in eps:
        e = <Endpoint?>x
        if mcv_load(&e.ep.state) == EP_ABORTED:
            return False
        for i in range(e.ep.nqp):
            if mcv_load(&e.ep.qp_bad[i]):
                return False
    return True


cdef int64_t _rr = 0


def submit(Slices s not None, KeyTable local not None, int local_col, KeyTable remote not None,
           list cols not None, list eps not None, bint roundrobin=False, list lcols=None):
    """Queue every slice of ``s`` on the endpoints' workers.

    ``eps[k]`` is the endpoint to the peer device whose rkeys are column ``cols[k]`` of
    ``remote``, from the local device whose lkeys are column ``lcols[k]`` of ``local`` (every
    path ``local_col`` without ``lcols``): the paths may start at different local devices, so
    one submit stripes over every NIC pair given.  Each slice picks ``k`` round-robin or at
    random.  A slice outside ``local``
    fails with MC_E_LOCAL, outside ``remote`` with MC_E_REFUSED, a WRITE into a read-only remote
    range with MC_E_DENIED, all without being posted.  Returns how many failed so.
    """
    cdef Py_ssize_t n = s.n, i
    cdef int ne = len(eps), k, r
    if ne == 0 or ne != len(cols):
        raise ValueError("need one endpoint per remote column")
    if ne > MAX_PATHS:
        raise ValueError(f"at most {MAX_PATHS} paths per submit")
    if lcols is not None and len(lcols) != ne:
        raise ValueError("need one local column per endpoint")
    if n == 0:
        return 0
    cdef vep *veps[MAX_PATHS]
    cdef int vcol[MAX_PATHS]
    cdef int vlcol[MAX_PATHS]
    cdef int64_t add[MAX_PATHS]
    cdef vslice *heads[MAX_PATHS]
    cdef vslice *tails[MAX_PATHS]
    for k in range(ne):
        veps[k] = (<Endpoint?>eps[k]).ep
        vcol[k] = cols[k]
        add[k] = 0
        heads[k] = NULL
        tails[k] = NULL
        if vcol[k] < 0 or vcol[k] >= remote.ncols:
            raise ValueError(f"remote column {vcol[k]} out of range")
        vlcol[k] = local_col if lcols is None else lcols[k]
        if vlcol[k] < 0 or vlcol[k] >= local.ncols:
            raise ValueError(f"local column {vlcol[k]} out of range")

    cdef vjob *job = <vjob *>calloc(1, sizeof(vjob) + n * sizeof(vslice))
    if job == NULL:
        raise MemoryError()
    cdef vslice *sl = <vslice *>(job + 1)
    cdef vslice *bad = NULL
    cdef vslice *x
    cdef int nbad = 0
    cdef uint64_t rr0 = <uint64_t>(mcv_add(&_rr, n) - n)
    cdef uint32_t *task = s.task
    cdef uint8_t *op = s.op
    cdef uint64_t *lo = s.local
    cdef uint64_t *ro = s.remote
    cdef uint64_t *ln = s.length
    job.batch = s.batch.b
    mc_batch_ref(job.batch)
    job.remaining = n + 1   # +1: held until every slice is queued
    with nogil:
        for i in range(n):
            x = &sl[i]
            x.job = job
            x.local = lo[i]
            x.remote = ro[i]
            x.length = ln[i]
            x.task = task[i]
            x.op = op[i]
            x.qp = -1
            k = <int>((rr0 + <uint64_t>i) % <uint64_t>ne) if roundrobin else \
                <int>(mcv_rand() % <uint32_t>ne)
            r = local.find_row(x.local, x.length)
            if r < 0 or x.op > C_OP_WRITE or x.length > <uint64_t>2147483648U:
                x.rkey = MC_E_LOCAL
            else:
                x.lkey = local.keys[r * local.ncols + vlcol[k]]
                r = remote.find_row(x.remote, x.length)
                if r < 0:
                    x.rkey = MC_E_REFUSED
                elif x.op == C_OP_WRITE and not remote.writable[r]:
                    x.rkey = MC_E_DENIED
                else:
                    x.rkey = remote.keys[r * remote.ncols + vcol[k]]
                    x.ep = veps[k]
                    add[k] += 1
                    if tails[k] == NULL:
                        heads[k] = x
                    else:
                        tails[k].next = x
                    tails[k] = x
                    continue
            x.next = bad
            bad = x
        for k in range(ne):
            if add[k]:
                mcv_add(&veps[k].refs, add[k])
        for k in range(ne):
            if add[k]:
                _push(veps[k].worker, heads[k], tails[k], add[k])
        while bad != NULL:
            x = bad.next
            nbad += 1
            _complete(bad, <int>bad.rkey)
            bad = x
        if mcv_add(&job.remaining, -1) == 0:
            mc_batch_unref(job.batch)
            free(job)
    return nbad


def post_poll_loop(QP qp not None, CQ cq not None, int opcode, uint64_t local, uint32_t lkey,
                   uint64_t remote, uint32_t rkey, uint32_t length, int64_t count,
                   int depth=64, int chain=CHAIN):
    """Post ``count`` RDMA WRs of ``length`` bytes (``depth`` in flight, chains of ``chain``)
    and poll them to completion, without the GIL.  ``(completed, errors, seconds)``."""
    cdef ibv_send_wr wrs[CHAIN]
    cdef ibv_sge sge
    cdef ibv_wc wcs[POLL_BATCH]
    cdef ibv_send_wr *bad = NULL
    cdef int64_t posted = 0, done = 0, errors = 0, inflight = 0
    cdef int i, n, k, rc = 0
    cdef double t0, t1
    if chain < 1 or chain > CHAIN:
        raise ValueError(f"chain must be 1..{CHAIN}")
    if qp.qp == NULL:
        raise ValueError("the QP is destroyed")
    if opcode != IBV_WR_RDMA_WRITE and opcode != IBV_WR_RDMA_READ:
        raise ValueError(f"opcode must be RDMA WRITE or READ, got {opcode}")
    depth = max(1, min(depth, qp.max_wr, cq.cqe))
    sge.addr = local
    sge.length = length
    sge.lkey = lkey
    memset(wrs, 0, sizeof(wrs))
    for i in range(CHAIN):
        wrs[i].sg_list = &sge
        wrs[i].num_sge = 1
        wrs[i].opcode = <ibv_wr_opcode>opcode
        wrs[i].send_flags = IBV_SEND_SIGNALED
        wrs[i].wr.rdma.remote_addr = remote
        wrs[i].wr.rdma.rkey = rkey
    with nogil:
        t0 = mc_now()
        while done < count:
            k = <int>min(<int64_t>chain, count - posted, depth - inflight)
            if k > 0:
                for i in range(k):
                    wrs[i].wr_id = <uint64_t>(posted + i)
                    wrs[i].next = &wrs[i + 1] if i < k - 1 else NULL
                rc = ibv_post_send(qp.qp, wrs, &bad)
                if rc:
                    break
                posted += k
                inflight += k
            n = ibv_poll_cq(cq.cq, POLL_BATCH, wcs)
            if n < 0:
                rc = 5  # EIO: the provider gives no errno for a failed poll
                break
            for i in range(n):
                if wcs[i].status != IBV_WC_SUCCESS:
                    errors += 1
            done += n
            inflight -= n
            if errors:
                break
        t1 = mc_now()
    if rc:
        raise OSError(rc, f"post/poll failed after {done} completions")
    return done, errors, t1 - t0
