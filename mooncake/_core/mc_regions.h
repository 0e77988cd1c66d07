/* Registered-memory table: sorted, non-overlapping [addr, addr+len) ranges under a rwlock.
 * Servers hold the read lock while they touch a range, so unregister (write lock) waits for
 * every in-progress access to that memory to finish. */
#ifndef MC_REGIONS_H
#define MC_REGIONS_H

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { uint64_t addr, len; } mc_region_t;

typedef struct {
    pthread_rwlock_t lock;
    mc_region_t *r;
    size_t n, cap;
} mc_regions_t;

static inline mc_regions_t *mc_regions_new(void) {
    mc_regions_t *t = (mc_regions_t *)calloc(1, sizeof(mc_regions_t));
    if (t) pthread_rwlock_init(&t->lock, NULL);
    return t;
}

static inline void mc_regions_free(mc_regions_t *t) {
    pthread_rwlock_destroy(&t->lock);
    free(t->r);
    free(t);
}

/* Index of the region holding [addr, addr+len), or -1.  Caller holds the lock. */
static inline long mc_regions_find_locked(const mc_regions_t *t, uint64_t addr, uint64_t len) {
    size_t lo = 0, hi = t->n;
    while (lo < hi) {                       /* first region with r.addr > addr */
        size_t mid = (lo + hi) / 2;
        if (t->r[mid].addr <= addr) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return -1;
    const mc_region_t *g = &t->r[lo - 1];
    uint64_t off = addr - g->addr;
    if (off <= g->len && len <= g->len - off) return (long)(lo - 1);
    return -1;
}

/* 0 ok, 1 overlaps an existing region, 2 out of memory, 3 wraps around. */
static inline int mc_regions_add(mc_regions_t *t, uint64_t addr, uint64_t len) {
    if (addr + len < addr) return 3;
    pthread_rwlock_wrlock(&t->lock);
    size_t i = 0;
    while (i < t->n && t->r[i].addr < addr) i++;
    int bad = (i > 0 && t->r[i - 1].addr + t->r[i - 1].len > addr) ||
              (i < t->n && addr + len > t->r[i].addr);
    if (bad) { pthread_rwlock_unlock(&t->lock); return 1; }
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 16;
        mc_region_t *nr = (mc_region_t *)realloc(t->r, cap * sizeof(mc_region_t));
        if (!nr) { pthread_rwlock_unlock(&t->lock); return 2; }
        t->r = nr; t->cap = cap;
    }
    memmove(&t->r[i + 1], &t->r[i], (t->n - i) * sizeof(mc_region_t));
    t->r[i].addr = addr; t->r[i].len = len;
    t->n++;
    pthread_rwlock_unlock(&t->lock);
    return 0;
}

/* Remove the region starting at addr; returns its length, or 0 when there is none. */
static inline uint64_t mc_regions_remove(mc_regions_t *t, uint64_t addr) {
    uint64_t len = 0;
    pthread_rwlock_wrlock(&t->lock);
    for (size_t i = 0; i < t->n; i++) {
        if (t->r[i].addr == addr) {
            len = t->r[i].len;
            memmove(&t->r[i], &t->r[i + 1], (t->n - i - 1) * sizeof(mc_region_t));
            t->n--;
            break;
        }
    }
    pthread_rwlock_unlock(&t->lock);
    return len;
}

static inline int mc_regions_contains(mc_regions_t *t, uint64_t addr, uint64_t len) {
    pthread_rwlock_rdlock(&t->lock);
    long i = mc_regions_find_locked(t, addr, len);
    pthread_rwlock_unlock(&t->lock);
    return i >= 0;
}

#endif
