"""Generate the sysfs/procfs fixture trees of ``tests/test_topology.py`` and ``test_doctor.py``.

    python tests/data/sysfs/make_fixtures.py          # rewrite every layout next to this file
    python tests/data/sysfs/make_fixtures.py DIR      # write them under DIR instead

Each layout is a tree with ``sys/`` and ``proc/`` as a real server has them, reduced to what
:mod:`mooncake.topology` and :mod:`mooncake.doctor` read: directories, small text files and
relative symlinks (``sys/class/*`` and ``sys/bus/pci/devices/*`` point into ``sys/devices``
the way the kernel's do, so ``os.path.realpath`` gives the same PCI paths).

* ``hgx8``: the seed's 8-GPU / 8-NIC 2-socket box (tuning chapter, section 12.10.1): NUMA 0
  holds GPU 0-3 and mlx5_bond_4..7, NUMA 1 GPU 4-7 and mlx5_bond_0..3.  Each socket has two
  root complexes; below each, a root port feeds a PCIe switch whose two downstream ports feed
  one lower switch each, and each lower switch holds one GPU (H100) and one NIC (ConnectX-7,
  two PFs in a RoCE LAG bond, netdev ``bondN``, MTU 4200).  So GPU0-mlx5_bond_4 is PIX,
  GPU0-mlx5_bond_5 PXB (three switches), GPU0-mlx5_bond_6/7 NODE, GPU0-mlx5_bond_0..3 SYS.
  Production settings: 4096 x 2 MiB huge pages, memlock unlimited, the seed's TCP sysctls,
  nvidia-peermem loaded.
* ``cpu2s``: a 2-socket CPU/storage node (a KV-cache pool member) without GPU: mlx5_0 (an
  InfiniBand ConnectX-6, IPoIB ib0) on a root port of NUMA 0's root complex, mlx5_1 (a RoCE
  ConnectX-6 Dx, MTU 9000) on NUMA 1's; the onboard NIC eno1 (MTU 1500) on another root port of
  NUMA 0's root complex carries Soft-RoCE rxe0, and rxe1 sits on a virtual netdev (dummy0).
  Distribution defaults: no huge pages, memlock 8 MiB, Debian's TCP buffer sysctls.

Like the kernel's, the trees hold symlink loops (an RDMA device's ``device`` link points back
to the PCI function above it); ``conftest.py`` here keeps pytest from walking them, and code that
copies them must keep symlinks (``shutil.copytree(..., symlinks=True)``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYOUTS = ("hgx8", "cpu2s")

BRIDGE = (0x060400, 0x8086, 0x352A)  # a PCIe port (root port or switch port)
SWITCH = (0x060400, 0x1000, 0xC030)  # Broadcom PEX89000 switch ports


class Tree:
    """Writes files and relative symlinks below ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def file(self, rel: str, text: str = "") -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + ("\n" if text else ""), encoding="utf-8")

    def link(self, rel: str, target: str) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(os.path.relpath(self.root / target, p.parent))


def _pci(t: Tree, path: str, cls: int, vendor: int, device: int, numa: int,
         driver: str | None = None, link: tuple[str, int] | None = None) -> str:
    """A PCI function at ``devices/<path>`` (``pci0000:15/0000:15:01.0/...``)."""
    d = f"sys/devices/{path}"
    t.file(f"{d}/class", f"0x{cls:06x}")
    t.file(f"{d}/vendor", f"0x{vendor:04x}")
    t.file(f"{d}/device", f"0x{device:04x}")
    t.file(f"{d}/numa_node", str(numa))
    if link:
        for k in ("current", "max"):
            t.file(f"{d}/{k}_link_speed", link[0])
            t.file(f"{d}/{k}_link_width", str(link[1]))
    bdf = path.rsplit("/", 1)[-1]
    t.link(f"sys/bus/pci/devices/{bdf}", d)
    if driver:
        t.file(f"sys/bus/pci/drivers/{driver}/bind")
        t.link(f"{d}/driver", f"sys/bus/pci/drivers/{driver}")
    return d


def _netdev(t: Tree, parent: str, name: str, mtu: int, mac: str) -> None:
    """A netdev below ``parent`` (a PCI function's directory, or ``sys/devices/virtual``)."""
    d = f"{parent}/net/{name}"
    t.file(f"{d}/mtu", str(mtu))
    t.file(f"{d}/operstate", "up")
    t.file(f"{d}/address", mac)
    t.link(f"sys/class/net/{name}", d)


def _mac_gid(mac: str) -> str:
    """The fe80::/64 GID of a MAC (EUI-64)."""
    b = [int(x, 16) for x in mac.split(":")]
    eui = [b[0] ^ 2, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]]
    return "fe80:0000:0000:0000:" + ":".join(f"{eui[i]:02x}{eui[i + 1]:02x}"
                                              for i in range(0, 8, 2))


def _v4_gid(ip: str) -> str:
    a, b, c, d = (int(x) for x in ip.split("."))
    return f"0000:0000:0000:0000:0000:ffff:{a:02x}{b:02x}:{c:02x}{d:02x}"


ZERO_GID = ":".join(["0000"] * 8)


def _ibdev(t: Tree, name: str, parent: str | None, *, link_layer: str, state: str, rate: str,
           gids: list[tuple[str, str, str | None]], lid: int = 0, slots: int = 8,
           netdev_parent: str | None = None, fw: str = "", hca: str = "") -> None:
    """An RDMA device: below its PCI function ``parent``, or virtual (soft) when None.
    ``gids``: ``(gid, sysfs type, netdev)`` rows for slots 0..; the rest of the ``slots``
    are empty (zero GID, no type, no netdev: reading those fails on a real kernel)."""
    d = f"{parent}/infiniband/{name}" if parent else f"sys/devices/virtual/infiniband/{name}"
    t.link(f"sys/class/infiniband/{name}", d)
    if parent:
        t.link(f"{d}/device", parent)
    t.file(f"{d}/node_type", "1: CA")
    if fw:
        t.file(f"{d}/fw_ver", fw)
    if hca:
        t.file(f"{d}/hca_type", hca)
    if netdev_parent:  # rxe names its netdev
        t.file(f"{d}/parent", netdev_parent)
    p = f"{d}/ports/1"
    t.file(f"{p}/state", state)
    t.file(f"{p}/phys_state", "5: LinkUp" if "ACTIVE" in state else "3: Disabled")
    t.file(f"{p}/link_layer", link_layer)
    t.file(f"{p}/rate", rate)
    t.file(f"{p}/lid", f"0x{lid:x}")
    for i in range(slots):
        if i < len(gids):
            gid, typ, ndev = gids[i]
            t.file(f"{p}/gids/{i}", gid)
            t.file(f"{p}/gid_attrs/types/{i}", typ)
            if ndev:
                t.file(f"{p}/gid_attrs/ndevs/{i}", ndev)
        else:
            t.file(f"{p}/gids/{i}", ZERO_GID)


def _numa(t: Tree, nodes: list[tuple[str, int]], online: str) -> None:
    base = "sys/devices/system/node"
    for i, (cpus, mem_kib) in enumerate(nodes):
        t.file(f"{base}/node{i}/cpulist", cpus)
        t.file(f"{base}/node{i}/meminfo",
               f"Node {i} MemTotal:       {mem_kib} kB\nNode {i} MemFree:        "
               f"{mem_kib // 2} kB")
    t.file(f"{base}/online", f"0-{len(nodes) - 1}")
    t.file(f"{base}/possible", f"0-{len(nodes) - 1}")
    t.file("sys/devices/system/cpu/online", online)


def _proc(t: Tree, *, mem_kib: int, huge: dict[int, int], sysctl: dict[str, str],
          memlock: str, osrelease: str) -> None:
    """``huge``: ``{page size in KiB: pages reserved}`` (all free)."""
    for size, n in huge.items():
        d = f"sys/kernel/mm/hugepages/hugepages-{size}kB"
        t.file(f"{d}/nr_hugepages", str(n))
        t.file(f"{d}/free_hugepages", str(n))
        t.file(f"{d}/resv_hugepages", "0")
        t.file(f"{d}/surplus_hugepages", "0")
    n2m = huge.get(2048, 0)
    t.file("proc/meminfo", "\n".join([
        f"MemTotal:       {mem_kib} kB", f"MemFree:        {mem_kib // 2} kB",
        f"HugePages_Total: {n2m:6d}", f"HugePages_Free:  {n2m:6d}", "HugePages_Rsvd:       0",
        "HugePages_Surp:       0", "Hugepagesize:       2048 kB",
        f"Hugetlb:        {sum(s * n for s, n in huge.items())} kB"]))
    t.file("proc/sys/vm/nr_hugepages", str(n2m))
    for k, v in sysctl.items():
        t.file(f"proc/sys/{k}", v)
    t.file("proc/sys/kernel/osrelease", osrelease)
    t.file("proc/self/limits", "\n".join([
        "Limit                     Soft Limit           Hard Limit           Units     ",
        "Max open files            1048576              1048576              files     ",
        f"Max locked memory         {memlock:<20} {memlock:<20} bytes     "]))
    t.file("proc/self/status", "Name:\tpython3\nCapInh:\t0000000000000000\n"
           "CapPrm:\t0000000000000000\nCapEff:\t0000000000000000")


SEED_SYSCTL = {"net/core/rmem_max": "16777216", "net/core/wmem_max": "16777216",
               "net/ipv4/tcp_rmem": "4096\t87380\t16777216",
               "net/ipv4/tcp_wmem": "4096\t65536\t16777216"}
DEBIAN_SYSCTL = {"net/core/rmem_max": "212992", "net/core/wmem_max": "212992",
                 "net/ipv4/tcp_rmem": "4096\t131072\t6291456",
                 "net/ipv4/tcp_wmem": "4096\t16384\t4194304"}


def hgx8(t: Tree) -> None:
    _numa(t, [("0-47,96-143", 1056375680), ("48-95,144-191", 1056961024)], "0-191")
    # (root bus, NUMA node, [(GPU index, bond index), (GPU index, bond index)])
    complexes = [(0x15, 0, [(0, 4), (1, 5)]), (0x37, 0, [(2, 6), (3, 7)]),
                 (0x97, 1, [(4, 0), (5, 1)]), (0xB7, 1, [(6, 2), (7, 3)])]
    gen5 = ("32.0 GT/s PCIe", 16)
    for bus, numa, pairs in complexes:
        rp = f"pci0000:{bus:02x}/0000:{bus:02x}:01.0"
        _pci(t, rp, *BRIDGE, numa)
        up = f"{rp}/0000:{bus + 1:02x}:00.0"  # the upper switch
        _pci(t, up, *SWITCH, numa)
        for j, (_gpu, bond) in enumerate(pairs):
            b = bus + 2 + 4 * j  # this pair's buses: b (unused), b+1 .. b+4
            dn = f"{up}/0000:{bus + 2:02x}:{j:02x}.0"
            _pci(t, dn, *SWITCH, numa)
            lo = f"{dn}/0000:{b + 1:02x}:00.0"  # the lower switch
            _pci(t, lo, *SWITCH, numa)
            gdn = f"{lo}/0000:{b + 2:02x}:00.0"
            ndn = f"{lo}/0000:{b + 2:02x}:01.0"
            _pci(t, gdn, *SWITCH, numa)
            _pci(t, ndn, *SWITCH, numa)
            _pci(t, f"{gdn}/0000:{b + 3:02x}:00.0", 0x030200, 0x10DE, 0x2330, numa,
                 driver="nvidia", link=gen5)
            nic = f"{ndn}/0000:{b + 4:02x}:00.0"
            for fn in (0, 1):  # two PFs, bonded (RoCE LAG): one RDMA device on PF0
                pf = _pci(t, f"{nic[:-1]}{fn}", 0x020000, 0x15B3, 0x1021, numa,
                          driver="mlx5_core", link=gen5)
                _netdev(t, pf, f"ens{b + 4}f{fn}np{fn}", 4200,
                        f"b8:3f:d2:{bond:02x}:00:{fn:02x}")
            mac = f"b8:3f:d2:{bond:02x}:00:00"
            _netdev(t, "sys/devices/virtual", f"bond{bond}", 4200, mac)
            ip = f"10.{bond}.0.11"
            nd = f"bond{bond}"
            _ibdev(t, f"mlx5_bond_{bond}", f"sys/devices/{nic}", link_layer="Ethernet",
                   state="4: ACTIVE", rate="400 Gb/sec (4X NDR)", fw="28.39.1002",
                   hca="MT4129",
                   gids=[(_mac_gid(mac), "IB/RoCE v1", nd), (_mac_gid(mac), "RoCE v2", nd),
                         (_v4_gid(ip), "IB/RoCE v1", nd), (_v4_gid(ip), "RoCE v2", nd)])
    _proc(t, mem_kib=2113336704, huge={2048: 4096, 1048576: 0}, sysctl=SEED_SYSCTL,
          memlock="unlimited", osrelease="5.15.0-105-generic")
    t.file("sys/module/nvidia/version", "535.161.08")
    t.file("sys/module/nvidia_peermem/initstate", "live")
    t.file("sys/module/ib_uverbs/initstate", "live")
    t.file("proc/driver/nvidia/version",
           "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.161.08  Thu Feb 22 2024\n"
           "GCC version:  gcc version 11.4.0 (Ubuntu 11.4.0-1ubuntu1~22.04)")


def cpu2s(t: Tree) -> None:
    _numa(t, [("0-31", 263842304), ("32-63", 264235008)], "0-63")
    gen4 = ("16.0 GT/s PCIe", 16)
    _pci(t, "pci0000:00/0000:00:02.0", *BRIDGE, 0)
    ib = _pci(t, "pci0000:00/0000:00:02.0/0000:01:00.0", 0x020700, 0x15B3, 0x101B, 0,
              driver="mlx5_core", link=gen4)
    _netdev(t, ib, "ib0", 4092, "00:00:10:29:fe:80:00:00:00:00:00:00:0c:42:a1:03:00:6e:5a:10")
    _ibdev(t, "mlx5_0", ib, link_layer="InfiniBand", state="4: ACTIVE",
           rate="200 Gb/sec (4X HDR)", lid=0x12, fw="20.40.1000", hca="MT4123",
           gids=[("fe80:0000:0000:0000:0c42:a103:006e:5a10", "IB/RoCE v1", None)])
    _pci(t, "pci0000:00/0000:00:1c.0", *BRIDGE, 0)
    eth = _pci(t, "pci0000:00/0000:00:1c.0/0000:02:00.0", 0x020000, 0x8086, 0x1521, 0,
               driver="igb", link=("5.0 GT/s PCIe", 4))
    _netdev(t, eth, "eno1", 1500, "3c:ec:ef:10:20:30")
    _ibdev(t, "rxe0", None, link_layer="Ethernet", state="4: ACTIVE",
           rate="2.5 Gb/sec (1X SDR)", netdev_parent="eno1",
           gids=[(_mac_gid("3c:ec:ef:10:20:30"), "RoCE v2", "eno1"),
                 (_v4_gid("10.1.0.5"), "RoCE v2", "eno1")])
    _pci(t, "pci0000:80/0000:80:02.0", *BRIDGE, 1)
    roce = _pci(t, "pci0000:80/0000:80:02.0/0000:81:00.0", 0x020000, 0x15B3, 0x101D, 1,
                driver="mlx5_core", link=gen4)
    mac = "0c:42:a1:70:80:90"
    _netdev(t, roce, "ens2f0np0", 9000, mac)
    nd = "ens2f0np0"
    _ibdev(t, "mlx5_1", roce, link_layer="Ethernet", state="4: ACTIVE",
           rate="100 Gb/sec (4X EDR)", fw="22.39.1002", hca="MT4125",
           gids=[(_mac_gid(mac), "IB/RoCE v1", nd), (_mac_gid(mac), "RoCE v2", nd),
                 (_v4_gid("192.168.1.20"), "IB/RoCE v1", nd),
                 (_v4_gid("192.168.1.20"), "RoCE v2", nd)])
    _netdev(t, "sys/devices/virtual", "dummy0", 1500, "9a:11:22:33:44:55")
    _ibdev(t, "rxe1", None, link_layer="Ethernet", state="4: ACTIVE",
           rate="10 Gb/sec (1X QDR)", netdev_parent="dummy0",
           gids=[(_mac_gid("9a:11:22:33:44:55"), "RoCE v2", "dummy0")])
    _proc(t, mem_kib=528077312, huge={2048: 0, 1048576: 0}, sysctl=DEBIAN_SYSCTL,
          memlock="8388608", osrelease="6.1.0-18-amd64")
    t.file("sys/module/ib_uverbs/initstate", "live")
    t.file("sys/module/rdma_rxe/initstate", "live")


def build(layout: str, dest: Path) -> Path:
    """Write ``layout`` into ``dest`` (replaced when it exists); returns ``dest``."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    {"hgx8": hgx8, "cpu2s": cpu2s}[layout](Tree(dest))
    return dest


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else HERE
    for name in LAYOUTS:
        build(name, out / name)
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
