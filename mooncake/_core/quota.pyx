# cython: language_level=3
"""Shared bandwidth quota kernel (mc_quota.h): the mapped table, joining, the ask/charge calls.

Opening, creating and validating the file is :mod:`mooncake.quota`'s job; a :class:`Table` is
handed a descriptor whose header was already checked, maps it and keeps its own copy of the
sizes (nothing read from the shared pages later can send an index outside the mapping).
"""

from libc.errno cimport ENOSPC
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from cpython.bytes cimport PyBytes_FromStringAndSize

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int PROT_READ
    int PROT_WRITE
    int MAP_SHARED
    void *MAP_FAILED

cdef extern from "<unistd.h>" nogil:
    int getpid()

cdef extern from "mc_quota.h" nogil:
    uint64_t MC_QUOTA_MAGIC
    uint32_t MC_QUOTA_VERSION
    uint32_t MC_QUOTA_HDR_SIZE
    int MC_QUOTA_NAME
    uint64_t MC_QUOTA_SCALE
    uint32_t MC_QUOTA_MAX_WEIGHT
    uint32_t MC_QUOTA_MAX_NICS
    uint32_t MC_QUOTA_MAX_SLOTS
    uint32_t MC_QUOTA_QUANTUM
    uint64_t MC_QUOTA_RECLAIM_NS
    ctypedef struct mc_quota_nic_t:
        uint64_t key
        uint64_t vclock
        uint32_t hw
        char name[40]
    ctypedef struct mc_quota_slot_t:
        uint64_t owner
        uint32_t weight
        uint32_t cls
        uint32_t active
        uint32_t contended
        uint64_t vt
        uint64_t seen_ns
        uint64_t bytes
        uint32_t waits
        uint32_t forced
    uint64_t mc_quota_now()
    uint64_t mc_quota_size(uint32_t max_nics, uint32_t max_slots)
    mc_quota_nic_t *mc_quota_nic(const mc_quota_t *q, uint32_t i)
    mc_quota_slot_t *mc_quota_slot(const mc_quota_t *q, uint32_t nic, uint32_t i)
    void mc_quota_format(void *base, uint32_t max_nics, uint32_t max_slots, uint64_t stale_ns,
                         uint64_t burst, uint64_t credit, uint64_t max_wait_ns)
    int32_t mc_quota_nic_find(const mc_quota_t *q, const char *name)
    uint64_t mc_quota_proc_start(uint32_t pid)
    uint64_t mc_quota_owner_word(uint32_t pid, uint64_t start)
    int mc_quota_owner_dead(uint64_t word)
    int32_t mc_quota_claim(const mc_quota_t *q, uint32_t nic, uint64_t me, uint32_t weight,
                           uint32_t cls)
    void mc_quota_release(const mc_quota_t *q, int32_t sid, uint64_t me)
    void mc_quota_set_weight(const mc_quota_t *q, int32_t sid, uint32_t weight)
    int mc_vt_lt(uint64_t a, uint64_t b)

MAGIC = MC_QUOTA_MAGIC
VERSION = MC_QUOTA_VERSION
HDR_SIZE = MC_QUOTA_HDR_SIZE
NIC_SIZE = sizeof(mc_quota_nic_t)
SLOT_SIZE = sizeof(mc_quota_slot_t)
NAME_MAX = MC_QUOTA_NAME - 1
SCALE = MC_QUOTA_SCALE
MAX_WEIGHT = MC_QUOTA_MAX_WEIGHT
MAX_NICS = MC_QUOTA_MAX_NICS
MAX_SLOTS = MC_QUOTA_MAX_SLOTS
QUANTUM = MC_QUOTA_QUANTUM
RECLAIM_S = MC_QUOTA_RECLAIM_NS / 1e9


def size_for(uint32_t max_nics, uint32_t max_slots):
    """Bytes of a table with these many NIC entries and slots per NIC."""
    return mc_quota_size(max_nics, max_slots)


def format_fd(int fd, uint32_t max_nics, uint32_t max_slots, uint64_t stale_ns, uint64_t burst,
              uint64_t credit, uint64_t max_wait_ns):
    """Write a fresh header into the zero-filled file ``fd`` (already sized)."""
    cdef size_t n = mc_quota_size(max_nics, max_slots)
    cdef void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if p == MAP_FAILED:
        raise OSError("mmap of the new quota table failed")
    mc_quota_format(p, max_nics, max_slots, stale_ns, burst, credit, max_wait_ns)
    munmap(p, n)


def owner_word(uint32_t pid=0):
    """This process's (or ``pid``'s) owner word: pid << 32 | low bits of its start time."""
    if pid == 0:
        pid = <uint32_t>getpid()
    return mc_quota_owner_word(pid, mc_quota_proc_start(pid))


def owner_dead(uint64_t word):
    return bool(mc_quota_owner_dead(word))


def now_ns():
    """CLOCK_MONOTONIC in ns (the clock of the slots' ``seen`` field)."""
    return mc_quota_now()


cdef int32_t _sid(Table t, int64_t sid) except -1:
    if sid < 0 or sid >= <int64_t>t.q.max_nics * t.q.max_slots:
        raise IndexError(f"slot id {sid} out of range")
    return <int32_t>sid


cdef class Table:
    """One process's mapping of a validated quota table."""

    def __cinit__(self, int fd, str path, uint64_t size, uint32_t max_nics, uint32_t max_slots,
                  uint64_t stale_ns, uint64_t burst, uint64_t credit, uint64_t max_wait_ns):
        self.mapped = False
        self.path = path
        if size != mc_quota_size(max_nics, max_slots):
            raise ValueError("quota table size does not match its geometry")
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise OSError(f"mmap of quota table {path} failed")
        self.q.base = <char *>p
        self.q.size = size
        self.q.max_nics = max_nics
        self.q.max_slots = max_slots
        self.q.stride = NIC_SIZE + <uint64_t>max_slots * SLOT_SIZE
        self.q.stale_ns = stale_ns
        self.q.burst = burst
        self.q.credit = credit
        self.q.max_wait_ns = max_wait_ns
        self.mapped = True

    def __dealloc__(self):
        if self.mapped:
            munmap(self.q.base, self.q.size)
            self.mapped = False

    @property
    def max_nics(self):
        return self.q.max_nics

    @property
    def max_slots(self):
        return self.q.max_slots

    @property
    def params(self):
        """``{stale_ns, burst, credit, max_wait_ns}`` this process uses (from the header)."""
        return {"stale_ns": self.q.stale_ns, "burst": self.q.burst, "credit": self.q.credit,
                "max_wait_ns": self.q.max_wait_ns}

    def nic(self, str name not None):
        """Index of the NIC entry ``name`` (claimed if new); -1 when the table is full."""
        cdef bytes b = name.encode()
        if not b or len(b) > NAME_MAX or b"\0" in b:
            raise ValueError(f"NIC key must be 1..{NAME_MAX} bytes without NUL: {name!r}")
        cdef const char *c = b
        cdef int32_t i
        with nogil:
            i = mc_quota_nic_find(&self.q, c)
        return -1 if i == -ENOSPC else i

    def claim(self, uint32_t nic, uint64_t owner, uint32_t weight, uint32_t cls=0):
        """Claim a slot on NIC entry ``nic`` (a free one, else a dead owner's); sid or -1."""
        if nic >= self.q.max_nics:
            raise IndexError("NIC index out of range")
        cdef int32_t sid
        with nogil:
            sid = mc_quota_claim(&self.q, nic, owner, weight, cls)
        return -1 if sid == -ENOSPC else sid

    def release(self, int64_t sid, uint64_t owner):
        mc_quota_release(&self.q, _sid(self, sid), owner)

    def set_weight(self, int64_t sid, uint32_t weight):
        mc_quota_set_weight(&self.q, _sid(self, sid), weight)

    def enter(self, int64_t sid):
        mc_quota_enter(&self.q, _sid(self, sid))

    def leave(self, int64_t sid):
        mc_quota_leave(&self.q, _sid(self, sid))

    def wait_ns(self, int64_t sid, uint64_t nbytes):
        """0: go now (then :meth:`charge`); else about how many ns to wait before asking again."""
        cdef int32_t s = _sid(self, sid)
        cdef uint64_t w
        with nogil:
            w = mc_quota_wait_ns(&self.q, s, nbytes)
        return w

    def charge(self, int64_t sid, uint64_t nbytes):
        mc_quota_charge(&self.q, _sid(self, sid), nbytes)

    def nics(self):
        """``[(index, name, vclock, high-water slots)]`` of the claimed NIC entries."""
        out = []
        cdef uint32_t i
        cdef mc_quota_nic_t *e
        for i in range(self.q.max_nics):
            e = mc_quota_nic(&self.q, i)
            if e.key == 0:
                continue
            name = PyBytes_FromStringAndSize(e.name, strnlen(e.name, MC_QUOTA_NAME - 1))
            name = name.decode(errors="replace")
            out.append((i, name, e.vclock, min(e.hw, self.q.max_slots)))
        return out

    def slot(self, int64_t sid):
        """A snapshot of one slot: owner pid, weight, class, active drives, whether others
        competed at its last ask, vt, seconds since its last ask (None: never), bytes charged,
        refusals, forced grants, and whether it competes now."""
        cdef int32_t s = _sid(self, sid)
        cdef mc_quota_slot_t *p = mc_quota_slot(&self.q, <uint32_t>s // self.q.max_slots,
                                                <uint32_t>s % self.q.max_slots)
        cdef uint64_t now = mc_quota_now()
        cdef uint64_t seen = p.seen_ns
        age = None if seen == 0 else <int64_t>(now - seen) / 1e9
        return {"sid": s, "pid": p.owner >> 32, "owner": p.owner, "weight": p.weight,
                "cls": p.cls, "active": p.active, "contended": bool(p.contended), "vt": p.vt,
                "age": age, "bytes": p.bytes,
                "waits": p.waits, "forced": p.forced,
                "competing": bool(p.owner and p.active and seen and
                                  <int64_t>(now - seen) <= <int64_t>self.q.stale_ns)}

    def slots(self, uint32_t nic):
        """Snapshots (:meth:`slot`) of NIC entry ``nic``'s claimed slots."""
        if nic >= self.q.max_nics:
            raise IndexError("NIC index out of range")
        cdef uint32_t hw = min(mc_quota_nic(&self.q, nic).hw, self.q.max_slots), i
        out = []
        for i in range(hw):
            d = self.slot(<int64_t>nic * self.q.max_slots + i)
            if d["owner"]:
                out.append(d)
        return out
