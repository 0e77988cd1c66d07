"""Shared bandwidth quota (TENT's ``shared_quota_shm_path``): processes on one host share each
NIC's bandwidth through a table in shared memory.

Unlike TENT's (a 6 ms cycle of time slots in which the LOW class may post only one third of the
time, even on an idle link, behind a robust mutex whose dead owner is ignored), this one is:

* **work-conserving**: a participant alone on a NIC never waits (one scan of the NIC's slots
  per window of at most 1 MiB is all it pays);
* **fair under contention**: bytes are shared in proportion to the participants' weights
  (stride scheduling on a virtual clock per NIC: a participant may send when its virtual time,
  bytes / weight, is within a burst of the slowest other competitor's);
* **lock-free and robust to a kill at any instant**: every slot is written only by its owner,
  with atomics; a participant that stops asking for ``stale`` seconds (50 ms) no longer holds
  anyone back, and a dead process's slot is reclaimed (``kill(pid, 0)`` / its start time) when a
  newcomer needs one;
* **bounded and versioned**: a fixed number of NIC entries and slots per NIC, sized at creation
  and recorded in a header (magic, version, record sizes, geometry, timing); a file that does
  not match is refused with :class:`QuotaLayoutError`.

The table lives in ``/dev/shm/<name>`` for a POSIX shm name (``mooncake_quota_shm`` or
``/mooncake_quota_shm``), or at the path given when it has a ``/`` after its first character.
The first process creates it atomically (a private file, formatted, then hard-linked into
place: nobody ever sees a half-written header); it is never removed (it is small: 64 NICs × 64
slots ≈ 266 KB) and is reused by later processes.  Mode 0600: only the creating user's
processes share it.

A **participant** is one transport of one engine on one NIC at one weight (a *slot*).  A NIC is
named by a key: ``net:<ifname>`` for a network interface (the TCP transport keys each peer route
by the interface of its local address; RDMA devices map to their netdev, so TCP and RoCE on one
port share one entry), ``rdma:<dev>`` otherwise.  Weights come from priority classes
(:data:`PRIORITIES`, TENT's intents) or are given as integers (1..65535).

When every slot of a NIC is held by a live process, :meth:`QuotaTable.join` raises
:class:`QuotaFull`; the TCP transport then logs a warning once and runs that route unregulated
(the documented fallback: transfers never fail because of the quota).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from mooncake._core import quota as _q
from mooncake.errors import MooncakeError

__all__ = ["QuotaError", "QuotaLayoutError", "QuotaFull", "PRIORITIES", "DEFAULT_PRIORITY",
           "weight_of", "table_path", "open_table", "QuotaTable", "QuotaSlot", "EngineSlots",
           "nic_key_for_ip", "nic_key_for_rdma", "engine_weight"]

log = logging.getLogger(__name__)

MiB = 1 << 20

#: TENT's intents (and its HIGH/MEDIUM/LOW priorities) as weights: under contention a class
#: gets bytes in proportion to its weight; alone, any class gets the whole link.
PRIORITIES: dict[str, int] = {
    "foreground_get": 8, "high": 8,
    "weight_loading": 4,
    "migration": 2, "medium": 2,
    "checkpoint": 2,
    "background_prefetch": 1, "prefetch": 1, "low": 1,
}
#: the class of an engine that names none
DEFAULT_PRIORITY = "foreground_get"
#: class numbers stored in the slots (informational: ``mooncake``'s own inspection)
CLASSES = {"foreground_get": 1, "high": 1, "weight_loading": 2, "migration": 3, "medium": 3,
           "checkpoint": 4, "background_prefetch": 5, "prefetch": 5, "low": 5}

#: defaults of a table created here (an existing table's header wins)
DEFAULT_NICS = 64
DEFAULT_SLOTS = 64
DEFAULT_STALE = 0.05        # s: a participant silent this long no longer competes
DEFAULT_BURST = 1 * MiB     # bytes at weight 1 a participant may run ahead of the slowest
DEFAULT_CREDIT = 4 * MiB    # bytes at weight 1 of saved service an idle participant keeps
DEFAULT_MAX_WAIT = 0.5      # s: a refusal streak this long goes anyway (a wedged table)

#: TENT's SharedHeader magic (tent/src/transport/rdma/shared_quota.cpp), to name it in errors
_TENT_MAGIC = 0x2025082772805203
_HDR = struct.Struct("<QIIIIIIQQQQQ")   # the first 72 bytes of mc_quota_hdr_t


class QuotaError(MooncakeError):
    """The shared quota table cannot be used."""


class QuotaLayoutError(QuotaError, ValueError):
    """The file is not a quota table of this layout (garbage, another version, TENT's)."""


class QuotaFull(QuotaError):
    """Every NIC entry, or every slot of a NIC, is held by a live process."""


def weight_of(priority: str | int | None) -> int:
    """The weight of a priority class name (:data:`PRIORITIES`, case-insensitive, ``-`` or
    ``_``) or of an integer weight 1..65535; None gives :data:`DEFAULT_PRIORITY`'s."""
    if priority is None:
        priority = DEFAULT_PRIORITY
    if isinstance(priority, bool):
        raise QuotaError(f"quota priority must be a class name or a weight, not {priority!r}")
    if isinstance(priority, int):
        if not 1 <= priority <= _q.MAX_WEIGHT:
            raise QuotaError(f"quota weight {priority} outside 1..{_q.MAX_WEIGHT}")
        return priority
    key = str(priority).strip().lower().replace("-", "_")
    if key.isdigit():
        return weight_of(int(key))
    try:
        return PRIORITIES[key]
    except KeyError:
        raise QuotaError(f"unknown quota priority {priority!r}; allowed: "
                         f"{', '.join(sorted(PRIORITIES))} or a weight 1..{_q.MAX_WEIGHT}"
                         ) from None


def _class_of(priority: str | int | None) -> int:
    if isinstance(priority, str):
        return CLASSES.get(priority.strip().lower().replace("-", "_"), 0)
    return CLASSES[DEFAULT_PRIORITY] if priority is None else 0


def table_path(spec: str) -> str:
    """The file of ``shared_quota_shm_path``: ``/dev/shm/<name>`` for a POSIX shm name
    (``name`` or ``/name``), else the path itself."""
    spec = spec.strip()
    if not spec:
        raise QuotaError("empty shared_quota_shm_path")
    if "/" not in spec[1:]:
        name = spec.lstrip("/")
        if not name or name in (".", ".."):
            raise QuotaError(f"shared_quota_shm_path {spec!r} is not a valid shm name")
        return os.path.join("/dev/shm", name)
    return os.path.abspath(spec)


# ---- opening ---------------------------------------------------------------------------------


_tables: weakref.WeakValueDictionary[tuple[str, int, int], QuotaTable] = \
    weakref.WeakValueDictionary()
_tables_lock = threading.Lock()


def open_table(spec: str, *, nics: int = DEFAULT_NICS, slots: int = DEFAULT_SLOTS,
               stale: float = DEFAULT_STALE, burst: int = DEFAULT_BURST,
               credit: int = DEFAULT_CREDIT, max_wait: float = DEFAULT_MAX_WAIT,
               create: bool = True) -> QuotaTable:
    """Open (creating it if absent and ``create``) the quota table of ``spec``.

    The geometry and timing arguments only shape a table created here; an existing table's
    header wins.  One mapping per file per process (engines of a process share it).
    Raises :class:`QuotaLayoutError` for a file that is not a table of this layout, and
    :class:`QuotaError` when the file cannot be created or opened."""
    path = table_path(spec)
    if not 1 <= nics <= _q.MAX_NICS or not 1 <= slots <= _q.MAX_SLOTS:
        raise QuotaError(f"quota geometry {nics} NICs x {slots} slots outside "
                         f"1..{_q.MAX_NICS} x 1..{_q.MAX_SLOTS}")
    params = _params(stale, burst, credit, max_wait)
    with _tables_lock:
        for _ in range(3):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                if not create:
                    raise QuotaError(f"quota table {path} does not exist") from None
                _create(path, nics, slots, params)
                continue
            except OSError as e:
                raise QuotaError(f"cannot open quota table {path}: {e.strerror}"
                                 f"{_owner_hint(path, e)}") from None
            try:
                st = os.fstat(fd)
                key = (path, st.st_dev, st.st_ino)
                t = _tables.get(key)
                if t is None:
                    t = QuotaTable(_map(fd, path, st), key)
                    _tables[key] = t
                return t
            finally:
                os.close(fd)
        raise QuotaError(f"quota table {path} keeps disappearing while it is opened")


def _params(stale: float, burst: int, credit: int, max_wait: float) -> tuple[int, int, int, int]:
    if not 0.001 <= stale <= 1.0:
        raise QuotaError(f"quota stale time {stale} s outside 0.001..1")
    if not 0 <= burst <= 1 << 40 or not 0 <= credit <= 1 << 40:
        raise QuotaError("quota burst/credit outside 0..1 TiB")
    if not 0.001 <= max_wait <= 60.0:
        raise QuotaError(f"quota max wait {max_wait} s outside 0.001..60")
    return (int(stale * 1e9), burst * _q.SCALE, credit * _q.SCALE, int(max_wait * 1e9))


def _owner_hint(path: str, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return " (it is a symbolic link; refused)"
    if e.errno != errno.EACCES:
        return ""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f" (owned by uid {st.st_uid}, mode {stat.filemode(st.st_mode)}; tables are shared " \
           f"by the processes of the user that created them)"


def _create(path: str, nics: int, slots: int, params: tuple[int, int, int, int]) -> None:
    """Create the table atomically: a private file, sized and formatted, linked into place."""
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    except OSError as e:
        raise QuotaError(f"cannot create quota table {path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, _q.size_for(nics, slots))
        _q.format_fd(fd, nics, slots, *params)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass          # another process won the race: use its table
        except OSError as e:
            raise QuotaError(f"cannot create quota table {path}: {e.strerror}") from None
    finally:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _map(fd: int, path: str, st: os.stat_result) -> _q.Table:
    """Validate the header of ``fd`` and map it."""
    def bad(why: str) -> QuotaLayoutError:
        return QuotaLayoutError(
            f"{path}: {why}; refusing it as shared_quota_shm_path (if no process uses it, "
            f"remove it, or choose another name)")

    if not stat.S_ISREG(st.st_mode):
        raise bad("not a regular file")
    if st.st_size < _q.HDR_SIZE:
        raise bad(f"{st.st_size} bytes, too small for a quota table header ({_q.HDR_SIZE} B)")
    raw = os.pread(fd, _HDR.size, 0)
    (magic, version, hdr_size, nic_size, slot_size, max_nics, max_slots, total,
     stale, burst, credit, max_wait) = _HDR.unpack(raw)
    if magic == _TENT_MAGIC:
        raise bad(f"it is TENT's shared quota (magic {magic:#018x}, version {version}), not "
                  "mooncake's; the two cannot share one file")
    if magic != _q.MAGIC:
        raise bad(f"not a mooncake quota table (magic {magic:#018x}, expected {_q.MAGIC:#018x})")
    if version != _q.VERSION:
        raise bad(f"quota table layout version {version}, this build speaks {_q.VERSION}")
    if (hdr_size, nic_size, slot_size) != (_q.HDR_SIZE, _q.NIC_SIZE, _q.SLOT_SIZE):
        raise bad(f"record sizes header/NIC/slot {hdr_size}/{nic_size}/{slot_size} B, this "
                  f"build uses {_q.HDR_SIZE}/{_q.NIC_SIZE}/{_q.SLOT_SIZE} B")
    if not 1 <= max_nics <= _q.MAX_NICS or not 1 <= max_slots <= _q.MAX_SLOTS:
        raise bad(f"geometry {max_nics} NICs x {max_slots} slots outside "
                  f"1..{_q.MAX_NICS} x 1..{_q.MAX_SLOTS}")
    want = _q.size_for(max_nics, max_slots)
    if total != want or st.st_size != want:
        raise bad(f"size {st.st_size} B (header says {total} B), a table of {max_nics} x "
                  f"{max_slots} is {want} B")
    if not (1_000_000 <= stale <= 1_000_000_000 and 1_000_000 <= max_wait <= 60 * 10**9
            and burst <= (1 << 40) * _q.SCALE and credit <= (1 << 40) * _q.SCALE):
        raise bad(f"timing parameters out of range (stale {stale} ns, burst {burst}, credit "
                  f"{credit}, max wait {max_wait} ns)")
    return _q.Table(fd, path, want, max_nics, max_slots, stale, burst, credit, max_wait)


# ---- the table and its slots ----------------------------------------------------------------


class QuotaTable:
    """A process's handle of one quota table (see :func:`open_table`)."""

    def __init__(self, core: _q.Table, key: tuple[str, int, int]) -> None:
        self.core = core
        self.path = core.path
        self._key = key
        self._lock = threading.Lock()

    @property
    def geometry(self) -> tuple[int, int]:
        """``(NIC entries, slots per NIC)``."""
        return self.core.max_nics, self.core.max_slots

    @property
    def params(self) -> dict[str, int]:
        return self.core.params

    def join(self, nic: str, priority: str | int | None = None) -> QuotaSlot:
        """Take a slot on NIC ``nic`` at ``priority`` (a class of :data:`PRIORITIES` or a
        weight).  Raises :class:`QuotaFull` when the table has no entry left for a new NIC or
        every slot of the NIC belongs to a live process (a dead one's is reclaimed once it has
        been silent for a second)."""
        weight = weight_of(priority)
        with self._lock:
            i = self.core.nic(nic)
            if i < 0:
                raise QuotaFull(f"quota table {self.path}: all {self.core.max_nics} NIC entries "
                                f"name other NICs; cannot add {nic!r}")
            owner = _q.owner_word()
            sid = self.core.claim(i, owner, weight, _class_of(priority))
            if sid < 0:
                pids = sorted({s["pid"] for s in self.core.slots(i)})
                raise QuotaFull(
                    f"quota table {self.path}: all {self.core.max_slots} slots of {nic!r} are "
                    f"held by live processes (pids {', '.join(map(str, pids[:16]))}"
                    f"{', ...' if len(pids) > 16 else ''})")
        return QuotaSlot(self, nic, i, sid, owner, weight)

    def nics(self) -> list[tuple[int, str, int, int]]:
        """``[(index, key, vclock, high-water slots)]``."""
        return self.core.nics()

    def slots(self, nic: str) -> list[dict[str, Any]]:
        """Snapshots of the claimed slots of NIC ``nic`` ([] when it has no entry)."""
        for i, name, _vc, _hw in self.core.nics():
            if name == nic:
                return self.core.slots(i)
        return []

    def __repr__(self) -> str:
        n, s = self.geometry
        return f"<QuotaTable {self.path} {n}x{s}>"


@dataclass(eq=False)
class QuotaSlot:
    """One participant: a slot of a NIC entry, owned by this process until :meth:`release`."""

    table: QuotaTable
    nic: str
    nic_index: int
    sid: int
    owner: int
    weight: int
    released: bool = field(default=False)

    @property
    def core(self) -> _q.Table:
        """The kernel object transports hand to their lanes (with :attr:`sid`)."""
        return self.table.core

    def enter(self) -> None:
        """A drive with work to send starts (the slot competes while one is in progress)."""
        self.core.enter(self.sid)

    def leave(self) -> None:
        self.core.leave(self.sid)

    def wait_ns(self, nbytes: int) -> int:
        """0: send ``nbytes`` now (then :meth:`charge`); else ns to wait before asking again."""
        return self.core.wait_ns(self.sid, nbytes)

    def charge(self, nbytes: int) -> None:
        self.core.charge(self.sid, nbytes)

    def set_priority(self, priority: str | int) -> None:
        self.weight = weight_of(priority)
        self.core.set_weight(self.sid, self.weight)

    def snapshot(self) -> dict[str, Any]:
        return self.core.slot(self.sid)

    def release(self) -> None:
        """Give the slot back (idempotent); lanes still holding it stop competing."""
        if not self.released:
            self.released = True
            self.core.release(self.sid, self.owner)

    def __enter__(self) -> QuotaSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---- NIC keys ----------------------------------------------------------------------------------


_SIOCGIFADDR, _SIOCGIFNETMASK = 0x8915, 0x891B


def _if_v4(name: str, req: int) -> int | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        res = fcntl.ioctl(s.fileno(), req, struct.pack("256s", name.encode()[:15]))
    except OSError:
        return None
    finally:
        s.close()
    return int.from_bytes(res[20:24], "big")


def nic_key_for_ip(ip: str) -> str:
    """The NIC key of local address ``ip``: ``net:<interface>`` when an interface has it (its
    primary IPv4 network, or an IPv6 address), else ``ip:<address>``."""
    try:
        packed6 = socket.inet_pton(socket.AF_INET6, ip)
    except OSError:
        packed6 = None
    if packed6 is not None:
        if packed6[:12] == b"\0" * 10 + b"\xff\xff":     # v4-mapped
            return nic_key_for_ip(socket.inet_ntop(socket.AF_INET, packed6[12:]))
        try:
            with open("/proc/net/if_inet6") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 6 and bytes.fromhex(parts[0]) == packed6:
                        return f"net:{parts[5]}"[: _q.NAME_MAX]
        except (OSError, ValueError):
            pass
        return f"ip:{ip}"[: _q.NAME_MAX]
    try:
        addr = int.from_bytes(socket.inet_aton(ip), "big")
    except OSError:
        return f"ip:{ip}"[: _q.NAME_MAX]
    best: tuple[int, str] | None = None
    try:
        names = [n for _i, n in socket.if_nameindex()]
    except OSError:
        names = []
    for name in names:
        a = _if_v4(name, _SIOCGIFADDR)
        m = _if_v4(name, _SIOCGIFNETMASK)
        if a is None or m is None:
            continue
        if a == addr:
            return f"net:{name}"[: _q.NAME_MAX]
        if (a & m) == (addr & m) and (best is None or m > best[0]):
            best = (m, name)
    if best is not None:
        return f"net:{best[1]}"[: _q.NAME_MAX]
    return f"ip:{ip}"[: _q.NAME_MAX]


def nic_key_for_rdma(device: str, port: int = 1) -> str:
    """The NIC key of RDMA device ``device``: ``net:<netdev>`` of its port (RoCE/IPoIB: the
    same entry the TCP transport uses on that interface), else ``rdma:<device>``."""
    base = f"/sys/class/infiniband/{device}"
    try:
        with open(f"{base}/ports/{port}/gid_attrs/ndevs/0") as f:
            nd = f.read().strip()
        if nd:
            return f"net:{nd}"[: _q.NAME_MAX]
    except OSError:
        pass
    try:
        nets = sorted(os.listdir(f"{base}/device/net"))
        if nets:
            return f"net:{nets[0]}"[: _q.NAME_MAX]
    except OSError:
        pass
    return f"rdma:{device}"[: _q.NAME_MAX]


# ---- configuration -------------------------------------------------------------------------------


def _cfg(cfg: Any, name: str, default: Any) -> Any:
    try:
        v = cfg[name]
    except (KeyError, TypeError):
        return default
    return default if v is None else v


class EngineSlots:
    """One transport's slots in the engine's shared quota (``shared_quota_shm_path``): a slot per
    (NIC, class) joined on first use, a table with no room warned about once per NIC (that
    traffic then runs unregulated: transfers never fail because of the quota), all released by
    :meth:`release`.  ``table`` is None when no quota is configured; opening a table that is
    not ours raises here (the transport's start fails)."""

    def __init__(self, cfg: Any, who: str) -> None:
        spec = engine_path(cfg)
        self.table: QuotaTable | None = open_table(spec) if spec else None
        #: the engine's class (``MC_SHARED_QUOTA_PRIORITY``) and its weight (0: no quota)
        self.priority = engine_weight(cfg) if spec else None
        self.weight = weight_of(self.priority) if spec else 0
        self._who = who
        self._slots: dict[tuple[str, int], QuotaSlot] = {}
        self._full: set[str] = set()
        self._lock = threading.Lock()

    def get(self, nic: str, priority: str | int | None = None) -> QuotaSlot | None:
        """The slot on ``nic`` at ``priority`` (default: the engine's), joined on first use;
        None without a quota or when the table has no room."""
        if self.table is None:
            return None
        p = self.priority if priority is None else priority
        key = (nic, weight_of(p))
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                return slot
            try:
                slot = self.table.join(nic, p)
            except QuotaFull as e:
                if nic not in self._full:
                    self._full.add(nic)
                    log.warning("%s: %s; its traffic through %s runs without the shared quota",
                                self._who, e, nic)
                return None
            self._full.discard(nic)
            self._slots[key] = slot
        log.debug("%s: shared quota %s: slot %d on %s at weight %d", self._who, self.table.path,
                  slot.sid, nic, slot.weight)
        return slot

    def release(self) -> None:
        """Give every slot back (the transport's workers must have left them)."""
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            slot.release()


def engine_path(cfg: Any) -> str:
    """``shared_quota_shm_path`` ("" = no quota)."""
    return str(_cfg(cfg, "transports/rdma/shared_quota_shm_path", "") or "")


def engine_weight(cfg: Any) -> str | int:
    """The engine's quota priority: the option ``MC_SHARED_QUOTA_PRIORITY`` (a class name or a
    weight; validated by :func:`weight_of`), :data:`DEFAULT_PRIORITY` without a config."""
    try:
        v = cfg["MC_SHARED_QUOTA_PRIORITY"] or DEFAULT_PRIORITY
    except (KeyError, TypeError):
        v = DEFAULT_PRIORITY
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    weight_of(v)
    return v
