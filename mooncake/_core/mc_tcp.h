/* TCP lanes: the wire format, the target's serve loop, and the initiator's lane machinery.
 *
 * Request (32 B):  magic "MCT1", op, flags, rsv, seq, rsv, addr, len   [+ len payload bytes if WRITE]
 * Response (16 B): magic "MCR1", status, seq, rsv                       [+ len payload bytes if READ ok]
 * Responses come back in request order on each connection.
 *
 * Initiator: a lane is driven by its owner, a synchronous caller or the lane's worker thread
 * (for queued jobs), with the same pipelined send/receive loop.
 */
#ifndef MC_TCP_H
#define MC_TCP_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#include "mc_batch.h"
#include "mc_quota.h"
#include "mc_regions.h"

#define MC_REQ_MAGIC 0x3154434dU /* "MCT1" */
#define MC_RSP_MAGIC 0x3152434dU /* "MCR1" */
#define MC_OP_READ 0
#define MC_OP_WRITE 1
#define MC_ST_OK 0
#define MC_ST_REFUSED 1
#define MC_RBUF_CAP (256 * 1024)
#define MC_DIRECT_MIN (32 * 1024) /* payloads at least this big are received in place */
#define MC_MAX_IOV 128

typedef struct __attribute__((packed)) {
    uint32_t magic; uint8_t op, flags; uint16_t rsv; uint32_t seq, rsv2; uint64_t addr, len;
} mc_req_t;
typedef struct __attribute__((packed)) {
    uint32_t magic, status, seq, rsv;
} mc_rsp_t;

/* ---------- guards: may this memory still be touched? ---------- */

/* Whoever is about to touch memory names what owns it: a task of a batch (initiator) or a pinned
 * region (target).  Blocking waits tick every MC_TICK_MS so a cancel or an unregister is seen
 * within a tick; from then on payload bytes are discarded instead of landing in the memory. */
typedef struct {
    mc_batch_t *b; uint32_t task;   /* initiator: the slice's task */
    const mc_reg_t *reg;            /* target: the pinned region */
    double cancel_at;               /* initiator: past this instant the batch is cancelled */
} mc_guard_t;

#define MC_TICK_MS 20

static inline int32_t mc_guard_check(const mc_guard_t *g) {
    if (!g) return 0;
    if (g->b && g->cancel_at > 0 && mc_now() >= g->cancel_at) {
        mc_batch_cancel(g->b, MC_E_TIMEOUT);
        return MC_E_TIMEOUT;
    }
    if (g->b) return mc_slice_live(g->b, g->task);
    if (g->reg && mc_reg_revoked(g->reg)) return MC_E_UNREGISTERED;
    return 0;
}

/* poll timeout in ms for what is left until `deadline` (0 = none: -1, forever), at most one
 * tick with `tick`; never overflows an int whatever the deadline. */
static inline int mc_poll_ms(double deadline, int tick) {
    if (deadline <= 0) return tick ? MC_TICK_MS : -1;
    double left = deadline - mc_now();
    if (left <= 0) return 0;
    double ms = left * 1000.0 + 1.0;
    double cap = tick ? MC_TICK_MS : 1e9;
    return ms < cap ? (int)ms : (int)cap;
}

/* ---------- buffered reading ---------- */

typedef struct { char *buf; size_t pos, len, cap; } mc_rbuf_t;

/* recv what is there, waiting up to one tick (and never past `deadline`, 0 = none).
 * >0 bytes, 0 closed, -EAGAIN nothing this tick, -ETIMEDOUT, -errno.  Never blocks in recv. */
static inline ssize_t mc_recv_tick(int fd, void *dst, size_t n, double deadline, int tick) {
    int eager = tick;   /* mid-payload the bytes are usually there: try before sleeping */
    for (;;) {
        if (eager) {
            ssize_t k = recv(fd, dst, n, MSG_DONTWAIT);
            if (k >= 0) return k;
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -errno;
            if (deadline > 0 && mc_now() >= deadline) return -ETIMEDOUT;
        }
        eager = 1;
        struct pollfd p = {fd, POLLIN, 0};
        int pr = poll(&p, 1, mc_poll_ms(deadline, tick));
        if (pr < 0) { if (errno == EINTR) continue; return -errno; }
        if (pr == 0) {
            if (deadline > 0 && mc_now() >= deadline) return -ETIMEDOUT;
            return -EAGAIN;
        }
    }
}

/* Make at least `need` bytes available in the buffer.  0 ok, 1 closed, -errno. */
static inline int mc_fill(int fd, mc_rbuf_t *r, size_t need, double deadline) {
    if (r->len - r->pos >= need) return 0;
    if (r->pos) {
        memmove(r->buf, r->buf + r->pos, r->len - r->pos);
        r->len -= r->pos; r->pos = 0;
    }
    while (r->len < need) {
        ssize_t k = mc_recv_tick(fd, r->buf + r->len, r->cap - r->len, deadline, 0);
        if (k == -EAGAIN) continue;
        if (k == 0) return 1;
        if (k < 0) return (int)k;
        r->len += (size_t)k;
    }
    return 0;
}

/* Read exactly n bytes into dst (dst NULL = discard).  With a guard, the bytes are discarded
 * from the moment it says the memory may no longer be touched; *stopped gets its reason (a
 * target's guard, a revoked region, returns -ECANCELED at once instead: the connection is cut
 * rather than held open for a peer that may never send the rest).  0 ok, 1 closed, -errno. */
static inline int mc_read_exact(int fd, mc_rbuf_t *r, char *dst, size_t n, double deadline,
                                const mc_guard_t *g, int32_t *stopped) {
    if (dst && g) {
        int32_t e = mc_guard_check(g);
        if (e) { if (g->reg) return -ECANCELED; dst = NULL; if (stopped) *stopped = e; }
    }
    size_t have = r->len - r->pos;
    size_t take = have < n ? have : n;
    if (dst && take) memcpy(dst, r->buf + r->pos, take);
    r->pos += take; n -= take;
    if (dst) dst += take;
    while (n >= MC_DIRECT_MIN && dst) {
        ssize_t k = mc_recv_tick(fd, dst, n, deadline, g != NULL);
        if (k == 0) return 1;
        if (k < 0 && k != -EAGAIN) return (int)k;
        if (k > 0) { dst += k; n -= (size_t)k; }
        if (g && n) {
            int32_t e = mc_guard_check(g);
            if (e) { if (g->reg) return -ECANCELED; dst = NULL; if (stopped) *stopped = e; }
        }
    }
    while (n > 0) {
        r->pos = r->len = 0;
        ssize_t k = mc_recv_tick(fd, r->buf, r->cap, deadline, dst && g);
        if (k == -EAGAIN) {
            if (dst && g) {
                int32_t e = mc_guard_check(g);
                if (e) { if (g->reg) return -ECANCELED; dst = NULL; if (stopped) *stopped = e; }
            }
            continue;
        }
        if (k == 0) return 1;
        if (k < 0) return (int)k;
        r->len = (size_t)k;
        take = r->len < n ? r->len : n;
        if (dst && g) {
            int32_t e = mc_guard_check(g);
            if (e) { if (g->reg) return -ECANCELED; dst = NULL; if (stopped) *stopped = e; }
        }
        if (dst) { memcpy(dst, r->buf, take); dst += take; }
        r->pos = take; n -= take;
    }
    return 0;
}

/* sendmsg the whole iovec array (modified in place), making progress at least every
 * `stall_s` seconds; with `pins`, a revoked one aborts the send (-ECANCELED): its memory may
 * not be read any more.  0 ok, -ETIMEDOUT, -ECANCELED, -errno. */
static inline int mc_send_iov(int fd, struct iovec *iov, int cnt, double stall_s,
                              mc_reg_t *const *pins, int npins) {
    double deadline = stall_s > 0 ? mc_now() + stall_s : 0;
    while (cnt > 0) {
        for (int i = 0; i < npins; i++)
            if (mc_reg_revoked(pins[i])) return -ECANCELED;
        struct msghdr m; memset(&m, 0, sizeof m);
        m.msg_iov = iov; m.msg_iovlen = cnt;
        ssize_t k = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -errno;
            struct pollfd p = {fd, POLLOUT, 0};
            int pr = poll(&p, 1, mc_poll_ms(deadline, npins > 0));
            if (pr < 0 && errno != EINTR) return -errno;
            if (pr == 0 && deadline > 0 && mc_now() >= deadline) return -ETIMEDOUT;
            continue;
        }
        if (deadline > 0) deadline = mc_now() + stall_s;
        while (cnt > 0 && (size_t)k >= iov->iov_len) { k -= iov->iov_len; iov++; cnt--; }
        if (cnt > 0) { iov->iov_base = (char *)iov->iov_base + k; iov->iov_len -= k; }
    }
    return 0;
}

/* ---------- target side ---------- */


#define MC_ST_DENIED 2

/* Serve one data connection until it closes, misbehaves or idles for `idle_timeout` s (0 =
 * forever).  Each request pins the region it touches (no lock is held while waiting on the
 * peer): a WRITE's payload is received in place while the pin is held, a READ's payload is
 * gathered from the region into one sendmsg with the following responses and unpinned after it
 * went out.  An unregister revokes the region: a WRITE being received is discarded and answered
 * REFUSED; a READ reply still unsent drops the connection.  A started frame must finish within
 * `frame_timeout`; a reply the peer does not drain for `frame_timeout` drops the connection.
 * Returns 0 on orderly close or idle, 1 on a protocol violation or a stall, -errno on I/O
 * error, 2 when an unregister cut a reply.  Between frames it polls for `spin` seconds before it
 * sleeps in recv (a synchronous initiator's next request usually comes within microseconds). */
static inline int mc_serve(int fd, mc_regions_t *regs, uint64_t max_frame, double frame_timeout,
                           double idle_timeout, double spin) {
    mc_rbuf_t r = {(char *)malloc(MC_RBUF_CAP), 0, 0, MC_RBUF_CAP};
    mc_rsp_t pend[MC_MAX_IOV];
    struct iovec out[2 * MC_MAX_IOV];
    mc_reg_t *pins[MC_MAX_IOV];
    int np = 0, nout = 0, npins = 0, rc = 0;
    size_t outbytes = 0;
    if (!r.buf) return -ENOMEM;
    int fl = fcntl(fd, F_GETFL);   /* we own the fd now: blocking, idle reads time out */
    if (fl >= 0 && (fl & O_NONBLOCK)) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    if (idle_timeout > 0) {
        struct timeval tv;
        double cap = idle_timeout < 1e6 ? idle_timeout : 1e6;
        tv.tv_sec = (time_t)cap;
        tv.tv_usec = (suseconds_t)((cap - (double)tv.tv_sec) * 1e6);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    }
#define MC_FLUSH() do { \
        if (nout) { \
            rc = mc_send_iov(fd, out, nout, frame_timeout, pins, npins); \
            if (rc == -ETIMEDOUT) rc = 1; else if (rc == -ECANCELED) rc = 2; \
        } \
        for (int _i = 0; _i < npins; _i++) mc_reg_release(pins[_i]); \
        nout = 0; np = 0; npins = 0; outbytes = 0; \
    } while (0)
    for (;;) {
        if (r.len - r.pos < sizeof(mc_req_t) && nout) {  /* about to wait: flush first */
            MC_FLUSH();
            if (rc) break;
        }
        if (r.len == r.pos) {   /* idle between frames: one blocking recv (SO_RCVTIMEO) */
            ssize_t k = -1;
            r.pos = r.len = 0;
            if (spin > 0 && mc_own_cpus() > 1) {
                /* a peer in a synchronous loop sends again soon: poll briefly, yielding (a
                 * peer on our CPU runs meanwhile); never when this thread has one CPU */
                double until = mc_now() + spin;
                do {
                    k = recv(fd, r.buf, r.cap, MSG_DONTWAIT);
                    if (k >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                        break;
                    sched_yield();
                } while (mc_now() < until);
            }
            if (k < 0 && (spin <= 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                do { k = recv(fd, r.buf, r.cap, 0); } while (k < 0 && errno == EINTR);
            if (k == 0) { rc = 0; break; }
            if (k < 0) { rc = (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno; break; }
            r.len = (size_t)k;
        }
        double deadline = mc_now() + frame_timeout;
        rc = mc_fill(fd, &r, sizeof(mc_req_t), deadline);
        if (rc) { if (rc == 1 || rc == -ETIMEDOUT) rc = 1; break; }
        mc_req_t h; memcpy(&h, r.buf + r.pos, sizeof h); r.pos += sizeof h;
        if (h.magic != MC_REQ_MAGIC || h.op > MC_OP_WRITE || h.len > max_frame) { rc = 1; break; }
        mc_rsp_t *s = &pend[np++];
        s->magic = MC_RSP_MAGIC; s->status = MC_ST_OK; s->seq = h.seq; s->rsv = 0;
        int32_t why = 0;
        mc_reg_t *g = h.len ? mc_regions_acquire(regs, h.addr, h.len, h.op == MC_OP_WRITE ?
                                                 MC_REG_REMOTE_WRITE : MC_REG_REMOTE_READ, &why)
                            : NULL;
        if (!g) s->status = why == MC_E_DENIED ? MC_ST_DENIED : MC_ST_REFUSED;
        if (h.op == MC_OP_WRITE) {
            mc_guard_t gd = {NULL, 0, g, 0};
            int32_t stopped = 0;
            rc = mc_read_exact(fd, &r, g ? (char *)(uintptr_t)h.addr : NULL, h.len, deadline,
                               g ? &gd : NULL, &stopped);
            if (g) mc_reg_release(g);
            if (rc) { rc = rc == -ETIMEDOUT ? 1 : rc == -ECANCELED ? 2 : -ECONNRESET; break; }
            if (stopped) s->status = MC_ST_REFUSED;
        }
        out[nout].iov_base = s; out[nout].iov_len = sizeof *s; nout++;
        if (h.op == MC_OP_READ && g) {
            out[nout].iov_base = (void *)(uintptr_t)h.addr; out[nout].iov_len = h.len; nout++;
            outbytes += h.len;
            pins[npins++] = g;
        }
        if (np == MC_MAX_IOV || outbytes >= MC_RBUF_CAP) {
            MC_FLUSH();
            if (rc) break;
        }
    }
    for (int i = 0; i < npins; i++) mc_reg_release(pins[i]);
#undef MC_FLUSH
    free(r.buf);
    return rc;
}

/* ---------- initiator side ---------- */

typedef struct {
    mc_batch_t *b; uint64_t local, remote, len; uint32_t task; uint8_t op;
    uint8_t ghost;   /* MC_JOB_*: nonzero once reported (its response is then only consumed) */
} mc_job_t;

typedef struct { mc_job_t *v; size_t cap, head, len; } mc_ring_t;

static inline int mc_ring_push(mc_ring_t *q, const mc_job_t *j) {
    if (q->len == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 256;
        mc_job_t *nv = (mc_job_t *)malloc(cap * sizeof(mc_job_t));
        if (!nv) return -ENOMEM;
        for (size_t i = 0; i < q->len; i++) nv[i] = q->v[(q->head + i) % q->cap];
        free(q->v);
        q->v = nv; q->cap = cap; q->head = 0;
    }
    q->v[(q->head + q->len) % q->cap] = *j;
    q->len++;
    return 0;
}

static inline mc_job_t *mc_ring_at(mc_ring_t *q, size_t i) { return &q->v[(q->head + i) % q->cap]; }

static inline void mc_ring_pop(mc_ring_t *q) { q->head = (q->head + 1) % q->cap; q->len--; }

/* A lane: one connection.  Whoever owns it (a synchronous caller, or the lane's worker thread
 * for queued jobs) drives the socket itself: pipelined sends interleaved with in-order reads of
 * the responses, so no job ever changes threads. */
typedef struct {
    int fd;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    mc_ring_t q;          /* submitted, not yet taken by the worker */
    int owned, dead, closing;
    int32_t dead_err;
    uint32_t seq;
    double spin;          /* seconds a synchronous caller polls before sleeping */
    double grace;         /* seconds a timed-out drive may take to drain what it sent */
    double last_used;     /* mc_now() when a drive last ended */
    double poll_grace;    /* TENT's grace period: the worker polls this long after a drive */
    mc_rbuf_t rb;
    const mc_quota_t *quota;  /* shared bandwidth quota of the lane's NIC, NULL = none */
    int32_t qslot;            /* this engine's slot in it */
} mc_lane_t;

static inline mc_lane_t *mc_lane_new(int fd) {
    mc_lane_t *l = (mc_lane_t *)calloc(1, sizeof(mc_lane_t));
    if (!l) return NULL;
    l->rb.buf = (char *)malloc(MC_RBUF_CAP);
    if (!l->rb.buf) { free(l); return NULL; }
    l->rb.cap = MC_RBUF_CAP;
    l->fd = fd;
    l->grace = 2.0;
    l->last_used = mc_now();
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
    return l;
}

/* Cut a lane's connection: wake whoever waits on it, and make the close that follows a reset
 * (SO_LINGER 0) that discards what is still queued to send, so no byte of failed work reaches
 * the peer after its failure was reported (a graceful close would keep sending it). */
static inline void mc_lane_cut(int fd) {
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    shutdown(fd, SHUT_RDWR);
}

/* Mark the lane dead (first error wins), fail every queued job, shut the socket down: an owner
 * in the middle of a drive sees the error and fails its own jobs with `dead_err`. */
static inline void mc_lane_fail(mc_lane_t *l, int32_t err) {
    pthread_mutex_lock(&l->mu);
    if (!l->dead) { l->dead = 1; l->dead_err = err; }
    err = l->dead_err;
    mc_ring_t q = l->q;
    memset(&l->q, 0, sizeof l->q);
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    mc_lane_cut(l->fd);
    for (size_t i = 0; i < q.len; i++) {
        mc_job_t *j = mc_ring_at(&q, i);
        mc_slice_done(j->b, j->task, 0, err);
        mc_batch_unref(j->b);
    }
    free(q.v);
}

/* Queue jobs for the worker (each takes a batch reference).  Fails them at once on a dead lane. */
static inline void mc_lane_submit(mc_lane_t *l, mc_job_t *jobs, size_t n) {
    pthread_mutex_lock(&l->mu);
    int dead = l->dead || l->closing;
    int32_t err = l->dead_err ? l->dead_err : MC_E_PEER;
    size_t queued = 0;
    if (!dead) {
        for (; queued < n; queued++) {
            mc_batch_ref(jobs[queued].b);
            if (mc_ring_push(&l->q, &jobs[queued])) {
                mc_batch_unref(jobs[queued].b); err = MC_E_LOCAL; break;
            }
        }
        pthread_cond_broadcast(&l->cv);
    }
    pthread_mutex_unlock(&l->mu);
    for (size_t i = queued; i < n; i++) mc_slice_done(jobs[i].b, jobs[i].task, 0, err);
}

/* True when the connection still looks usable: not dead and, if it sat idle for more than a
 * second, the peer has not closed it meanwhile (it reaps idle connections, or restarted). */
static inline int mc_lane_usable(mc_lane_t *l) {
    if (l->dead) return 0;
    if (l->owned || mc_now() - l->last_used < 1.0) return 1;
    char c;
    ssize_t k = recv(l->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        pthread_mutex_lock(&l->mu);
        if (!l->dead) { l->dead = 1; l->dead_err = MC_E_PEER; }
        pthread_mutex_unlock(&l->mu);
        return 0;
    }
    return 1;
}

/* Poll the socket without sleeping for up to `spin_s` seconds, buffering what arrives; on a
 * thread with one CPU each round yields it (the peer may be the one to run). */
static inline void mc_spin_fill(mc_lane_t *l, double spin_s) {
    int yield = mc_own_cpus() < 2;
    if (l->rb.pos) {
        memmove(l->rb.buf, l->rb.buf + l->rb.pos, l->rb.len - l->rb.pos);
        l->rb.len -= l->rb.pos; l->rb.pos = 0;
    }
    double until = mc_now() + spin_s;
    do {
        ssize_t k = recv(l->fd, l->rb.buf + l->rb.len, l->rb.cap - l->rb.len, MSG_DONTWAIT);
        if (k > 0) { l->rb.len += (size_t)k; return; }
        if (k == 0 || (errno != EAGAIN && errno != EINTR)) return;  /* the read reports it */
        if (yield) sched_yield();
    } while (mc_now() < until);
}

/* Job states: sent as asked; sent as an empty request (cancelled before it went out); or
 * reported early (cancelled while its response was outstanding: a READ payload is discarded). */
enum { MC_JOB_LIVE = 0, MC_JOB_GHOST = 1, MC_JOB_ORPHAN = 2 };

/* Headers (and WRITE payload iovecs) for jobs[0..n).  A job whose memory may no longer be
 * touched is sent as an empty request (answered REFUSED, no payload) and reported now. */
static inline int mc_build_iov(mc_job_t *jobs, size_t n, mc_req_t *hdr, struct iovec *iov,
                               uint32_t seq0) {
    int c = 0;
    for (size_t i = 0; i < n; i++) {
        mc_job_t *j = &jobs[i];
        mc_req_t *h = &hdr[i];
        memset(h, 0, sizeof *h);
        h->magic = MC_REQ_MAGIC; h->op = j->op; h->seq = seq0 + (uint32_t)i;
        h->addr = j->remote; h->len = j->len;
        int32_t e = j->ghost ? 0 : mc_slice_live(j->b, j->task);
        if (e) { j->ghost = MC_JOB_GHOST; mc_slice_done(j->b, j->task, 0, e); }
        if (j->ghost) h->len = 0;
        iov[c].iov_base = h; iov[c].iov_len = sizeof *h; c++;
        if (j->op == MC_OP_WRITE && !j->ghost) {
            iov[c].iov_base = (void *)(uintptr_t)j->local; iov[c].iov_len = j->len; c++;
        }
    }
    return c;
}

/* Report every job of [from, to) whose batch was cancelled or whose memory was unregistered
 * while its response is outstanding: its bytes will be discarded when they come. */
static inline void mc_orphan_dead(mc_job_t *jobs, size_t from, size_t to) {
    for (size_t i = from; i < to; i++) {
        mc_job_t *j = &jobs[i];
        if (j->ghost) continue;
        int32_t e = mc_slice_live(j->b, j->task);
        if (e) { j->ghost = MC_JOB_ORPHAN; mc_slice_done(j->b, j->task, 0, e); }
    }
}

#define MC_SEND_BATCH 64
#define MC_WORKER_BATCH 1024

/* Drive jobs[0..n) (sequence numbers from seq0) from this thread; the caller owns the lane.
 * Every job is completed into its batch, errors included, after the last byte of it moved.
 * `timeout` bounds the whole drive, or, with `idle`, each stretch without progress.  While it
 * waits on the peer it wakes every tick to report jobs that were cancelled or unregistered
 * meanwhile (their bytes are discarded when they arrive).  When a synchronous drive runs out of
 * time it cancels its batches and drains what it already sent for up to `l->grace` seconds (the
 * lane stays usable for other callers); only a peer that does not answer within that loses
 * the lane. */
static inline void mc_lane_drive(mc_lane_t *l, mc_job_t *jobs, size_t n, uint32_t seq0,
                                 double timeout, int idle) {
    double deadline = mc_now() + timeout;
    int draining = 0;
    mc_req_t hdr[MC_SEND_BATCH];
    struct iovec iov[2 * MC_SEND_BATCH];
    size_t sent = 0, done = 0;     /* jobs fully sent / fully answered */
    int niov = 0, cur = 0;         /* pending iovec window for jobs [sent, sent+chunk) */
    size_t chunk = 0;
    int32_t err = 0;
#define MC_START_DRAIN() do { \
        for (size_t _i = done; _i < n; _i++) mc_batch_cancel(jobs[_i].b, MC_E_TIMEOUT); \
        draining = 1; deadline = mc_now() + l->grace; \
    } while (0)
    int readable = 0;              /* the last poll said responses are waiting */
    /* shared quota: each window (capped at MC_QUOTA_QUANTUM bytes under contention) is asked
     * for and charged before it is built; a refusal waits in the poll below, draining
     * responses meanwhile */
    const mc_quota_t *quota = l->quota;
    int32_t qslot = l->qslot;
    if (quota) mc_quota_enter(quota, qslot);
    while (done < n) {
        int progressed = 0, want_wait = 0;
        uint64_t qwait = 0;
        if (sent < n && niov == 0) {
            chunk = n - sent < MC_SEND_BATCH ? n - sent : MC_SEND_BATCH;
            if (quota && !draining) {
                uint64_t qbytes = 0, qmax = mc_quota_quantum(quota, qslot);
                size_t c = 0;
                while (c < chunk) {
                    if (!jobs[sent + c].ghost) qbytes += jobs[sent + c].len;
                    c++;
                    if (qbytes >= qmax) break;
                }
                chunk = c;
                qwait = qbytes ? mc_quota_wait_ns(quota, qslot, qbytes) : 0;
                if (!qwait && qbytes) mc_quota_charge(quota, qslot, qbytes);
            }
            if (!qwait) {
                niov = mc_build_iov(jobs + sent, chunk, hdr, iov, seq0 + (uint32_t)sent);
                cur = 0;
            }
        }
        if (niov) {   /* send what the socket takes now */
            struct msghdr m; memset(&m, 0, sizeof m);
            m.msg_iov = iov + cur; m.msg_iovlen = niov - cur;
            ssize_t k = sendmsg(l->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                err = MC_E_PEER; break;
            }
            if (k > 0) progressed = 1;
            while (k > 0 && cur < niov) {
                if ((size_t)k >= iov[cur].iov_len) { k -= iov[cur].iov_len; cur++; }
                else { iov[cur].iov_base = (char *)iov[cur].iov_base + k; iov[cur].iov_len -= k; k = 0; }
            }
            if (cur == niov) { sent += chunk; niov = 0; }
        }
        /* handle every response already here; never block for a header */
        while (done < sent) {
            if (l->rb.len - l->rb.pos < sizeof(mc_rsp_t)) {
                if (sent == n && !idle && l->spin > 0 && !draining)
                    mc_spin_fill(l, l->spin);   /* a synchronous caller: skip the sleep if quick */
                if (l->rb.len - l->rb.pos < sizeof(mc_rsp_t)) {
                    /* all sent and poll did not say readable: go straight to the wait */
                    if (sent == n && !readable) { want_wait = 1; break; }
                    readable = 0;
                    if (l->rb.pos) {
                        size_t have = l->rb.len - l->rb.pos;
                        memmove(l->rb.buf, l->rb.buf + l->rb.pos, have);
                        l->rb.len = have; l->rb.pos = 0;
                    }
                    ssize_t k = recv(l->fd, l->rb.buf + l->rb.len, l->rb.cap - l->rb.len,
                                     MSG_DONTWAIT);
                    if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK &&
                                   errno != EINTR)) { err = MC_E_PEER; break; }
                    if (k > 0) l->rb.len += (size_t)k;
                    if (l->rb.len - l->rb.pos < sizeof(mc_rsp_t)) { want_wait = 1; break; }
                }
            }
            mc_rsp_t s;
            memcpy(&s, l->rb.buf + l->rb.pos, sizeof s);
            l->rb.pos += sizeof s;
            if (s.magic != MC_RSP_MAGIC || s.seq != seq0 + (uint32_t)done) { err = MC_E_PROTO; break; }
            mc_job_t *j = &jobs[done];
            int32_t e = s.status == MC_ST_OK ? 0 :
                        s.status == MC_ST_DENIED ? MC_E_DENIED : MC_E_REFUSED;
            if (!e && j->op == MC_OP_READ) {
                if (j->ghost == MC_JOB_GHOST) { err = MC_E_PROTO; break; }  /* OK to an empty ask */
                /* a synchronous caller's deadline passing mid-payload cancels its batch: the
                 * rest is discarded (within the grace period), the stream stays in step */
                int sync_live = !idle && !draining;
                mc_guard_t gd = {j->b, j->task, NULL, sync_live ? deadline : 0};
                int32_t stopped = 0;
                int rc = mc_read_exact(l->fd, &l->rb, j->ghost ? NULL : (char *)(uintptr_t)j->local,
                                       j->len, sync_live ? deadline + l->grace : deadline,
                                       j->ghost ? NULL : &gd, &stopped);
                if (sync_live && stopped == MC_E_TIMEOUT) MC_START_DRAIN();
                if (rc) { err = rc == -ETIMEDOUT ? MC_E_TIMEOUT : MC_E_PEER; break; }
                if (stopped) e = stopped;
            } else if (!e && j->op == MC_OP_WRITE && !j->ghost) {
                int32_t stopped = mc_slice_live(j->b, j->task);
                if (stopped) e = stopped;   /* it landed, but the caller gave up on it */
            }
            if (!j->ghost) mc_slice_done(j->b, j->task, e ? 0 : (int64_t)j->len, e);
            j->ghost = MC_JOB_ORPHAN;
            done++;
            progressed = 1;
        }
        if (err == MC_E_TIMEOUT && !idle && !draining) { err = 0; MC_START_DRAIN(); continue; }
        if (err) break;
        if (progressed && idle) deadline = mc_now() + timeout;
        if (!progressed || (want_wait && sent == n) || qwait) {
            /* nothing to send and no response yet (or the socket is full, or the quota said
             * wait: then only as long as it said): wait, a tick at most */
            if (mc_now() >= deadline) {
                if (!idle && !draining) { MC_START_DRAIN(); continue; }
                err = MC_E_TIMEOUT; break;
            }
            struct pollfd p = {l->fd, (short)((niov ? POLLOUT : 0) | (done < sent ? POLLIN : 0)), 0};
            int pr;
            if (qwait) {
                uint64_t cap = (uint64_t)mc_poll_ms(deadline, 1) * 1000000ULL;
                pr = mc_quota_poll(&p, qwait < cap ? qwait : cap);
            } else {
                pr = poll(&p, 1, mc_poll_ms(deadline, 1));
            }
            if (pr == 0) mc_orphan_dead(jobs, done, sent);   /* a quiet tick: who gave up? */
            if (pr < 0 && errno == EINTR) continue;
            if (pr < 0 || (p.revents & (POLLERR | POLLNVAL))) { err = MC_E_PEER; break; }
            readable = (p.revents & (POLLIN | POLLHUP)) != 0;
        }
    }
#undef MC_START_DRAIN
    if (quota) mc_quota_leave(quota, qslot);
    if (err) {
        pthread_mutex_lock(&l->mu);
        if (l->dead) err = l->dead_err;      /* aborted from outside: report why */
        else { l->dead = 1; l->dead_err = err; }
        pthread_mutex_unlock(&l->mu);
        mc_lane_cut(l->fd);
        for (size_t i = done; i < n; i++)
            if (!jobs[i].ghost) mc_slice_done(jobs[i].b, jobs[i].task, 0, err);
    }
    l->last_used = mc_now();
}

/* Own the lane for n jobs (caller holds mu); their sequence numbers start at *seq0. */
static inline void mc_lane_take(mc_lane_t *l, size_t n, uint32_t *seq0) {
    l->owned = 1;
    *seq0 = l->seq;
    l->seq += (uint32_t)n;
}

/* Hand a lane held since its creation (its connection handshake) to its worker and callers. */
static inline void mc_lane_release(mc_lane_t *l) {
    pthread_mutex_lock(&l->mu);
    l->owned = 0;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

/* A synchronous caller drives its jobs itself; -EBUSY when the lane is not idle. */
static inline int mc_lane_run(mc_lane_t *l, mc_job_t *jobs, size_t n, double timeout) {
    uint32_t seq0;
    pthread_mutex_lock(&l->mu);
    if (l->owned || l->dead || l->closing || l->q.len) {
        pthread_mutex_unlock(&l->mu);
        return -EBUSY;
    }
    mc_lane_take(l, n, &seq0);
    pthread_mutex_unlock(&l->mu);
    mc_lane_drive(l, jobs, n, seq0, timeout, 0);
    pthread_mutex_lock(&l->mu);
    l->owned = 0;
    if (l->q.len) pthread_cond_broadcast(&l->cv);  /* jobs queued meanwhile: wake the worker */
    pthread_mutex_unlock(&l->mu);
    return 0;
}

/* A synchronous call of several slices spreads them over the idle lanes: contiguous parts of
 * about equal size, parts 1.. queued to their lanes' workers first (they start while the caller
 * drives part 0 on the first idle lane itself).  1: all of it ran here (every job reported);
 * 2: parts run on other lanes too (wait for the batch); -EBUSY: no lane was idle. */
#define MC_SPREAD_MAX 16
static inline int mc_lanes_run(mc_lane_t **lanes, size_t nl, mc_job_t *jobs, size_t n,
                               double timeout) {
    size_t idle[MC_SPREAD_MAX], k = 0;
    for (size_t i = 0; i < nl && k < MC_SPREAD_MAX && k < n; i++) {
        mc_lane_t *l = lanes[i];
        pthread_mutex_lock(&l->mu);
        int free_ = !l->owned && !l->dead && !l->closing && !l->q.len;
        pthread_mutex_unlock(&l->mu);
        if (free_) idle[k++] = i;
    }
    if (k == 0) return -EBUSY;
    if (k == 1) return mc_lane_run(lanes[idle[0]], jobs, n, timeout) == -EBUSY ? -EBUSY : 1;
    size_t per = n / k, extra = n % k, first = per + (extra ? 1 : 0), off = first;
    for (size_t p = 1; p < k; p++) {
        size_t len = per + (p < extra ? 1 : 0);
        mc_lane_submit(lanes[idle[p]], jobs + off, len);
        off += len;
    }
    if (mc_lane_run(lanes[idle[0]], jobs, first, timeout) == -EBUSY)
        mc_lane_submit(lanes[idle[0]], jobs, first);   /* taken meanwhile: its worker runs it */
    return 2;
}

/* Worker thread body: drive queued jobs, up to MC_WORKER_BATCH at a time, until closed.
 * Jobs cancelled while queued are reported without being sent.  `idle_timeout`: a peer that
 * makes no progress for that long fails the jobs. */
static inline void mc_lane_worker(mc_lane_t *l, double idle_timeout) {
    mc_job_t *jobs = (mc_job_t *)malloc(MC_WORKER_BATCH * sizeof(mc_job_t));
    if (!jobs) { mc_lane_fail(l, MC_E_LOCAL); return; }
    double last_work = 0;
    for (;;) {
        uint32_t seq0;
        if (l->poll_grace > 0 && last_work > 0) {   /* within the grace period: poll, yielding */
            double until = last_work + l->poll_grace;
            for (unsigned k = 1; !__atomic_load_n(&l->q.len, __ATOMIC_ACQUIRE) &&
                                 !__atomic_load_n(&l->closing, __ATOMIC_ACQUIRE); k++)
                if (mc_grace_round(k, until)) break;
        }
        pthread_mutex_lock(&l->mu);
        while (!l->closing && !l->dead && (l->q.len == 0 || l->owned))
            pthread_cond_wait(&l->cv, &l->mu);
        if (l->closing || l->dead) { pthread_mutex_unlock(&l->mu); break; }
        size_t n = 0, dropped = 0;
        mc_job_t drop[64];
        while (n < MC_WORKER_BATCH && l->q.len && dropped < 64) {
            mc_job_t j = *mc_ring_at(&l->q, 0);
            mc_ring_pop(&l->q);
            j.ghost = 0;
            if (mc_slice_live(j.b, j.task)) drop[dropped++] = j;
            else jobs[n++] = j;
        }
        if (n) mc_lane_take(l, n, &seq0);
        pthread_mutex_unlock(&l->mu);
        for (size_t i = 0; i < dropped; i++) {
            mc_slice_done(drop[i].b, drop[i].task, 0, mc_slice_live(drop[i].b, drop[i].task));
            mc_batch_unref(drop[i].b);
        }
        if (!n) continue;
        mc_lane_drive(l, jobs, n, seq0, idle_timeout, 1);
        last_work = mc_now();
        for (size_t i = 0; i < n; i++) mc_batch_unref(jobs[i].b);
        pthread_mutex_lock(&l->mu);
        l->owned = 0;
        pthread_mutex_unlock(&l->mu);
    }
    free(jobs);
}

/* Stop the worker: it returns; work in its hands ends with `err`, queued jobs are failed by
 * mc_lane_fail afterwards. */
static inline void mc_lane_close(mc_lane_t *l, int32_t err) {
    pthread_mutex_lock(&l->mu);
    l->closing = 1;
    if (!l->dead) { l->dead = 1; l->dead_err = err; }
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    mc_lane_cut(l->fd);
}

static inline void mc_lane_free(mc_lane_t *l) {
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv);
    free(l->q.v); free(l->rb.buf);
    free(l);
}

#endif
