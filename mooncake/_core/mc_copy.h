/* Same-host copy kernel: memcpy through mappings and cross-memory attach, on a pthread pool.
 *
 * Objects (all refcounted, all usable without the GIL):
 *   mc_map_t    one local mapping (a peer's shm object, a CXL window) or a direct view of our own
 *               address space; munmap()ed when the last reference goes, so a copy still running
 *               never faults on a mapping that the transport dropped.
 *   mc_peer_t   the process on the other end: pid, a pidfd (exit detection), the "alive" word of
 *               its control page, an abort generation and an in-flight counter.
 *   mc_table_t  the peer's buffers, sorted by start address: how a remote range is reached
 *               (through a mapping, directly, or by process_vm_readv/writev), whether WRITEs may
 *               land in it, which registration slot must still hold the value it had when the
 *               table was built, and this initiator's busy counter for that slot.
 *   mc_group_t  the copy ops of one submit; workers claim chunks of consecutive ops under the pool
 *               mutex, run them unlocked and report each op with mc_slice_done().  The group holds
 *               a batch reference until its last op is reported.
 *
 * Silence.  An op is copied in chunks of at most MC_CP_CHUNK bytes.  Before each chunk the worker
 * checks mc_slice_live() (the batch was cancelled, the local region unregistered), the peer's
 * abort generation and alive word; then, around the chunk, the target-side protocol:
 *     busy++ (seq_cst)  ->  re-load the registration slot (seq_cst)  ->  copy  ->  busy-- (release)
 * The target unregisters by storing a new slot value (seq_cst) and then waiting until every
 * initiator's busy counter for that slot was seen at 0 (mc_busy_wait): either a worker saw the
 * new value and copied nothing, or the target waits for its chunk to end.  A slice is reported
 * only after its last byte was copied (or it was stopped), so a task that ended is never touched.
 */
#ifndef MC_COPY_H
#define MC_COPY_H

#include "mc_batch.h"

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

enum { MC_CP_READ = 0, MC_CP_WRITE = 1 };          /* slice opcodes (batch.OP_READ/OP_WRITE) */
enum { MC_CP_MEM = 0, MC_CP_PV = 1 };              /* how an entry is reached */
#define MC_CP_MAX_THREADS 64
#define MC_CP_CHUNK ((uint64_t)1 << 20)            /* bytes copied between two checks */
#define MC_CP_POLL_NS 1000000                      /* a peer's exit is polled for every 1 ms */

/* ------------------------------------------------------------------ mappings */

typedef struct {
    _Atomic int64_t refs;
    char *base;
    size_t len;
    int owned;            /* munmap on last unref */
    int writable;         /* mapped PROT_WRITE (a view of our own memory counts as writable) */
} mc_map_t;

static inline mc_map_t *mc_map_new(char *base, size_t len, int owned, int writable) {
    mc_map_t *m = (mc_map_t *)calloc(1, sizeof(mc_map_t));
    if (!m) return NULL;
    atomic_init(&m->refs, 1);
    m->base = base;
    m->len = len;
    m->owned = owned;
    m->writable = writable;
    return m;
}

static inline void mc_map_ref(mc_map_t *m) { if (m) atomic_fetch_add(&m->refs, 1); }

static inline void mc_map_unref(mc_map_t *m) {
    if (m && atomic_fetch_sub(&m->refs, 1) == 1) {
        if (m->owned && m->base) munmap(m->base, m->len);
        free(m);
    }
}

/* ------------------------------------------------------------------ peers */

typedef struct {
    _Atomic int64_t refs;
    int pid;                          /* 0: no process behind it (CXL window) */
    int pidfd;                        /* -1: none (ourselves, or no pidfd support) */
    _Atomic int32_t dead;
    _Atomic int32_t cancel_gen;       /* bumped by abort: older groups fail */
    _Atomic int64_t inflight;         /* ops queued or running */
    _Atomic int64_t next_poll_ns;     /* the pidfd is polled at most once per MC_CP_POLL_NS */
    const _Atomic uint64_t *alive;    /* the peer's control-page alive word, or NULL */
    mc_map_t *ctl;                    /* keeps `alive` mapped */
} mc_peer_t;

static inline mc_peer_t *mc_peer_new(int pid, int pidfd, mc_map_t *ctl, uint64_t alive_off) {
    mc_peer_t *p = (mc_peer_t *)calloc(1, sizeof(mc_peer_t));
    if (!p) return NULL;
    atomic_init(&p->refs, 1);
    p->pid = pid;
    p->pidfd = pidfd;
    if (ctl) {
        mc_map_ref(ctl);
        p->ctl = ctl;
        p->alive = (const _Atomic uint64_t *)(ctl->base + alive_off);
    }
    return p;
}

static inline void mc_peer_ref(mc_peer_t *p) { if (p) atomic_fetch_add(&p->refs, 1); }

static inline void mc_peer_unref(mc_peer_t *p) {
    if (p && atomic_fetch_sub(&p->refs, 1) == 1) {
        if (p->pidfd >= 0) close(p->pidfd);
        mc_map_unref(p->ctl);
        free(p);
    }
}

/* 1 when `fd` (a pidfd) is readable: its process exited.  -1 means "unknown": never. */
static inline int mc_fd_readable(int fd) {
    if (fd < 0) return 0;
    struct pollfd pf = {fd, POLLIN, 0};
    return poll(&pf, 1, 0) > 0;
}

/* The cheap part of mc_peer_check (atomic loads only): abort generation and alive word. */
static inline int32_t mc_peer_quick(mc_peer_t *p, int32_t gen) {
    if (!p) return 0;
    if (atomic_load_explicit(&p->cancel_gen, memory_order_acquire) != gen) return MC_E_TIMEOUT;
    if (atomic_load_explicit(&p->dead, memory_order_relaxed)) return MC_E_PEER;
    if (p->alive && atomic_load_explicit(p->alive, memory_order_acquire) == 0) {
        atomic_store(&p->dead, 1);
        return MC_E_PEER;
    }
    return 0;
}

/* 0 while the peer is usable; MC_E_TIMEOUT after an abort, MC_E_PEER once it exited/closed (a
 * close is seen at once through the alive word, an exit within MC_CP_POLL_NS: the pidfd poll is
 * a system call, which a 4 KiB copy should not pay every time). */
static inline int32_t mc_peer_check(mc_peer_t *p, int32_t gen) {
    int32_t err = mc_peer_quick(p, gen);
    if (err || !p || p->pidfd < 0) return err;
    int64_t now = (int64_t)(mc_now() * 1e9);
    if (now < atomic_load_explicit(&p->next_poll_ns, memory_order_relaxed)) return 0;
    atomic_store_explicit(&p->next_poll_ns, now + MC_CP_POLL_NS, memory_order_relaxed);
    if (mc_fd_readable(p->pidfd)) {
        atomic_store(&p->dead, 1);
        return MC_E_PEER;
    }
    return 0;
}

/* ------------------------------------------------------------------ buffer tables */

typedef struct {
    uint64_t start, end;              /* the range as the initiator names it (remote addresses) */
    int kind;                         /* MC_CP_MEM or MC_CP_PV */
    int writable;                     /* WRITEs may land in it (else MC_E_DENIED, untouched) */
    mc_map_t *map;                    /* MEM: where it lives here (NULL: addresses valid as is) */
    uint64_t map_off;                 /* MEM: offset of `start` inside map */
    const void *slot;                 /* registration slot (atomic u64) to re-check, or NULL */
    uint64_t slot_val;
    void *busy;                       /* our busy counter (atomic u32) for that slot, or NULL */
    mc_map_t *slot_map, *busy_map;    /* keep `slot` and `busy` mapped while the table lives */
} mc_entry_t;

typedef struct {
    _Atomic int64_t refs;
    int n;
    mc_entry_t e[];
} mc_table_t;

static inline mc_table_t *mc_table_new(int n) {
    mc_table_t *t = (mc_table_t *)calloc(1, sizeof(mc_table_t) + (size_t)n * sizeof(mc_entry_t));
    if (!t) return NULL;
    atomic_init(&t->refs, 1);
    t->n = n;
    return t;
}

static inline void mc_table_ref(mc_table_t *t) { atomic_fetch_add(&t->refs, 1); }

static inline void mc_table_unref(mc_table_t *t) {
    if (t && atomic_fetch_sub(&t->refs, 1) == 1) {
        for (int i = 0; i < t->n; i++) {
            mc_map_unref(t->e[i].map);
            mc_map_unref(t->e[i].slot_map);
            mc_map_unref(t->e[i].busy_map);
        }
        free(t);
    }
}

/* The entry holding [addr, addr+len), or NULL.  Entries are sorted by start, non-overlapping. */
static inline const mc_entry_t *mc_table_find(const mc_table_t *t, uint64_t addr, uint64_t len) {
    int lo = 0, hi = t->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) >> 1;
        const mc_entry_t *e = &t->e[mid];
        if (addr < e->start) hi = mid - 1;
        else if (addr >= e->end) lo = mid + 1;
        else return (len <= e->end - addr) ? e : NULL;
    }
    return NULL;
}

/* ------------------------------------------------------------------ copy ops and groups */

typedef struct {
    uint64_t local;                   /* initiator memory */
    uint64_t remote;                  /* MEM: local view of the target; PV: peer address */
    uint64_t len;
    const mc_entry_t *e;              /* the table entry holding the remote range */
    uint32_t task;
    uint8_t kind, op;
} mc_op_t;

typedef struct mc_group {
    struct mc_group *next;
    mc_batch_t *batch;
    mc_peer_t *peer;
    mc_table_t *table;
    _Atomic int64_t *pool_inflight;
    int32_t cancel_gen;
    int64_t n, claim, cursor;         /* cursor: guarded by the pool mutex */
    int64_t stop_from;                /* mc_pool_stop: the first op it fails */
    _Atomic int64_t left;             /* ops not reported yet (+1 while a synchronous caller
                                       * works on the group); the last one to go frees it */
    mc_op_t ops[];
} mc_group_t;

static inline mc_group_t *mc_group_new(int64_t n) {
    mc_group_t *g = (mc_group_t *)calloc(1, sizeof(mc_group_t) + (size_t)n * sizeof(mc_op_t));
    return g;
}

/* Take the references a queued group needs; n ops become in flight.  `caller`: a synchronous
 * caller keeps a reference too (mc_group_unref) while it claims ops itself. */
static inline void mc_group_arm(mc_group_t *g, mc_batch_t *b, mc_peer_t *p, mc_table_t *t,
                                int64_t *pool_inflight_, int64_t claim, int caller) {
    _Atomic int64_t *pool_inflight = (_Atomic int64_t *)pool_inflight_;
    g->batch = b;
    mc_batch_ref(b);
    g->peer = p;
    mc_peer_ref(p);
    g->table = t;
    if (t) mc_table_ref(t);
    g->pool_inflight = pool_inflight;
    g->cancel_gen = p ? atomic_load(&p->cancel_gen) : 0;
    g->claim = claim < 1 ? 1 : claim;
    g->cursor = 0;
    atomic_init(&g->left, g->n + (caller ? 1 : 0));
    if (p) atomic_fetch_add(&p->inflight, g->n);
    if (pool_inflight) atomic_fetch_add(pool_inflight, g->n);
}

static inline void mc_group_free(mc_group_t *g) {
    mc_table_unref(g->table);
    mc_peer_unref(g->peer);
    mc_batch_unref(g->batch);
    free(g);
}

/* n ops of g were reported. */
static inline void mc_group_release(mc_group_t *g, int64_t n) {
    if (g->peer) atomic_fetch_sub(&g->peer->inflight, n);
    if (g->pool_inflight) atomic_fetch_sub(g->pool_inflight, n);
    if (atomic_fetch_sub(&g->left, n) == n) mc_group_free(g);
}

/* The synchronous caller lets go of g. */
static inline void mc_group_unref(mc_group_t *g) {
    if (atomic_fetch_sub(&g->left, 1) == 1) mc_group_free(g);
}

/* Resolve n slices into g's ops (then g->n = ops kept): a slice whose remote range is not inside
 * one entry of t is reported MC_E_REFUSED, a WRITE into a read-only entry MC_E_DENIED, both
 * untouched.  *total = the bytes of the ops kept. */
static inline void mc_group_fill(mc_group_t *g, mc_batch_t *b, const mc_table_t *t, int64_t n,
                                 const uint32_t *task, const uint8_t *op, const uint64_t *local,
                                 const uint64_t *remote, const uint64_t *len, uint64_t *total) {
    int64_t k = 0;
    uint64_t sum = 0;
    for (int64_t i = 0; i < n; i++) {
        const mc_entry_t *e = mc_table_find(t, remote[i], len[i]);
        if (!e) { mc_slice_done(b, task[i], 0, MC_E_REFUSED); continue; }
        if (op[i] == MC_CP_WRITE && !e->writable) {
            mc_slice_done(b, task[i], 0, MC_E_DENIED);
            continue;
        }
        mc_op_t *o = &g->ops[k++];
        o->local = local[i];
        o->len = len[i];
        o->task = task[i];
        o->op = op[i];
        o->kind = (uint8_t)e->kind;
        o->e = e;
        o->remote = e->kind == MC_CP_MEM && e->map
            ? (uint64_t)(uintptr_t)e->map->base + e->map_off + (remote[i] - e->start)
            : remote[i];
        sum += len[i];
    }
    g->n = k;
    *total = sum;
}

/* One cross-memory-attach copy of `len` bytes.  0 or an errno: a peer range that is not mapped
 * (e.g. a truncated file) gives EFAULT, never a signal.  EAGAIN/ENOMEM back off (never spin). */
static inline int32_t mc_pv_copy(int pid, int op, uint64_t local, uint64_t remote, uint64_t len) {
    int again = 0;
    while (len) {
        struct iovec l = {(void *)(uintptr_t)local, (size_t)len};
        struct iovec r = {(void *)(uintptr_t)remote, (size_t)len};
        ssize_t got = op == MC_CP_WRITE ? process_vm_writev(pid, &l, 1, &r, 1, 0)
                                        : process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (got < 0) {
            int e = errno;
            if (e == EINTR) continue;
            if ((e == EAGAIN || e == ENOMEM) && again < 50) {
                struct timespec nap = {0, 100000L * (1 + again++)};   /* 0.1 ms .. 5 ms */
                nanosleep(&nap, NULL);
                continue;
            }
            return e ? e : EIO;
        }
        if (got == 0) return EFAULT;
        again = 0;
        local += (uint64_t)got;
        remote += (uint64_t)got;
        len -= (uint64_t)got;
    }
    return 0;
}

/* Copy bytes [off, off+n) of op o. */
static inline int32_t mc_chunk_copy(const mc_group_t *g, const mc_op_t *o, uint64_t off,
                                    uint64_t n) {
    if (o->kind == MC_CP_PV)
        return mc_pv_copy(g->peer->pid, o->op, o->local + off, o->remote + off, n);
    void *l = (void *)(uintptr_t)(o->local + off), *r = (void *)(uintptr_t)(o->remote + off);
    if (o->op == MC_CP_WRITE) memcpy(r, l, n);
    else memcpy(l, r, n);
    return 0;
}

/* Run one op: chunks of MC_CP_CHUNK bytes, each preceded by the liveness checks and wrapped in
 * the busy/slot protocol (see the top of this file).  0 or the error to report the slice with. */
static inline int32_t mc_op_run(const mc_group_t *g, const mc_op_t *o) {
    const mc_entry_t *e = o->e;
    if (o->op == MC_CP_WRITE && !e->writable) return MC_E_DENIED;
    _Atomic uint32_t *busy = (_Atomic uint32_t *)e->busy;
    const _Atomic uint64_t *slot = (const _Atomic uint64_t *)e->slot;
    uint64_t done = 0;
    do {
        uint64_t n = o->len - done;
        if (n > MC_CP_CHUNK) n = MC_CP_CHUNK;
        int32_t err = mc_slice_live(g->batch, o->task);
        if (!err) err = mc_peer_quick(g->peer, g->cancel_gen);
        if (err) return err;
        if (busy) atomic_fetch_add_explicit(busy, 1, memory_order_seq_cst);
        if (slot && atomic_load_explicit(slot, memory_order_seq_cst) != e->slot_val)
            err = MC_E_REFUSED;   /* the peer unregistered the buffer since we resolved it */
        else if (n)
            err = mc_chunk_copy(g, o, done, n);
        if (busy) atomic_fetch_sub_explicit(busy, 1, memory_order_seq_cst);
        if (err) return err;
        done += n;
    } while (done < o->len);
    return 0;
}

/* Run ops [i, j) of g and report each one after its last byte.  May free g. */
static inline void mc_group_run(mc_group_t *g, int64_t i, int64_t j) {
    int32_t perr = mc_peer_check(g->peer, g->cancel_gen);
    for (int64_t k = i; k < j; k++) {
        const mc_op_t *o = &g->ops[k];
        int32_t err = perr ? perr : mc_op_run(g, o);
        mc_slice_done(g->batch, o->task, err ? 0 : (int64_t)o->len, err);
    }
    mc_group_release(g, j - i);
}

/* Report ops [i, j) of g as failed with err.  May free g. */
static inline void mc_group_fail(mc_group_t *g, int64_t i, int64_t j, int32_t err) {
    for (int64_t k = i; k < j; k++) mc_slice_done(g->batch, g->ops[k].task, 0, err);
    mc_group_release(g, j - i);
}

/* ------------------------------------------------------------------ the worker pool */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    mc_group_t *head, *tail;
    int stop;
    int nthreads;
    pthread_t th[MC_CP_MAX_THREADS];
    _Atomic int64_t inflight;
    /* TENT's grace period: a worker that just finished work polls for more (without the lock,
     * yielding the CPU) for this long before it sleeps on the condvar; 0 = sleep at once */
    double grace_s;
    _Atomic int pending;   /* head != NULL, or stopping: what a polling worker watches */
    _Atomic int64_t by_workers, by_callers;   /* ops copied by the workers / callers' threads */
    _Atomic int64_t users;   /* callers inside mc_pool_copy or a drain: the pool outlives them */
} mc_pool_t;

/* Poll (lock not held) until work is queued or `until` passes. */
static inline void mc_pool_poll(mc_pool_t *p, double until) {
    for (unsigned k = 1; !atomic_load_explicit(&p->pending, memory_order_acquire); k++)
        if (mc_grace_round(k, until)) return;
}

static void *mc_pool_worker(void *arg) {
    mc_pool_t *p = (mc_pool_t *)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);   /* signals belong to the interpreter's thread */
    double last_work = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (!p->head && !p->stop && p->grace_s > 0 && last_work > 0) {
            double until = last_work + p->grace_s;   /* within the grace period: poll */
            if (mc_now() < until) {
                pthread_mutex_unlock(&p->mu);
                mc_pool_poll(p, until);
                pthread_mutex_lock(&p->mu);
            }
        }
        while (!p->head && !p->stop) pthread_cond_wait(&p->cv, &p->mu);
        if (!p->head) break;                  /* stopping and nothing left */
        mc_group_t *g = p->head;
        int64_t i = g->cursor, j = i + g->claim;
        if (j >= g->n) {
            j = g->n;
            p->head = g->next;
            if (!p->head) { p->tail = NULL; atomic_store(&p->pending, p->stop); }
        }
        g->cursor = j;
        if (p->head) pthread_cond_signal(&p->cv);   /* more to claim: wake a sibling */
        pthread_mutex_unlock(&p->mu);
        mc_group_run(g, i, j);
        atomic_fetch_add_explicit(&p->by_workers, j - i, memory_order_relaxed);
        last_work = mc_now();
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* 0 or an errno.  On failure no thread is left running. */
static inline int mc_pool_start(mc_pool_t *p, int nthreads, double grace_s) {
    memset(p, 0, sizeof(*p));
    p->grace_s = grace_s > 0 && grace_s < 10.0 ? grace_s : (grace_s >= 10.0 ? 10.0 : 0);
    atomic_init(&p->pending, 0);
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MC_CP_MAX_THREADS) nthreads = MC_CP_MAX_THREADS;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    atomic_init(&p->inflight, 0);
    for (int i = 0; i < nthreads; i++) {
        int rc = pthread_create(&p->th[i], NULL, mc_pool_worker, p);
        if (rc) {
            pthread_mutex_lock(&p->mu);
            p->stop = 1;
            pthread_cond_broadcast(&p->cv);
            pthread_mutex_unlock(&p->mu);
            for (int k = 0; k < i; k++) pthread_join(p->th[k], NULL);
            p->nthreads = 0;
            return rc;
        }
        p->nthreads = i + 1;
    }
    return 0;
}

static inline int mc_pool_push(mc_pool_t *p, mc_group_t *g) {
    pthread_mutex_lock(&p->mu);
    if (p->stop) {
        pthread_mutex_unlock(&p->mu);
        return -1;
    }
    g->next = NULL;
    if (p->tail) p->tail->next = g;
    else p->head = g;
    p->tail = g;
    atomic_store_explicit(&p->pending, 1, memory_order_release);
    if (g->n > g->claim) pthread_cond_broadcast(&p->cv);
    else pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
    return 0;
}

/* Take g off the queue (caller holds mu): its last ops were claimed outside a worker. */
static inline void mc_pool_unlink(mc_pool_t *p, mc_group_t *g) {
    mc_group_t *prev = NULL, *q = p->head;
    while (q && q != g) { prev = q; q = q->next; }
    if (!q) return;
    if (prev) prev->next = g->next;
    else p->head = g->next;
    if (p->tail == g) p->tail = prev;
    if (!p->head) atomic_store(&p->pending, p->stop);
}

/* A synchronous caller works on its own queued group: it claims ranges like a worker until none
 * is left or `deadline` passed (the rest is the workers'; the engine cancels a late batch). */
static inline void mc_pool_help(mc_pool_t *p, mc_group_t *g, double deadline) {
    for (;;) {
        pthread_mutex_lock(&p->mu);
        int64_t i = g->cursor, j = i + g->claim;
        if (i >= g->n) {
            pthread_mutex_unlock(&p->mu);
            return;
        }
        if (j >= g->n) {
            j = g->n;
            mc_pool_unlink(p, g);
        }
        g->cursor = j;
        pthread_mutex_unlock(&p->mu);
        mc_group_run(g, i, j);   /* cannot free g: the caller's reference */
        atomic_fetch_add_explicit(&p->by_callers, j - i, memory_order_relaxed);
        if (mc_now() > deadline) return;
    }
}

/* Stop the workers; every op not claimed yet is reported with err. */
static inline void mc_pool_stop(mc_pool_t *p, int32_t err) {
    pthread_mutex_lock(&p->mu);
    mc_group_t *g = p->head;
    for (mc_group_t *q = g; q; q = q->next) {   /* claimed by nobody else from now on */
        q->stop_from = q->cursor;
        q->cursor = q->n;
    }
    p->head = p->tail = NULL;
    p->stop = 1;
    atomic_store(&p->pending, 1);   /* wakes polling workers */
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    while (g) {
        mc_group_t *next = g->next;
        mc_group_fail(g, g->stop_from, g->n, err);
        g = next;
    }
    for (int i = 0; i < p->nthreads; i++) pthread_join(p->th[i], NULL);
    p->nthreads = 0;
}

/* Wait until nothing is in flight (counter reaches 0); 0 or ETIMEDOUT. */
static inline int mc_wait_zero(int64_t *counter_, double timeout_s) {
    _Atomic int64_t *counter = (_Atomic int64_t *)counter_;
    double until = mc_now() + timeout_s;
    struct timespec nap = {0, 50000};
    while (atomic_load(counter) > 0) {
        if (mc_now() > until) return ETIMEDOUT;
        nanosleep(&nap, NULL);
    }
    return 0;
}

/* Target side of the busy protocol, after the slot's new value was stored (seq_cst): wait until
 * each initiator lane's counter for the slot was seen at 0 or the lane's process exited.
 * `area` + lanes[i] * lane_size + slot_off is lane i's counter (atomic u32); pidfds[i] (-1:
 * unknown) tells whether its owner exited.  Lanes found idle are set to -1; 0 or ETIMEDOUT. */
static inline int mc_busy_wait(char *area, uint64_t lane_size, uint64_t slot_off, int *lanes,
                               const int *pidfds, int n, double timeout_s) {
    double until = mc_now() + timeout_s;
    long nap = 20000;                       /* ns, doubling to 1 ms */
    atomic_thread_fence(memory_order_seq_cst);
    for (;;) {
        int left = 0;
        for (int i = 0; i < n; i++) {
            if (lanes[i] < 0) continue;
            const _Atomic uint32_t *c =
                (const _Atomic uint32_t *)(area + (uint64_t)lanes[i] * lane_size + slot_off);
            if (atomic_load_explicit(c, memory_order_seq_cst) == 0 || mc_fd_readable(pidfds[i]))
                lanes[i] = -1;
            else
                left++;
        }
        if (!left) return 0;
        if (mc_now() > until) return ETIMEDOUT;
        struct timespec ts = {0, nap};
        nanosleep(&ts, NULL);
        if (nap < 1000000) nap *= 2;
    }
}

static inline int mc_pidfd_open(int pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

/* ------------------------------------------------------------------ accessors for Cython */

/* Copy group g (filled by mc_group_fill: total bytes) of batch b.  A group of at most
 * `inline_max` bytes is copied here, by the caller; a larger one is queued for the workers in
 * claims of about `chunk` bytes, and with `sync` the caller claims its share too and then waits
 * for the rest until `timeout_s`.  0 when every op was reported, else ETIMEDOUT (sync only). */
static inline int mc_pool_copy(mc_pool_t *p, mc_group_t *g, mc_batch_t *b, mc_peer_t *peer,
                               mc_table_t *t, uint64_t total, uint64_t inline_max,
                               uint64_t chunk, int sync, double timeout_s) {
    int64_t k = g->n;
    if (k == 0) {
        free(g);
        return 0;
    }
    int inl = total <= inline_max;
    uint64_t hands = (uint64_t)p->nthreads + (sync ? 1 : 0);
    uint64_t target = total / (2 * hands);
    if (target > chunk) target = chunk;
    mc_group_arm(g, b, peer, t, (int64_t *)&p->inflight,
                 (int64_t)(target / (total / (uint64_t)k + 1)), sync && !inl);
    if (inl) {
        mc_group_run(g, 0, k);
        atomic_fetch_add_explicit(&p->by_callers, k, memory_order_relaxed);
        return 0;
    }
    double deadline = mc_now() + timeout_s;
    if (mc_pool_push(p, g) != 0) {
        mc_group_fail(g, 0, k, ECANCELED);
        if (sync) mc_group_unref(g);
        return 0;
    }
    if (!sync) return 0;
    mc_pool_help(p, g, deadline);
    double left = deadline - mc_now();
    int rc = mc_batch_wait(b, left > 0 ? left : 0, 20e-6);
    mc_group_unref(g);
    return rc;
}

static inline int32_t mc_peer_gen(mc_peer_t *p) { return atomic_load(&p->cancel_gen); }
static inline void mc_peer_cancel(mc_peer_t *p) { atomic_fetch_add(&p->cancel_gen, 1); }
static inline int64_t mc_peer_inflight(mc_peer_t *p) { return atomic_load(&p->inflight); }
static inline int64_t *mc_peer_inflight_ptr(mc_peer_t *p) { return (int64_t *)&p->inflight; }
static inline mc_entry_t *mc_table_entry(mc_table_t *t, int i) { return &t->e[i]; }
static inline mc_op_t *mc_group_op(mc_group_t *g, int64_t i) { return &g->ops[i]; }
static inline void mc_group_set_n(mc_group_t *g, int64_t n) { g->n = n; }
static inline int64_t *mc_pool_inflight(mc_pool_t *p) { return (int64_t *)&p->inflight; }
static inline void mc_pool_enter(mc_pool_t *p) { atomic_fetch_add(&p->users, 1); }
static inline void mc_pool_exit(mc_pool_t *p) { atomic_fetch_sub(&p->users, 1); }
/* After mc_pool_stop: wait until no caller is inside (they leave promptly: nothing is left to
 * claim and every queued op was reported), so the pool can be freed. */
static inline void mc_pool_wait_users(mc_pool_t *p) {
    struct timespec nap = {0, 100000L};
    while (atomic_load(&p->users) > 0) nanosleep(&nap, NULL);
}
static inline int64_t mc_pool_by_workers(mc_pool_t *p) { return atomic_load(&p->by_workers); }
static inline int64_t mc_pool_by_callers(mc_pool_t *p) { return atomic_load(&p->by_callers); }
static inline int64_t mc_load64(const int64_t *c) { return atomic_load((const _Atomic int64_t *)c); }
static inline uint64_t mc_load_u64(const void *a) {
    return atomic_load_explicit((const _Atomic uint64_t *)a, memory_order_acquire);
}
/* seq_cst: a slot release must be ordered before the busy counters are read (mc_busy_wait). */
static inline void mc_store_u64(void *a, uint64_t v) {
    atomic_store_explicit((_Atomic uint64_t *)a, v, memory_order_seq_cst);
}
static inline int mc_cas_u64(void *a, uint64_t expect, uint64_t v) {
    return atomic_compare_exchange_strong((_Atomic uint64_t *)a, &expect, v);
}
static inline uint32_t mc_load_u32(const void *a) {
    return atomic_load_explicit((const _Atomic uint32_t *)a, memory_order_seq_cst);
}
static inline uint32_t mc_add_u32(void *a, int32_t d) {
    return atomic_fetch_add_explicit((_Atomic uint32_t *)a, (uint32_t)d, memory_order_seq_cst);
}

#endif
