/* Transfer metrics, counted in C: one refcounted block per (engine, transport, peer).
 *
 * Every kernel module inlines the headers, so nothing here is `static` state: the block is
 * allocated by the meter module (mooncake/_core/meter.pyx) and a batch carries a pointer to it
 * (mc_batch_meter, mc_batch.h).  Whichever module reports a task's last slice (tcp lanes, the shm
 * copy pool, rdma completions, a Python transport) updates the same memory.
 *
 * Hot-path cost: a batch adds its armed requests and bytes once (per opcode); a task that ends
 * adds, when it completed, its bytes, one latency bucket, the latency sum and one size bucket
 * (4 relaxed atomic adds and a clock read), when it failed, a failure and its length (2).
 * Requests = successes (a histogram's count) + failures; in flight = armed - ended.
 *
 * Histograms have fixed log2 buckets: bucket i counts values v with v <= 2^i (bucket 0: v <= 1),
 * latency in nanoseconds, sizes in bytes; the exporter folds them into Prometheus buckets.
 */
#ifndef MC_METRICS_H
#define MC_METRICS_H

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define MC_M_BUCKETS 64

typedef struct {
    uint64_t armed;                    /* requests (tasks) handed to a transport */
    uint64_t armed_bytes;              /* their lengths */
    uint64_t bytes;                    /* bytes of completed requests */
    uint64_t failures;                 /* requests that ended FAILED/TIMEOUT */
    uint64_t failed_bytes;             /* their lengths */
    uint64_t lat_sum_ns;               /* latency of completed requests, summed */
    uint64_t lat[MC_M_BUCKETS];        /* completed requests by latency (ns, log2) */
    uint64_t size[MC_M_BUCKETS];       /* completed requests by length (bytes, log2) */
} mc_meter_op_t;

typedef struct {
    int64_t refs;
    uint64_t infeasible;               /* batches whose deadline had passed at submit */
    mc_meter_op_t op[2];               /* 0 READ, 1 WRITE */
} mc_meter_t;

static inline mc_meter_t *mc_meter_new(void) {
    mc_meter_t *m = (mc_meter_t *)calloc(1, sizeof(mc_meter_t));
    if (m) m->refs = 1;
    return m;
}

static inline void mc_meter_ref(mc_meter_t *m) { __atomic_fetch_add(&m->refs, 1, __ATOMIC_RELAXED); }

static inline void mc_meter_unref(mc_meter_t *m) {
    if (__atomic_fetch_sub(&m->refs, 1, __ATOMIC_ACQ_REL) == 1) free(m);
}

static inline uint64_t mc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* The log2 bucket of v: the smallest i with v <= 2^i. */
static inline unsigned mc_meter_bucket(uint64_t v) {
    if (v <= 1) return 0;
    unsigned i = 64u - (unsigned)__builtin_clzll(v - 1);
    return i < MC_M_BUCKETS ? i : MC_M_BUCKETS - 1;
}

static inline void mc_meter_add(uint64_t *p, uint64_t v) {
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

/* `n` requests of `nbytes` in total, opcode `op`, go to the transport. */
static inline void mc_meter_arm(mc_meter_t *m, unsigned op, uint64_t n, uint64_t nbytes) {
    if (!n) return;
    mc_meter_op_t *o = &m->op[op & 1];
    mc_meter_add(&o->armed_bytes, nbytes);
    mc_meter_add(&o->armed, n);   /* after its bytes: a reader never sees bytes go negative */
}

/* A request of `len` bytes ended: completed (`err` 0) `lat_ns` after its batch was submitted. */
static inline void mc_meter_done(mc_meter_t *m, unsigned op, uint64_t len, int32_t err,
                                 uint64_t lat_ns) {
    mc_meter_op_t *o = &m->op[op & 1];
    if (err) {
        mc_meter_add(&o->failed_bytes, len);
        mc_meter_add(&o->failures, 1);
        return;
    }
    mc_meter_add(&o->bytes, len);
    mc_meter_add(&o->lat_sum_ns, lat_ns);
    mc_meter_add(&o->lat[mc_meter_bucket(lat_ns)], 1);
    mc_meter_add(&o->size[mc_meter_bucket(len)], 1);
}

static inline uint64_t mc_meter_load(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

#endif
