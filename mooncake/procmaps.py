"""What the kernel says about our own address space: is a range mapped, and writable?

Used when memory is registered by raw address (the Mooncake face): a buffer object tells us
whether it is read-only, a bare integer does not.  Reads ``/proc/self/maps`` once per call.
"""

from __future__ import annotations

__all__ = ["access_of"]


def access_of(addr: int, length: int, maps: str = "/proc/self/maps") -> str | None:
    """``"rw"`` when every byte of ``[addr, addr+length)`` is mapped writable, ``"r"`` when it is
    all mapped readable (some of it not writable), ``None`` when part of it is not mapped or not
    readable (or ``maps`` cannot be read: then ``"rw"`` is assumed, the caller's word)."""
    end = addr + length
    try:
        with open(maps) as f:
            lines = f.readlines()
    except OSError:
        return "rw"
    pos, writable = addr, True
    for line in lines:
        span, perms = line.split(None, 2)[:2]
        lo_s, hi_s = span.split("-")
        lo, hi = int(lo_s, 16), int(hi_s, 16)
        if hi <= pos:
            continue
        if lo > pos:
            return None  # a hole
        if perms[0] != "r":
            return None
        writable = writable and perms[1] == "w"
        pos = hi
        if pos >= end:
            return "rw" if writable else "r"
    return None
