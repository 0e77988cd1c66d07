"""Where host memory lives: the NUMA node of a buffer's pages, and placing pages on a node.

``node_of(addr, length)`` asks the kernel (``move_pages(2)`` with no target nodes: a query) for
the node of a few pages spread over the range and returns the one most of them are on; pages
never touched have no node yet (``None`` for them all).  ``bind(addr, length, node)`` moves a
range's pages to ``node`` (``mbind(2)`` with ``MPOL_MF_MOVE``): what tests and benches use to
put a buffer where they want it.  ``with preferred(node):`` makes the calling thread's new
pages prefer ``node`` (``set_mempolicy(2)``, restored after): the rdma transport creates a NIC's
queues so, on the NIC's node.  All go through ``syscall(2)`` (glibc has no wrapper; libnuma is
not needed).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["node_of", "bind", "preferred", "node_count", "NumaError"]

# (mbind, move_pages, set_mempolicy, get_mempolicy) per machine
_SYSCALLS = {"x86_64": (237, 279, 238, 239), "aarch64": (235, 239, 237, 236),
             "ppc64le": (259, 301, 261, 260)}
_MPOL_DEFAULT, _MPOL_PREFERRED, _MPOL_BIND = 0, 1, 2
_MASK_BITS = 1024
_MPOL_MF_STRICT, _MPOL_MF_MOVE = 1, 2
_PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class NumaError(OSError):
    """The kernel refused a NUMA query or move (no NUMA support, a bad node...)."""


def _nr(which: int) -> int:
    nums = _SYSCALLS.get(platform.machine())
    if nums is None:
        raise NumaError(errno.ENOSYS, f"NUMA syscalls unknown on {platform.machine()}")
    return nums[which]


def node_count() -> int:
    """NUMA nodes the kernel shows (``/sys/devices/system/node``); 1 without NUMA."""
    try:
        return max(1, sum(1 for n in os.listdir("/sys/devices/system/node")
                          if n.startswith("node") and n[4:].isdigit()))
    except OSError:
        return 1


def _nodes(addr: int, length: int, samples: int) -> list[int]:
    first = addr - addr % _PAGE
    npages = max(1, (addr + max(length, 1) - first + _PAGE - 1) // _PAGE)
    count = min(samples, npages)
    step = npages / count
    pages = (ctypes.c_void_p * count)(*[first + int(i * step) * _PAGE for i in range(count)])
    status = (ctypes.c_int * count)()
    rc = _libc.syscall(_nr(1), 0, ctypes.c_ulong(count), pages, None, status, 0)
    if rc < 0:
        e = ctypes.get_errno()
        raise NumaError(e, f"move_pages: {os.strerror(e)}")
    return list(status)


def node_of(addr: int, length: int = 1, samples: int = 16) -> int | None:
    """The NUMA node most of ``[addr, addr + length)``'s pages are on (``samples`` pages
    looked at), or None when none of them is backed yet (never touched) or the kernel cannot
    say."""
    try:
        got = [n for n in _nodes(addr, length, samples) if n >= 0]
    except NumaError:
        return None
    return Counter(got).most_common(1)[0][0] if got else None


def bind(addr: int, length: int, node: int) -> None:
    """Move the pages of ``[addr, addr + length)`` to ``node`` and keep them there: pages
    touched later are placed there too (page-aligned ranges).  Raises :class:`NumaError`."""
    if addr % _PAGE or length <= 0:
        raise ValueError(f"bind needs a page-aligned range, got {addr:#x}+{length}")
    if not 0 <= node < 64:
        raise ValueError(f"node {node} is out of 0..63")
    mask = ctypes.c_ulong(1 << node)
    rc = _libc.syscall(_nr(0), ctypes.c_void_p(addr), ctypes.c_ulong(length), _MPOL_BIND,
                       ctypes.byref(mask), ctypes.c_ulong(64), _MPOL_MF_MOVE | _MPOL_MF_STRICT)
    if rc < 0:
        e = ctypes.get_errno()
        raise NumaError(e, f"mbind to node {node}: {os.strerror(e)}")


@contextmanager
def preferred(node: int | None) -> Iterator[bool]:
    """Within the block, pages this thread's allocations touch first prefer ``node`` (the kernel
    falls back to other nodes when it is full); the thread's previous policy comes back after.
    Yields whether the policy was set: False for ``None``/-1, or where the kernel refuses it
    (no NUMA), and the block then runs unchanged."""
    if node is None or node < 0:
        yield False
        return
    if node >= _MASK_BITS:
        raise ValueError(f"node {node} is out of 0..{_MASK_BITS - 1}")
    words = _MASK_BITS // (8 * ctypes.sizeof(ctypes.c_ulong))
    old_mode, old_mask = ctypes.c_int(0), (ctypes.c_ulong * words)()
    try:
        if _libc.syscall(_nr(3), ctypes.byref(old_mode), old_mask, ctypes.c_ulong(_MASK_BITS),
                         None, ctypes.c_ulong(0)) < 0:
            yield False
            return
        mask = (ctypes.c_ulong * words)()
        bits = 8 * ctypes.sizeof(ctypes.c_ulong)
        mask[node // bits] = 1 << (node % bits)
        ok = _libc.syscall(_nr(2), _MPOL_PREFERRED, mask, ctypes.c_ulong(_MASK_BITS)) == 0
    except NumaError:  # an unknown machine
        yield False
        return
    try:
        yield ok
    finally:
        if ok:
            mode = old_mode.value  # with its flags (MPOL_F_STATIC_NODES...)
            default = mode == _MPOL_DEFAULT
            _libc.syscall(_nr(2), mode, None if default else old_mask,
                          ctypes.c_ulong(0 if default else _MASK_BITS))
