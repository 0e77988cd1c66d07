"""HugeTLB-backed managed buffers (``MC_STORE_USE_HUGEPAGE``, ``MC_STORE_HUGEPAGE_SIZE``).

:func:`allocate` maps a ``memfd_create(MFD_HUGETLB)`` file shared, so the buffer is backed by
reserved huge pages (2 MiB or 1 GiB) and same-host peers can still map it: its ``shm_name`` is
always ``/proc/<pid>/fd/<fd>`` (the only form the ``shm`` transport accepts; the kernel lets
processes that may attach to us open it), and the memfd is sealed against shrinking and growing
(:func:`mooncake.memory.memfd_buffer`), so a peer's mapping can never fault.  The memfd disappears
with the process, so a crash leaks nothing.  With ``MC_STORE_USE_HUGEPAGE`` off it returns an
ordinary (sealed) memfd buffer.

When the pool lacks free pages the error says how to reserve them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mooncake.errors import InvalidAddress, MooncakeError
from mooncake.memory import ManagedBuffer, allocate_shm, memfd_buffer

__all__ = ["allocate", "free", "HugeBuffer", "HugepageUnavailable", "page_sizes", "pool_state"]

MiB, GiB = 1 << 20, 1 << 30
MFD_HUGETLB = 0x0004
MFD_HUGE_SHIFT = 26
SYSFS = "/sys/kernel/mm/hugepages"


class HugepageUnavailable(MooncakeError, MemoryError):
    """Not enough free huge pages of the requested size."""


@dataclass(eq=False)
class HugeBuffer(ManagedBuffer):
    """A managed buffer on huge pages; unpacks as ``(mmap_obj, addr, shm_name)``."""

    page_size: int = 2 * MiB

    def __iter__(self):
        return iter((self.mm, self.addr, self.shm_name))


def page_sizes() -> list[int]:
    """Huge page sizes the kernel offers, in bytes."""
    try:
        names = os.listdir(SYSFS)
    except OSError:
        return []
    return sorted(int(n.split("-")[1].rstrip("kB")) * 1024 for n in names
                  if n.startswith("hugepages-"))


def pool_state(page_size: int) -> tuple[int, int]:
    """``(total, free)`` pages of ``page_size`` bytes in the kernel's HugeTLB pool."""
    d = f"{SYSFS}/hugepages-{page_size // 1024}kB"
    try:
        with open(f"{d}/nr_hugepages") as f:
            total = int(f.read())
        with open(f"{d}/free_hugepages") as f:
            free_ = int(f.read())
    except (OSError, ValueError):
        return 0, 0
    return total, free_


def _how_to_reserve(page_size: int, pages: int) -> str:
    total, free_ = pool_state(page_size)
    label = "2 MiB" if page_size == 2 * MiB else "1 GiB"
    knob = ("/proc/sys/vm/nr_hugepages" if page_size == 2 * MiB and
            os.path.exists("/proc/sys/vm/nr_hugepages")
            else f"{SYSFS}/hugepages-{page_size // 1024}kB/nr_hugepages")
    return (f"{pages} free {label} huge pages are needed, the pool has {free_} free of {total}; "
            f"reserve more as root: `echo {total + pages} > {knob}` (or boot with "
            f"hugepagesz={'2M' if page_size == 2 * MiB else '1G'} hugepages=N), or unset "
            "MC_STORE_USE_HUGEPAGE")


def allocate(length: int, config: Any) -> ManagedBuffer:
    """A managed buffer of ``length`` bytes for ``TransferEngine.allocate_managed_buffer``.

    Huge pages when ``config["MC_STORE_USE_HUGEPAGE"]`` (size ``MC_STORE_HUGEPAGE_SIZE``), else
    ``/dev/shm``.  The result has ``.addr``, ``.length``, ``.mm``, ``.shm_name``, ``.close()``
    and unpacks as ``(mmap_obj, addr, shm_name_or_None)``.  Raises :class:`HugepageUnavailable`
    (with how to reserve pages) when the pool is short, :class:`InvalidAddress` for length <= 0.
    """
    if not isinstance(length, int) or length <= 0:
        raise InvalidAddress(f"managed buffer length must be a positive int, got {length!r}")
    if not config["MC_STORE_USE_HUGEPAGE"]:
        return allocate_shm(length)
    page = config["MC_STORE_HUGEPAGE_SIZE"]  # validated by the config: 2 MiB or 1 GiB
    if page not in page_sizes():
        raise HugepageUnavailable(f"this kernel offers no {page >> 20} MiB huge pages "
                                  f"(sizes: {[p >> 20 for p in page_sizes()]} MiB)")
    size = -(-length // page) * page
    flags = MFD_HUGETLB | ((page.bit_length() - 1) << MFD_HUGE_SHIFT)
    try:
        return memfd_buffer(length, size, flags, HugeBuffer, page_size=page)
    except OSError as e:
        raise HugepageUnavailable(f"cannot map {length} bytes on huge pages ({e.strerror}): "
                                  + _how_to_reserve(page, size // page)) from None


def free(buf: ManagedBuffer) -> None:
    """Release a buffer from :func:`allocate` (unregister it first)."""
    buf.close()
