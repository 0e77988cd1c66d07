"""Segment descriptors: encode ours, decode and validate peers', cache them."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from mooncake._core.regions import RegionTable
from mooncake.errors import SegmentNotFound
from mooncake.transport import BufferDesc, SegmentDesc

__all__ = ["host_identity", "decode", "SegmentCache"]

_MAX_ADDR = 1 << 64


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


def decode(name: str, obj: Any) -> SegmentDesc:
    """Validate a descriptor dict and build a :class:`SegmentDesc`; errors name the segment."""

    def bad(why: str) -> SegmentNotFound:
        return SegmentNotFound(f"segment {name!r}: malformed descriptor: {why}")

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    bufs = obj.get("buffers", [])
    transports = obj.get("transports", {})
    if not isinstance(bufs, list) or not isinstance(transports, dict):
        raise bad("'buffers' must be a list and 'transports' an object")
    out = []
    for i, b in enumerate(bufs):
        if not isinstance(b, dict):
            raise bad(f"buffer {i} is not an object")
        addr, length = b.get("addr"), b.get("length")
        if not isinstance(addr, int) or not isinstance(length, int):
            raise bad(f"buffer {i} lacks integer 'addr'/'length'")
        if addr < 0 or length <= 0 or addr + length > _MAX_ADDR:
            raise bad(f"buffer {i} range 0x{addr:x}+{length} is outside the address space")
        out.append(BufferDesc(addr, length, str(b.get("location", "cpu:0")), b.get("shm_name"),
                              b.get("transports") or {}))
    return SegmentDesc(name=str(obj.get("name", name)), host_id=str(obj.get("host_id", "")),
                       pid=int(obj.get("pid", 0) or 0), buffers=out, transports=transports,
                       timestamp=float(obj.get("timestamp", 0.0) or 0.0))


class _Entry:
    __slots__ = ("desc", "table", "fetched")

    def __init__(self, desc: SegmentDesc) -> None:
        self.desc = desc
        self.fetched = time.monotonic()
        self.table = RegionTable()
        for b in desc.buffers:
            try:
                self.table.add(b.addr, b.length)
            except ValueError:
                raise SegmentNotFound(
                    f"segment {desc.name!r}: malformed descriptor: buffers overlap at 0x{b.addr:x}"
                ) from None


class SegmentCache:
    """Peers' descriptors with a region table each for fast remote-range checks."""

    def __init__(self, fetch, enabled: bool = True, refresh_interval: float = 0.0) -> None:
        self._fetch = fetch
        self.enabled = enabled
        self.refresh_interval = refresh_interval
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def get(self, name: str, refresh: bool = False) -> _Entry:
        e = self._entries.get(name)
        stale = e is not None and self.refresh_interval > 0 and (
            time.monotonic() - e.fetched > self.refresh_interval)
        if e is None or refresh or stale or not self.enabled:
            e = _Entry(decode(name, self._fetch(name)))
            with self._lock:
                self._entries[name] = e
        return e

    def drop(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)
