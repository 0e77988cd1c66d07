/* Shared bandwidth quota: processes on one host share each NIC through a table in shared memory.
 *
 * Capacity-free weighted fair sharing (stride scheduling on a shared virtual clock per NIC).
 * Every participant (a slot: one engine's transport on one NIC, at one weight) keeps a virtual
 * time vt = Σ bytes × SCALE / weight.  Before it sends a window of bytes it asks: it may go when
 * its vt ≤ the smallest vt of the *other competing* slots + `burst`, else it waits a little and
 * asks again.  A slot competes while one of its drives is in progress (`active` > 0) and it asked
 * within `stale_ns`: an idle process never holds anyone back (work-conserving: alone, a process
 * only pays one scan of the slots per window), and a process killed at any instant stops
 * competing `stale_ns` after its last ask.  Nothing is locked: each slot is written only by its
 * owner (atomics); the table's only shared words are claimed by CAS (a NIC entry's key, a slot's
 * owner) or only ever raised (the NIC's clock).
 *
 * The NIC's clock `vclock` only moves forward: at each grant it is raised to the smallest vt of
 * the competing slots.  A slot's vt is never left below vclock - `credit`, so a participant that
 * was idle re-enters with at most `credit` of saved service (no hoarding), while one that was
 * ahead keeps its debt (a sync loop's gaps between calls cost it nothing); one that has not
 * asked for a second re-enters at exactly vclock - `credit`.  The clock and the vt's wrap
 * around (comparisons are modular, and no live vt is ever 2^63 away from the clock), so nothing
 * overflows however long the table lives.
 *
 * Layout (version 1; every field little-endian, every record 64-byte aligned):
 *   header (128 B)  magic "MCQUOTA1", version, the sizes of header / NIC entry / slot, the
 *                   number of NIC entries and of slots per NIC, the total size, and the timing
 *                   parameters every participant uses (stale_ns, burst, credit, max_wait_ns)
 *   NIC entry i     at hdr_size + i × (nic_size + max_slots × slot_size): key hash (0 = free),
 *                   vclock, high-water slot count, the key text; then its max_slots slots.
 *   slot            owner (pid << 32 | low 32 bits of the process start time; 0 = free),
 *                   weight, class, active drives, contended flag, vt, last ask
 *                   (CLOCK_MONOTONIC ns), counters.
 * Whatever another process writes into the table can only skew the sharing, never make us read
 * or write outside the mapping: every index comes from this process's copy of the sizes.
 *
 * A transport asks and charges per window (GIL-free, a NULL test when no quota is configured):
 *     mc_quota_enter(q, sid);                       a drive with work to send starts
 *     max = mc_quota_quantum(q, sid);               how big a window to ask for (>= 1 job)
 *     ns = mc_quota_wait_ns(q, sid, bytes);         0: go now (then mc_quota_charge), else
 *                                                   wait about ns (keep draining) and ask again
 *     mc_quota_charge(q, sid, bytes);               WRITE payload bytes / READ lengths
 *     mc_quota_leave(q, sid);                       the drive ended
 * `sid` = nic index × max_slots + slot index, from mc_quota_join.
 */
#ifndef MC_QUOTA_H
#define MC_QUOTA_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MC_QUOTA_MAGIC 0x3141544f5551434dULL   /* "MCQUOTA1" */
#define MC_QUOTA_VERSION 1u
#define MC_QUOTA_HDR_SIZE 128u
#define MC_QUOTA_NAME 40
#define MC_QUOTA_SCALE 65536ULL                 /* vt units per byte at weight 1 */
#define MC_QUOTA_MAX_WEIGHT 65535u
#define MC_QUOTA_MAX_NICS 1024u
#define MC_QUOTA_MAX_SLOTS 1024u
/* A window asked for at once under contention: at most this many bytes (at least one job). */
#define MC_QUOTA_QUANTUM (1u << 20)
/* Suggested waits are clamped to [MIN, MAX] ns: bounded sleeps, never a spin. */
#define MC_QUOTA_WAIT_MIN 20000ULL
#define MC_QUOTA_WAIT_MAX 1000000ULL
/* A dead owner's slot is reclaimed once it has not asked for this long as well. */
#define MC_QUOTA_RECLAIM_NS 1000000000ULL
/* A slot that has not asked for this long re-enters at the NIC's clock - credit whatever its
 * vt says (its debt is long paid, and a vt left behind for hours could have wrapped). */
#define MC_QUOTA_RESYNC_NS 1000000000ULL

typedef struct {
    uint64_t magic;
    uint32_t version, hdr_size;
    uint32_t nic_size, slot_size;
    uint32_t max_nics, max_slots;
    uint64_t total_size;
    uint64_t stale_ns;      /* a slot that has not asked for this long does not compete */
    uint64_t burst;         /* vt units a slot may run ahead of the slowest competitor */
    uint64_t credit;        /* vt units of saved service a slot may keep while idle */
    uint64_t max_wait_ns;   /* a refusal streak this long goes anyway (a wedged table) */
    uint8_t rsv[MC_QUOTA_HDR_SIZE - 72];
} mc_quota_hdr_t;

typedef struct {
    _Atomic uint64_t key;     /* FNV-1a of the name, never 0; 0 = free entry */
    _Atomic uint64_t vclock;
    _Atomic uint32_t hw;      /* slots ever claimed (scan bound) */
    uint32_t rsv;
    char name[MC_QUOTA_NAME];
} mc_quota_nic_t;

typedef struct {
    _Atomic uint64_t owner;   /* pid << 32 | (start time & 0xffffffff); 0 = free */
    _Atomic uint32_t weight;
    _Atomic uint32_t cls;     /* priority class, informational */
    _Atomic uint32_t active;  /* drives in progress */
    _Atomic uint32_t contended;   /* others competed at the last ask (windows are capped) */
    _Atomic uint64_t vt;
    _Atomic uint64_t seen_ns; /* last ask */
    _Atomic uint64_t bytes;   /* charged, for statistics */
    _Atomic uint32_t waits;   /* refusals, for statistics (wraps) */
    _Atomic uint32_t forced;  /* grants past max_wait_ns (wraps) */
    _Atomic uint64_t wait_since;  /* first refusal of the current streak, 0 = none */
} mc_quota_slot_t;

_Static_assert(sizeof(mc_quota_hdr_t) == MC_QUOTA_HDR_SIZE, "quota header size");
_Static_assert(sizeof(mc_quota_nic_t) == 64, "quota NIC entry size");
_Static_assert(sizeof(mc_quota_slot_t) == 64, "quota slot size");

/* This process's view: the mapping and its own copy of the validated sizes and parameters. */
typedef struct {
    char *base;
    uint64_t size;
    uint32_t max_nics, max_slots;
    uint64_t stride;          /* one NIC entry plus its slots */
    uint64_t stale_ns, burst, credit, max_wait_ns;
} mc_quota_t;

static inline uint64_t mc_quota_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline int mc_vt_lt(uint64_t a, uint64_t b) { return (int64_t)(a - b) < 0; }

static inline uint64_t mc_quota_size(uint32_t max_nics, uint32_t max_slots) {
    return MC_QUOTA_HDR_SIZE + (uint64_t)max_nics *
           (sizeof(mc_quota_nic_t) + (uint64_t)max_slots * sizeof(mc_quota_slot_t));
}

static inline mc_quota_nic_t *mc_quota_nic(const mc_quota_t *q, uint32_t i) {
    return (mc_quota_nic_t *)(q->base + MC_QUOTA_HDR_SIZE + (uint64_t)i * q->stride);
}

static inline mc_quota_slot_t *mc_quota_slot(const mc_quota_t *q, uint32_t nic, uint32_t i) {
    return (mc_quota_slot_t *)((char *)mc_quota_nic(q, nic) + sizeof(mc_quota_nic_t) +
                               (uint64_t)i * sizeof(mc_quota_slot_t));
}

/* Fill a fresh (zeroed) table's header: the creator does this before the file gets its name. */
static inline void mc_quota_format(void *base, uint32_t max_nics, uint32_t max_slots,
                                   uint64_t stale_ns, uint64_t burst, uint64_t credit,
                                   uint64_t max_wait_ns) {
    mc_quota_hdr_t *h = (mc_quota_hdr_t *)base;
    memset(h, 0, sizeof *h);
    h->version = MC_QUOTA_VERSION;
    h->hdr_size = MC_QUOTA_HDR_SIZE;
    h->nic_size = sizeof(mc_quota_nic_t);
    h->slot_size = sizeof(mc_quota_slot_t);
    h->max_nics = max_nics;
    h->max_slots = max_slots;
    h->total_size = mc_quota_size(max_nics, max_slots);
    h->stale_ns = stale_ns;
    h->burst = burst;
    h->credit = credit;
    h->max_wait_ns = max_wait_ns;
    atomic_thread_fence(memory_order_release);
    h->magic = MC_QUOTA_MAGIC;
}

/* ---------- joining (cold path) ---------- */

static inline uint64_t mc_quota_hash(const char *s) {
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) { h ^= (unsigned char)*s; h *= 1099511628211ULL; }
    return h ? h : 1;
}

/* The NIC entry named `name` (at most MC_QUOTA_NAME - 1 bytes), claimed if new.
 * Its index, or -ENOSPC when every entry names another NIC. */
static inline int32_t mc_quota_nic_find(const mc_quota_t *q, const char *name) {
    uint64_t h = mc_quota_hash(name);
    for (uint32_t i = 0; i < q->max_nics; i++) {
        mc_quota_nic_t *e = mc_quota_nic(q, i);
        uint64_t k = atomic_load(&e->key);
        if (k == 0) {
            uint64_t zero = 0;
            if (atomic_compare_exchange_strong(&e->key, &zero, h)) {
                strncpy(e->name, name, MC_QUOTA_NAME - 1);
                return (int32_t)i;
            }
            k = zero;
        }
        if (k != h) continue;
        /* a claimer may not have written the name yet (or died before): the text is the same */
        if (e->name[0] == 0) strncpy(e->name, name, MC_QUOTA_NAME - 1);
        if (strncmp(e->name, name, MC_QUOTA_NAME - 1) == 0) return (int32_t)i;
    }
    return -ENOSPC;
}

/* Start time of `pid` (clock ticks since boot, /proc/<pid>/stat field 22); 0 when unknown,
 * UINT64_MAX when the process is gone or a zombie. */
static inline uint64_t mc_quota_proc_start(uint32_t pid) {
    char path[48], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT || errno == ESRCH ? UINT64_MAX : 0;
    ssize_t k = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (k <= 0) return 0;
    buf[k] = 0;
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ') return 0;
    p += 2;
    if (*p == 'Z' || *p == 'X') return UINT64_MAX;
    for (int field = 3; field < 22; field++) {   /* p is at field 3 (state) */
        p = strchr(p, ' ');
        if (!p) return 0;
        p++;
    }
    uint64_t v = 0;
    for (; *p >= '0' && *p <= '9'; p++) v = v * 10 + (uint64_t)(*p - '0');
    return v;
}

static inline uint64_t mc_quota_owner_word(uint32_t pid, uint64_t start) {
    return ((uint64_t)pid << 32) | (start & 0xffffffffULL);
}

/* Whether the owner recorded in `word` is gone: no such process, a zombie, or another process
 * with that pid (its start time differs). */
static inline int mc_quota_owner_dead(uint64_t word) {
    uint32_t pid = (uint32_t)(word >> 32);
    if (pid == 0) return 1;
    if (kill((pid_t)pid, 0) < 0 && errno == ESRCH) return 1;
    uint64_t st = mc_quota_proc_start(pid);
    if (st == UINT64_MAX) return 1;
    return st != 0 && (st & 0xffffffffULL) != (word & 0xffffffffULL);
}

/* Claim a slot on NIC entry `nic` for the owner word `me`: a free one, else one whose owner is
 * dead and which has not asked for MC_QUOTA_RECLAIM_NS.  Its sid, or -ENOSPC. */
static inline int32_t mc_quota_claim(const mc_quota_t *q, uint32_t nic, uint64_t me,
                                     uint32_t weight, uint32_t cls) {
    mc_quota_nic_t *e = mc_quota_nic(q, nic);
    if (weight == 0) weight = 1;
    if (weight > MC_QUOTA_MAX_WEIGHT) weight = MC_QUOTA_MAX_WEIGHT;
    for (int pass = 0; pass < 2; pass++) {      /* free slots first, then the dead */
        for (uint32_t i = 0; i < q->max_slots; i++) {
            mc_quota_slot_t *s = mc_quota_slot(q, nic, i);
            uint64_t w = atomic_load(&s->owner);
            if (pass == 0 ? w != 0 : w == 0) continue;
            if (pass == 1) {
                uint64_t seen = atomic_load(&s->seen_ns);
                if (seen && (int64_t)(mc_quota_now() - seen) < (int64_t)MC_QUOTA_RECLAIM_NS)
                    continue;
                if (!mc_quota_owner_dead(w)) continue;
            }
            if (!atomic_compare_exchange_strong(&s->owner, &w, me)) continue;
            atomic_store(&s->active, 0);
            atomic_store(&s->contended, 0);
            atomic_store(&s->seen_ns, 0);
            atomic_store(&s->weight, weight);
            atomic_store(&s->cls, cls);
            atomic_store(&s->bytes, 0);
            atomic_store(&s->waits, 0);
            atomic_store(&s->forced, 0);
            atomic_store(&s->wait_since, 0);
            atomic_store(&s->vt, atomic_load(&e->vclock));
            uint32_t hw = atomic_load(&e->hw);
            while (hw < i + 1 && !atomic_compare_exchange_weak(&e->hw, &hw, i + 1)) {}
            return (int32_t)(nic * q->max_slots + i);
        }
    }
    return -ENOSPC;
}

/* Give the slot back (only if `me` still owns it). */
static inline void mc_quota_release(const mc_quota_t *q, int32_t sid, uint64_t me) {
    mc_quota_slot_t *s = mc_quota_slot(q, (uint32_t)sid / q->max_slots, (uint32_t)sid % q->max_slots);
    atomic_store(&s->active, 0);
    atomic_store(&s->seen_ns, 0);
    atomic_compare_exchange_strong(&s->owner, &me, 0);
}

static inline void mc_quota_set_weight(const mc_quota_t *q, int32_t sid, uint32_t weight) {
    mc_quota_slot_t *s = mc_quota_slot(q, (uint32_t)sid / q->max_slots, (uint32_t)sid % q->max_slots);
    if (weight == 0) weight = 1;
    if (weight > MC_QUOTA_MAX_WEIGHT) weight = MC_QUOTA_MAX_WEIGHT;
    atomic_store(&s->weight, weight);
}

/* ---------- the hot path ---------- */

static inline void mc_quota_enter(const mc_quota_t *q, int32_t sid) {
    mc_quota_slot_t *s = mc_quota_slot(q, (uint32_t)sid / q->max_slots, (uint32_t)sid % q->max_slots);
    atomic_fetch_add_explicit(&s->active, 1, memory_order_relaxed);
}

static inline void mc_quota_leave(const mc_quota_t *q, int32_t sid) {
    mc_quota_slot_t *s = mc_quota_slot(q, (uint32_t)sid / q->max_slots, (uint32_t)sid % q->max_slots);
    uint32_t a = atomic_load_explicit(&s->active, memory_order_relaxed);
    while (a && !atomic_compare_exchange_weak(&s->active, &a, a - 1)) {}
}

/* How many bytes a window of slot `sid` should ask for at once (at least one job): the
 * quantum while others competed at its last ask, else no limit (alone, windows are as big as
 * without the quota). */
static inline uint64_t mc_quota_quantum(const mc_quota_t *q, int32_t sid) {
    mc_quota_slot_t *s = mc_quota_slot(q, (uint32_t)sid / q->max_slots, (uint32_t)sid % q->max_slots);
    return atomic_load_explicit(&s->contended, memory_order_relaxed) ? MC_QUOTA_QUANTUM
                                                                     : UINT64_MAX;
}

/* May slot `sid` send `bytes` now?  0: yes (charge them with mc_quota_charge); otherwise about
 * how many ns to wait before asking again (MC_QUOTA_WAIT_MIN..MAX). */
static inline uint64_t mc_quota_wait_ns(const mc_quota_t *q, int32_t sid, uint64_t bytes) {
    (void)bytes;
    uint32_t nic = (uint32_t)sid / q->max_slots, me = (uint32_t)sid % q->max_slots;
    mc_quota_nic_t *e = mc_quota_nic(q, nic);
    mc_quota_slot_t *s = mc_quota_slot(q, nic, me);
    uint64_t now = mc_quota_now();
    /* no hoarding: never more than `credit` behind the NIC's clock */
    uint64_t floor = atomic_load_explicit(&e->vclock, memory_order_relaxed) - q->credit;
    uint64_t vt = atomic_load_explicit(&s->vt, memory_order_relaxed);
    uint64_t last = atomic_load_explicit(&s->seen_ns, memory_order_relaxed);
    if (!last || (int64_t)(now - last) > (int64_t)MC_QUOTA_RESYNC_NS) {
        atomic_store_explicit(&s->vt, floor, memory_order_relaxed);   /* back after a while */
        vt = floor;
    }
    while (mc_vt_lt(vt, floor)) {
        if (atomic_compare_exchange_weak(&s->vt, &vt, floor)) { vt = floor; break; }
    }
    atomic_store_explicit(&s->seen_ns, now, memory_order_relaxed);
    uint32_t hw = atomic_load_explicit(&e->hw, memory_order_relaxed);
    if (hw > q->max_slots) hw = q->max_slots;
    uint64_t m = 0;
    int have = 0;
    for (uint32_t i = 0; i < hw; i++) {
        if (i == me) continue;
        mc_quota_slot_t *o = mc_quota_slot(q, nic, i);
        if (!atomic_load_explicit(&o->active, memory_order_relaxed)) continue;
        uint64_t seen = atomic_load_explicit(&o->seen_ns, memory_order_relaxed);
        if (!seen || (int64_t)(now - seen) > (int64_t)q->stale_ns) continue;
        if (!atomic_load_explicit(&o->owner, memory_order_relaxed)) continue;
        uint64_t ov = atomic_load_explicit(&o->vt, memory_order_relaxed);
        if (!have || mc_vt_lt(ov, m)) { m = ov; have = 1; }
    }
    if ((uint32_t)have != atomic_load_explicit(&s->contended, memory_order_relaxed))
        atomic_store_explicit(&s->contended, (uint32_t)have, memory_order_relaxed);
    if (have && mc_vt_lt(m + q->burst, vt)) {
        uint64_t since = atomic_load_explicit(&s->wait_since, memory_order_relaxed);
        if (!since || !last || (int64_t)(now - last) > (int64_t)q->stale_ns) {  /* a new streak */
            atomic_store_explicit(&s->wait_since, now, memory_order_relaxed);
        } else if (now - since >= q->max_wait_ns) {
            atomic_fetch_add_explicit(&s->forced, 1, memory_order_relaxed);
            goto grant;
        }
        atomic_fetch_add_explicit(&s->waits, 1, memory_order_relaxed);
        uint64_t ns = (vt - m - q->burst) / MC_QUOTA_SCALE;   /* ~1 B/ns: a guess, clamped */
        return ns < MC_QUOTA_WAIT_MIN ? MC_QUOTA_WAIT_MIN :
               ns > MC_QUOTA_WAIT_MAX ? MC_QUOTA_WAIT_MAX : ns;
    }
grant:
    if (atomic_load_explicit(&s->wait_since, memory_order_relaxed))
        atomic_store_explicit(&s->wait_since, 0, memory_order_relaxed);
    {   /* the clock follows the slowest competitor */
        uint64_t low = have && mc_vt_lt(m, vt) ? m : vt;
        uint64_t c = atomic_load_explicit(&e->vclock, memory_order_relaxed);
        while (mc_vt_lt(c, low) && !atomic_compare_exchange_weak(&e->vclock, &c, low)) {}
    }
    return 0;
}

/* Account `bytes` sent (or asked for, a READ) by slot `sid`. */
static inline void mc_quota_charge(const mc_quota_t *q, int32_t sid, uint64_t bytes) {
    mc_quota_slot_t *s = mc_quota_slot(q, (uint32_t)sid / q->max_slots, (uint32_t)sid % q->max_slots);
    uint32_t w = atomic_load_explicit(&s->weight, memory_order_relaxed);
    if (w == 0) w = 1;
    atomic_fetch_add_explicit(&s->vt, bytes * MC_QUOTA_SCALE / w, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->bytes, bytes, memory_order_relaxed);
}

/* Sleep up to `ns` in poll on `p` (events may be 0: a plain sleep); poll's return value. */
static inline int mc_quota_poll(struct pollfd *p, uint64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000ULL), (long)(ns % 1000000000ULL)};
    return ppoll(p, 1, &ts, NULL);
}

#endif
