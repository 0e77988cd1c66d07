# cython: language_level=3
"""Batch table: per-task atomic counters, GIL-free wait, and slicing into C arrays."""

from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memset

from mooncake._core.regions cimport MC_REG_LOCAL_WRITE, RegionTable, mc_regions_acquire

#: slice error codes (mc_batch.h); 0 = ok, positive values below 1000 are errno numbers
E_REFUSED = MC_E_REFUSED
E_PEER = MC_E_PEER
E_TIMEOUT = MC_E_TIMEOUT
E_PROTO = MC_E_PROTO
E_LOCAL = MC_E_LOCAL
E_CLOSED = MC_E_CLOSED
E_UNREGISTERED = MC_E_UNREGISTERED
E_DENIED = MC_E_DENIED
E_CANCELED = MC_E_CANCELED
E_AUTH = MC_E_AUTH
#: the largest slice size the slicer takes (larger counts would overflow its arithmetic)
MAX_SLICE = 1 << 48

#: short names of the codes (``TaskStatus.code_name``)
CODE_NAMES = {
    MC_E_REFUSED: "REFUSED", MC_E_PEER: "PEER_LOST", MC_E_TIMEOUT: "TIMEOUT",
    MC_E_PROTO: "PROTOCOL", MC_E_LOCAL: "LOCAL", MC_E_CLOSED: "CLOSED",
    MC_E_UNREGISTERED: "UNREGISTERED", MC_E_DENIED: "DENIED", MC_E_CANCELED: "CANCELED",
    MC_E_AUTH: "AUTH",
}

ERROR_NAMES = {
    MC_E_REFUSED: "target refused the range (outside its registered memory)",
    MC_E_PEER: "connection to the peer was lost",
    MC_E_TIMEOUT: "aborted after the transfer timeout",
    MC_E_PROTO: "malformed response from the peer",
    MC_E_LOCAL: "refused locally before posting",
    MC_E_CLOSED: "the engine was closed while it was in flight",
    MC_E_UNREGISTERED: "the local memory was unregistered while in flight",
    MC_E_DENIED: "the target's region does not allow this access (read-only)",
    MC_E_CANCELED: "the batch was cancelled",
    MC_E_AUTH: "the peer refused our cluster token, or could not prove it (MC_CLUSTER_TOKEN)",
}


class SliceError(ValueError):
    """A request's local range cannot be used: ``index`` of the request, ``code``
    (``E_REFUSED``: not inside registered memory, ``E_DENIED``: the region is read-only)."""

    def __init__(self, index, code, addr, length):
        self.index, self.code, self.addr, self.length = index, code, addr, length
        why = ("is read-only (registered from a read-only buffer): it can be a WRITE source, "
               "not a READ destination" if code == MC_E_DENIED else
               "is not inside registered memory (register it first)")
        super().__init__("request %d: local range 0x%x+%d %s" % (index, addr, length, why))
STATUS_NAMES = ("WAITING", "PENDING", "INVALID", "CANCELED", "COMPLETED", "TIMEOUT", "FAILED")
OP_READ = 0
OP_WRITE = 1


cdef class SpinGauge:
    """How long synchronous waits of one kind took lately (an average over the last few), and
    the longest a wait may poll (``cap`` seconds; 0: never poll)."""
    cdef public double cap
    cdef public double avg

    def __cinit__(self, double cap):
        self.cap = cap if cap > 0 else 0.0
        self.avg = 0.0


cdef class Batch:
    """Completion counters of one batch of ``ntasks`` requests (owned by the engine)."""

    def __cinit__(self, uint32_t ntasks):
        self.total_bytes = 0
        self.priority = 0
        self.b = mc_batch_new(ntasks)
        if self.b == NULL:
            raise MemoryError("cannot allocate a batch of %d tasks" % ntasks)
        self.ntasks = ntasks

    def __dealloc__(self):
        if self.b != NULL:
            mc_batch_unref(self.b)
            self.b = NULL

    cdef int _check(self, uint32_t t) except -1:
        if t >= self.ntasks:
            raise IndexError("task %d out of range (batch has %d tasks)" % (t, self.ntasks))
        return 0

    def arm(self, uint32_t t, int64_t nslices):
        """Declare that task ``t`` will complete after ``nslices`` slices."""
        self._check(t)
        mc_task_arm(self.b, t, nslices)

    def slice_done(self, uint32_t t, int64_t nbytes, int32_t err=0):
        """Report one finished slice of task ``t`` (for transports written in Python)."""
        self._check(t)
        mc_slice_done(self.b, t, nbytes, err)

    def status(self, uint32_t t):
        """(status code, transferred bytes, error code) of task ``t``."""
        self._check(t)
        cdef mc_batch_t *b = self.b
        return (mc_task_status(b, t), mc_task_bytes(b, t), mc_task_error(b, t))

    def statuses(self):
        return [self.status(t) for t in range(self.ntasks)]

    def first_not_completed(self):
        """Index of the first task that is not COMPLETED, or -1 when all completed."""
        cdef uint32_t t
        for t in range(self.ntasks):
            if mc_task_status(self.b, t) != MC_COMPLETED:
                return t
        return -1

    @property
    def done(self):
        return mc_open_tasks(self.b) == 0

    def cancel(self, int32_t err=MC_E_CANCELED):
        """Stop the batch: slices not touched yet end with ``err``; those in a worker's hands
        stop at its next check.  The tasks end once every slice was reported (``wait``)."""
        mc_batch_cancel(self.b, err)

    def wait(self, double timeout, double spin=0.0):
        """Block (without the GIL) until all tasks finished, polling for ``spin`` seconds first
        (not on a thread with one CPU); False on timeout."""
        cdef int rc
        with nogil:
            rc = mc_batch_wait(self.b, timeout, spin)
        return rc == 0

    def wait_spun(self, double timeout, SpinGauge gauge not None):
        """:meth:`wait`, polling first for twice as long as the waits ``gauge`` saw lately (at
        most its cap); a wait that ends in time goes into its average."""
        cdef int rc
        cdef double t0, avg = gauge.avg
        cdef double spin = gauge.cap if avg <= 0 else min(gauge.cap, 2.0 * avg)
        with nogil:
            t0 = mc_now()
            rc = mc_batch_wait(self.b, timeout, spin)
            if rc == 0:
                t0 = mc_now() - t0
                gauge.avg = t0 if avg <= 0 else 0.875 * avg + 0.125 * t0
        return rc == 0


#: log2 buckets per histogram of a :class:`Meter`: bucket ``i`` counts values ``v <= 2**i``
#: (bucket 0: ``v <= 1``)
METER_BUCKETS = MC_M_BUCKETS
_OPS = ("read", "write")


cdef class Meter:
    """Transfer counters in C (mc_metrics.h): the engine keeps one per (transport, peer).

    A batch sliced with ``meter=`` counts its requests here: in flight from then on, and once
    more when each ends, by whichever kernel module reports its last slice, without the GIL.
    Batches keep the block alive until they are freed."""

    def __cinit__(self):
        self.m = mc_meter_new()
        if self.m == NULL:
            raise MemoryError("cannot allocate a meter")

    def __dealloc__(self):
        if self.m != NULL:
            mc_meter_unref(self.m)
            self.m = NULL

    def count_infeasible(self):
        """A batch whose deadline had already passed when it was submitted."""
        mc_meter_add(&self.m.infeasible, 1)

    def reject(self, uint8_t op, uint64_t n=1):
        """``n`` requests of opcode ``op`` that failed before any transport took them (the
        engine's validator refused them): requests and failures, no bytes."""
        mc_meter_arm(self.m, op & 1, n, 0)
        mc_meter_add(&self.m.op[op & 1].failures, n)

    def snapshot(self):
        """``{"read": {...}, "write": {...}, "infeasible": n}``; per opcode ``bytes``,
        ``requests``, ``completed``, ``failures``, ``inflight``, ``inflight_bytes``,
        ``latency_sum_ns`` and the log2 buckets ``latency_ns`` and ``size`` (lists of
        :data:`METER_BUCKETS` counts, not cumulative).  What ended is read before what was
        armed, so ``inflight`` is never negative."""
        cdef mc_meter_op_t *o
        cdef int k, i
        out = {}
        for k in range(2):
            o = &self.m.op[k]
            lat = [mc_meter_load(&o.lat[i]) for i in range(MC_M_BUCKETS)]
            size = [mc_meter_load(&o.size[i]) for i in range(MC_M_BUCKETS)]
            nbytes = mc_meter_load(&o.bytes)
            fails = mc_meter_load(&o.failures)
            failed_bytes = mc_meter_load(&o.failed_bytes)
            lat_sum = mc_meter_load(&o.lat_sum_ns)
            ok = sum(lat)
            armed_bytes = mc_meter_load(&o.armed_bytes)
            armed = mc_meter_load(&o.armed)
            out[_OPS[k]] = {
                "bytes": nbytes, "requests": ok + fails, "completed": ok, "failures": fails,
                "inflight": max(0, armed - ok - fails),
                "inflight_bytes": max(0, armed_bytes - nbytes - failed_bytes),
                "latency_sum_ns": lat_sum, "latency_ns": lat, "size": size,
            }
        out["infeasible"] = mc_meter_load(&self.m.infeasible)
        return out


def meter_bucket(uint64_t v):
    """The log2 bucket a :class:`Meter` counts ``v`` (ns or bytes) in."""
    return mc_meter_bucket(v)


cdef class Slices:
    """Slices of one batch as C arrays: task index, opcode, local/remote address, length.

    Built by :func:`slice_requests`; iterate it to get ``(task, op, local, remote, length)``.
    """

    def __cinit__(self):
        self.n = 0
        self.local = NULL

    def __dealloc__(self):
        if self.local != NULL:  # the start of the one block holding every array
            PyMem_RawFree(self.local)
            self.local = NULL

    cdef int _alloc(self, Py_ssize_t n) except -1:
        # one block: the three u64 arrays, then u32 tasks, then u8 ops
        cdef size_t sz = <size_t>n * (3 * sizeof(uint64_t) + sizeof(uint32_t) + 1) + 8
        cdef char *p = <char *>PyMem_RawMalloc(sz)
        if p == NULL:
            raise MemoryError()
        self.local = <uint64_t *>p
        self.remote = self.local + n
        self.length = self.remote + n
        self.task = <uint32_t *>(self.length + n)
        self.op = <uint8_t *>(self.task + n)
        self.n = n
        return 0

    @property
    def batch(self):
        return self.batch

    def __len__(self):
        return self.n

    def head(self):
        """``(local, remote, length)`` of the first slice (what a transport picks a path by),
        or None when there is none."""
        if self.n == 0:
            return None
        return (self.local[0], self.remote[0], self.length[0])

    def __iter__(self):
        cdef Py_ssize_t i
        for i in range(self.n):
            yield (self.task[i], self.op[i], self.local[i], self.remote[i], self.length[i])

    def fail_all(self, int32_t err):
        """Complete every slice with ``err`` (a transport could not post them)."""
        cdef Py_ssize_t i
        cdef mc_batch_t *b = self.batch.b
        with nogil:
            for i in range(self.n):
                mc_slice_done(b, self.task[i], 0, err)


cdef inline int64_t _count(uint64_t length, uint64_t slice_size, uint64_t frag) nogil:
    if length <= slice_size + frag:
        return 1
    cdef int64_t n = <int64_t>(length // slice_size)
    if length % slice_size > frag:
        n += 1
    return n


cdef inline int32_t _pin(Batch batch, RegionTable regions, uint32_t task, uint8_t op,
                         uint64_t local, uint64_t length) noexcept nogil:
    """Pin task ``task``'s local region (writable for a READ); 0 or why not."""
    cdef int32_t err = 0
    cdef mc_reg_t *r = mc_regions_acquire(regions.t, local, length,
                                          MC_REG_LOCAL_WRITE if op == 0 else 0, &err)  # 0: READ
    if r != NULL:
        mc_task_pin(batch.b, task, r)
    return err


def slice_requests(Batch batch not None, op, local, remote, length, uint64_t slice_size,
                   uint64_t fragment_ratio, RegionTable regions=None, uint32_t first_task=0,
                   Meter meter=None):
    """Cut requests into slices and arm the batch's tasks.

    ``op`` is one opcode (0 READ, 1 WRITE) or a sequence; ``local``, ``remote``, ``length`` are
    equal-length sequences (lists or NumPy arrays).  A request's tail of at most
    ``slice_size / fragment_ratio`` bytes merges into its previous slice.  Request ``i`` is task
    ``first_task + i``.  With ``meter``, the batch's requests are counted there (once per batch:
    call it with the batch's last requests).
    """
    cdef const uint64_t[:] lv = _u64(local)
    cdef const uint64_t[:] rv = _u64(remote)
    cdef const uint64_t[:] nv = _u64(length)
    cdef Py_ssize_t nreq = lv.shape[0], i, j, total = 0
    if rv.shape[0] != nreq or nv.shape[0] != nreq:
        raise ValueError("local, remote and length must have equal lengths")
    if first_task + nreq > batch.ntasks:
        raise ValueError("batch has %d tasks, got %d requests" % (batch.ntasks, nreq))
    if slice_size == 0 or slice_size > MAX_SLICE:
        raise ValueError("slice_size must be in 1..2**48, got %d" % slice_size)
    cdef uint64_t frag = slice_size // fragment_ratio if fragment_ratio else 0
    cdef const uint8_t[:] opv
    cdef uint8_t op_one = 0
    cdef bint many_ops = not isinstance(op, int)
    if many_ops:
        opv = _u8(op)
        if opv.shape[0] != nreq:
            raise ValueError("op must be one opcode or one per request")
    else:
        op_one = op
    cdef int32_t err = 0
    if regions is not None:  # every task pins its local region, or none does
        with nogil:
            for i in range(nreq):
                err = _pin(batch, regions, <uint32_t>(first_task + i),
                           opv[i] if many_ops else op_one, lv[i], nv[i])
                if err:
                    for j in range(i):
                        mc_task_pin(batch.b, <uint32_t>(first_task + j), NULL)
                    break
        if err:
            raise SliceError(i, err, lv[i], nv[i])
    for i in range(nreq):
        total += _count(nv[i], slice_size, frag)
    cdef Slices s = Slices.__new__(Slices)
    s.batch = batch
    s._alloc(total)
    cdef int64_t cnt
    cdef uint64_t off, ln
    cdef Py_ssize_t k = 0
    with nogil:
        for i in range(nreq):
            cnt = _count(nv[i], slice_size, frag)
            mc_task_arm_req(batch.b, <uint32_t>(first_task + i), cnt,
                            opv[i] if many_ops else op_one, nv[i])
            off = 0
            for j in range(cnt):
                ln = slice_size if j < cnt - 1 else nv[i] - off
                s.task[k] = <uint32_t>(first_task + i)
                s.op[k] = opv[i] if many_ops else op_one
                s.local[k] = lv[i] + off
                s.remote[k] = rv[i] + off
                s.length[k] = ln
                off += ln
                k += 1
    if meter is not None and mc_batch_meter(batch.b, meter.m) != 0:
        raise ValueError("the batch already has a meter")
    return s


def _u64(x):
    import numpy as np
    return np.ascontiguousarray(x, dtype=np.uint64)


def _u8(x):
    import numpy as np
    return np.ascontiguousarray(x, dtype=np.uint8)


def slice_one(Batch batch not None, uint8_t op, uint64_t local, uint64_t remote,
              uint64_t length, uint64_t slice_size, uint64_t fragment_ratio,
              RegionTable regions=None, Meter meter=None):
    """:func:`slice_requests` for a single request (task 0), without array conversions."""
    if slice_size == 0 or slice_size > MAX_SLICE:
        raise ValueError("slice_size must be in 1..2**48, got %d" % slice_size)
    cdef int32_t err = 0
    if regions is not None:
        err = _pin(batch, regions, 0, op, local, length)
        if err:
            raise SliceError(0, err, local, length)
    cdef uint64_t frag = slice_size // fragment_ratio if fragment_ratio else 0
    cdef int64_t cnt = _count(length, slice_size, frag), j
    cdef Slices s = Slices.__new__(Slices)
    s.batch = batch
    s._alloc(cnt)
    mc_task_arm_req(batch.b, 0, cnt, op, length)
    cdef uint64_t off = 0, ln
    for j in range(cnt):
        ln = slice_size if j < cnt - 1 else length - off
        s.task[j] = 0
        s.op[j] = op
        s.local[j] = local + off
        s.remote[j] = remote + off
        s.length[j] = ln
        off += ln
    if meter is not None and mc_batch_meter(batch.b, meter.m) != 0:
        raise ValueError("the batch already has a meter")
    return s
