"""``shm``: same-host transfers at memcpy speed, to any registered memory of the peer.

How a peer's buffer is reached (decided once per descriptor, not per slice):

* a managed, shm-backed buffer (its descriptor carries ``shm_name``) is mapped here once
  (relocation cache: peer address → local mapping) and copied with ``memcpy``;
* any other CPU buffer (NumPy arrays, bytearrays, mmaps) is copied by cross-memory attach
  (``process_vm_readv``/``process_vm_writev`` on the peer's pid);
* our own segment is copied directly.

"Same host" means equal ``host_id`` (boot id + network namespace), never equal host names.
Each engine also publishes a small *control page* (a memfd, named ``/proc/<pid>/fd/<fd>``): an
alive word, a token that proves the published pid is really the peer, and one registration slot
per buffer.  Every copy re-checks its buffer's slot, so a peer that unregisters (or exits, seen by
the alive word and a pidfd) makes queued copies end FAILED instead of writing into memory that is
no longer registered.  When the kernel refuses cross-memory attach (EPERM: Yama ptrace policy,
another user, a non-dumpable peer) :meth:`ShmTransport.can_reach` says so and the engine uses
another transport.

Knobs: ``transports/shm/enable``; ``transports/shm/async_memcpy_threshold`` (bytes: a submit of
fewer bytes is copied inline, larger ones by the workers); ``MC_WORKERS_PER_CTX`` worker threads.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from mooncake._core import batch as _batch
from mooncake._core import copy as kc
from mooncake.errors import TransportUnavailable
from mooncake.transport import Region, SegmentDesc, Transport, TransportContext

if TYPE_CHECKING:
    from mooncake._core.batch import Slices

__all__ = ["ShmTransport", "ControlPage", "shm_path"]

log = logging.getLogger("mooncake.transports.shm")

E_PEER = _batch.E_PEER

# control page layout (u64 words)
MAGIC = int.from_bytes(b"MCSHMCT1", "little")
OFF_MAGIC, OFF_PID, OFF_ALIVE, OFF_TOKEN = 0, 8, 16, 24
OFF_SLOTS = 64
NSLOTS = 8192
CTL_SIZE = OFF_SLOTS + 8 * NSLOTS

PR_SET_PTRACER = 0x59616D61
PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


def shm_path(name: str) -> str:
    """The file behind a published ``shm_name``: an absolute path as is (hugetlbfs files), a
    POSIX shm name under ``/dev/shm``."""
    if name.startswith("/") and "/" in name[1:]:
        return name
    return "/dev/shm/" + name.lstrip("/")


class ControlPage:
    """Our control page: created at start, unlinked at close."""

    def __init__(self) -> None:
        # a memfd, published as /proc/<pid>/fd/<fd>: peers that may attach to us can open it,
        # and it vanishes with the process (nothing leaks in /dev/shm after a crash)
        self.fd = os.memfd_create(f"mooncake_{os.getpid()}_ctl", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, CTL_SIZE)
            self.map = kc.Mapping.from_fd(self.fd, CTL_SIZE)
        except BaseException:
            os.close(self.fd)
            raise
        self.name = f"/proc/{os.getpid()}/fd/{self.fd}"
        self.token = secrets.randbits(63) | 1
        m = self.map
        m.store_u64(OFF_PID, os.getpid())
        m.store_u64(OFF_TOKEN, self.token)
        m.store_u64(OFF_ALIVE, 1)
        m.store_u64(OFF_MAGIC, MAGIC)
        self._gens = [0] * NSLOTS
        self._free = list(range(NSLOTS - 1, -1, -1))
        self._lock = threading.Lock()

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
        with self._lock:
            self.map.store_u64(OFF_SLOTS + 8 * slot, self._gens[slot] << 1)
            self._free.append(slot)

    def close(self) -> None:
        if self.map.closed:
            return
        self.map.store_u64(OFF_ALIVE, 0)
        self.map.close()
        os.close(self.fd)


def _open_map(path: str, length: int, writable: bool = True) -> kc.Mapping:
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < length:
            raise OSError(errno.EINVAL, f"{path} holds {size} bytes, the peer publishes {length}")
        # the whole file: huge-page files must be unmapped in whole pages
        return kc.Mapping.from_fd(fd, size, 0, writable)
    finally:
        os.close(fd)


@dataclass(eq=False)
class _Link:
    """What we know about one same-host peer."""

    pid: int
    ctl: kc.Mapping | None
    handle: kc.Peer | None
    reason: str | None = None
    who: tuple = ()
    key: tuple = ()
    table: kc.Table | None = None
    maps: dict[tuple, kc.Mapping] = field(default_factory=dict)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        self.table = None
        if self.ctl is not None:
            self.ctl.close()


class ShmTransport(Transport):
    """Same-host transport: mapped shm buffers and cross-memory attach, on the copy kernel."""

    name: ClassVar[str] = "shm"
    auto_priority: ClassVar[int] = 10
    same_host_only: ClassVar[bool] = True
    memory_kinds: ClassVar[frozenset[str]] = frozenset({"cpu", "cxl"})

    @classmethod
    def probe(cls) -> str | None:
        if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
            return "/dev/shm is missing or not writable"
        if not os.path.exists("/proc/self/ns/net"):
            return "needs Linux (process_vm_readv, /proc)"
        return None

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.enabled = cfg["transports/shm/enable"]
        self.inline_max = cfg["transports/shm/async_memcpy_threshold"]
        self.nworkers = cfg["MC_WORKERS_PER_CTX"]
        self.pool: kc.CopyPool | None = None
        self.ctl: ControlPage | None = None
        self._slots: dict[int, int] = {}  # region addr -> slot
        self._links: dict[str, _Link] = {}
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> dict:
        if not self.enabled:
            raise TransportUnavailable("shm is disabled by transports/shm/enable=false")
        self.ctl = ControlPage()
        self.pool = kc.CopyPool(self.nworkers)
        _allow_attach()
        return {"ctl": self.ctl.name, "token_addr": self.ctl.token_addr, "pid": os.getpid()}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()  # queued copies end FAILED (ECANCELED)
            self.pool = None
        with self._lock:
            for link in self._links.values():
                link.close()
            self._links.clear()
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None

    # -- registration --------------------------------------------------------------------------

    def register(self, region: Region) -> dict | None:
        if self.ctl is None:
            return None
        got = self.ctl.claim()
        if got is None:
            log.warning("shm: all %d registration slots are used; 0x%x is published without "
                        "unregistration checks", NSLOTS, region.addr)
            return {}
        self._slots[region.addr] = got[0]
        return {"slot": got[0], "gen": got[1]}

    def unregister(self, region: Region) -> None:
        slot = self._slots.pop(region.addr, None)
        if slot is not None and self.ctl is not None:
            self.ctl.release(slot)  # peers' queued copies into it now fail
        if self.pool is not None:
            # copies we queued may still read or write this local region: let them finish
            # before the caller frees it (they are bounded memcpy/attach calls)
            self.pool.drain(30.0)

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

    def _link(self, peer: SegmentDesc) -> _Link:
        with self._lock:
            link = self._links.get(peer.name)
            info = peer.transports.get("shm", {})
            pid = int(info.get("pid") or peer.pid or 0)
            who = (pid, info.get("ctl"), info.get("token_addr"))
            if link is not None and link.who == who and (
                    link.reason is None or link.key == _ident(peer)):
                return link
            if link is not None:
                link.close()
            link = self._links[peer.name] = self._connect(peer, info, pid)
            link.who = who
            link.key = _ident(peer)
            return link

    def _connect(self, peer: SegmentDesc, info: dict, pid: int) -> _Link:
        name = info.get("ctl")
        if not name or pid <= 0:
            return _Link(pid, None, None, "peer's shm descriptor lacks its control page or pid")
        try:
            ctl = _open_map(shm_path(name), CTL_SIZE, writable=False)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM) and name.startswith("/proc/"):
                return _Link(pid, None, None, _attach_reason(pid, errno.EPERM))
            return _Link(pid, None, None, f"cannot open the peer's shm control page "
                                          f"{shm_path(name)}: {e.strerror or e} (is /dev/shm "
                                          "shared with it?)")
        if ctl.load_u64(OFF_MAGIC) != MAGIC or ctl.load_u64(OFF_PID) != pid:
            ctl.close()
            return _Link(pid, None, None, f"shm control page {name} does not belong to pid {pid}")
        token = ctl.load_u64(OFF_TOKEN)
        if pid != os.getpid():
            buf = ctypes.c_uint64(0)
            rc = kc.pv_copy(pid, 0, ctypes.addressof(buf), int(info.get("token_addr", 0)), 8)
            if rc:
                ctl.close()
                return _Link(pid, None, None, _attach_reason(pid, rc))
            if buf.value != token:
                ctl.close()
                return _Link(pid, None, None, f"pid {pid} is not the peer (token mismatch: "
                                              "different pid namespace?)")
        handle = kc.Peer(pid, ctl, OFF_ALIVE)
        return _Link(pid, ctl, handle)

    # -- data path -----------------------------------------------------------------------------

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
            f = b.transports.get("shm", {})
            slot = (link.ctl, OFF_SLOTS + 8 * int(f["slot"]), int(f["gen"])) if "slot" in f \
                else (None, 0, 0)
            if same:
                rows.append((b.addr, b.length, kc.KIND_MEM, None, 0, *slot))
                continue
            if b.shm_name:
                mk = (b.shm_name, b.addr, b.length)
                m = link.maps.get(mk)
                if m is None:
                    try:
                        m = _open_map(shm_path(b.shm_name), b.length)
                    except OSError as e:
                        log.debug("shm: cannot map %s (%s); using cross-memory attach",
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

    def submit(self, peer: SegmentDesc, slices: Slices) -> None:
        pool = self.pool
        link = self._link(peer) if pool is not None else None
        if link is None or link.reason or link.handle is None:
            slices.fail_all(E_PEER)
            return
        pool.submit(slices, link.handle, self._table(link, peer), self.inline_max)

    def transfer(self, peer: SegmentDesc, slices: Slices, timeout: float) -> bool:
        self.submit(peer, slices)
        return slices.batch.wait(timeout, 50e-6)

    def abort(self, peer: SegmentDesc) -> None:
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

