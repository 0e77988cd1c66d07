"""Hardware discovery from sysfs/procfs: RDMA devices, NUMA nodes, GPUs and the PCI paths
between them.

Pure Python over a file tree whose root is a parameter (``discover(root="/")``), so tests run
on fixture trees (``tests/data/sysfs/<layout>/``).  Two optional extras are used only on the
live system (``root="/"``) and only when present: the verbs module (the port's active MTU as
``ibv_query_port`` reports it) and ``nvidia-smi`` (GPU indices and names); neither is ever
required.

What is read:

* RDMA devices: ``/sys/class/infiniband/<dev>``: per port ``state``, ``phys_state``,
  ``link_layer``, ``rate``, ``lid``, the GID table (``gids/I``, ``gid_attrs/types/I``,
  ``gid_attrs/ndevs/I``); the PCI function (the ``device`` link, else the class directory's
  ``../..``), its NUMA node and link speed/width.  Soft devices (rxe, siw: no PCI function of
  their own) follow their netdev (``parent``, else the GIDs' ``ndevs``) to
  ``/sys/class/net/<if>``; a virtual netdev (dummy, bond, veth...) has no PCI device, and the
  device says so (:attr:`RdmaDevice.note`).
* The GID to use: Mooncake's auto pick (``MC_GID_INDEX=-1``), as the rdma transport does it: a
  RoCE v2 GID on an IPv4-mapped address, else any RoCE v2 GID, else the first non-zero one.
* The active MTU: sysfs has none; for RoCE it follows from the netdev's MTU the way the kernel
  derives it (``iboe_get_mtu``: the netdev MTU less 96 bytes of RoCE headers, rounded down to
  256/512/1024/2048/4096), and on the live system the verbs module's answer wins.
* NUMA nodes: ``/sys/devices/system/node/node*/`` (``cpulist``, ``meminfo`` MemTotal).
* GPUs: PCI functions of class 0x03xxxx (display) from NVIDIA (0x10de) or AMD (0x1002), in PCI
  bus order (``CUDA_DEVICE_ORDER=PCI_BUS_ID``, what ``nvidia-smi`` numbers), named ``cuda:N`` /
  ``hip:N`` like TENT's memory locations.

PCI path classes (NCCL's, as ``nvidia-smi topo -m`` prints them), from the sysfs device paths
(``/sys/devices/pci0000:15/0000:15:01.0/0000:16:00.0/...``):

* ``PIX``: the path crosses at most one PCIe switch (its upstream port and two of its
  downstream ports; or one bridge);
* ``PXB``: several switches, never the host bridge;
* ``PHB``: through the host bridge (root complex) both hang off, i.e. they meet at the root
  complex or at a root port (part of it);
* ``NODE``: different root complexes (``pciDDDD:BB``) of the same NUMA node;
* ``SYS``: across NUMA nodes (the inter-socket link).

A switch is counted by its upstream port: below a root port, ports alternate upstream
(odd depth) and downstream (even depth), the folding NCCL does (it skips two sysfs levels per
switch).  Between a NUMA node (its CPUs and memory) and a device: ``PHB`` on the device's node,
``SYS`` elsewhere.  A device whose NUMA node is unknown (``numa_node`` -1) counts as node 0 on
a single-node machine; on several nodes it is treated as remote (``SYS``).

:func:`load_cluster_topology` reads TENT's ``cluster-topology.json`` (``partition_matchings``
per NUMA pair, what ``mooncake topology generate`` measures and writes), checked as data from a
stranger.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from mooncake.errors import ConfigError

__all__ = ["Gid", "Port", "RdmaDevice", "NumaNode", "Gpu", "PciDevice", "Topology",
           "discover", "path_class", "select_gid", "iboe_mtu", "parse_cpulist", "PATH_CLASSES",
           "relaxed_ordering", "pcie_devctl_relaxed_ordering", "Matching",
           "load_cluster_topology", "parse_cluster_topology"]

#: NCCL's path classes, nearest first
PATH_CLASSES = ("PIX", "PXB", "PHB", "NODE", "SYS")
_RANK = {c: i for i, c in enumerate(PATH_CLASSES)}

_BDF = re.compile(r"^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_ROOT_BUS = re.compile(r"^pci[0-9a-f]{4,8}:[0-9a-f]{2}$")
_V4_PREFIX = bytes(10) + b"\xff\xff"
#: RoCE header bytes the kernel subtracts from the netdev MTU (iboe_get_mtu: GRH 40, UDP 8,
#: BTH 12, XRC 4, AtomicETH 28, ICRC 4)
_ROCE_HEADERS = 96
_IB_MTUS = (4096, 2048, 1024, 512, 256)
#: TENT's enums (tent/include/tent/runtime/topology.h)
NIC_RDMA = 0
MEM_HOST, MEM_CUDA, MEM_ROCM = 0, 1, 2
_GPU_VENDORS = {0x10DE: "nvidia", 0x1002: "amd"}


# ---- small readers -------------------------------------------------------------------------------


def _read(path: str, limit: int = 1 << 16) -> str | None:
    """A sysfs/procfs text file, stripped; None when absent or unreadable (an empty GID slot's
    ``types/I`` fails with EINVAL)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(limit).strip()
    except OSError:
        return None


def _read_int(path: str, base: int = 0) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.split()[0], base) if text else None
    except (ValueError, IndexError):
        return None


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def parse_cpulist(text: str | None) -> list[int]:
    """``0-3,8,10-11`` -> ``[0, 1, 2, 3, 8, 10, 11]`` (empty or malformed parts are skipped)."""
    out: list[int] = []
    for part in (text or "").split(","):
        part = part.strip()
        lo, _, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            continue
    return out


# ---- data ----------------------------------------------------------------------------------------


@dataclass
class Gid:
    """One non-empty GID table slot."""

    index: int
    gid: str
    #: ``"IB"``, ``"RoCE v1"`` or ``"RoCE v2"`` (sysfs says ``IB/RoCE v1`` for the first two)
    type: str
    netdev: str | None = None
    #: the IPv4 address of an IPv4-mapped GID
    ipv4: str | None = None

    @property
    def raw(self) -> bytes:
        return bytes.fromhex(self.gid.replace(":", ""))


@dataclass
class Port:
    num: int
    #: ``ACTIVE``, ``DOWN``, ``INIT``, ``ARMED``, ``ACTIVE_DEFER`` (sysfs ``N: NAME``)
    state: str
    state_code: int | None
    phys_state: str
    #: ``InfiniBand`` or ``Ethernet``
    link_layer: str
    rate: str
    rate_gbps: float | None
    lid: int | None
    gids: list[Gid] = field(default_factory=list)
    #: the GID index Mooncake's auto pick uses (None: no usable GID)
    gid_index: int | None = None
    netdev: str | None = None
    netdev_mtu: int | None = None
    active_mtu: int | None = None
    #: where ``active_mtu`` comes from: ``verbs``, ``netdev`` (derived), or None (unknown)
    mtu_source: str | None = None

    @property
    def active(self) -> bool:
        return self.state == "ACTIVE"

    @property
    def roce(self) -> bool:
        return self.link_layer.lower() == "ethernet"

    def gid(self, index: int) -> Gid | None:
        return next((g for g in self.gids if g.index == index), None)


@dataclass
class PciDevice:
    """A PCI function: where it sits in the tree and its NUMA node."""

    bus_id: str
    #: the root bus (host bridge) it hangs off: ``pci0000:15``
    root: str
    #: BDFs from the root port down to the function itself
    chain: tuple[str, ...]
    numa_node: int = -1
    #: the path below ``/sys`` (``devices/pci0000:15/...``)
    sysfs: str = ""
    link_speed: str | None = None
    link_width: int | None = None
    max_link_speed: str | None = None
    max_link_width: int | None = None


@dataclass
class RdmaDevice:
    name: str
    #: ``pci`` (a PCI function of its own) or ``soft`` (rxe/siw: follows its netdev)
    kind: str
    pci: PciDevice | None
    ports: list[Port] = field(default_factory=list)
    netdevs: list[str] = field(default_factory=list)
    driver: str | None = None
    node_type: str | None = None
    fw_ver: str | None = None
    #: why there is no PCI device (a soft device on a virtual netdev...)
    note: str = ""

    @property
    def pci_bus_id(self) -> str:
        return self.pci.bus_id if self.pci else ""

    @property
    def numa_node(self) -> int:
        return self.pci.numa_node if self.pci else -1

    def port(self, num: int) -> Port | None:
        return next((p for p in self.ports if p.num == num), None)


@dataclass
class NumaNode:
    id: int
    cpulist: str
    cpus: list[int]
    mem_total_kib: int | None


@dataclass
class Gpu:
    index: int
    #: TENT's location name: ``cuda:N`` (NVIDIA) or ``hip:N`` (AMD)
    name: str
    vendor: str
    device_id: int | None
    pci: PciDevice
    #: from nvidia-smi, when it ran
    model: str | None = None

    @property
    def pci_bus_id(self) -> str:
        return self.pci.bus_id

    @property
    def numa_node(self) -> int:
        return self.pci.numa_node


# ---- PCI paths -----------------------------------------------------------------------------------


def _sysfs_rel(path: str, sys_dir: str) -> str | None:
    """``path`` resolved, relative to ``<root>/sys`` (None when it leaves the tree)."""
    real = os.path.realpath(path)
    base = os.path.realpath(sys_dir)
    if real != base and not real.startswith(base + os.sep):
        return None
    return os.path.relpath(real, base)


def _pci_of(rel: str | None, sys_dir: str) -> PciDevice | None:
    """The PCI function at or above sysfs path ``rel`` (``devices/pci0000:00/0000:00:03.0/
    virtio2/net/eth0`` -> ``0000:00:03.0``); None for virtual devices."""
    if not rel:
        return None
    parts = rel.split(os.sep)
    if len(parts) < 2 or parts[0] != "devices":
        return None
    root = None
    chain: list[str] = []
    last = 0
    for i, p in enumerate(parts[1:], 1):
        if _ROOT_BUS.match(p):
            root = root or p  # a VMD domain below a root port keeps the outer root
        elif _BDF.match(p) and root:
            chain.append(p)
            last = i
    if not root or not chain:
        return None
    d = os.path.join(sys_dir, *parts[: last + 1])
    numa = _read_int(os.path.join(d, "numa_node"), 10)
    return PciDevice(bus_id=chain[-1], root=root, chain=tuple(chain),
                     numa_node=-1 if numa is None else numa,
                     sysfs="/".join(parts[: last + 1]),
                     link_speed=_read(os.path.join(d, "current_link_speed")),
                     link_width=_read_int(os.path.join(d, "current_link_width"), 10),
                     max_link_speed=_read(os.path.join(d, "max_link_speed")),
                     max_link_width=_read_int(os.path.join(d, "max_link_width"), 10))


def _switches(chain: tuple[str, ...], start: int) -> int:
    """Switches on the part of a path at depths >= ``start``: the upstream ports (odd depths
    below the root port, which is depth 0)."""
    return sum(1 for d in range(start, len(chain) - 1) if d % 2 == 1)


def path_class(a: PciDevice | None, b: PciDevice | None, single_node: bool = False) -> str | None:
    """NCCL's class of the PCI path between two functions (module docstring); None when one
    has no PCI function."""
    if a is None or b is None:
        return None
    if a.root != b.root:
        na, nb = a.numa_node, b.numa_node
        if single_node:
            na, nb = max(na, 0), max(nb, 0)
        return "NODE" if na == nb and na >= 0 else "SYS"
    k = 0
    for x, y in zip(a.chain, b.chain, strict=False):
        if x != y:
            break
        k += 1
    if k <= 1:  # they meet at the root complex or at a root port
        return "PHB"
    if k == min(len(a.chain), len(b.chain)):  # one is above the other (a bridge and below)
        return "PIX"
    # the path: a's ancestors from depth k-1 (the common one) down, and b's from depth k
    n = _switches(a.chain, k - 1) + _switches(b.chain, k)
    return "PIX" if n <= 1 else "PXB"


def _numa_class(node: int, dev: PciDevice | None, single_node: bool) -> str | None:
    if dev is None:
        return None
    numa = dev.numa_node
    if single_node:
        numa = max(numa, 0)
    return "PHB" if numa == node else "SYS"


# ---- GIDs, MTU -----------------------------------------------------------------------------------


def select_gid(gids: list[Gid]) -> int | None:
    """Mooncake's auto GID (``MC_GID_INDEX=-1``): a RoCE v2 GID on an IPv4-mapped address,
    else any RoCE v2 GID, else the first non-zero GID (InfiniBand: index 0); None if none."""
    valid = [g for g in gids if any(g.raw)]
    for pred in (lambda g: g.type == "RoCE v2" and g.raw[:12] == _V4_PREFIX,
                 lambda g: g.type == "RoCE v2"):
        for g in valid:
            if pred(g):
                return g.index
    return valid[0].index if valid else None


def iboe_mtu(netdev_mtu: int | None) -> int | None:
    """The RoCE active MTU the kernel derives from a netdev MTU (``iboe_get_mtu``)."""
    if not netdev_mtu:
        return None
    usable = netdev_mtu - _ROCE_HEADERS
    return next((m for m in _IB_MTUS if usable >= m), None)


def _gid_type(text: str | None, roce: bool) -> str:
    t = (text or "").strip()
    if t.lower() == "roce v2":
        return "RoCE v2"
    return "RoCE v1" if roce else "IB"


def _gids(pdir: str, roce: bool) -> list[Gid]:
    out = []
    idx = sorted(int(n) for n in _listdir(os.path.join(pdir, "gids")) if n.isdigit())
    for i in idx:
        text = _read(os.path.join(pdir, "gids", str(i)))
        if not text:
            continue
        try:
            raw = bytes.fromhex(text.replace(":", ""))
        except ValueError:
            continue
        if len(raw) != 16 or not any(raw):
            continue
        typ = _read(os.path.join(pdir, "gid_attrs", "types", str(i)))
        ndev = _read(os.path.join(pdir, "gid_attrs", "ndevs", str(i))) or None
        if roce and typ is None:  # an entry the kernel cannot describe: not in use
            continue
        v4 = str(ipaddress.IPv4Address(raw[12:])) if raw[:12] == _V4_PREFIX else None
        gid = ":".join(raw[j:j + 2].hex() for j in range(0, 16, 2))
        out.append(Gid(i, gid, _gid_type(typ, roce), ndev, v4))
    return out


def _state(text: str | None) -> tuple[str, int | None]:
    """``"4: ACTIVE"`` -> ``("ACTIVE", 4)``."""
    if not text:
        return "UNKNOWN", None
    code, _, name = text.partition(":")
    try:
        return (name.strip() or code.strip()).upper(), int(code)
    except ValueError:
        return text.strip().upper(), None


def _rate(text: str | None) -> float | None:
    m = re.match(r"\s*([\d.]+)\s*Gb/sec", text or "")
    return float(m.group(1)) if m else None


# ---- discovery -----------------------------------------------------------------------------------


def _netdev_info(sys_dir: str, name: str) -> tuple[str, int | None]:
    """``(sysfs path below /sys, MTU)`` of netdev ``name``."""
    link = os.path.join(sys_dir, "class", "net", name)
    rel = _sysfs_rel(link, sys_dir) if os.path.exists(link) else None
    return rel or "", _read_int(os.path.join(link, "mtu"), 10)


def _rdma_device(sys_dir: str, name: str) -> RdmaDevice:
    base = os.path.join(sys_dir, "class", "infiniband", name)
    real = _sysfs_rel(base, sys_dir) or ""
    dev_link = os.path.join(base, "device")
    pci = None
    if os.path.exists(dev_link):
        pci = _pci_of(_sysfs_rel(dev_link, sys_dir), sys_dir)
    elif not real.startswith("devices/virtual/"):
        pci = _pci_of(os.path.dirname(os.path.dirname(real)), sys_dir)  # Mooncake's "../.."
    driver = None
    if pci is not None:
        drv = os.path.join(sys_dir, pci.sysfs, "driver")
        driver = os.path.basename(os.path.realpath(drv)) if os.path.exists(drv) else None
    dev = RdmaDevice(name=name, kind="pci" if pci else "soft", pci=pci, driver=driver,
                     node_type=_read(os.path.join(base, "node_type")),
                     fw_ver=_read(os.path.join(base, "fw_ver")))
    nets: list[str] = []
    if pci is not None:
        nets.extend(_listdir(os.path.join(sys_dir, pci.sysfs, "net")))
    parent = _read(os.path.join(base, "parent"))  # rxe: its netdev
    if parent:
        nets.append(parent)
    for pn in sorted(int(p) for p in _listdir(os.path.join(base, "ports")) if p.isdigit()):
        pdir = os.path.join(base, "ports", str(pn))
        ll = _read(os.path.join(pdir, "link_layer")) or ("Ethernet" if pci is None else
                                                         "InfiniBand")
        roce = ll.lower() == "ethernet"
        state, code = _state(_read(os.path.join(pdir, "state")))
        phys_text = _read(os.path.join(pdir, "phys_state")) or "?"
        phys = phys_text.partition(":")[2].strip() or phys_text
        rate = _read(os.path.join(pdir, "rate")) or ""
        gids = _gids(pdir, roce)
        netdev = next((g.netdev for g in gids if g.netdev), None)
        if netdev is None and nets:
            netdev = nets[0]
        port = Port(num=pn, state=state, state_code=code, phys_state=phys, link_layer=ll,
                    rate=rate, rate_gbps=_rate(rate),
                    lid=_read_int(os.path.join(pdir, "lid"), 16), gids=gids,
                    gid_index=select_gid(gids), netdev=netdev)
        if netdev:
            _, port.netdev_mtu = _netdev_info(sys_dir, netdev)
            if roce and port.netdev_mtu:
                port.active_mtu, port.mtu_source = iboe_mtu(port.netdev_mtu), "netdev"
        dev.ports.append(port)
        for g in gids:
            if g.netdev:
                nets.append(g.netdev)
    dev.netdevs = list(dict.fromkeys(nets))
    if pci is None:  # a soft device: its PCI function is its netdev's
        for nd in dev.netdevs:
            rel, _ = _netdev_info(sys_dir, nd)
            if not rel:
                continue
            if rel.startswith("devices/virtual/"):
                dev.note = f"netdev {nd} is virtual: no PCI device"
                continue
            dev.pci = _pci_of(rel, sys_dir)
            if dev.pci:
                dev.note = f"soft device on netdev {nd} ({dev.pci.bus_id})"
                break
        if dev.pci is None and not dev.note:
            dev.note = ("no netdev found: no PCI device" if not dev.netdevs else
                        f"netdev {dev.netdevs[0]} not found under /sys/class/net: no PCI device")
    return dev


def _numa_nodes(root: str) -> list[NumaNode]:
    nd = os.path.join(root, "sys", "devices", "system", "node")
    out = []
    for n in _listdir(nd):
        if not (n.startswith("node") and n[4:].isdigit()):
            continue
        cl = _read(os.path.join(nd, n, "cpulist")) or ""
        mem = None
        for line in (_read(os.path.join(nd, n, "meminfo")) or "").splitlines():
            if "MemTotal:" in line:
                mem = int(line.split("MemTotal:")[1].split()[0])
        out.append(NumaNode(int(n[4:]), cl, parse_cpulist(cl), mem))
    if not out:  # a kernel without NUMA: one node holds everything
        cl = _read(os.path.join(root, "sys", "devices", "system", "cpu", "online")) or ""
        mem = None
        for line in (_read(os.path.join(root, "proc", "meminfo")) or "").splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1])
        out.append(NumaNode(0, cl, parse_cpulist(cl), mem))
    return sorted(out, key=lambda x: x.id)


def _nvidia_smi() -> dict[str, tuple[int, str]]:
    """``{pci bus id: (index, name)}`` from nvidia-smi, when it is installed and answers."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        out = subprocess.run([exe, "--query-gpu=index,pci.bus_id,name",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    got = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[0].isdigit():
            bus = parts[1].lower()
            if bus.count(":") == 2 and len(bus.split(":")[0]) == 8:  # 00000000:1A:00.0
                bus = bus[4:]
            got[bus] = (int(parts[0]), parts[2])
    return got


def _gpus(root: str, use_smi: bool) -> list[Gpu]:
    sys_dir = os.path.join(root, "sys")
    pdir = os.path.join(sys_dir, "bus", "pci", "devices")
    found: list[tuple[str, PciDevice, int | None]] = []
    for bdf in _listdir(pdir):
        cls = _read_int(os.path.join(pdir, bdf, "class"), 16)
        vendor = _read_int(os.path.join(pdir, bdf, "vendor"), 16)
        if cls is None or vendor not in _GPU_VENDORS or (cls >> 16) != 0x03:
            continue
        pci = _pci_of(_sysfs_rel(os.path.join(pdir, bdf), sys_dir), sys_dir)
        if pci is None:
            continue
        found.append((_GPU_VENDORS[vendor], pci, _read_int(os.path.join(pdir, bdf, "device"),
                                                           16)))
    smi = _nvidia_smi() if use_smi and any(v == "nvidia" for v, _, _ in found) else {}
    out = []
    for vendor in ("nvidia", "amd"):
        mine = sorted((f for f in found if f[0] == vendor), key=lambda f: f[1].bus_id)
        for i, (_, pci, devid) in enumerate(mine):
            idx, model = smi.get(pci.bus_id, (i, None)) if vendor == "nvidia" else (i, None)
            prefix = "cuda" if vendor == "nvidia" else "hip"
            out.append(Gpu(idx, f"{prefix}:{idx}", vendor, devid, pci, model))
    return sorted(out, key=lambda g: (g.vendor != "nvidia", g.index))


def _verbs_mtus(devices: list[RdmaDevice]) -> None:
    """On the live system: the active MTU (and state) of each port from ``ibv_query_port``."""
    try:
        from mooncake._core import verbs
    except ImportError:
        return
    try:
        names = set(verbs.device_names())
    except Exception:
        return
    for d in devices:
        if d.name not in names:
            continue
        try:
            dev = verbs.Device(d.name)
        except Exception:
            continue
        for p in d.ports:
            try:
                attr = dev.query_port(p.num)
            except Exception:
                continue
            if attr.get("active_mtu"):
                p.active_mtu, p.mtu_source = int(attr["active_mtu"]), "verbs"
        del dev


def discover(root: str = "/", *, verbs: bool | None = None,
             nvidia_smi: bool | None = None) -> Topology:
    """Everything this module finds under ``root`` (``/``: the live system).  ``verbs`` and
    ``nvidia_smi`` (default: only when ``root`` is ``/``) allow the optional extras."""
    live = os.path.realpath(root) == "/"
    sys_dir = os.path.join(root, "sys")
    ib = os.path.join(sys_dir, "class", "infiniband")
    devices = [_rdma_device(sys_dir, n) for n in sorted(_listdir(ib), key=_natural)]
    if devices and (live if verbs is None else verbs):
        _verbs_mtus(devices)
    gpus = _gpus(root, live if nvidia_smi is None else nvidia_smi)
    topo = Topology(root=root, rdma_devices=devices, numa_nodes=_numa_nodes(root), gpus=gpus)
    if not os.path.isdir(ib):
        topo.notes.append("no RDMA devices (/sys/class/infiniband is absent: no RDMA driver "
                          "loaded)")
    elif not devices:
        topo.notes.append("no RDMA devices (/sys/class/infiniband is empty)")
    return topo


# ---- PCIe relaxed ordering -----------------------------------------------------------------------


def pcie_devctl_relaxed_ordering(config: bytes) -> bool | None:
    """Whether a function's PCIe Device Control register enables Relaxed Ordering (bit 4),
    from its config space bytes; None when they do not reach the PCI Express capability
    (an unprivileged read of sysfs ``config`` gives only the first 64 bytes)."""
    if len(config) < 0x40 or not (config[0x06] & 0x10):  # no capability list
        return None
    ptr, seen = config[0x34] & 0xFC, set()
    while ptr and ptr not in seen and ptr + 10 <= len(config):
        seen.add(ptr)
        if config[ptr] == 0x10:  # PCI Express capability: DevCtl at +8
            devctl = int.from_bytes(config[ptr + 8: ptr + 10], "little")
            return bool(devctl & 0x10)
        ptr = config[ptr + 1] & 0xFC
    return None


def relaxed_ordering(root: str, dev: PciDevice | None) -> bool | None:
    """:func:`pcie_devctl_relaxed_ordering` of a function's ``config`` file, or None."""
    if dev is None:
        return None
    try:
        with open(os.path.join(root, "sys", dev.sysfs, "config"), "rb") as f:
            data = f.read(256)
    except OSError:
        return None
    return pcie_devctl_relaxed_ordering(data)


# ---- the topology --------------------------------------------------------------------------------


@dataclass
class Topology:
    """What :func:`discover` found."""

    root: str
    rdma_devices: list[RdmaDevice]
    numa_nodes: list[NumaNode]
    gpus: list[Gpu]
    notes: list[str] = field(default_factory=list)

    @property
    def single_node(self) -> bool:
        return len(self.numa_nodes) <= 1

    def device(self, name: str) -> RdmaDevice | None:
        return next((d for d in self.rdma_devices if d.name == name), None)

    def numa_of(self, dev: RdmaDevice | Gpu) -> int:
        """The device's NUMA node (-1 unknown; 0 on a single-node machine)."""
        n = dev.numa_node
        return max(n, 0) if self.single_node else n

    def filtered(self, include: list[str] | tuple[str, ...] = (),
                 exclude: list[str] | tuple[str, ...] = ()) -> Topology:
        """Only the RDMA devices in ``include`` (when given), none of ``exclude`` (TENT's
        ``topology/rdma_whitelist`` / ``rdma_blacklist``: the whitelist wins)."""
        devs = [d for d in self.rdma_devices
                if (d.name in include if include else d.name not in exclude)]
        return Topology(self.root, devs, self.numa_nodes, self.gpus, list(self.notes))

    # -- classes -------------------------------------------------------------------------------

    def path(self, a: RdmaDevice | Gpu, b: RdmaDevice | Gpu) -> str | None:
        """NCCL's path class between two devices (None: one has no PCI device)."""
        return path_class(a.pci, b.pci, self.single_node)

    def gpu_nic_matrix(self) -> dict[str, dict[str, str | None]]:
        """``{gpu name: {nic name: class}}`` (``nvidia-smi topo -m``'s GPU rows)."""
        return {g.name: {d.name: self.path(g, d) for d in self.rdma_devices} for g in self.gpus}

    def numa_nic_matrix(self) -> dict[int, dict[str, str | None]]:
        """``{numa node: {nic name: class}}``: PHB on the NIC's node, SYS elsewhere."""
        return {n.id: {d.name: _numa_class(n.id, d.pci, self.single_node)
                       for d in self.rdma_devices} for n in self.numa_nodes}

    def nic_nic_matrix(self) -> dict[str, dict[str, str | None]]:
        return {a.name: {b.name: ("X" if a is b else self.path(a, b))
                         for b in self.rdma_devices} for a in self.rdma_devices}

    def nearest_nics(self, gpu: Gpu) -> list[str]:
        """The NICs of the best path class from ``gpu`` (TENT's rank0)."""
        row = {n: c for n, c in self.gpu_nic_matrix()[gpu.name].items() if c}
        if not row:
            return []
        best = min(_RANK[c] for c in row.values())
        return [n for n, c in row.items() if _RANK[c] == best]

    # -- Mooncake's formats --------------------------------------------------------------------

    def _ranks(self) -> list[dict]:
        """Each memory location with its NICs in TENT's three tiers (indices into nics)."""
        nics = self.rdma_devices
        mems = [{"name": "*", "pci_bus_id": "", "type": MEM_HOST, "numa_node": -1,
                 "device_list": {"rank0": [], "rank1": [], "rank2": list(range(len(nics)))}}]
        for n in self.numa_nodes:
            r0 = [i for i, d in enumerate(nics) if d.pci and self.numa_of(d) == n.id]
            mems.append({"name": f"cpu:{n.id}", "pci_bus_id": "", "type": MEM_HOST,
                         "numa_node": n.id,
                         "device_list": {"rank0": r0, "rank1": [],
                                         "rank2": [i for i in range(len(nics)) if i not in r0]}})
        for g in self.gpus:
            near = set(self.nearest_nics(g))
            r0 = [i for i, d in enumerate(nics) if d.name in near]
            gn = self.numa_of(g)
            r1 = [i for i, d in enumerate(nics)
                  if i not in r0 and d.pci and gn >= 0 and self.numa_of(d) == gn]
            r2 = [i for i in range(len(nics)) if i not in r0 and i not in r1]
            mems.append({"name": g.name, "pci_bus_id": g.pci_bus_id,
                         "type": MEM_CUDA if g.vendor == "nvidia" else MEM_ROCM,
                         "numa_node": g.numa_node,
                         "device_list": {"rank0": r0, "rank1": r1, "rank2": r2}})
        return mems

    def to_tent_json(self) -> dict[str, Any]:
        """TENT's topology (``Topology::toString``, what its ``get_local_topology()`` and
        ``transfer_engine_topology_dump --backend tent`` print), as a dict::

            {"nics": [{"name", "pci_bus_id", "type": 0 (RDMA), "numa_node"}],
             "mems": [{"name": "*" | "cpu:N" | "cuda:N" | "hip:N", "pci_bus_id",
                       "type": 0 host | 1 cuda | 2 rocm, "numa_node",
                       "device_list": {"rank0": [...], "rank1": [...], "rank2": [...]}}]}

        ``device_list`` holds indices into ``nics``: host memory ranks its node's NICs first
        (rank0) and the others last (rank2); a GPU ranks the NICs of its best PCI path class
        first, then those on its NUMA node, then the rest; ``*`` lists every NIC in rank2.
        """
        return {"nics": [{"name": d.name, "pci_bus_id": d.pci_bus_id, "type": NIC_RDMA,
                          "numa_node": d.numa_node} for d in self.rdma_devices],
                "mems": self._ranks()}

    def to_priority_matrix(self) -> dict[str, list[list[str]]]:
        """The classic Transfer Engine's NIC priority matrix (``MC_CUSTOM_TOPO_JSON``'s
        format, what its ``get_local_topology()`` prints): ``{"cpu:0": [[preferred...],
        [available...]], "cuda:0": ...}``."""
        names = [d.name for d in self.rdma_devices]
        out: dict[str, list[list[str]]] = {}
        for m in self._ranks()[1:]:
            dl = m["device_list"]
            pref = [names[i] for i in dl["rank0"]]
            out[m["name"]] = [pref, [n for n in names if n not in pref]]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (the doctor's ``--json`` embeds it)."""
        return {
            "root": self.root,
            "rdma_devices": [asdict(d) | {"pci_bus_id": d.pci_bus_id, "numa_node": d.numa_node}
                             for d in self.rdma_devices],
            "numa_nodes": [asdict(n) for n in self.numa_nodes],
            "gpus": [asdict(g) for g in self.gpus],
            "gpu_nic": self.gpu_nic_matrix(),
            "numa_nic": {str(k): v for k, v in self.numa_nic_matrix().items()},
            "notes": list(self.notes),
        }


# ---- cluster-topology.json (TENT's partition_matchings) ------------------------------------------

#: what :func:`load_cluster_topology` accepts (data from a stranger: every size is bounded)
MAX_CLUSTER_TOPOLOGY_BYTES = 16 << 20
MAX_MATCHINGS = 1 << 16  # entries in one file, endpoints included
MAX_NUMA_NODE = 1023  # Linux: MAX_NUMNODES is at most 1024
MAX_BANDWIDTH_MBPS = 1e8  # 100 TB/s
MAX_LATENCY_US = 1e9  # 1000 s
_NIC_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_PARTITION = re.compile(r"(-1|[0-9]{1,4})-(-1|[0-9]{1,4})(_extra)?")
_MATCHING_KEYS = ("src_dev", "dst_dev", "src_numa", "dst_numa", "bandwidth", "latency")
_RECORD_KEYS = ("src_host", "dst_host", "endpoints", "partition_matchings")


@dataclass(frozen=True)
class Matching:
    """One measured NIC pair of a ``cluster-topology.json`` partition."""

    src_dev: str
    dst_dev: str
    src_numa: int
    dst_numa: int
    #: MB/s (decimal: 1e6 bytes)
    bandwidth: float
    #: microseconds
    latency: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _MATCHING_KEYS}


def _cerr(where: str, what: str) -> ConfigError:
    """``where``: the JSON path of what is wrong (``""``: the document)."""
    return ConfigError(f"{where}: {what}" if where else what)


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _matching(e: Any, where: str) -> Matching:
    if not isinstance(e, dict):
        raise _cerr(where, f"is {type(e).__name__}; allowed: an object with "
                           f"{', '.join(_MATCHING_KEYS)}")
    missing = [k for k in _MATCHING_KEYS if k not in e]
    extra = sorted(set(e) - set(_MATCHING_KEYS))
    if missing or extra:
        what = "; ".join(([f"lacks {', '.join(missing)}"] if missing else []) +
                         ([f"has unknown key(s) {', '.join(map(repr, extra))}"] if extra else []))
        raise _cerr(where, f"{what}; allowed keys: {', '.join(_MATCHING_KEYS)}")
    for k in ("src_dev", "dst_dev"):
        if not isinstance(e[k], str) or not _NIC_NAME.fullmatch(e[k]):
            raise _cerr(_at(where, k), f"{e[k]!r:.80} is not a NIC name; allowed: 1-64 of "
                                        "A-Z a-z 0-9 _ . : -")
    for k in ("src_numa", "dst_numa"):
        v = e[k]
        if type(v) is not int or not -1 <= v <= MAX_NUMA_NODE:
            raise _cerr(_at(where, k), f"{v!r:.40} is not allowed; allowed: an integer "
                                        f"-1 (unknown) .. {MAX_NUMA_NODE}")
    nums = {}
    for k, hi, unit in (("bandwidth", MAX_BANDWIDTH_MBPS, "MB/s"),
                        ("latency", MAX_LATENCY_US, "microseconds")):
        v = e[k]
        if type(v) not in (int, float):
            raise _cerr(_at(where, k), f"{v!r:.40} is {type(v).__name__}; allowed: a number "
                                        f"of {unit}")
        if not 0 < v <= hi:  # also NaN
            sign = "negative" if v < 0 else "zero" if v == 0 else "too large" if v > hi \
                else "not a number"
            raise _cerr(_at(where, k), f"{v!r} is {sign}; allowed: 0 < {k} <= {hi:g} {unit}")
        nums[k] = float(v)
    return Matching(e["src_dev"], e["dst_dev"], e["src_numa"], e["dst_numa"], **nums)


def _record(doc: dict, where: str, budget: list[int]) -> dict[tuple[int, int], list[Matching]]:
    extra = sorted(set(doc) - set(_RECORD_KEYS))
    if extra:
        raise _cerr(where, f"unknown key(s) {', '.join(map(repr, extra))}; allowed: "
                           f"{', '.join(_RECORD_KEYS)}")
    for k in ("src_host", "dst_host"):
        if k in doc and (not isinstance(doc[k], str) or len(doc[k]) > 256):
            raise _cerr(_at(where, k), "allowed: a string of at most 256 characters")

    def entries(v: Any, at: str) -> list[Matching]:
        if not isinstance(v, list):
            raise _cerr(at, f"is {type(v).__name__}; allowed: a list of matchings")
        budget[0] -= len(v)
        if budget[0] < 0:
            raise _cerr(at, f"too many matchings; allowed: at most {MAX_MATCHINGS} in a file")
        return [_matching(e, f"{at}[{i}]") for i, e in enumerate(v)]

    if "endpoints" in doc:
        entries(doc["endpoints"], _at(where, "endpoints"))
    pm = doc.get("partition_matchings")
    if not isinstance(pm, dict) or not pm:
        raise _cerr(_at(where, "partition_matchings"),
                    "missing or empty; allowed: an object {\"SRC-DST\": [matchings]}, "
                    "SRC and DST NUMA nodes (-1: unknown)")
    main: dict[tuple[int, int], list[Matching]] = {}
    extras: dict[tuple[int, int], list[Matching]] = {}
    for key, v in pm.items():
        at = f"{_at(where, 'partition_matchings')}[{key!r:.40}]"
        m = _PARTITION.fullmatch(key)
        if not m:
            raise _cerr(at, "is not a partition key; allowed: \"SRC-DST\" or "
                            "\"SRC-DST_extra\" (NUMA nodes, -1 unknown), e.g. \"0-1\"")
        part = (int(m[1]), int(m[2]))
        if max(part) > MAX_NUMA_NODE:
            raise _cerr(at, f"NUMA node {max(part)} is not allowed; allowed: -1 (unknown) "
                            f".. {MAX_NUMA_NODE}")
        got = entries(v, at)
        if not got:
            raise _cerr(at, "is empty; allowed: at least one matching")
        for i, x in enumerate(got):
            if (x.src_numa, x.dst_numa) != part:
                raise _cerr(f"{at}[{i}]", f"is {x.src_numa}-{x.dst_numa} (src_numa-dst_numa), "
                                          f"not its partition {part[0]}-{part[1]}")
        (extras if m[3] else main)[part] = got
    out: dict[tuple[int, int], list[Matching]] = {}
    for part in list(main) + [p for p in extras if p not in main]:
        rows = main.get(part, []) + extras.get(part, [])
        pairs = [(x.src_dev, x.dst_dev) for x in rows]
        dup = next((p for i, p in enumerate(pairs) if p in pairs[:i]), None)
        if dup:
            raise _cerr(_at(where, "partition_matchings"),
                        f"partition {part[0]}-{part[1]} lists {dup[0]}->{dup[1]} twice")
        out[part] = rows
    return out


def parse_cluster_topology(doc: Any, label: str = "cluster topology", *,
                           src_host: str | None = None, dst_host: str | None = None
                           ) -> dict[tuple[int, int], list[Matching]]:
    """:func:`load_cluster_topology` of an already decoded document; errors start with
    ``label``."""
    try:
        return _document(doc, src_host, dst_host)
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from None


def _document(doc: Any, src_host: str | None, dst_host: str | None
              ) -> dict[tuple[int, int], list[Matching]]:
    if isinstance(doc, dict):
        return _record(doc, "", [MAX_MATCHINGS])
    if not isinstance(doc, list) or not doc:
        raise _cerr("", f"the document is {type(doc).__name__}; allowed: an object with "
                        "partition_matchings, or a non-empty list of such records (one per "
                        "host pair, with src_host/dst_host)")
    budget = [MAX_MATCHINGS]
    recs = []
    for i, r in enumerate(doc):
        if not isinstance(r, dict):
            raise _cerr(f"[{i}]", f"is {type(r).__name__}; allowed: an object with "
                                  "partition_matchings")
        recs.append((r, _record(r, f"[{i}]", budget)))
    chosen = [(r, m) for r, m in recs
              if (src_host is None or r.get("src_host") == src_host)
              and (dst_host is None or r.get("dst_host") == dst_host)]
    if len(chosen) != 1:
        hosts = ", ".join(f"{r.get('src_host')}->{r.get('dst_host')}" for r, _ in recs)
        raise _cerr("", f"{len(chosen)} of its {len(recs)} host pairs match src_host="
                        f"{src_host} dst_host={dst_host}; allowed: exactly one (it has "
                        f"{hosts:.300})")
    return chosen[0][1]


def _load_json(path: str, where: str, limit: int) -> Any:
    """A JSON file read as data from a stranger: at most ``limit`` bytes of UTF-8, no NaN, no
    duplicate keys; a :class:`~mooncake.errors.ConfigError` (prefixed ``where``) otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise _cerr(where, f"cannot read it: {e.strerror or e}") from None
    if len(raw) > limit:
        raise _cerr(where, f"too large; allowed: at most {limit} bytes")

    def no_dups(pairs: list[tuple[str, Any]]) -> dict:
        d: dict = {}
        for k, v in pairs:
            if k in d:
                raise ValueError(f"key {k!r:.40} appears twice in one object")
            d[k] = v
        return d

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_dups,
                          parse_constant=no_constant)
    except UnicodeDecodeError as e:
        raise _cerr(where, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise _cerr(where, "nested too deeply") from None
    except ValueError as e:
        raise _cerr(where, f"not JSON: {str(e)[:160]}") from None


def load_cluster_topology(path: str, *, src_host: str | None = None,
                          dst_host: str | None = None) -> dict[tuple[int, int], list[Matching]]:
    """TENT's ``cluster-topology.json`` (``topology/cluster_topology_path``): ``{(src NUMA
    node, dst NUMA node): [Matching, ...]}``, each list in the file's order (best first, as
    ``mooncake topology generate`` writes it), a partition's ``"S-D_extra"`` matchings after
    its ``"S-D"`` ones.

    Two shapes load: the seed's ``{"partition_matchings": {"0-1": [...]}}`` (optionally with
    ``src_host``, ``dst_host``, ``endpoints``), and Mooncake's generator output, a list of
    such records, one per host pair (``src_host``/``dst_host`` pick one when it holds
    several).  Checked as data from a stranger, a :class:`~mooncake.errors.ConfigError` naming
    the first thing wrong: the file at most 16 MiB of UTF-8 JSON (no NaN, no duplicate keys),
    partition keys ``S-D`` (NUMA nodes -1..1023), each matching exactly ``src_dev``,
    ``dst_dev`` (NIC names), ``src_numa``, ``dst_numa`` (its partition's), ``bandwidth`` (MB/s)
    and ``latency`` (µs), both positive and bounded, no pair twice in a partition."""
    where = f"cluster topology {path}"
    doc = _load_json(path, where, MAX_CLUSTER_TOPOLOGY_BYTES)
    return parse_cluster_topology(doc, where, src_host=src_host, dst_host=dst_host)


#: the largest NIC priority matrix file read (MC_CUSTOM_TOPO_JSON)
MAX_PRIORITY_MATRIX_BYTES = 1 << 20
#: a memory location a priority matrix names: "*" (any), "cpu:N", or an accelerator's "kind:N"
_LOCATION = re.compile(r"\*|(cpu|cuda|hip|musa|maca|npu):\d{1,4}")
_MAX_LOCATIONS = 4096
_MAX_MATRIX_NICS = 64


def _nic_list(v: Any, where: str) -> list[str]:
    if not isinstance(v, list) or len(v) > _MAX_MATRIX_NICS:
        raise _cerr(where, f"must be a list of at most {_MAX_MATRIX_NICS} NIC names")
    out: list[str] = []
    for k, n in enumerate(v):
        if not isinstance(n, str) or not _NIC_NAME.fullmatch(n):
            raise _cerr(f"{where}[{k}]", f"{n!r:.40} is not a NIC name (1-64 of A-Z a-z 0-9 _ . "
                        ": -)")
        if n in out:
            raise _cerr(f"{where}[{k}]", f"{n} is listed twice")
        out.append(n)
    return out


def parse_priority_matrix(doc: Any, label: str = "priority matrix"
                          ) -> dict[str, tuple[list[str], list[str]]]:
    """A NIC priority matrix (``MC_CUSTOM_TOPO_JSON`` / TENT's ``topology/custom_json_path``):
    ``{location: ([preferred NICs], [available NICs])}``, each list in the file's order.

    Two shapes load, the two :class:`Topology` writes: the classic Transfer Engine's
    ``{"cpu:0": [[preferred...], [available...]], ...}`` (:meth:`Topology.to_priority_matrix`)
    and TENT's ``{"nics": [{"name": ...}, ...], "mems": [{"name": "cpu:0", "device_list":
    {"rank0": [...], "rank1": [...], "rank2": [...]}}]}`` (:meth:`Topology.to_tent_json`;
    rank0 is preferred, rank1 then rank2 available, entries index ``nics``).  Locations are
    ``*``, ``cpu:N`` or ``cuda:N``-like names; a NIC preferred is not also available.  A
    :class:`~mooncake.errors.ConfigError` names the first thing wrong."""
    out: dict[str, tuple[list[str], list[str]]] = {}

    def put(loc: Any, pref: list[str], avail: list[str], where: str) -> None:
        if not isinstance(loc, str) or not _LOCATION.fullmatch(loc):
            raise _cerr(where, f"{loc!r:.40} is not a memory location (*, cpu:N, cuda:N...)")
        if loc in out:
            raise _cerr(where, f"location {loc} appears twice")
        if len(out) >= _MAX_LOCATIONS:
            raise _cerr(where, f"more than {_MAX_LOCATIONS} locations")
        out[loc] = (pref, [n for n in avail if n not in pref])

    if not isinstance(doc, dict):
        raise _cerr(label, "must be a JSON object")
    if "nics" in doc or "mems" in doc:  # TENT's shape
        extra = set(doc) - {"nics", "mems"}
        if extra:
            raise _cerr(label, f"unknown key {sorted(extra)[0]!r:.40}; allowed: nics, mems")
        nics = doc.get("nics")
        if not isinstance(nics, list) or len(nics) > _MAX_MATRIX_NICS:
            raise _cerr(_at(label, "nics"), f"must be a list of at most {_MAX_MATRIX_NICS} NICs")
        names = _nic_list([n.get("name") if isinstance(n, dict) else n for n in nics],
                          _at(label, "nics"))
        mems = doc.get("mems")
        if not isinstance(mems, list) or len(mems) > _MAX_LOCATIONS:
            raise _cerr(_at(label, "mems"), f"must be a list of at most {_MAX_LOCATIONS} "
                        "memory locations")
        for k, m in enumerate(mems):
            where = f"{_at(label, 'mems')}[{k}]"
            dl = m.get("device_list") if isinstance(m, dict) else None
            if not isinstance(dl, dict) or not set(dl) <= {"rank0", "rank1", "rank2"}:
                raise _cerr(where, 'needs "name" and "device_list": {"rank0": [...], "rank1": '
                            '[...], "rank2": [...]} (indices into nics)')
            ranks = []
            for r in ("rank0", "rank1", "rank2"):
                v = dl.get(r, [])
                if not isinstance(v, list) or not all(
                        type(i) is int and 0 <= i < len(names) for i in v):
                    raise _cerr(f"{where}.device_list.{r}",
                                f"must list indices 0..{len(names) - 1} into nics")
                ranks.append([names[i] for i in v])
            put(m.get("name"), ranks[0], ranks[1] + [n for n in ranks[2] if n not in ranks[1]],
                where)
        return out
    for loc, row in doc.items():
        where = _at(label, str(loc)[:40])
        if not isinstance(row, list) or not 1 <= len(row) <= 2:
            raise _cerr(where, "must be [[preferred NICs], [available NICs]]")
        put(loc, _nic_list(row[0], f"{where}[0]"),
            _nic_list(row[1], f"{where}[1]") if len(row) > 1 else [], where)
    return out


def load_priority_matrix(path: str) -> dict[str, tuple[list[str], list[str]]]:
    """:func:`parse_priority_matrix` of the file at ``path`` (at most
    ``MAX_PRIORITY_MATRIX_BYTES`` of strict UTF-8 JSON)."""
    where = f"MC_CUSTOM_TOPO_JSON={path}"
    return parse_priority_matrix(_load_json(path, where, MAX_PRIORITY_MATRIX_BYTES), where)
