"""``shm``: same-host transfers at memcpy speed, to any registered memory of the peer.

How a peer's buffer is reached (decided once per descriptor, not per slice):

* a managed buffer (its descriptor carries ``shm_name``, ``/proc/<pid>/fd/<n>`` of a memfd the
  peer sealed against shrinking) is mapped here once (relocation cache: peer address → local
  mapping) and copied with ``memcpy``;
* any other CPU buffer (NumPy arrays, bytearrays, mmaps, an unsealed or foreign file) is copied
  by cross-memory attach (``process_vm_readv``/``process_vm_writev`` on the peer's pid), which
  returns EFAULT where memory vanished instead of raising SIGBUS;
* our own segment is copied directly.

**Descriptors are data from strangers.**  Every path a peer publishes must be
``/proc/<pid>/fd/<n>`` of the peer's *proven* pid; it is ``stat``-ed before it is opened (regular
files only: a FIFO or device is never opened), opened ``O_NONBLOCK|O_CLOEXEC`` and ``fstat``-ed
for its size before it is mapped, and mapped only when ``F_GET_SEALS`` shows it cannot shrink.
"Same host, same process" is never taken from fields: the initiator opens the peer's control
page, calls ``shm.prove`` on the peer's RPC port with a fresh nonce, and trusts pid and page only
when the nonce comes back through that page (a descriptor that copies another engine's pid/page,
ours included, fails here and the engine falls back to another transport).  A token read by
cross-memory attach also checks that the pid is the peer in our pid namespace and that the
kernel lets us attach (EPERM is reported by :meth:`ShmTransport.can_reach`).

**Control page** (a sealed memfd, ``/proc/<pid>/fd/<fd>``): a read-only part for peers (magic,
pid, alive word, token, the nonces of ``shm.prove``, one registration slot per buffer) and a part
peers map writable: one lane per initiator process (claimed by compare-and-swap of its pid) of
per-slot *busy* counters.  Each copy chunk (≤ 1 MiB) runs as ``busy++ → re-check the slot →
copy → busy--`` (seq_cst), so :meth:`ShmTransport.unregister` can release the slot and then wait
(without the GIL, up to ``MC_TRANSFER_TIMEOUT``) until every lane's counter was seen at 0 or its
process exited: after it returns, no peer's copy touches the region.  A peer that stays inside a
chunk past the timeout (e.g. stopped by SIGSTOP) makes ``unregister`` raise
:class:`~mooncake.errors.TransferTimeout`; the memory must then not be freed.

Honest limit: processes of the same user can attach to each other anyway (ptrace,
``process_vm_writev``, ``/proc/<pid>/mem``); the page and the protocol keep well-behaved peers
silent and make stale or forged descriptors fail, they do not sandbox a hostile process of the
same user.  Peers that another user runs cannot open our pages or attach at all.

Knobs: ``transports/shm/enable``; ``transports/shm/async_memcpy_threshold`` (KiB, TENT's unit:
a call of at most that many bytes is copied by the calling thread alone; a larger synchronous
call is split between the caller and the workers, a larger asynchronous one is queued for the
workers); ``MC_WORKERS_PER_CTX`` worker threads;
``MC_TRANSFER_TIMEOUT`` bounds the unregister wait and the proof RPC.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from mooncake._core import batch as _batch
from mooncake._core import copy as kc
from mooncake.errors import TransferTimeout, TransportUnavailable
from mooncake.fields import Field, FieldError, check_fields
from mooncake.memory import seal_memfd
from mooncake.options import Option
from mooncake.transport import Region, SegmentDesc, Transport, TransportContext

if TYPE_CHECKING:
    from mooncake._core.batch import Slices

__all__ = ["ShmTransport", "ControlPage", "PROC_FD"]

log = logging.getLogger(__name__)

E_PEER = _batch.E_PEER

PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT
#: the only form of path a peer may publish: an fd of its own process
PROC_FD = re.compile(r"/proc/([1-9][0-9]{0,6})/fd/([0-9]{1,9})")

# control page layout (byte offsets); peers map [0, OFF_OWNERS) read-only
MAGIC = int.from_bytes(b"MCSHMCT2", "little")
OFF_MAGIC, OFF_PID, OFF_ALIVE, OFF_TOKEN = 0, 8, 16, 24
OFF_NONCES, NNONCES = 1024, 128  # shm.prove answers (u64 each), round robin
OFF_SLOTS, NSLOTS = 8192, 8192  # registration slots: odd = registered, (gen << 1) | 1
OFF_OWNERS = 128 << 10  # writable by peers: lane k's owner pid (u64), claimed by CAS
NLANES = 256
OFF_BUSY = OFF_OWNERS + (64 << 10)  # writable by peers: lane k = one u32 busy counter per slot
LANE_SIZE = 64 << 10  # 32 KiB used, padded so every lane maps on any page size up to 64 KiB
CTL_SIZE = OFF_BUSY + NLANES * LANE_SIZE
assert OFF_SLOTS + 8 * NSLOTS <= OFF_OWNERS and 8 * NLANES <= OFF_BUSY - OFF_OWNERS
assert 4 * NSLOTS <= LANE_SIZE

PR_SET_PTRACER = 0x59616D61
PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


#: the rows of the configuration table this transport reads
OPTIONS: tuple[Option, ...] = (
    # ---- SHM -------------------------------------------------------------------------------------
    Option("transports/shm/enable", bool, True, tent="transports/shm/enable", owner="shm",
           doc="TENT: enable the same-host shared-memory transport",
           hint="enable for same-node transfers",
           reads=("transports/shm.py",)),
    Option("transports/shm/async_memcpy_threshold", int, 64,
           tent="transports/shm/async_memcpy_threshold", range=(0, 1 << 20), unit="KiB",
           owner="shm",
           doc="KiB, TENT's unit (its copy transports read value x 1024): a call of at most this "
               "many bytes is copied by the calling thread; a larger synchronous call is split "
               "between the caller and the workers, a larger asynchronous one queued for them",
           hint="larger values keep more transfers on the calling thread (lowest latency, one "
                "core); 0 always involves the workers",
           reads=("transports/shm.py", "transports/cxl.py")),
)


class _NotUsable(Exception):
    """Why a peer's page or buffer cannot be used (the message is the reason)."""


class ControlPage:
    """Our control page: created at start, closed at close."""

    def __init__(self) -> None:
        # a memfd, published as /proc/<pid>/fd/<fd>: peers that may attach to us can open it,
        # and it vanishes with the process (nothing leaks in /dev/shm after a crash); sealed so
        # that no one can shrink it under a peer's mapping
        fd = os.memfd_create(f"mooncake_{os.getpid()}_ctl", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, CTL_SIZE)
            if not seal_memfd(fd):
                log.warning("shm: cannot seal the control page; peers will refuse to map it")
            self.map = kc.Mapping.from_fd(fd, CTL_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.name = f"/proc/{os.getpid()}/fd/{fd}"
        self.token = secrets.randbits(63) | 1
        m = self.map
        m.store_u64(OFF_PID, os.getpid())
        m.store_u64(OFF_TOKEN, self.token)
        m.store_u64(OFF_ALIVE, 1)
        m.store_u64(OFF_MAGIC, MAGIC)
        self._gens = [0] * NSLOTS
        self._free = list(range(NSLOTS - 1, -1, -1))
        self._lock = threading.Lock()
        self._next_nonce = 0

    @property
    def token_addr(self) -> int:
        return self.map.addr + OFF_TOKEN

    def claim(self) -> tuple[int, int] | None:
        """A registration slot and its value (odd = registered), or None when all are used."""
        with self._lock:
            if not self._free:
                return None
            i = self._free.pop()
            self._gens[i] += 1
            val = (self._gens[i] << 1) | 1
        self.map.store_u64(OFF_SLOTS + 8 * i, val)
        return i, val

    def release(self, slot: int) -> None:
        """Mark the slot unregistered (seq_cst): chunks that start from now on copy nothing."""
        with self._lock:
            self.map.store_u64(OFF_SLOTS + 8 * slot, self._gens[slot] << 1)

    def free(self, slot: int) -> None:
        """Let a released slot, whose waiters are gone, be claimed again."""
        with self._lock:
            self._free.append(slot)

    def post_nonce(self, nonce: int) -> int:
        """Write a prover's nonce where peers can read it; its index."""
        with self._lock:
            at = self._next_nonce
            self._next_nonce = (at + 1) % NNONCES
            self.map.store_u64(OFF_NONCES + 8 * at, nonce)
        return at

    def wait_idle(self, slot: int, timeout: float) -> list[int]:
        """After :meth:`release`: wait until no peer is inside a chunk on ``slot`` (each lane's
        counter seen at 0, or its owner exited).  The pids still inside at ``timeout``."""
        m = self.map
        lanes, fds, pids = [], [], []
        try:
            for k in range(NLANES):
                owner = m.load_u64(OFF_OWNERS + 8 * k)
                if not 0 < owner <= PID_MAX or not m.load_u32(OFF_BUSY + k * LANE_SIZE + 4 * slot):
                    continue
                fd = _pidfd(owner)
                if fd is None:
                    continue  # exited: it cannot copy any more
                lanes.append(k)
                fds.append(fd)
                pids.append(owner)
            if not lanes:
                return []
            left = kc.wait_busy(m, OFF_BUSY, LANE_SIZE, 4 * slot, lanes, fds, timeout)
            return [pids[lanes.index(k)] for k in left]
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def close(self) -> None:
        if self.map.closed:
            return
        self.map.store_u64(OFF_ALIVE, 0)
        self.map.close()
        os.close(self.fd)


def _pidfd(pid: int) -> int | None:
    """A pidfd of ``pid``; None when it does not exist, -1 when pidfds are unavailable."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except (OSError, AttributeError):
        return -1


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _check_proc_path(path: object, pid: int, what: str) -> str:
    if not isinstance(path, str) or (m := PROC_FD.fullmatch(path)) is None:
        raise _NotUsable(f"the peer's {what} {str(path)[:80]!r} is not /proc/<pid>/fd/<n>")
    if int(m[1]) != pid:
        raise _NotUsable(f"the peer's {what} {path} is not an fd of the peer's pid {pid}")
    return path


def _open_peer_file(path: str, length: int, writable: bool) -> tuple[int, os.stat_result]:
    """Open a file a peer published: regular only (stat first, so FIFOs and devices are never
    opened), O_NONBLOCK|O_CLOEXEC, at least ``length`` bytes.  ``_NotUsable`` or OSError."""
    st = os.stat(path)  # follows the /proc magic link to the peer's file, opens nothing
    if not stat.S_ISREG(st.st_mode):
        raise _NotUsable(f"{path} is {_kind(st.st_mode)}")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _NotUsable(f"{path} is {_kind(st.st_mode)}")
        if st.st_size < length:
            raise _NotUsable(f"{path} holds {st.st_size} bytes, the peer publishes {length}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _size_sealed(fd: int) -> bool:
    """True when the file cannot shrink under a mapping (sealed memfd)."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:  # not a memfd/shmem file
        return False


# lanes this process claimed in peers' control pages, by the page's (st_dev, st_ino): every
# transport of the process shares one lane per peer (one pid, one liveness)
_lanes: dict[tuple[int, int], int] = {}
_lanes_lock = threading.Lock()


def _claim_lane(fd: int, ident: tuple[int, int]) -> tuple[int, kc.Mapping]:
    """Our lane in the peer's page open at ``fd`` and the writable mapping of its counters."""
    me = os.getpid()
    with _lanes_lock:
        owners = kc.Mapping.from_fd(fd, 8 * NLANES, OFF_OWNERS, True)
        try:
            lane = _lanes.get(ident)
            if lane is None or owners.load_u64(8 * lane) != me:
                lane, used = _take_lane(owners, me)
                _lanes[ident] = lane
                busy = kc.Mapping.from_fd(fd, LANE_SIZE, OFF_BUSY + lane * LANE_SIZE, True)
                if used:
                    busy.zero(0, LANE_SIZE)  # an exited owner's leftovers; the lane is ours now
                return lane, busy
        finally:
            owners.close()
    return lane, kc.Mapping.from_fd(fd, LANE_SIZE, OFF_BUSY + lane * LANE_SIZE, True)


def _take_lane(owners: kc.Mapping, me: int) -> tuple[int, bool]:
    """A lane for pid ``me``, and whether an earlier owner may have left counters in it."""
    for k in range(NLANES):
        if owners.load_u64(8 * k) == me:
            return k, True  # a process that had our pid before us
    for k in range(NLANES):
        if owners.cas_u64(8 * k, 0, me):
            return k, False  # never used: lanes are not given back while their owner lives
    for k in range(NLANES):  # reclaim a lane whose process exited
        owner = owners.load_u64(8 * k)
        fd = _pidfd(owner) if 0 < owner <= PID_MAX else None
        if fd is None:
            if owners.cas_u64(8 * k, owner, me):
                return k, True
        elif fd >= 0:
            os.close(fd)
    raise _NotUsable(f"all {NLANES} initiator lanes of the peer's control page are in use")


@dataclass(eq=False)
class _Link:
    """What we know about one same-host peer."""

    pid: int
    ctl: kc.Mapping | None
    handle: kc.Peer | None
    reason: str | None = None
    busy: kc.Mapping | None = None
    who: tuple = ()
    key: tuple = ()
    table: kc.Table | None = None
    maps: dict[tuple, kc.Mapping] = field(default_factory=dict)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        self.table = None
        for m in (self.ctl, self.busy):
            if m is not None:
                m.close()


def _failed(reason: str, pid: int = 0) -> _Link:
    return _Link(pid, None, None, reason)


class ShmTransport(Transport):
    """Same-host transport: mapped shm buffers and cross-memory attach, on the copy kernel."""

    name: ClassVar[str] = "shm"
    options: ClassVar[tuple[Option, ...]] = OPTIONS
    auto_priority: ClassVar[int] = 10
    same_host_only: ClassVar[bool] = True
    memory_kinds: ClassVar[frozenset[str]] = frozenset({"cpu", "cxl"})
    segment_fields: ClassVar[dict[str, Field]] = {
        "ctl": Field("str", max_len=32, pattern=PROC_FD.pattern),
        "pid": Field("int", 1, PID_MAX),
        "token_addr": Field("int", 1, (1 << 64) - 8),
    }
    buffer_fields: ClassVar[dict[str, Field]] = {
        "slot": Field("int", 0, NSLOTS - 1),
        "gen": Field("int", 1, (1 << 63) - 1),
    }

    @classmethod
    def probe(cls) -> str | None:
        if not os.path.exists("/proc/self/ns/net"):
            return "needs Linux (process_vm_readv, /proc)"
        if not hasattr(os, "memfd_create"):
            return "needs memfd_create"
        return None

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.enabled = cfg["transports/shm/enable"]
        self.inline_max = cfg["transports/shm/async_memcpy_threshold"] * 1024  # KiB, as TENT
        self.nworkers = cfg["MC_WORKERS_PER_CTX"]
        #: TENT's grace period: idle copy workers poll this long before they sleep
        self.grace = cfg["transports/rdma/workers/grace_period_ns"] / 1e9
        self.timeout = float(cfg["MC_TRANSFER_TIMEOUT"])
        self.pool: kc.CopyPool | None = None
        self.ctl: ControlPage | None = None
        self._slots: dict[int, int] = {}  # region addr -> slot
        self._links: dict[str, _Link] = {}
        #: peer name -> (the descriptor object, its link, its table) of the last transfer: a
        #: repeated call with the same descriptor skips the checks and the lock
        self._last: dict[str, tuple[SegmentDesc, _Link, kc.Table]] = {}
        self._connecting: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> dict:
        if not self.enabled:
            raise TransportUnavailable("shm is disabled by transports/shm/enable=false")
        self.ctl = ControlPage()
        self.pool = kc.CopyPool(self.nworkers, self.grace)
        if self.ctx.add_rpc_handler is not None:
            self.ctx.add_rpc_handler("shm.prove", self._on_prove)
        _allow_attach()
        return {"ctl": self.ctl.name, "token_addr": self.ctl.token_addr, "pid": os.getpid()}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close(_batch.E_CLOSED)  # queued copies end FAILED: closed
            self.pool = None
        with self._lock:
            links = list(self._links.values())
            self._links.clear()
            self._last.clear()
        for link in links:
            link.close()
        ctl = self.ctl
        if ctl is not None:
            self.ctl = None
            ctl.map.store_u64(OFF_ALIVE, 0)  # peers' next chunk fails (MC_E_PEER)
            slots, self._slots = list(self._slots.values()), {}
            deadline = time.monotonic() + self.timeout
            for slot in slots:
                ctl.release(slot)
            for slot in slots:
                stuck = ctl.wait_idle(slot, max(0.0, deadline - time.monotonic()))
                if stuck:
                    log.error("shm: closing while peer process(es) %s still copy into a "
                              "registered buffer (slot %d) after %.0fs", stuck, slot, self.timeout)
            ctl.close()

    # -- registration --------------------------------------------------------------------------

    def register(self, region: Region) -> dict | None:
        if self.ctl is None:
            return None
        got = self.ctl.claim()
        if got is None:
            log.warning("shm: all %d registration slots are used; 0x%x is not reachable over shm",
                        NSLOTS, region.addr)
            return None
        self._slots[region.addr] = got[0]
        return {"slot": got[0], "gen": got[1]}

    def unregister(self, region: Region) -> None:
        """Release the region's slot, then wait (up to ``MC_TRANSFER_TIMEOUT``, without the GIL)
        until no peer is inside a copy chunk on it.  Copies we started ourselves are the
        engine's business (it waits for the tasks pinning the region).  Raises
        :class:`TransferTimeout` when a live peer is still inside a chunk: the memory must not be
        freed then."""
        slot = self._slots.pop(region.addr, None)
        ctl = self.ctl
        if slot is None or ctl is None:
            return
        ctl.release(slot)
        stuck = ctl.wait_idle(slot, self.timeout)
        if stuck:
            raise TransferTimeout(
                f"shm: peer process(es) {stuck} are still copying into 0x{region.addr:x}+"
                f"{region.length} {self.timeout:g}s (MC_TRANSFER_TIMEOUT) after it was "
                "unregistered; the memory must not be freed yet")
        ctl.free(slot)

    # -- the proof -----------------------------------------------------------------------------

    def _on_prove(self, args: dict) -> dict:
        """``shm.prove``: write the caller's nonce into our control page; where it is."""
        nonce = args.get("nonce") if isinstance(args, dict) else None
        if type(nonce) is not int or not 0 < nonce < 1 << 63:
            raise ValueError("shm.prove needs a nonce in 1..2**63-1")
        ctl = self.ctl
        if ctl is None:
            raise RuntimeError("shm is closed")
        return {"at": ctl.post_nonce(nonce)}

    def _prove(self, peer: SegmentDesc, ctl: kc.Mapping, path: str) -> None:
        if self.ctx.rpc_call is None:
            raise _NotUsable("cannot prove the peer's identity: this transport has no RPC")
        nonce = secrets.randbits(63) | 1
        try:
            reply = self.ctx.rpc_call(peer.name, "shm.prove", {"nonce": nonce},
                                      min(self.timeout, 10.0))
        except Exception as e:  # noqa: BLE001 - any failure means "not proven"
            raise _NotUsable(f"the peer did not answer the shm proof: {e}") from None
        at = reply.get("at") if isinstance(reply, dict) else None
        if type(at) is not int or not 0 <= at < NNONCES:
            raise _NotUsable(f"the peer answered the shm proof with {str(reply)[:80]!r}")
        if ctl.load_u64(OFF_NONCES + 8 * at) != nonce:
            raise _NotUsable(f"the engine at {peer.name} failed the shm proof: the control page "
                             f"{path} is not its own (a descriptor copying another engine's pid "
                             "and control page?)")

    # -- reachability --------------------------------------------------------------------------

    def can_reach(self, peer: SegmentDesc) -> str | None:
        if not self.enabled or self.ctl is None:
            return "shm is disabled (transports/shm/enable=false) or not started"
        if "shm" not in peer.transports:
            return "peer does not publish shm"
        if not peer.host_id or peer.host_id != self.ctx.host_id:
            return (f"peer is on another host or network namespace (host_id {peer.host_id!r} "
                    f"!= ours {self.ctx.host_id!r})")
        link = self._link(peer)
        if link.reason:
            return link.reason
        if link.handle is not None and not link.handle.alive:
            return f"peer process {link.pid} has exited or closed its engine"
        return None

    def _fresh(self, link: _Link | None, who: tuple, peer: SegmentDesc) -> bool:
        return link is not None and link.who == who and (
            link.reason is None or link.key == _ident(peer))

    def _link(self, peer: SegmentDesc) -> _Link:
        info = peer.transports.get("shm")
        info = info if isinstance(info, dict) else {}
        who = (repr(info.get("pid")), repr(info.get("ctl")), repr(info.get("token_addr")))
        with self._lock:
            link = self._links.get(peer.name)
            if self._fresh(link, who, peer):
                return link
            connecting = self._connecting.setdefault(peer.name, threading.Lock())
        with connecting:  # one proof per peer at a time; no transport-wide lock across the peer
            with self._lock:
                link = self._links.get(peer.name)
                if self._fresh(link, who, peer):
                    return link
            new = self._connect(peer, info)
            new.who, new.key = who, _ident(peer)
            with self._lock:
                old = self._links.get(peer.name)
                self._links[peer.name] = new
            if old is not None:
                old.close()  # queued copies keep what they use mapped (refcounts)
            return new

    def _connect(self, peer: SegmentDesc, info: dict) -> _Link:
        try:
            check_fields(info, self.segment_fields, "transports.shm")
        except FieldError as e:
            return _failed(f"peer's shm descriptor is malformed: {e}")
        pid, name = info["pid"], info["ctl"]
        ctl = busy = None
        try:
            _check_proc_path(name, pid, "control page")
            try:
                fd, st = _open_peer_file(name, CTL_SIZE, writable=True)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM):
                    raise _NotUsable(_attach_reason(pid, errno.EPERM)) from None
                raise _NotUsable(f"cannot open the peer's shm control page {name}: "
                                 f"{e.strerror or e}") from None
            try:
                if not _size_sealed(fd):
                    raise _NotUsable(f"the peer's control page {name} is not a memfd sealed "
                                     "against shrinking")
                ctl = kc.Mapping.from_fd(fd, OFF_OWNERS, 0, False)
                if ctl.load_u64(OFF_MAGIC) != MAGIC or ctl.load_u64(OFF_PID) != pid:
                    raise _NotUsable(f"shm control page {name} does not belong to pid {pid}")
                if pid != os.getpid():
                    token = ctl.load_u64(OFF_TOKEN)
                    buf = ctypes.c_uint64(0)
                    rc = kc.pv_copy(pid, 0, ctypes.addressof(buf), info["token_addr"], 8)
                    if rc:
                        raise _NotUsable(_attach_reason(pid, rc))
                    if buf.value != token:
                        raise _NotUsable(f"pid {pid} is not the peer (token mismatch: different "
                                         "pid namespace?)")
                self._prove(peer, ctl, name)
                _, busy = _claim_lane(fd, (st.st_dev, st.st_ino))
            finally:
                os.close(fd)
            return _Link(pid, ctl, kc.Peer(pid, ctl, OFF_ALIVE), busy=busy)
        except (_NotUsable, OSError) as e:
            for m in (ctl, busy):
                if m is not None:
                    m.close()
            why = str(e) if isinstance(e, _NotUsable) else f"shm setup failed: {e}"
            return _failed(why, pid)

    # -- data path -----------------------------------------------------------------------------

    def _map_buffer(self, link: _Link, name: str, length: int, writable: bool) -> kc.Mapping:
        """Map a peer's sealed memfd; ``_NotUsable``/OSError when it must be attached instead."""
        _check_proc_path(name, link.pid, "shm_name")
        fd, st = _open_peer_file(name, length, writable)
        try:
            if not _size_sealed(fd):
                raise _NotUsable(f"{name} is not sealed against shrinking")
            page = max(st.st_blksize, os.sysconf("SC_PAGE_SIZE"))  # hugetlbfs: the huge page
            size = min(st.st_size, -(-length // page) * page)  # unmapped in whole pages
            return kc.Mapping.from_fd(fd, size, 0, writable)
        finally:
            os.close(fd)

    def _table(self, link: _Link, peer: SegmentDesc) -> kc.Table:
        key = _ident(peer)
        if link.table is not None and link.key == key:
            return link.table
        rows = []
        maps: dict[tuple, kc.Mapping] = {}
        same = link.pid == os.getpid()
        for b in peer.buffers:
            if not b.location.startswith(("cpu", "cxl", "*")):
                continue
            f = b.transports.get("shm")
            try:
                check_fields(f, self.buffer_fields, "buffer.transports.shm")
            except FieldError:
                continue  # no slot: it cannot be unregistered safely, so it is not reachable
            writable = bool(getattr(b, "writable", True))
            slot = (link.ctl, OFF_SLOTS + 8 * f["slot"], f["gen"], link.busy, 4 * f["slot"],
                    writable)
            if same:
                rows.append((b.addr, b.length, kc.KIND_MEM, None, 0, *slot))
                continue
            if b.shm_name:
                # the registration (slot, generation) is part of the key: a buffer freed and
                # allocated again under the same name and address is other memory
                mk = (b.shm_name, b.addr, b.length, writable, f["slot"], f["gen"])
                m = link.maps.get(mk)
                if m is None:
                    try:
                        m = self._map_buffer(link, b.shm_name, b.length, writable)
                    except (_NotUsable, OSError) as e:
                        log.debug("shm: not mapping %s (%s); using cross-memory attach",
                                  b.shm_name, e)
                if m is not None:
                    maps[mk] = m
                    rows.append((b.addr, b.length, kc.KIND_MEM, m, 0, *slot))
                    continue
            rows.append((b.addr, b.length, kc.KIND_PV, None, 0, *slot))
        for mk, m in link.maps.items():
            if mk not in maps:
                m.close()  # unmapped once no queued copy uses it
        link.maps = maps
        link.table = kc.Table(rows)
        link.key = key
        return link.table

    def _target(self, peer: SegmentDesc) -> tuple[_Link, kc.Table] | None:
        """The link and buffer table for ``peer``, or None when it cannot be reached."""
        last = self._last.get(peer.name)
        if last is not None and last[0] is peer and self._links.get(peer.name) is last[1]:
            return last[1], last[2]
        link = self._link(peer)
        if link.reason or link.handle is None:
            return None
        with self._lock:
            table = self._table(link, peer)
            self._last[peer.name] = (peer, link, table)
        return link, table

    def submit(self, peer: SegmentDesc, slices: Slices) -> None:
        pool = self.pool
        hit = self._target(peer) if pool is not None else None
        if hit is None:
            slices.fail_all(E_PEER)
            return
        pool.submit(slices, hit[0].handle, hit[1], self.inline_max)

    def transfer(self, peer: SegmentDesc, slices: Slices, timeout: float) -> bool:
        """Synchronous: at most ``async_memcpy_threshold`` copied by the calling thread alone,
        more split between it and the workers."""
        pool = self.pool
        hit = self._target(peer) if pool is not None else None
        if hit is None:
            slices.fail_all(E_PEER)
            return True
        return pool.transfer(slices, hit[0].handle, hit[1], self.inline_max, timeout)

    def abort(self, peer: SegmentDesc) -> None:
        """Fallback after a timeout: fail every copy queued for ``peer`` so far and wait for the
        workers to let go (chunks in progress end at their next check)."""
        link = self._links.get(peer.name)
        if link is not None and link.handle is not None:
            link.handle.cancel()
            link.handle.wait_idle(5.0)


def _ident(peer: SegmentDesc) -> tuple:
    return (peer.timestamp, id(peer.buffers), len(peer.buffers))


def _attach_reason(pid: int, rc: int) -> str:
    what = os.strerror(rc)
    if rc == errno.EPERM:
        return (f"cross-memory attach to pid {pid} refused (EPERM: {what}): the peer runs as "
                "another user, is not dumpable, or the Yama ptrace policy forbids it "
                "(/proc/sys/kernel/yama/ptrace_scope); the shm transport cannot reach it")
    if rc == errno.ESRCH:
        return f"peer process {pid} does not exist (ESRCH)"
    return f"cross-memory attach to pid {pid} failed: {errno.errorcode.get(rc, rc)} ({what})"


_attach_allowed = False


def _allow_attach() -> None:
    """Under Yama ptrace_scope 1 only ancestors may attach; let same-user peers attach to us
    (the usual PR_SET_PTRACER_ANY opt-in).  Scope 0 needs nothing, scopes 2-3 cannot be eased."""
    global _attach_allowed
    if _attach_allowed:
        return
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    if scope == 1:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(PR_SET_PTRACER_ANY), 0, 0, 0) == 0:
            _attach_allowed = True
            log.debug("shm: Yama ptrace_scope=1, allowed same-user peers to attach")
