/* Batch/task completion table shared by every kernel module.
 *
 * A batch is a refcounted C block: a header plus one task record per request.  The engine sets
 * each task's slice count before any slice is posted; transports (any thread, no GIL) call
 * mc_slice_done() once per slice.  The last slice of the last task wakes waiters.
 * In-flight slices hold a reference (mc_batch_ref) so the block outlives an abandoned batch.
 *
 * Ownership: each task pins the local region its request lies in (mc_task_pin); the pin is
 * dropped when the task's last slice is reported, so a region's pin count says whether any
 * worker may still touch it.  Workers call mc_slice_live() before touching memory: a cancelled
 * batch (mc_batch_cancel: a timeout, close) or a revoked region makes them stop and report the
 * slice with that error.  A slice is reported only after the last byte of it was touched, so
 * a task that ended (any status) is never touched again.
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

#include "mc_errors.h"
#include "mc_metrics.h"
#include "mc_regions.h"

/* Mooncake's TransferStatusEnum order. */
enum { MC_WAITING = 0, MC_PENDING = 1, MC_INVALID = 2, MC_CANCELED = 3,
       MC_COMPLETED = 4, MC_TIMEOUT = 5, MC_FAILED = 6 };


typedef struct {
    _Atomic int64_t pending;   /* slices not finished yet */
    _Atomic int64_t bytes;     /* bytes moved by finished slices */
    _Atomic int32_t error;     /* first error, 0 if none */
    int64_t total;             /* slices submitted */
    mc_reg_t *lreg;            /* the pinned local region, released with the last slice */
    uint64_t len;              /* the request's length (mc_task_arm_req), for the meter */
    uint8_t op;                /* its opcode: 0 READ, 1 WRITE */
} mc_task_t;

typedef struct {
    _Atomic int64_t refs;
    _Atomic int64_t open_tasks;
    _Atomic int32_t cancel;    /* 0, or why every slice not yet touched must stop */
    uint32_t ntasks;
    mc_meter_t *meter;         /* where its tasks are counted when they end (NULL: nowhere) */
    uint64_t t0_ns;            /* when it was handed to the transport (mc_batch_meter) */
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
        for (uint32_t t = 0; t < b->ntasks; t++) {   /* tasks never armed or never finished */
            mc_task_t *k = &b->tasks[t];
            if (k->lreg) mc_reg_release(k->lreg);
            if (b->meter && k->total > 0 && atomic_load(&k->pending) > 0)
                mc_meter_done(b->meter, k->op, k->len, MC_E_CANCELED, 0);  /* abandoned */
        }
        if (b->meter) mc_meter_unref(b->meter);
        pthread_mutex_destroy(&b->mu);
        pthread_cond_destroy(&b->cv);
        free(b);
    }
}

/* Give task `t` the pinned local region `r` (from mc_regions_acquire); the task owns the pin. */
static inline void mc_task_pin(mc_batch_t *b, uint32_t t, mc_reg_t *r) {
    mc_task_t *k = &b->tasks[t];
    if (k->lreg) mc_reg_release(k->lreg);
    k->lreg = r;
}

static inline void mc_task_unpin(mc_task_t *k) {
    mc_reg_t *r = k->lreg;
    k->lreg = NULL;
    if (r) mc_reg_release(r);
}

/* Arm task `t` with `n` slices (n may be 0: the task then finishes at once). */
static inline void mc_task_arm(mc_batch_t *b, uint32_t t, int64_t n) {
    mc_task_t *k = &b->tasks[t];
    k->total = n;
    atomic_store(&k->pending, n);
    if (n > 0) atomic_fetch_add(&b->open_tasks, 1);
    else mc_task_unpin(k);
}

/* mc_task_arm for request `t` of opcode `op` and `len` bytes (what its meter counts). */
static inline void mc_task_arm_req(mc_batch_t *b, uint32_t t, int64_t n, uint8_t op,
                                   uint64_t len) {
    b->tasks[t].op = op;
    b->tasks[t].len = len;
    mc_task_arm(b, t, n);
}

/* Count the batch's armed tasks in meter `m` from now on (once, after slicing, before any slice
 * is posted): their requests and bytes are in flight, each is counted again when it ends. */
static inline int mc_batch_meter(mc_batch_t *b, mc_meter_t *m) {
    if (b->meter) return -1;
    uint64_t n[2] = {0, 0}, bytes[2] = {0, 0};
    for (uint32_t t = 0; t < b->ntasks; t++) {
        mc_task_t *k = &b->tasks[t];
        if (k->total <= 0) continue;
        n[k->op & 1]++;
        bytes[k->op & 1] += k->len;
    }
    mc_meter_ref(m);
    b->meter = m;
    b->t0_ns = mc_now_ns();
    mc_meter_arm(m, 0, n[0], bytes[0]);
    mc_meter_arm(m, 1, n[1], bytes[1]);
    return 0;
}

/* Stop the batch: slices not touched yet end with `err` (first reason wins). */
static inline void mc_batch_cancel(mc_batch_t *b, int32_t err) {
    int32_t zero = 0;
    atomic_compare_exchange_strong(&b->cancel, &zero, err);
}

/* 0 when a worker may touch the memory of task `t`'s slice, else the error to report it with. */
static inline int32_t mc_slice_live(mc_batch_t *b, uint32_t t) {
    int32_t c = atomic_load_explicit(&b->cancel, memory_order_acquire);
    if (c) return c;
    if (mc_reg_revoked(b->tasks[t].lreg)) return MC_E_UNREGISTERED;
    return 0;
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
        mc_task_unpin(k);      /* before anyone can see the task finished */
        if (b->meter)          /* counted before a waiter can return */
            mc_meter_done(b->meter, k->op, k->len, atomic_load(&k->error),
                          mc_now_ns() - b->t0_ns);
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

/* Round k (from 1) of a grace-period poll (TENT's grace_period_ns): a pause, and every 64th
 * round a sched_yield; 1 once `until` has passed (stop polling, go to sleep). */
static inline int mc_grace_round(unsigned k, double until) {
    if ((k & 63) == 0) {
        if (mc_now() >= until) return 1;
        sched_yield();
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    return 0;
}

/* Wait until every task finished, spinning `spin_s` seconds first.  0 = done, ETIMEDOUT. */
/* CPUs the calling thread may run on (1 when unknown). */
static inline int mc_own_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
    return CPU_COUNT(&set);
}

/* Wait for every task of `b`: first polling for `spin_s` seconds (never on a thread that has
 * one CPU: it would only keep the thread that must finish the work off it), then sleeping. */
static inline int mc_batch_wait(mc_batch_t *b, double timeout_s, double spin_s) {
    if (atomic_load(&b->open_tasks) == 0) return 0;
    double start = mc_now();
    if (spin_s > 0 && mc_own_cpus() > 1) {
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
