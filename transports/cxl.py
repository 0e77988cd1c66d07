"""``cxl``: transfers through a shared CXL/DAX memory window.

The window is ``MC_CXL_DEV_PATH`` (a devdax character device such as ``/dev/dax0.0``, or a regular
file, e.g. on tmpfs, standing in for one), ``MC_CXL_DEV_SIZE`` bytes long (unset: read from
``/sys/bus/dax/devices/<dev>/size``, or the file's size).  Each process maps the whole window once,
``MAP_SHARED``; :func:`window` returns that process-wide mapping.

Addressing (matching Mooncake's ``cxl_base_addr`` + per-buffer ``offset`` descriptor fields):

* A process makes part of the window transferable by registering it like any memory:
  ``w = cxl.window(); engine.register_memory(w.address(off), length, "cxl")``.  Registration is
  allowed only inside the window, and devdax rules hold: ``off`` and ``length`` are multiples of
  the device alignment (sysfs ``/sys/bus/dax/devices/<dev>/align``; 2 MiB for files).
* The descriptor publishes ``cxl_name``, ``cxl_base_addr`` (the peer's mapping address) and, per
  buffer, ``offset`` (from the window start).
* A request's remote address is the **peer's virtual address** of a registered window range, as for
  every other transport (so the engine's bounds checks apply unchanged); the transport turns it
  into ``offset = remote - peer.cxl_base_addr`` and copies to/from its own mapping at that offset.
  Mooncake-style raw offsets (``target_offset`` from ``cxl_base_addr``) are accepted by the
  transport too, and :meth:`CxlTransport.peer_address` converts one into the peer address.
* Copies inside a registered range are byte-granular (loads/stores on DAX memory need no
  alignment); only mappings and registrations follow the device alignment.

Two processes reach each other when both map the same window: same ``cxl_name`` and size, and for
a file-backed window also the same host (``host_id``) and file (device and inode numbers).

Silence: the copy kernel checks before every chunk (≤ 1 MiB) that the batch was not cancelled and
the local region not unregistered, and the engine waits for the tasks pinning a region, so
:meth:`CxlTransport.unregister` has nothing of its own to wait for.  A buffer the peer published
read-only (``"access": "ro"``) refuses WRITEs (``MC_E_DENIED``) untouched.  Limit: the window has
no per-range revocation word (a window may span hosts, with no control channel but the RPC port),
so a peer holding a stale descriptor can still copy into a range we unregistered until it
refreshes the descriptor; the window itself stays mapped, so this never faults.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mooncake._core import batch as _batch
from mooncake._core import copy as kc
from mooncake.errors import ConfigError, InvalidAddress, TransportUnavailable
from mooncake.fields import Field, FieldError, check_fields
from mooncake.options import Option
from mooncake.transport import Region, SegmentDesc, Transport, TransportContext

if TYPE_CHECKING:
    from mooncake._core.batch import Slices

__all__ = ["CxlTransport", "CxlWindow", "window", "DEFAULT_ALIGN"]

DEFAULT_ALIGN = 2 << 20
DAX_SYSFS = "/sys/bus/dax/devices"
E_PEER = _batch.E_PEER


#: the rows of the configuration table this transport reads
OPTIONS: tuple[Option, ...] = (
    # ---- CXL ----------------------------------------------------------------------------------
    Option("MC_CXL_DEV_PATH", str, "", owner="cxl", doc="DAX device (or file) of the CXL window",
           hint="e.g. /dev/dax0.0",
           reads=("transports/cxl.py",)),
    Option("MC_CXL_DEV_SIZE", "size", None, range=(1, None), unit="bytes", owner="cxl",
           doc="CXL window size (unset: /sys/bus/dax/devices/<dev>/size)",
           hint="e.g. 68719476736 (64 GiB)",
           reads=("transports/cxl.py",)),
    Option("transports/cxl/enable", bool, True, tent="transports/cxl/enable", owner="cxl",
           doc="TENT: enable the CXL transport",
           reads=("transports/cxl.py",)),
)


@dataclass(eq=False)
class CxlWindow:
    """The whole window, mapped shared in this process."""

    path: str
    name: str           # device name (dax0.0) or the file's real path
    size: int
    align: int
    ident: str          # "st_dev:st_ino" of a file-backed window, "" for a device
    mapping: kc.Mapping

    @property
    def addr(self) -> int:
        return self.mapping.addr

    def address(self, offset: int) -> int:
        """Local address of window offset ``offset``."""
        if not 0 <= offset < self.size:
            raise InvalidAddress(f"offset {offset} is outside the CXL window (0..{self.size - 1})")
        return self.addr + offset

    def offset(self, addr: int, length: int = 1) -> int:
        """Window offset of local range ``[addr, addr+length)``; InvalidAddress when outside."""
        off = addr - self.addr
        if off < 0 or length < 0 or off + length > self.size:
            raise InvalidAddress(f"range 0x{addr:x}+{length} is outside the CXL window "
                                 f"0x{self.addr:x}+{self.size} ({self.path})")
        return off

    def check_aligned(self, off: int, length: int) -> None:
        """devdax rule: ranges start and end on the device alignment."""
        if off % self.align or length % self.align or length <= 0:
            raise InvalidAddress(
                f"CXL range at offset {off} with length {length} is not aligned: offsets and "
                f"lengths must be positive multiples of the device alignment {self.align} "
                f"({self.align >> 20} MiB) on {self.name}")


_windows: dict[tuple[str, int | None], CxlWindow] = {}
_wlock = threading.Lock()


def _sysfs_int(dev: str, what: str) -> int | None:
    try:
        with open(os.path.join(DAX_SYSFS, dev, what)) as f:
            return int(f.read().strip(), 0)
    except (OSError, ValueError):
        return None


def window(path: str | None = None, size: int | None = None) -> CxlWindow:
    """Map (once per process) and return the CXL window; defaults from ``MC_CXL_DEV_PATH`` and
    ``MC_CXL_DEV_SIZE``.  ``ConfigError`` names what is wrong with the path or size."""
    if not path or size is None:
        from mooncake.config import load_config  # validates MC_CXL_DEV_SIZE like every option

        cfg = load_config()
        path = path or cfg["MC_CXL_DEV_PATH"]
        size = cfg["MC_CXL_DEV_SIZE"] if size is None else size
    if not path:
        raise ConfigError("MC_CXL_DEV_PATH is not set; allowed: a DAX device (/dev/daxX.Y) or a "
                          "file standing in for one")
    key = (os.path.realpath(path), size)
    with _wlock:
        w = _windows.get(key)
        if w is None or w.mapping.closed:
            w = _windows[key] = _open_window(path, size)
        return w


def _open_window(path: str, size: int | None) -> CxlWindow:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise ConfigError(f"MC_CXL_DEV_PATH={path!r}: {e.strerror}; allowed: a DAX device "
                          "(/dev/daxX.Y) or a regular file") from None
    is_dev = stat.S_ISCHR(st.st_mode)
    if not (is_dev or stat.S_ISREG(st.st_mode)):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a file or device"
        raise ConfigError(f"MC_CXL_DEV_PATH={path!r} is {kind}; allowed: a DAX character "
                          "device (/dev/daxX.Y) or a regular file (e.g. on /dev/shm)")
    dev = os.path.basename(real)
    align = (_sysfs_int(dev, "align") if is_dev else None) or DEFAULT_ALIGN
    if size is None:
        size = _sysfs_int(dev, "size") if is_dev else st.st_size
        if not size:
            raise ConfigError(f"MC_CXL_DEV_SIZE is unset and the size of {path!r} is unknown "
                              f"({DAX_SYSFS}/{dev}/size unreadable or the file is empty); set "
                              "MC_CXL_DEV_SIZE to the window size in bytes")
    if size <= 0 or size % align:
        raise ConfigError(f"MC_CXL_DEV_SIZE={size} is not a positive multiple of the device "
                          f"alignment {align}")
    if not is_dev and st.st_size < size:
        raise ConfigError(f"MC_CXL_DEV_PATH={path!r} is too small: it holds {st.st_size} bytes, "
                          f"the window needs MC_CXL_DEV_SIZE={size}")
    try:
        fd = os.open(real, os.O_RDWR)
    except OSError as e:
        raise ConfigError(f"cannot open MC_CXL_DEV_PATH={path!r}: {e.strerror}") from None
    try:
        m = kc.Mapping.from_fd(fd, size)  # always MAP_SHARED
    except OSError as e:
        raise ConfigError(f"cannot map the CXL window {path!r} ({size} bytes): {e.strerror}; "
                          f"devdax needs MAP_SHARED and {align}-byte aligned sizes") from None
    finally:
        os.close(fd)
    ident = "" if is_dev else f"{st.st_dev}:{st.st_ino}"
    return CxlWindow(path, dev if is_dev else real, size, align, ident, m)


class CxlTransport(Transport):
    """Copies between local memory and registered ranges of the shared CXL window."""

    name: ClassVar[str] = "cxl"
    options: ClassVar[tuple[Option, ...]] = OPTIONS
    auto_priority: ClassVar[int] = 20
    memory_kinds: ClassVar[frozenset[str]] = frozenset({"cpu", "cxl"})
    segment_fields: ClassVar[dict[str, Field]] = {
        "cxl_name": Field("str", max_len=4096, pattern=r"[^\x00-\x1f]{1,4096}"),
        "cxl_base_addr": Field("int", 0, (1 << 64) - 1),
        "size": Field("int", 1, (1 << 63) - 1),
        "align": Field("int", 1, 1 << 40),
        "ident": Field("str", max_len=41, pattern=r"([0-9]{1,20}:[0-9]{1,20})?"),
    }
    buffer_fields: ClassVar[dict[str, Field]] = {"offset": Field("int", 0, (1 << 63) - 1)}

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.enabled = cfg["transports/cxl/enable"]
        self.path = cfg["MC_CXL_DEV_PATH"]
        self.size = cfg["MC_CXL_DEV_SIZE"]
        self.inline_max = cfg["transports/shm/async_memcpy_threshold"] * 1024  # KiB, as TENT
        self.nworkers = cfg["MC_WORKERS_PER_CTX"]
        #: TENT's grace period: idle copy workers poll this long before they sleep
        self.grace = cfg["transports/rdma/workers/grace_period_ns"] / 1e9
        self.window: CxlWindow | None = None
        self.pool: kc.CopyPool | None = None
        self._peer = kc.Peer(0)  # no process behind the window
        self._tables: dict[str, tuple[tuple, kc.Table]] = {}

    def start(self) -> dict:
        if not self.enabled:
            raise TransportUnavailable("cxl is disabled by transports/cxl/enable=false")
        if not self.path:
            raise TransportUnavailable("cxl needs MC_CXL_DEV_PATH (a DAX device or a file)")
        self.window = window(self.path, int(self.size) if self.size else None)
        self.pool = kc.CopyPool(self.nworkers, self.grace)
        w = self.window
        return {"cxl_name": w.name, "cxl_base_addr": w.addr, "size": w.size, "align": w.align,
                "ident": w.ident}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close(_batch.E_CLOSED)  # queued copies end FAILED: closed
            self.pool = None
        self._tables.clear()

    def register(self, region: Region) -> dict | None:
        w = self.window
        if w is None:
            return None
        off = region.addr - w.addr
        inside = 0 <= off and off + region.length <= w.size
        if not inside:
            if region.location == "cxl":
                raise InvalidAddress(
                    f"0x{region.addr:x}+{region.length} is registered as 'cxl' but is not inside "
                    f"the CXL window 0x{w.addr:x}+{w.size}; register a range of "
                    "mooncake's window (transports.cxl.window().address(offset))")
            return None
        w.check_aligned(off, region.length)
        return {"offset": off}

    def unregister(self, region: Region) -> None:
        """Nothing to wait for: our copies touching the region belong to tasks the engine waits
        for, and each of them stops at its next chunk once the region is revoked."""

    def can_reach(self, peer: SegmentDesc) -> str | None:
        w = self.window
        if w is None:
            return "cxl is not started (MC_CXL_DEV_PATH unset or transports/cxl/enable=false)"
        info = peer.transports.get("cxl")
        if not info:
            return "peer does not publish cxl"
        try:
            check_fields(info, self.segment_fields, "transports.cxl")
        except FieldError as e:
            return f"peer's cxl descriptor is malformed: {e}"
        if info.get("cxl_name") != w.name or info.get("size") != w.size:
            return (f"peer maps another CXL window ({info.get('cxl_name')!r}, {info.get('size')} "
                    f"bytes; ours {w.name!r}, {w.size} bytes)")
        if w.ident and (info.get("ident") != w.ident or peer.host_id != self.ctx.host_id):
            return "peer's file-backed CXL window is another file or on another host"
        return None

    def peer_address(self, peer: SegmentDesc, offset: int) -> int:
        """The peer's virtual address of window offset ``offset`` (Mooncake target_offset)."""
        return int(peer.transports["cxl"]["cxl_base_addr"]) + offset

    def _table(self, peer: SegmentDesc) -> kc.Table:
        key = (peer.timestamp, id(peer.buffers), len(peer.buffers))
        hit = self._tables.get(peer.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        w = self.window
        virt, raw = [], []
        for b in peer.buffers:
            f = b.transports.get("cxl")
            try:
                check_fields(f, self.buffer_fields, "buffer.transports.cxl")
            except FieldError:
                continue  # not a window range
            off = f["offset"]
            if off > w.size or b.length > w.size - off:
                continue  # not inside our window
            wr = bool(getattr(b, "writable", True))
            virt.append((b.addr, b.length, kc.KIND_MEM, w.mapping, off, None, 0, 0, None, 0, wr))
            raw.append((off, b.length, kc.KIND_MEM, w.mapping, off, None, 0, 0, None, 0, wr))
        rows = virt
        lo = min((r[0] for r in virt), default=0)
        if all(r[0] + r[1] <= lo for r in raw):  # raw offsets never collide with addresses
            rows = virt + raw
        table = kc.Table(rows)
        self._tables[peer.name] = (key, table)
        return table

    def submit(self, peer: SegmentDesc, slices: Slices) -> None:
        if self.pool is None or self.window is None:
            slices.fail_all(E_PEER)
            return
        self.pool.submit(slices, self._peer, self._table(peer), self.inline_max)

    def transfer(self, peer: SegmentDesc, slices: Slices, timeout: float) -> bool:
        """Synchronous: the calling thread copies its share (all of a small call)."""
        if self.pool is None or self.window is None:
            slices.fail_all(E_PEER)
            return True
        return self.pool.transfer(slices, self._peer, self._table(peer), self.inline_max,
                                  timeout)
