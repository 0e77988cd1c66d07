/* Batch/task completion table shared by every kernel module.
 *
 * A batch is a refcounted C block: a header plus one task record per request.  The engine sets
 * each task's slice count before any slice is posted; transports (any thread, no GIL) call
 * mc_slice_done() once per slice.  The last slice of the last task wakes waiters.
 * In-flight slices hold a reference (mc_batch_ref) so the block outlives an abandoned batch.
 */
#ifndef MC_BATCH_H
#define MC_BATCH_H

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Mooncake's TransferStatusEnum order. */
enum { MC_WAITING = 0, MC_PENDING = 1, MC_INVALID = 2, MC_CANCELED = 3,
       MC_COMPLETED = 4, MC_TIMEOUT = 5, MC_FAILED = 6 };

/* Slice error codes (task.error); 0 = ok.  Positive values are errno numbers. */
enum { MC_E_REFUSED = 1000,   /* target refused the range (outside registered memory) */
       MC_E_PEER = 1001,      /* connection to the peer lost */
       MC_E_TIMEOUT = 1002,   /* aborted after the transfer timeout */
       MC_E_PROTO = 1003,     /* malformed response */
       MC_E_LOCAL = 1004,     /* refused before posting (local validation) */
       MC_E_CLOSED = 1005 };  /* the engine (or its transport) was closed meanwhile */

typedef struct {
    _Atomic int64_t pending;   /* slices not finished yet */
    _Atomic int64_t bytes;     /* bytes moved by finished slices */
    _Atomic int32_t error;     /* first error, 0 if none */
    int64_t total;             /* slices submitted */
} mc_task_t;

typedef struct {
    _Atomic int64_t refs;
    _Atomic int64_t open_tasks;
    uint32_t ntasks;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    mc_task_t tasks[];
} mc_batch_t;

static inline mc_batch_t *mc_batch_new(uint32_t ntasks) {
    mc_batch_t *b = (mc_batch_t *)calloc(1, sizeof(mc_batch_t) + (size_t)ntasks * sizeof(mc_task_t));
    if (!b) return NULL;
    atomic_init(&b->refs, 1);
    atomic_init(&b->open_tasks, 0);
    b->ntasks = ntasks;
    pthread_mutex_init(&b->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&b->cv, &ca);
    pthread_condattr_destroy(&ca);
    return b;
}

static inline void mc_batch_ref(mc_batch_t *b) { atomic_fetch_add(&b->refs, 1); }

static inline void mc_batch_unref(mc_batch_t *b) {
    if (atomic_fetch_sub(&b->refs, 1) == 1) {
        pthread_mutex_destroy(&b->mu);
        pthread_cond_destroy(&b->cv);
        free(b);
    }
}

/* Arm task `t` with `n` slices (n may be 0: the task then finishes at once). */
static inline void mc_task_arm(mc_batch_t *b, uint32_t t, int64_t n) {
    mc_task_t *k = &b->tasks[t];
    k->total = n;
    atomic_store(&k->pending, n);
    if (n > 0) atomic_fetch_add(&b->open_tasks, 1);
}

static inline void mc_batch_wake(mc_batch_t *b) {
    pthread_mutex_lock(&b->mu);
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

/* One slice of task `t` finished; `err` 0 = ok.  Safe from any thread. */
static inline void mc_slice_done(mc_batch_t *b, uint32_t t, int64_t nbytes, int32_t err) {
    mc_task_t *k = &b->tasks[t];
    if (err) {
        int32_t zero = 0;
        atomic_compare_exchange_strong(&k->error, &zero, err);
    } else {
        atomic_fetch_add(&k->bytes, nbytes);
    }
    if (atomic_fetch_sub(&k->pending, 1) == 1) {
        if (atomic_fetch_sub(&b->open_tasks, 1) == 1) mc_batch_wake(b);
    }
}

static inline int mc_task_status(mc_batch_t *b, uint32_t t) {
    mc_task_t *k = &b->tasks[t];
    if (atomic_load(&k->pending) > 0) return MC_PENDING;
    int32_t e = atomic_load(&k->error);
    if (e == 0) return MC_COMPLETED;
    return e == MC_E_TIMEOUT ? MC_TIMEOUT : MC_FAILED;
}

static inline int64_t mc_task_bytes(mc_batch_t *b, uint32_t t) { return atomic_load(&b->tasks[t].bytes); }
static inline int32_t mc_task_error(mc_batch_t *b, uint32_t t) { return atomic_load(&b->tasks[t].error); }
static inline int64_t mc_open_tasks(mc_batch_t *b) { return atomic_load(&b->open_tasks); }

static inline double mc_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Wait until every task finished, spinning `spin_s` seconds first.  0 = done, ETIMEDOUT. */
static inline int mc_batch_wait(mc_batch_t *b, double timeout_s, double spin_s) {
    if (atomic_load(&b->open_tasks) == 0) return 0;
    double start = mc_now();
    if (spin_s > 0) {
        double until = start + (spin_s < timeout_s ? spin_s : timeout_s);
        while (mc_now() < until) {
            for (int i = 0; i < 64; i++) {
                if (atomic_load_explicit(&b->open_tasks, memory_order_acquire) == 0) return 0;
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
            }
        }
    }
    double deadline = start + timeout_s;
    struct timespec ts;
    ts.tv_sec = (time_t)deadline;
    ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
    int rc = 0;
    pthread_mutex_lock(&b->mu);
    while (atomic_load(&b->open_tasks) > 0) {
        rc = pthread_cond_timedwait(&b->cv, &b->mu, &ts);
        if (rc == ETIMEDOUT) break;
    }
    int done = atomic_load(&b->open_tasks) == 0;
    pthread_mutex_unlock(&b->mu);
    return done ? 0 : ETIMEDOUT;
}

#endif
