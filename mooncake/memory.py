"""Local memory: addresses of Python buffers, and shm-backed managed buffers."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Any

from mooncake.errors import InvalidAddress

__all__ = ["buffer_info", "ManagedBuffer", "allocate_shm", "memfd_buffer", "seal_memfd", "SEALS"]


def buffer_info(obj: Any) -> tuple[int, int, str]:
    """``(address, nbytes, location)`` of a contiguous buffer: NumPy/CuPy arrays (array or CUDA
    array interface), DLPack-capable arrays, ``bytearray``, ``memoryview``, ``mmap``...

    Raises :class:`InvalidAddress` for non-contiguous or read-only-incompatible inputs.
    """
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        if cai.get("strides") is not None and not _c_contiguous(cai):
            raise InvalidAddress("CUDA array is not C-contiguous")
        dev = getattr(getattr(obj, "device", None), "id", 0)
        return cai["data"][0], _nbytes(cai), f"cuda:{dev}"
    ai = getattr(obj, "__array_interface__", None)
    if ai is not None:
        if ai.get("strides") is not None and not _c_contiguous(ai):
            raise InvalidAddress("array is not C-contiguous; pass a contiguous array")
        return ai["data"][0], _nbytes(ai), "cpu:0"
    try:
        mv = memoryview(obj)
    except TypeError:
        raise InvalidAddress(
            f"cannot take the address of a {type(obj).__name__}: pass an int address, a NumPy/"
            "CuPy array or a writable buffer (bytearray, memoryview, mmap)"
        ) from None
    if not mv.c_contiguous:
        raise InvalidAddress("buffer is not C-contiguous")
    if mv.nbytes == 0:
        raise InvalidAddress("buffer is empty")
    if mv.readonly:
        import numpy as np

        addr = np.frombuffer(mv, dtype=np.uint8).__array_interface__["data"][0]
    else:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mv))
    return addr, mv.nbytes, "cpu:0"


def _nbytes(ai: dict) -> int:
    import numpy as np

    n = int(np.dtype(ai["typestr"]).itemsize)
    for d in ai["shape"]:
        n *= int(d)
    return n


def _c_contiguous(ai: dict) -> bool:
    import numpy as np

    itemsize = np.dtype(ai["typestr"]).itemsize
    expect = itemsize
    for dim, stride in zip(reversed(ai["shape"]), reversed(ai["strides"]), strict=True):
        if dim > 1 and stride != expect:
            return False
        expect *= dim
    return True


#: seals of a managed buffer's memfd: its size can never change, so a peer that maps it can
#: never fault on a truncated page (SIGBUS); the seals themselves are final
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@dataclass(eq=False)
class ManagedBuffer:
    """A buffer the engine allocated on a memfd, shared-mapped.  Same-host peers map it by its
    ``shm_name``, ``/proc/<pid>/fd/<fd>``; the kernel frees it with the process, so a crash
    leaves nothing behind in ``/dev/shm``.  The memfd is sealed against shrinking and growing
    (``sealed``), which is what lets a peer map it without risking SIGBUS; peers use
    cross-memory attach for an unsealed one."""

    addr: int
    length: int
    mm: mmap.mmap
    shm_name: str | None
    _anchor: Any = None  # ctypes view pinning the address; dropped before close
    fd: int = -1
    sealed: bool = False

    def close(self) -> None:
        self._anchor = None
        try:
            self.mm.close()
        except BufferError:  # someone still exports a view; let GC close it
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def seal_memfd(fd: int) -> bool:
    """Seal a memfd's size (:data:`SEALS`); False when the kernel or file cannot be sealed
    (created without ``MFD_ALLOW_SEALING``, a kernel without hugetlbfs seals)."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError:
        return False
    return True


def memfd_buffer(length: int, size: int, flags: int = 0, cls: type = ManagedBuffer,
                 **extra: Any) -> ManagedBuffer:
    """Map a new memfd of ``size`` bytes (``memfd_create`` ``flags``) as a ``cls`` buffer whose
    usable length is ``length``; its size is sealed (:func:`seal_memfd`).  OSError propagates
    (the fd is closed).  The name peers open is ``/proc/<pid>/fd/<fd>``."""
    fd = os.memfd_create(f"mooncake_{os.getpid()}",
                         os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | flags)
    try:
        os.ftruncate(fd, size)
        sealed = seal_memfd(fd)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        raise
    anchor = ctypes.c_char.from_buffer(mm)
    return cls(ctypes.addressof(anchor), length, mm, f"/proc/{os.getpid()}/fd/{fd}", anchor,
               fd=fd, sealed=sealed, **extra)


def allocate_shm(length: int) -> ManagedBuffer:
    """A fresh shared buffer of ``length`` bytes (see :class:`ManagedBuffer`)."""
    if not isinstance(length, int) or length <= 0:
        raise InvalidAddress(f"managed buffer length must be a positive int, got {length!r}")
    return memfd_buffer(length, length)
