# cython: language_level=3
"""TCP data-path kernel: lanes (initiator) and the serve loop (target), all without the GIL."""

from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc
from libc.errno cimport EBUSY
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from mooncake._core.batch cimport Batch, Slices, mc_batch_t
from mooncake._core.quota cimport Table, mc_quota_t
from mooncake._core.regions cimport RegionTable, mc_regions_t


cdef extern from "mc_tcp.h" nogil:
    ctypedef struct mc_job_t:
        mc_batch_t *b
        uint64_t local
        uint64_t remote
        uint64_t len
        uint32_t task
        uint8_t op
        uint8_t ghost
    ctypedef struct mc_lane_t:
        int dead
        int32_t dead_err
        double spin
        double grace
        double poll_grace
        const mc_quota_t *quota
        int32_t qslot
        uint32_t seq
        int owned
    mc_lane_t *mc_lane_new(int fd)
    void mc_lane_free(mc_lane_t *l)
    void mc_lane_worker(mc_lane_t *l, double idle_timeout)
    void mc_lane_submit(mc_lane_t *l, mc_job_t *jobs, size_t n)
    int mc_lane_run(mc_lane_t *l, mc_job_t *jobs, size_t n, double timeout)
    int mc_lanes_run(mc_lane_t **lanes, size_t nl, mc_job_t *jobs, size_t n, double timeout)
    void mc_lane_release(mc_lane_t *l)
    void mc_lane_fail(mc_lane_t *l, int32_t err)
    void mc_lane_close(mc_lane_t *l, int32_t err)
    int mc_lane_usable(mc_lane_t *l)
    int mc_serve(int fd, mc_regions_t *regs, uint64_t max_frame, double frame_timeout,
                 double idle_timeout, double spin)


cdef class Lane:
    """One persistent connection to a peer's data port.

    Run :meth:`run_worker` in a thread of its own (it releases the GIL for its whole life): it
    drives queued jobs.  :meth:`close` stops it; :meth:`abort` fails what is left.
    """

    cdef mc_lane_t *l
    cdef readonly object sock
    cdef list _quotas   # every quota table this lane was given stays mapped while it lives

    def __cinit__(self, sock, double spin=0.0, double grace=2.0, double poll_grace=0.0,
                  bint held=False):
        self.sock = sock
        self.l = mc_lane_new(sock.fileno())
        if self.l == NULL:
            raise MemoryError()
        self.l.owned = 1 if held else 0   # held: jobs queue up until release()
        self.l.spin = spin
        self.l.grace = grace
        self.l.poll_grace = poll_grace if poll_grace < 10.0 else 10.0

    def __dealloc__(self):
        if self.l != NULL:
            mc_lane_free(self.l)
            self.l = NULL

    def set_quota(self, Table table, int32_t sid=-1):
        """Ask and charge slot ``sid`` of the shared quota ``table`` for every window this lane
        sends (None: no quota).  Set it before the lane's first transfer; a drive in progress
        keeps what it started with."""
        if table is None:
            self.l.quota = NULL
            return
        if sid < 0 or sid >= <int64_t>table.q.max_nics * table.q.max_slots:
            raise IndexError(f"quota slot id {sid} out of range")
        if self._quotas is None:
            self._quotas = []
        self._quotas.append(table)
        self.l.qslot = sid
        self.l.quota = &table.q

    @property
    def quota_slot(self):
        """The quota slot id this lane charges, or None."""
        return None if self.l.quota == NULL else self.l.qslot

    def release(self):
        """Start serving a lane created ``held`` (its connection handshake is done)."""
        with nogil:
            mc_lane_release(self.l)

    def run_worker(self, double idle_timeout):
        """Drive queued jobs until closed; a peer silent for ``idle_timeout`` s fails them."""
        with nogil:
            mc_lane_worker(self.l, idle_timeout)

    @property
    def dead(self):
        return bool(self.l.dead)

    @property
    def requests(self):
        """Requests sent on this lane so far (modulo 2**32)."""
        return self.l.seq

    def abort(self, int32_t err):
        """Fail everything queued or in flight with ``err`` and shut the socket down."""
        with nogil:
            mc_lane_fail(self.l, err)

    def close(self, int32_t err):
        """Ask the worker to stop, its work ending with ``err`` (join it, then ``abort``)."""
        with nogil:
            mc_lane_close(self.l, err)


cdef mc_job_t *_jobs(Slices s) except NULL:
    cdef mc_job_t *j = <mc_job_t *>PyMem_RawMalloc(max(s.n, 1) * sizeof(mc_job_t))
    if j == NULL:
        raise MemoryError()
    cdef Py_ssize_t i
    cdef mc_batch_t *b = s.batch.b
    for i in range(s.n):
        j[i].b = b
        j[i].task = s.task[i]
        j[i].op = s.op[i]
        j[i].local = s.local[i]
        j[i].remote = s.remote[i]
        j[i].len = s.length[i]
        j[i].ghost = 0
    return j


def submit(list lanes not None, Slices s not None, Py_ssize_t start=0):
    """Queue the slices on ``lanes`` round-robin, slice ``k`` to lane ``(start + k) % len``."""
    cdef Py_ssize_t nl = len(lanes), i, k, c
    if nl == 0:
        raise ValueError("no lanes")
    cdef mc_job_t *all_jobs = _jobs(s)
    cdef mc_job_t *mine = <mc_job_t *>PyMem_RawMalloc((s.n // nl + 1) * sizeof(mc_job_t))
    cdef Lane lane
    try:
        if mine == NULL:
            raise MemoryError()
        for i in range(nl):
            lane = lanes[(start + i) % nl]
            c = 0
            k = i
            while k < s.n:
                mine[c] = all_jobs[k]
                c += 1
                k += nl
            if c:
                with nogil:
                    mc_lane_submit(lane.l, mine, c)
    finally:
        PyMem_RawFree(mine)
        PyMem_RawFree(all_jobs)


def run(Lane lane not None, Slices s not None, double timeout):
    """Send and complete ``s`` on an idle lane from this thread; False if the lane is busy.

    Past ``timeout`` the batch is cancelled (its tasks end TIMEOUT) and what was already sent is
    drained within the lane's grace period, so the lane stays usable; a peer that does not answer
    within that loses the lane."""
    cdef mc_job_t *jobs = _jobs(s)
    cdef int rc
    try:
        with nogil:
            rc = mc_lane_run(lane.l, jobs, s.n, timeout)
    finally:
        PyMem_RawFree(jobs)
    return rc != -EBUSY


def run_spread(list lanes not None, Slices s not None, double timeout):
    """A synchronous call: its slices spread over the idle lanes, this thread driving the first
    part (see :func:`run`).  1: done here, every slice reported; 2: other lanes' workers run
    parts too (wait for the batch); 0: no lane was idle."""
    cdef Py_ssize_t nl = len(lanes), i
    if nl == 0:
        raise ValueError("no lanes")
    if nl > 64:
        raise ValueError("at most 64 lanes")
    cdef mc_lane_t *ls[64]
    cdef Lane lane
    for i in range(nl):
        lane = lanes[i]
        ls[i] = lane.l
    cdef mc_job_t *jobs = _jobs(s)
    cdef int rc
    try:
        with nogil:
            rc = mc_lanes_run(ls, nl, jobs, s.n, timeout)
    finally:
        PyMem_RawFree(jobs)
    return 0 if rc == -EBUSY else rc


def serve(int fd, RegionTable regions not None, uint64_t max_frame, double frame_timeout,
          double idle_timeout=0.0, double spin=0.0):
    """Serve one accepted data connection until it closes, or idles ``idle_timeout`` s (0 =
    forever); 0 ok, 1 protocol violation or stall (a frame not completed, or a reply not drained,
    within ``frame_timeout`` s), 2 an unregister cut a reply, <0 -errno."""
    cdef int rc
    with nogil:
        rc = mc_serve(fd, regions.t, max_frame, frame_timeout, idle_timeout, spin)
    return rc


def all_alive(list lanes not None):
    """True when every lane of the list is usable (a lane idle for a while is checked for a
    close by the peer)."""
    cdef Lane lane
    for lane in lanes:
        if not mc_lane_usable(lane.l):
            return False
    return True
