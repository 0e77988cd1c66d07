"""Segment descriptors: encode ours, decode and validate peers', cache them."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from mooncake._core.regions import ALL, READ_ONLY, RegionTable
from mooncake.errors import SegmentNotFound
from mooncake.metadata.base import validate_descriptor
from mooncake.transport import BufferDesc, SegmentDesc, memory_kind

__all__ = ["host_identity", "decode", "SegmentCache"]

def host_identity() -> str:
    """This host as peers should see it: kernel boot id plus network-namespace inode."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    return f"{boot}/{netns}"


def decode(name: str, obj: Any, schemas: dict | None = None) -> SegmentDesc:
    """Validate a descriptor dict (:func:`validate_descriptor`, with the per-transport field
    ``schemas``) and build a :class:`SegmentDesc`; errors name the segment and the field."""
    obj = validate_descriptor(name, obj, schemas)
    bufs = [BufferDesc(b["addr"], b["length"], b["location"], b.get("shm_name"),
                       b.get("transports") or {}, b.get("access", "rw") != "ro")
            for b in obj["buffers"]]
    return SegmentDesc(name=obj["name"], host_id=obj["host_id"], pid=obj["pid"], buffers=bufs,
                       transports=obj["transports"], timestamp=float(obj["timestamp"]))


class _Entry:
    __slots__ = ("desc", "table", "fetched", "kinds", "read_only")

    def __init__(self, desc: SegmentDesc) -> None:
        self.desc = desc
        self.kinds = {memory_kind(b.location) for b in desc.buffers}
        self.read_only = any(not b.writable for b in desc.buffers)
        self.fetched = time.monotonic()
        self.table = RegionTable()
        for b in desc.buffers:
            try:
                self.table.add(b.addr, b.length, ALL if b.writable else READ_ONLY)
            except ValueError:
                raise SegmentNotFound(
                    f"segment {desc.name!r}: malformed descriptor: buffers overlap at 0x{b.addr:x}"
                ) from None


class SegmentCache:
    """Peers' descriptors with a region table each for fast remote-range checks."""

    def __init__(self, fetch, enabled: bool = True, refresh_interval: float = 0.0,
                 schemas: dict | None = None, verify=None) -> None:
        self._fetch = fetch
        #: ``verify(name, raw)`` raises for a descriptor that must not be trusted (its signature)
        self._verify = verify
        self.schemas = schemas or {}
        self.enabled = enabled
        self.refresh_interval = refresh_interval
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def get(self, name: str, refresh: bool = False) -> _Entry:
        e = self._entries.get(name)
        stale = e is not None and self.refresh_interval > 0 and (
            time.monotonic() - e.fetched > self.refresh_interval)
        if e is None or refresh or stale or not self.enabled:
            raw = self._fetch(name)
            if self._verify is not None:
                self._verify(name, raw)
            e = _Entry(decode(name, raw, self.schemas))
            with self._lock:
                self._entries[name] = e
        return e

    def cached(self, name: str) -> _Entry | None:
        """The entry held for ``name`` (no fetch), or None."""
        return self._entries.get(name)

    def drop(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)
