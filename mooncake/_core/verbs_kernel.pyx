# cython: language_level=3
"""The RDMA data path: post chains of RDMA WRITE/READ and poll CQs, all without the GIL.

Pieces (C structs owned by small cdef classes):

* ``CQSlot``: a CQ with its outstanding-CQE counter (posting stops before the CQ could overflow).
* ``Worker``: one thread's nogil loop.  It takes slices from its inbox, posts them in chains to
  its endpoints' QPs (bounded by each QP's ``max_wr`` and the CQ depth), polls its CQs 64
  completions at a time, reports each slice to the batch table, and sleeps on completion
  channels + an eventfd when idle.
* ``Endpoint``: ``n`` RC QPs to one peer device.  A slice that fails with a retryable status is
  reposted on another healthy QP of its endpoint; when none is left it goes to the ``Hub``,
  where the transport's repair thread rebuilds the endpoint (a handshake, in Python) and
  resubmits it, or fails it.  Slices carry their retry count; past ``retry_cnt`` they fail.
* ``KeyTable``: sorted address ranges -> lkey/rkey columns, searched per slice at submit.
* ``submit``: turn a ``Slices`` block into in-flight slices on endpoints' workers.

Completion accounting: every in-flight slice holds one reference on its endpoint (``users``)
and its job holds one reference on the batch.  An endpoint is destroyed only at ``users == 0``,
so its QPs drain first.
"""

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset

from mooncake._core.batch cimport (
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
)
from mooncake._core.libibverbs cimport *
from mooncake._core.verbs cimport CQ, QP, CompChannel

cdef extern from *:
    """
    #include <pthread.h>
    #include <poll.h>
    #include <sched.h>
    #include <stdlib.h>
    #include <sys/eventfd.h>
    #include <unistd.h>
    #include <errno.h>
    #define mcv_add(p, v) __atomic_add_fetch((p), (v), __ATOMIC_ACQ_REL)
    #define mcv_load(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define mcv_store(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
    static inline void mcv_kick(int fd) { uint64_t one = 1; ssize_t r = write(fd, &one, 8); (void)r; }
    static inline void mcv_drain(int fd) { uint64_t v; ssize_t r = read(fd, &v, 8); (void)r; }
    """
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr) nogil
    int pthread_mutex_destroy(pthread_mutex_t *m) nogil
    int pthread_mutex_lock(pthread_mutex_t *m) nogil
    int pthread_mutex_unlock(pthread_mutex_t *m) nogil
    int pthread_cond_init(pthread_cond_t *c, void *attr) nogil
    int pthread_cond_destroy(pthread_cond_t *c) nogil
    int pthread_cond_signal(pthread_cond_t *c) nogil
    int pthread_cond_broadcast(pthread_cond_t *c) nogil
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m) nogil
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
    int eventfd(unsigned int initval, int flags) nogil
    int close(int fd) nogil
    int sched_yield() nogil
    int rand_r(unsigned int *seed) nogil
    int64_t mcv_add(int64_t *p, int64_t v) nogil
    int64_t mcv_load(int64_t *p) nogil
    void mcv_store(int64_t *p, int64_t v) nogil
    void mcv_kick(int fd) nogil
    void mcv_drain(int fd) nogil

DEF CHAIN = 32      # work requests per ibv_post_send chain
DEF POLL_BATCH = 64  # completions per ibv_poll_cq
DEF STICKY = 16     # consecutive slices on one QP before moving on (keeps chains long)
DEF MAX_CQ = 64     # CQs one worker polls

cdef enum:
    EP_OK = 0
    EP_ABORTED = 1

cdef enum:
    C_OP_READ = 0
    C_OP_WRITE = 1

OP_READ = C_OP_READ
OP_WRITE = C_OP_WRITE

# --------------------------------------------------------------------------------- structs

cdef struct vjob:
    mc_batch_t *batch
    int64_t remaining

cdef struct vcq:
    ibv_cq *cq
    ibv_comp_channel *ch
    int64_t out
    int64_t cap

cdef struct vslice:
    vslice *next
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
    int ncq
    vcq *cqs[MAX_CQ]
    vhub *hub
    int retry_cnt
    int spin
    int64_t posted
    int64_t post_calls
    int64_t completed
    int64_t failed
    int64_t retried
    int64_t sleeps

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
    int64_t users
    int64_t state
    int64_t abort_err
    int64_t last_status
    int64_t done
    vworker *worker
    vcq *cq

# --------------------------------------------------------------------------------- helpers

cdef inline void _complete(vslice *s, int err) noexcept nogil:
    """Report a finished slice; afterwards ``s`` may be freed."""
    cdef vjob *job = s.job
    if s.ep != NULL:  # first: the endpoint may be destroyed once a waiter sees the batch done
        mcv_add(&s.ep.users, -1)
    mc_slice_done(job.batch, s.task, 0 if err else <int64_t>s.length, err)
    if mcv_add(&job.remaining, -1) == 0:
        mc_batch_unref(job.batch)
        free(job)


cdef inline void _push(vworker *w, vslice *head, vslice *tail, int64_t n) noexcept nogil:
    """Append a chain to a worker's inbox and wake it."""
    tail.next = NULL
    pthread_mutex_lock(&w.mu)
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


cdef inline void _on_error(vworker *w, vslice *s, int status) noexcept nogil:
    cdef vep *ep = s.ep
    mcv_store(&ep.qp_bad[s.qp], 1)   # an errored RC QP is in ERR: nothing more goes there
    if status != IBV_WC_WR_FLUSH_ERR:
        mcv_store(&ep.last_status, status)
    if mcv_load(&ep.state) == EP_ABORTED:
        _complete(s, <int>mcv_load(&ep.abort_err))
    elif _fatal(status):
        w.failed += 1
        _complete(s, MC_E_REFUSED if (status == IBV_WC_REM_ACCESS_ERR or
                                      status == IBV_WC_REM_INV_REQ_ERR or
                                      status == IBV_WC_REM_OP_ERR) else MC_E_LOCAL)
    else:
        s.retries += 1
        if s.retries > w.retry_cnt:
            w.failed += 1
            _complete(s, MC_E_PEER)
        else:
            w.retried += 1
            s.qp = -1
            _push(ep.worker, s, s, 1)   # its worker reposts it on another QP, or hands it on


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
        return n
    first_bad = <int>(bad - wrs) if bad != NULL else 0
    if rc != ENOMEM:
        mcv_store(&ep.qp_bad[q], 1)
        mcv_store(&ep.last_status, -rc)
    for i in range(first_bad, n):
        s = <vslice *><uintptr_t>wrs[i].wr_id
        mcv_add(&ep.qp_out[q], -1)
        mcv_add(&ep.cq.out, -1)
        s.qp = -1
        s.next = NULL
        if keep_tail[0] == NULL:
            keep_head[0] = s
        else:
            keep_tail[0].next = s
        keep_tail[0] = s
    w.posted += first_bad
    return first_bad


cdef int _post_pending(vworker *w, vslice **phead) noexcept nogil:
    """Post what can be posted from the pending list; the rest stays in it."""
    cdef ibv_send_wr wrs[CHAIN]
    cdef ibv_sge sges[CHAIN]
    cdef int nwr = 0, q, cur_q = -1, posted = 0
    cdef vep *cur_ep = NULL
    cdef vep *ep
    cdef vslice *s = phead[0]
    cdef vslice *nxt
    cdef vslice *keep_head = NULL
    cdef vslice *keep_tail = NULL
    cdef ibv_send_wr *wr
    while s != NULL:
        nxt = s.next
        s.next = NULL
        ep = s.ep
        if mcv_load(&ep.state) == EP_ABORTED:
            _complete(s, <int>mcv_load(&ep.abort_err))
            s = nxt
            continue
        q = _pick_qp(ep) if mcv_load(&ep.cq.out) < ep.cq.cap else -1
        if q == -2:
            _to_hub(w.hub, s)
            s = nxt
            continue
        if q == -1:
            if keep_tail == NULL:
                keep_head = s
            else:
                keep_tail.next = s
            keep_tail = s
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
        s = nxt
    if nwr:
        posted += _flush(w, cur_ep, cur_q, wrs, nwr, &keep_head, &keep_tail)
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
        for i in range(n):
            s = <vslice *><uintptr_t>wcs[i].wr_id
            mcv_add(&s.ep.done, 1)
            mcv_add(&s.ep.qp_out[s.qp], -1)
            mcv_add(&cq.out, -1)
            if wcs[i].status == IBV_WC_SUCCESS:
                w.completed += 1
                _complete(s, 0)
            else:
                _on_error(w, s, wcs[i].status)
        if n > 0:
            total += n
    return total


cdef void _arm(vworker *w) noexcept nogil:
    """Request a completion event on every CQ (then poll once more before sleeping)."""
    cdef int c
    for c in range(w.ncq):
        if w.cqs[c].ch != NULL:
            ibv_req_notify_cq(w.cqs[c].cq, 0)


cdef void _sleep(vworker *w, bint busy) noexcept nogil:
    """Block until new work or a completion event; ``busy``: completions are outstanding (the
    CQs were armed and polled empty since)."""
    cdef pollfd fds[MAX_CQ + 1]
    cdef int n = 1, c, k
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
        poll(fds, n, 10 if n > 1 else 1)
    else:
        poll(fds, 1, 200)
    w.sleeps += 1
    mcv_drain(w.evfd)
    for c in range(w.ncq):
        if w.cqs[c].ch == NULL:
            continue
        while ibv_get_cq_event(w.cqs[c].ch, &ev_cq, &ev_ctx) == 0:
            ibv_ack_cq_events(ev_cq, 1)


cdef void _loop(vworker *w) noexcept nogil:
    cdef vslice *pending = NULL
    cdef vslice *tail
    cdef vslice *got
    cdef int idle = 0, did, c
    cdef bint busy, armed = False
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
            did += _post_pending(w, &pending)
        did += _poll_cqs(w)
        if did:
            idle = 0
            armed = False
            continue
        idle += 1
        if idle < w.spin:
            sched_yield()
            continue
        busy = pending != NULL
        for c in range(w.ncq):
            if mcv_load(&w.cqs[c].out) > 0:
                busy = True
        if busy and not armed:
            _arm(w)   # then one more empty poll round before sleeping
            armed = True
            continue
        _sleep(w, busy)
        armed = False
        idle = w.spin - 1   # after a wake-up, one poll round, then sleep again if idle
    # stopping: whatever was never posted fails
    while pending != NULL:
        got = pending.next
        _complete(pending, MC_E_PEER)
        pending = got

# --------------------------------------------------------------------------------- classes


@cython.no_gc_clear
cdef class CQSlot:
    """A CQ as the kernel sees it: pointer, channel and outstanding-CQE budget."""
    cdef vcq c
    cdef readonly CQ cq

    def __cinit__(self, CQ cq):
        self.cq = cq
        self.c.cq = cq.cq
        self.c.ch = cq.cq.channel
        self.c.out = 0
        self.c.cap = cq.cqe

    @property
    def outstanding(self):
        return mcv_load(&self.c.out)


cdef class Hub:
    """Slices whose endpoint has no healthy QP left, waiting for the repair thread."""
    cdef vhub h

    def __cinit__(self):
        memset(&self.h, 0, sizeof(vhub))
        pthread_mutex_init(&self.h.mu, NULL)
        pthread_cond_init(&self.h.cv, NULL)

    def __dealloc__(self):
        cdef vslice *s = self.h.head
        cdef vslice *n
        while s != NULL:
            n = s.next
            _complete(s, MC_E_PEER)
            s = n
        pthread_mutex_destroy(&self.h.mu)
        pthread_cond_destroy(&self.h.cv)

    def take(self, double timeout):
        """Wait up to ``timeout`` s for orphaned slices; an ``Orphans`` or None."""
        cdef double deadline = mc_now() + timeout
        cdef vslice *got = NULL
        with nogil:
            pthread_mutex_lock(&self.h.mu)
            while self.h.head == NULL and not self.h.closed:
                pthread_mutex_unlock(&self.h.mu)
                if mc_now() >= deadline:
                    pthread_mutex_lock(&self.h.mu)
                    break
                poll(NULL, 0, 5)
                pthread_mutex_lock(&self.h.mu)
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

    cdef int _fail(self, int64_t ep_id, int err) noexcept:
        cdef vslice *s = self.head
        cdef vslice *prev = NULL
        cdef vslice *nxt
        cdef int n = 0
        while s != NULL:
            nxt = s.next
            if ep_id < 0 or s.ep.id == ep_id:
                if prev == NULL:
                    self.head = nxt
                else:
                    prev.next = nxt
                _complete(s, err)
                n += 1
            else:
                prev = s
            s = nxt
        return n

    def fail(self, int64_t ep_id, int err):
        """Fail the slices of endpoint ``ep_id`` (-1: all) with ``err``; how many."""
        return self._fail(ep_id, err)

    def resubmit(self, int64_t ep_id, Endpoint ep):
        """Move the slices of endpoint ``ep_id`` onto ``ep`` (same peer device: rkeys stay)."""
        cdef vslice *s = self.head
        cdef vslice *prev = NULL
        cdef vslice *nxt
        cdef vslice *h = NULL
        cdef vslice *t = NULL
        cdef int64_t n = 0
        while s != NULL:
            nxt = s.next
            if s.ep.id == ep_id:
                if prev == NULL:
                    self.head = nxt
                else:
                    prev.next = nxt
                mcv_add(&ep.ep.users, 1)
                mcv_add(&s.ep.users, -1)
                s.ep = ep.ep
                s.qp = -1
                s.next = NULL
                if t == NULL:
                    h = s
                else:
                    t.next = s
                t = s
                n += 1
            else:
                prev = s
            s = nxt
        if n:
            _push(ep.ep.worker, h, t, n)
        return n


@cython.no_gc_clear
cdef class Worker:
    """One worker thread's state; ``run()`` (in a thread) loops without the GIL until
    ``stop()``."""
    cdef vworker *w
    cdef readonly list slots
    cdef readonly Hub hub

    def __cinit__(self, list slots, Hub hub, int retry_cnt=9, int spin=64):
        if not slots or len(slots) > MAX_CQ:
            raise ValueError(f"a worker polls 1..{MAX_CQ} CQs, got {len(slots)}")
        self.w = <vworker *>calloc(1, sizeof(vworker))
        if self.w == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.w.mu, NULL)
        self.w.evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.w.evfd < 0:
            raise OSError("eventfd failed")
        self.slots = list(slots)
        self.hub = hub
        self.w.hub = &hub.h
        self.w.ncq = len(slots)
        for i, sl in enumerate(slots):
            self.w.cqs[i] = &(<CQSlot>sl).c
        self.w.retry_cnt = retry_cnt
        self.w.spin = spin

    def __dealloc__(self):
        if self.w != NULL:
            close(self.w.evfd)
            pthread_mutex_destroy(&self.w.mu)
            free(self.w)
            self.w = NULL

    def run(self):
        """The worker loop; returns after ``stop()``."""
        with nogil:
            _loop(self.w)

    def stop(self):
        mcv_store(&self.w.stop, 1)
        mcv_kick(self.w.evfd)

    def kick(self):
        mcv_kick(self.w.evfd)

    def stats(self):
        cdef vworker *w = self.w
        return dict(posted=w.posted, post_calls=w.post_calls, completed=w.completed,
                    failed=w.failed, retried=w.retried, sleeps=w.sleeps)


@cython.no_gc_clear
cdef class Endpoint:
    """``len(qps)`` connected RC QPs to one peer device, served by one worker."""
    cdef vep *ep
    cdef readonly list qps
    cdef readonly Worker worker
    cdef readonly CQSlot slot
    cdef public object info

    def __cinit__(self, int64_t ep_id, list qps, Worker worker, CQSlot slot):
        cdef int n = len(qps), i
        if n < 1:
            raise ValueError("an endpoint needs at least one QP")
        self.ep = <vep *>calloc(1, sizeof(vep) + n * (sizeof(void *) + 2 * sizeof(int64_t)))
        if self.ep == NULL:
            raise MemoryError()
        self.ep.qp = <ibv_qp **>(self.ep + 1)
        self.ep.qp_out = <int64_t *>(self.ep.qp + n)
        self.ep.qp_bad = self.ep.qp_out + n
        self.ep.id = ep_id
        self.ep.nqp = n
        self.ep.max_wr = min((<QP>q).max_wr for q in qps)
        self.ep.max_inline = min((<QP>q).max_inline for q in qps)
        for i in range(n):
            self.ep.qp[i] = (<QP>qps[i]).qp
        self.ep.worker = worker.w
        self.ep.cq = &slot.c
        self.qps = list(qps)
        self.worker = worker
        self.slot = slot

    def __dealloc__(self):
        # in-flight slices point at the struct: leak it rather than free it under them
        if self.ep != NULL and mcv_load(&self.ep.users) == 0:
            free(self.ep)
        self.ep = NULL

    @property
    def id(self):
        return self.ep.id

    @property
    def users(self):
        """Slices queued or in flight on this endpoint."""
        return mcv_load(&self.ep.users)

    @property
    def healthy(self):
        """Number of QPs not in error."""
        return sum(1 for i in range(self.ep.nqp) if not mcv_load(&self.ep.qp_bad[i]))

    @property
    def aborted(self):
        return mcv_load(&self.ep.state) == EP_ABORTED

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

    def abort(self, int err=MC_E_TIMEOUT):
        """Fail all queued and in-flight work with ``err`` (default MC_E_TIMEOUT; MC_E_PEER
        when the peer is gone): QPs to ERR, posted WRs flush."""
        mcv_store(&self.ep.abort_err, err)
        mcv_store(&self.ep.state, EP_ABORTED)
        for i in range(self.ep.nqp):
            mcv_store(&self.ep.qp_bad[i], 1)
        for q in self.qps:
            try:
                (<QP>q).to_error()
            except OSError:
                pass
        self.worker.kick()

    def destroy(self):
        """Destroy the QPs; only once nothing is queued or in flight."""
        if mcv_load(&self.ep.users) != 0:
            raise RuntimeError(f"endpoint {self.ep.id} still has {self.users} slices in flight")
        for q in self.qps:
            (<QP>q).close()


cdef class KeyTable:
    """Sorted, non-overlapping ``[start, end)`` ranges, each with one key per column."""
    cdef uint64_t *starts
    cdef uint64_t *ends
    cdef uint32_t *keys
    cdef readonly int n
    cdef readonly int ncols

    def __cinit__(self, rows, int ncols):
        """``rows``: iterable of ``(start, length, [key per column])``."""
        rows = sorted(rows, key=lambda r: r[0])
        self.n = len(rows)
        self.ncols = ncols
        self.starts = <uint64_t *>malloc(max(1, self.n) * sizeof(uint64_t))
        self.ends = <uint64_t *>malloc(max(1, self.n) * sizeof(uint64_t))
        self.keys = <uint32_t *>malloc(max(1, self.n * ncols) * sizeof(uint32_t))
        if self.starts == NULL or self.ends == NULL or self.keys == NULL:
            raise MemoryError()
        for i, (start, length, keys) in enumerate(rows):
            if len(keys) != ncols:
                raise ValueError(f"row {i} has {len(keys)} keys, expected {ncols}")
            self.starts[i] = start
            self.ends[i] = start + length
            for j in range(ncols):
                self.keys[i * ncols + j] = keys[j]

    def __dealloc__(self):
        free(self.starts)
        free(self.ends)
        free(self.keys)

    cdef inline bint find(self, uint64_t addr, uint64_t length, int col,
                          uint32_t *key) noexcept nogil:
        cdef int lo = 0, hi = self.n - 1, mid, hit = -1
        while lo <= hi:
            mid = (lo + hi) >> 1
            if self.starts[mid] <= addr:
                hit = mid
                lo = mid + 1
            else:
                hi = mid - 1
        if hit < 0 or addr + length > self.ends[hit] or addr + length < addr:
            return False
        key[0] = self.keys[hit * self.ncols + col]
        return True

    def lookup(self, uint64_t addr, uint64_t length, int col=0):
        """The key covering ``[addr, addr+length)`` in ``col``, or None."""
        cdef uint32_t k
        return k if self.find(addr, length, col, &k) else None


cdef unsigned int _seed = 12345
cdef uint64_t _rr = 0


def submit(Slices s, KeyTable local, int local_col, KeyTable remote, list cols, list eps,
           bint roundrobin=False):
    """Queue every slice of ``s`` on the endpoints' workers.

    ``eps[k]`` is the endpoint to the peer device whose rkeys are column ``cols[k]`` of
    ``remote``; each slice picks ``k`` round-robin or at random.  A slice outside ``local``
    fails with MC_E_LOCAL, outside ``remote`` with MC_E_REFUSED, without being posted.
    """
    global _seed, _rr
    cdef Py_ssize_t n = s.n, i
    cdef int ne = len(eps), k, j
    if ne == 0 or ne != len(cols):
        raise ValueError("need one endpoint per remote column")
    if ne > 64:
        raise ValueError("at most 64 paths per submit")
    if n == 0:
        return 0
    cdef vep *veps[64]
    cdef int vcol[64]
    cdef int64_t add[64]
    cdef vslice *heads[64]
    cdef vslice *tails[64]
    for k in range(ne):
        veps[k] = (<Endpoint>eps[k]).ep
        vcol[k] = cols[k]
        add[k] = 0
        heads[k] = NULL
        tails[k] = NULL
        if vcol[k] < 0 or vcol[k] >= remote.ncols:
            raise ValueError(f"remote column {vcol[k]} out of range")
    if local_col < 0 or local_col >= local.ncols:
        raise ValueError(f"local column {local_col} out of range")
    cdef vjob *job = <vjob *>calloc(1, sizeof(vjob) + n * sizeof(vslice))
    if job == NULL:
        raise MemoryError()
    cdef vslice *sl = <vslice *>(job + 1)
    cdef vslice *bad = NULL
    cdef vslice *x
    cdef uint32_t key
    cdef int nbad = 0
    cdef uint64_t rr0 = _rr
    _rr += n
    job.batch = s.batch.b
    mc_batch_ref(job.batch)
    job.remaining = n + 1   # +1: held until every slice is queued
    with nogil:
        for i in range(n):
            x = &sl[i]
            x.job = job
            x.local = s.local[i]
            x.remote = s.remote[i]
            x.length = s.length[i]
            x.task = s.task[i]
            x.op = s.op[i]
            x.qp = -1
            k = <int>((rr0 + i) % ne) if roundrobin else rand_r(&_seed) % ne
            if not local.find(x.local, x.length, local_col, &x.lkey):
                x.rkey = MC_E_LOCAL
            elif not remote.find(x.remote, x.length, vcol[k], &x.rkey):
                x.rkey = MC_E_REFUSED
            elif x.length > <uint64_t>2147483648U:
                x.rkey = MC_E_LOCAL
            else:
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
                mcv_add(&veps[k].users, add[k])
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


def post_poll_loop(QP qp, CQ cq, int opcode, uint64_t local, uint32_t lkey, uint64_t remote,
                   uint32_t rkey, uint32_t length, int64_t count, int depth=64,
                   int chain=CHAIN):
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
    depth = min(depth, qp.max_wr, cq.cqe)
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
                rc = -n
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
