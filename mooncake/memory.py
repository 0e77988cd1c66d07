"""Local memory: addresses of Python buffers, and shm-backed managed buffers."""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
from dataclasses import dataclass
from typing import Any

from mooncake.errors import InvalidAddress

__all__ = ["buffer_info", "ManagedBuffer", "allocate_shm"]


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


@dataclass(eq=False)
class ManagedBuffer:
    """A buffer the engine allocated: shm-backed so same-host peers can map it by name."""

    addr: int
    length: int
    mm: mmap.mmap
    shm_name: str | None
    _anchor: Any = None  # ctypes view pinning the address; dropped before close

    def close(self) -> None:
        self._anchor = None
        try:
            self.mm.close()
        except BufferError:  # someone still exports a view; let GC close it
            pass
        if self.shm_name:
            try:
                os.unlink(f"/dev/shm/{self.shm_name}")
            except FileNotFoundError:
                pass


def allocate_shm(length: int) -> ManagedBuffer:
    """A fresh POSIX shm object ``/dev/shm/mooncake_<pid>_<random>`` of ``length`` bytes, mapped
    shared."""
    if length <= 0:
        raise InvalidAddress(f"managed buffer length must be > 0, got {length}")
    name = f"mooncake_{os.getpid()}_{secrets.token_hex(4)}"
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, length)
        mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.unlink(f"/dev/shm/{name}")
        raise
    finally:
        os.close(fd)
    anchor = ctypes.c_char.from_buffer(mm)
    return ManagedBuffer(ctypes.addressof(anchor), length, mm, name, anchor)
