/* Registered memory as owned, refcounted records in a sorted table under a rwlock.
 *
 * A record (mc_reg_t) lives as long as anyone holds a reference: the table, a task that pins it
 * (mc_task_pin in mc_batch.h), a target serving a peer's request.  Whoever touches the memory
 * holds a *pin* (a pinned reference) for as long as it may touch it.  Unregistering removes the record
 * from the table and marks it revoked (workers stop touching it at their next check and fail
 * that work), then waits for the pins to go without any lock held.
 *
 * No lock is ever held across I/O: a lookup takes the read lock for a binary search, pins the
 * record and lets go. */
#ifndef MC_REGIONS_H
#define MC_REGIONS_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mc_errors.h"

/* Access flags of a region. */
#define MC_REG_LOCAL_WRITE 1u   /* local READs may land in it */
#define MC_REG_REMOTE_READ 2u   /* peers may READ it */
#define MC_REG_REMOTE_WRITE 4u  /* peers may WRITE it */
#define MC_REG_ALL 7u

typedef struct mc_reg {
    /* references (low 32 bits) and pins (high 32 bits) in one word: taking or dropping a pinned
     * reference is one atomic operation */
    _Atomic uint64_t rc;
    _Atomic int32_t revoked;    /* unregistered: stop touching, fail with MC_E_UNREGISTERED */
    uint32_t flags;
    uint64_t addr, len;
} mc_reg_t;

#define MC_REG_PIN ((uint64_t)1 << 32)

static inline mc_reg_t *mc_reg_new(uint64_t addr, uint64_t len, uint32_t flags) {
    mc_reg_t *r = (mc_reg_t *)calloc(1, sizeof(mc_reg_t));
    if (!r) return NULL;
    atomic_init(&r->rc, 1);
    atomic_init(&r->revoked, 0);
    r->addr = addr; r->len = len; r->flags = flags;
    return r;
}

static inline void mc_reg_ref(mc_reg_t *r) { atomic_fetch_add(&r->rc, 1); }

static inline void mc_reg_unref(mc_reg_t *r) {
    if (r && atomic_fetch_sub(&r->rc, 1) == 1) free(r);
}

/* A pinned reference (from mc_regions_acquire) is done with: unpin and drop it at once. */
static inline void mc_reg_release(mc_reg_t *r) {
    if (r && atomic_fetch_sub(&r->rc, MC_REG_PIN | 1) == (MC_REG_PIN | 1)) free(r);
}

static inline int64_t mc_reg_inflight(mc_reg_t *r) {
    return (int64_t)(atomic_load(&r->rc) >> 32);
}

static inline int mc_reg_revoked(const mc_reg_t *r) {
    return r && atomic_load_explicit(&((mc_reg_t *)r)->revoked, memory_order_acquire);
}

static inline double mc_reg_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Wait until nobody holds a pin; 0, or ETIMEDOUT after timeout_s. */
static inline int mc_reg_wait_idle(mc_reg_t *r, double timeout_s) {
    if (mc_reg_inflight(r) <= 0) return 0;
    double until = mc_reg_now() + timeout_s;
    long nap = 20000; /* ns, doubling to 1 ms */
    while (mc_reg_inflight(r) > 0) {
        if (mc_reg_now() > until) return ETIMEDOUT;
        struct timespec ts = {0, nap};
        nanosleep(&ts, NULL);
        if (nap < 1000000) nap *= 2;
    }
    return 0;
}

typedef struct {
    pthread_rwlock_t lock;
    mc_reg_t **r;
    size_t n, cap;
} mc_regions_t;

static inline mc_regions_t *mc_regions_new(void) {
    mc_regions_t *t = (mc_regions_t *)calloc(1, sizeof(mc_regions_t));
    if (!t) return NULL;
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
#ifdef __GLIBC__
    /* writers (register/unregister) are not starved by a stream of lookups */
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
#endif
    pthread_rwlock_init(&t->lock, &a);
    pthread_rwlockattr_destroy(&a);
    return t;
}

static inline void mc_regions_free(mc_regions_t *t) {
    for (size_t i = 0; i < t->n; i++) mc_reg_unref(t->r[i]);
    pthread_rwlock_destroy(&t->lock);
    free(t->r);
    free(t);
}

/* Index of the region holding [addr, addr+len), or -1.  Caller holds the lock. */
static inline long mc_regions_find_locked(const mc_regions_t *t, uint64_t addr, uint64_t len) {
    size_t lo = 0, hi = t->n;
    while (lo < hi) {                       /* first region with r.addr > addr */
        size_t mid = (lo + hi) / 2;
        if (t->r[mid]->addr <= addr) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return -1;
    const mc_reg_t *g = t->r[lo - 1];
    uint64_t off = addr - g->addr;
    if (off <= g->len && len <= g->len - off) return (long)(lo - 1);
    return -1;
}

/* Insert `reg` (the table takes a reference).  0 ok, 1 overlaps, 2 out of memory, 3 wraps. */
static inline int mc_regions_add(mc_regions_t *t, mc_reg_t *reg) {
    uint64_t addr = reg->addr, len = reg->len;
    if (len == 0 || addr + len < addr) return 3;
    pthread_rwlock_wrlock(&t->lock);
    size_t lo = 0, hi = t->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (t->r[mid]->addr < addr) lo = mid + 1; else hi = mid;
    }
    size_t i = lo;
    int bad = (i > 0 && t->r[i - 1]->addr + t->r[i - 1]->len > addr) ||
              (i < t->n && addr + len > t->r[i]->addr);
    if (bad) { pthread_rwlock_unlock(&t->lock); return 1; }
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 16;
        mc_reg_t **nr = (mc_reg_t **)realloc(t->r, cap * sizeof(mc_reg_t *));
        if (!nr) { pthread_rwlock_unlock(&t->lock); return 2; }
        t->r = nr; t->cap = cap;
    }
    memmove(&t->r[i + 1], &t->r[i], (t->n - i) * sizeof(mc_reg_t *));
    mc_reg_ref(reg);
    t->r[i] = reg;
    t->n++;
    pthread_rwlock_unlock(&t->lock);
    return 0;
}

/* Take the region starting at `addr` out of the table and revoke it; the table's reference
 * passes to the caller.  NULL when there is none. */
static inline mc_reg_t *mc_regions_remove(mc_regions_t *t, uint64_t addr) {
    mc_reg_t *out = NULL;
    pthread_rwlock_wrlock(&t->lock);
    size_t lo = 0, hi = t->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (t->r[mid]->addr < addr) lo = mid + 1; else hi = mid;
    }
    if (lo < t->n && t->r[lo]->addr == addr) {
        out = t->r[lo];
        memmove(&t->r[lo], &t->r[lo + 1], (t->n - lo - 1) * sizeof(mc_reg_t *));
        t->n--;
        atomic_store_explicit(&out->revoked, 1, memory_order_release);
    }
    pthread_rwlock_unlock(&t->lock);
    return out;
}

/* Pin the region holding [addr, addr+len) if it grants `need` (MC_REG_* bits).  Returns it
 * pinned and referenced (release with mc_reg_release), or NULL with *err = MC_E_REFUSED (no such
 * range) or MC_E_DENIED (the region does not grant `need`). */
static inline mc_reg_t *mc_regions_acquire(mc_regions_t *t, uint64_t addr, uint64_t len,
                                           uint32_t need, int32_t *err) {
    mc_reg_t *r = NULL;
    int32_t e = MC_E_REFUSED;
    if (len == 0) { if (err) *err = e; return NULL; }
    pthread_rwlock_rdlock(&t->lock);
    long i = mc_regions_find_locked(t, addr, len);
    if (i >= 0) {
        mc_reg_t *g = t->r[i];
        if ((g->flags & need) != need) e = MC_E_DENIED;
        else { r = g; atomic_fetch_add(&r->rc, MC_REG_PIN | 1); e = 0; }
    }
    pthread_rwlock_unlock(&t->lock);
    if (err) *err = e;
    return r;
}

static inline int mc_regions_contains(mc_regions_t *t, uint64_t addr, uint64_t len) {
    pthread_rwlock_rdlock(&t->lock);
    long i = mc_regions_find_locked(t, addr, len);
    pthread_rwlock_unlock(&t->lock);
    return i >= 0;
}

/* Flags of the region holding the range, or -1. */
static inline int mc_regions_flags(mc_regions_t *t, uint64_t addr, uint64_t len) {
    pthread_rwlock_rdlock(&t->lock);
    long i = mc_regions_find_locked(t, addr, len);
    int f = i >= 0 ? (int)t->r[i]->flags : -1;
    pthread_rwlock_unlock(&t->lock);
    return f;
}

static inline size_t mc_regions_count(mc_regions_t *t) {
    pthread_rwlock_rdlock(&t->lock);
    size_t n = t->n;
    pthread_rwlock_unlock(&t->lock);
    return n;
}

#endif
