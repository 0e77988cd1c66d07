"""HugeTLB-backed managed buffers: real reserved pages (as root; restored after), the error that
explains how to reserve them, and a same-host peer reaching such a buffer through ``shm``."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest

from mooncake import hugepage
from mooncake.config import load_config
from mooncake.errors import ConfigError, InvalidAddress

MiB, GiB = 1 << 20, 1 << 30


def knob(page: int) -> str:
    return f"{hugepage.SYSFS}/hugepages-{page // 1024}kB/nr_hugepages"


class Reserve:
    """Reserve ``n`` more huge pages of ``page`` bytes; put the old count back on exit."""

    def __init__(self, page: int, n: int) -> None:
        self.page, self.n = page, n

    def __enter__(self):
        path = knob(self.page)
        if not os.path.exists(path):
            pytest.skip(f"the kernel offers no {self.page >> 20} MiB huge pages")
        if os.geteuid() != 0:
            pytest.skip("reserving huge pages needs root (writes " + path + ")")
        self.old = int(open(path).read())
        try:
            with open(path, "w") as f:
                f.write(str(self.old + self.n))
        except OSError as e:
            pytest.skip(f"cannot reserve huge pages here: {e}")
        total, free_ = hugepage.pool_state(self.page)
        if free_ < self.n:
            self.__exit__()
            pytest.skip(f"the kernel reserved only {free_} of {self.n} {self.page >> 20} MiB "
                        "pages (memory fragmented)")
        return self

    def __exit__(self, *exc) -> None:
        with open(knob(self.page), "w") as f:
            f.write(str(self.old))

    def set(self, count: int) -> None:
        with open(knob(self.page), "w") as f:
            f.write(str(count))


def Cfg(use=True, size=2 * MiB):  # noqa: N802 (reads like the config it builds)
    return load_config({"MC_STORE_USE_HUGEPAGE": use, "MC_STORE_HUGEPAGE_SIZE": size})


def kernel_page_size(addr: int) -> int:
    """KernelPageSize of the mapping holding ``addr`` (from /proc/self/smaps), in bytes."""
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                cur = lo <= addr < hi
            elif cur and line.startswith("KernelPageSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


def test_two_mib_pages_back_the_buffer():
    with Reserve(2 * MiB, 3):
        total, free_before = hugepage.pool_state(2 * MiB)
        buf = hugepage.allocate(5 * MiB, Cfg())
        try:
            mm, addr, name = buf
            assert addr == buf.addr and addr % (2 * MiB) == 0 and buf.length == 5 * MiB
            assert name == f"/proc/{os.getpid()}/fd/{buf.fd}"
            assert kernel_page_size(addr) == 2 * MiB
            a = np.frombuffer(mm, dtype=np.uint8, count=5 * MiB)
            a[:] = 7
            assert hugepage.pool_state(2 * MiB)[1] == free_before - 3
            # a peer (here: a second mapping by the published name) sees the same pages
            with open(name, "rb") as f:
                assert f.read(4096) == b"\x07" * 4096
            # sealed: it can never shrink under a peer's mapping (no SIGBUS there)
            assert buf.sealed
            assert fcntl.fcntl(buf.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            with pytest.raises(PermissionError):
                os.ftruncate(buf.fd, 0)
            del a
        finally:
            hugepage.free(buf)
        assert hugepage.pool_state(2 * MiB)[1] == free_before


def test_no_free_pages_says_how_to_reserve():
    if os.geteuid() == 0 and os.path.exists(knob(2 * MiB)):
        with Reserve(2 * MiB, 0) as r:
            r.set(0)
            with pytest.raises(hugepage.HugepageUnavailable) as ei:
                hugepage.allocate(4 * MiB, Cfg())
    else:
        if hugepage.pool_state(2 * MiB)[1] >= 2:
            pytest.skip("huge pages are free here and we cannot empty the pool without root")
        with pytest.raises(hugepage.HugepageUnavailable) as ei:
            hugepage.allocate(4 * MiB, Cfg())
    msg = str(ei.value)
    assert "nr_hugepages" in msg and "echo" in msg and "2 free 2 MiB" in msg
    assert isinstance(ei.value, MemoryError)


def test_one_gib_pages():
    if GiB not in hugepage.page_sizes():
        pytest.skip("no 1 GiB huge pages on this kernel")
    with Reserve(GiB, 1):
        buf = hugepage.allocate(MiB, Cfg(size=GiB))
        try:
            assert buf.page_size == GiB and kernel_page_size(buf.addr) == GiB
        finally:
            hugepage.free(buf)


def test_off_gives_an_ordinary_shared_buffer():
    buf = hugepage.allocate(MiB, Cfg(use=False))
    try:
        assert buf.shm_name == f"/proc/{os.getpid()}/fd/{buf.fd}"
        assert buf.sealed and fcntl.fcntl(buf.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        for size in (0, MiB // 2, 2 * MiB):
            with pytest.raises(PermissionError):
                os.ftruncate(buf.fd, size)
        with open(buf.shm_name, "rb") as f:  # what a same-host peer opens
            assert os.fstat(f.fileno()).st_size == MiB
    finally:
        buf.close()
    assert not os.path.exists(buf.shm_name)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="MC_STORE_HUGEPAGE_SIZE.*allowed: one of 2097152"):
        hugepage.allocate(MiB, Cfg(size=4096))
    with pytest.raises(ConfigError, match="MC_STORE_HUGEPAGE_SIZE.*allowed: one of 2097152"):
        hugepage.allocate(MiB, Cfg(size="3MB"))
    with pytest.raises(InvalidAddress, match="positive"):
        hugepage.allocate(0, Cfg())
    assert Cfg(size="1GB")["MC_STORE_HUGEPAGE_SIZE"] == GiB
    assert Cfg(size="2MB")["MC_STORE_HUGEPAGE_SIZE"] == 2 * MiB
