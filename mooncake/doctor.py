"""``mooncake doctor [--json] [--peer SEG] [--host ADDR] [--root DIR]``: the tuning chapter's
production checklist (shared/seed, section 12.12.1), automated.

It reads sysfs/procfs (through :mod:`mooncake.topology`) and the effective configuration
(:func:`mooncake.config.load_config`) and reports findings, each with a severity (``ok``,
``info``, ``warn``, ``error``), what it saw, the row of the seed's troubleshooting table
(section 12.12.3) it relates to, and the knob or command that changes it:

* RDMA devices (``ibstat``/``ibv_devinfo``): the state of every port (the one ``MC_IB_PORT``
  selects must be ACTIVE: DOWN/INIT/ARMED are errors), link layer and rate, the PCIe link
  (running below its capability), the GID the engine will use (``MC_GID_INDEX``, or the auto
  pick: RoCE v2 on an IPv4-mapped address, ``show_gids``), and the active MTU against
  ``MC_MTU`` (the engine uses the smaller);
* the NUMA layout (``numactl -H``) and where NICs and GPUs sit; the GPU-to-NIC PCI path classes
  (``nvidia-smi topo -m``) when GPUs exist; nvidia-peermem / DMA-BUF for GPU memory; PCIe
  Relaxed Ordering of each NIC (its Device Control register, where config space is readable)
  against ``MC_IB_PCI_RELAXED_ORDERING``;
* huge pages (``/proc/meminfo``, ``/sys/kernel/mm/hugepages``) against
  ``MC_STORE_USE_HUGEPAGE``/``MC_STORE_HUGEPAGE_SIZE``; the locked-memory limit (what RDMA
  registration may pin: unlimited, or CAP_IPC_LOCK, is what it needs); the TCP buffer sysctls
  against the seed's values (16 MiB);
* the cluster token: unset while the engine's address is not loopback is a warning;
* the configuration itself: load errors, typos and clamps (``Config.notes``), options set that do
  nothing here, settings the troubleshooting table names (``MC_DISABLE_METACACHE``, a CQ shallower
  than the QPs' send queues);
* with ``--peer SEG``: a :class:`~mooncake.engine.TransferEngine` probes the peer, says which
  transports reach it (``explain``) and, per reachable transport, reads 1 MiB of the peer's first
  published buffer; with ``--write`` it also writes a random pattern, reads it back and compares
  SHA-256 checksums, then writes the original bytes back.  That write is a real write into the
  peer's memory (off by default): use it only on a peer whose buffer may change for a moment.

Exit status: 0 when every finding is ok or info, 1 with warnings, 2 with errors.

The doctor judges options, it does not apply them: it reads them through module constants
(``_MTU = "MC_MTU"`` ...), not as the quoted reads ``tests/test_options_effect.py`` credits to a
consumer in the option table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import resource
import socket
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mooncake import topology as T
from mooncake.auth import is_loopback
from mooncake.errors import ConfigError

__all__ = ["Finding", "Report", "run", "main", "ROWS", "SEVERITIES"]

SEVERITIES = ("ok", "info", "warn", "error")
EXIT = {"ok": 0, "info": 0, "warn": 1, "error": 2}

#: the seed's troubleshooting table (section 12.12.3): English symptom -> (symptom as written,
#: likely cause, what to check), translated
ROWS: dict[str, tuple[str, str, str]] = {
    "Throughput far below line rate": (
        "吞吐远低于线速", "slices too small / not enough workers",
        "raise MC_SLICE_SIZE, raise MC_WORKERS_PER_CTX"),
    "Tail latency abnormally high": (
        "尾延迟异常高", "cross-NUMA access / CQ overflow",
        "check NUMA binding, raise MC_MAX_CQE_PER_CTX"),
    "GPU Direct throughput low": (
        "GPU Direct 吞吐低", "Relaxed Ordering not enabled", "set MC_IB_PCI_RELAXED_ORDERING=1"),
    "Slow connection setup": (
        "连接建立慢", "metadata cache disabled", "make sure MC_DISABLE_METACACHE is not set"),
    "Frequent transfer timeouts": (
        "传输频繁超时", "too few retries / network problems",
        "raise MC_RETRY_CNT, check the network state"),
    "CPU usage too high": (
        "CPU 使用率过高", "worker polling overhead", "TENT: raise grace_period_ns"),
    "Low endpoint cache hit rate": (
        "端点缓存命中率低", "endpoint cache too small",
        "raise MC_MAX_EP_PER_CTX or endpoint_store_cap"),
}
_THROUGHPUT, _TAIL, _GPUDIRECT, _CONNECT, _TIMEOUTS = list(ROWS)[:5]

#: the checklist (section 12.12.1)
_CK_NIC = "1. RDMA NIC state: ibstat, ibv_devinfo"
_CK_GID = "2. GID index: show_gids"
_CK_NUMA = "3. NUMA topology: numactl -H, nvidia-smi topo -m"
_CK_HUGE = "4. huge pages: cat /proc/meminfo | grep HugePages"

# the options the doctor judges (see the module docstring)
_IB_PORT = "MC_IB_PORT"
_GID_INDEX = "MC_GID_INDEX"
_MTU = "MC_MTU"
_FILTERS = "MC_TE_FILTERS"
_FILTERS_EXCLUDE = "MC_TE_FILTERS_EXCLUDE"
_RELAXED = "MC_IB_PCI_RELAXED_ORDERING"
_USE_HUGE = "MC_STORE_USE_HUGEPAGE"
_HUGE_SIZE = "MC_STORE_HUGEPAGE_SIZE"
_TOKEN = "MC_CLUSTER_TOKEN"
_TOKEN_FILE = "MC_CLUSTER_TOKEN_FILE"
_BIND = "MC_TCP_BIND_ADDRESS"
_METACACHE = "MC_DISABLE_METACACHE"
_MAX_CQE = "MC_MAX_CQE_PER_CTX"
_MAX_WR = "MC_MAX_WR"
_QP_PER_EP = "MC_NUM_QP_PER_EP"
_AFFINITY = "MC_ENABLE_DEST_DEVICE_AFFINITY"
_FORCE_TCP = "MC_FORCE_TCP"

#: the seed's TCP sysctls (section 12.11.2): name -> minimum of the (last) value
_SYSCTLS = {"net.core.rmem_max": 16777216, "net.core.wmem_max": 16777216,
            "net.ipv4.tcp_rmem": 16777216, "net.ipv4.tcp_wmem": 16777216}
_SYSCTL_SET = {"net.core.rmem_max": "16777216", "net.core.wmem_max": "16777216",
               "net.ipv4.tcp_rmem": '"4096 87380 16777216"',
               "net.ipv4.tcp_wmem": '"4096 65536 16777216"'}
_CAP_IPC_LOCK = 14
MiB, GiB = 1 << 20, 1 << 30


@dataclass
class Finding:
    #: what was checked: ``rdma.port``, ``memory.hugepages``...
    check: str
    severity: str
    #: what it is about: a device and port, a sysctl, ``host``...
    subject: str
    #: what was seen
    seen: str
    #: the knob or command that changes it
    fix: str = ""
    #: the symptom of the seed's troubleshooting row it relates to (a key of :data:`ROWS`)
    row: str | None = None
    #: the checklist step (section 12.12.1) it automates
    checklist: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.severity in SEVERITIES, self.severity
        assert self.row is None or self.row in ROWS, self.row


@dataclass
class Report:
    root: str
    host: str
    findings: list[Finding]
    topology: T.Topology

    @property
    def exit_status(self) -> int:
        return max((EXIT[f.severity] for f in self.findings), default=0)

    def summary(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    def to_json(self) -> dict[str, Any]:
        return {"root": self.root, "host": self.host, "exit_status": self.exit_status,
                "summary": self.summary(), "findings": [asdict(f) for f in self.findings],
                "topology": self.topology.to_dict(),
                "tent_topology": self.topology.to_tent_json()}


@dataclass
class _Ctx:
    root: str
    live: bool
    cfg: Any
    topo: T.Topology
    host: str
    out: list[Finding] = field(default_factory=list)

    def add(self, *a: Any, **kw: Any) -> Finding:
        f = Finding(*a, **kw)
        self.out.append(f)
        return f

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)


# ---- helpers -------------------------------------------------------------------------------------


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v.is_integer() or v >= 100 else f"{v:.1f} {unit}"
    return f"{n} B"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(1 << 16).strip()
    except OSError:
        return None


def _names(devs: list[str]) -> str:
    """``mlx5_bond_4, mlx5_bond_5`` (at most 6 names, then a count)."""
    return ", ".join(devs[:6]) + (f" (+{len(devs) - 6})" if len(devs) > 6 else "") or "none"


def primary_address() -> str:
    """The address this host reaches the world from (the route to a TEST-NET address; a
    UDP connect sends nothing), else 127.0.0.1."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def _src(cfg: Any, name: str) -> str:
    s = cfg.source(name)
    return "" if s == "default" else f" ({s})"


def load(env: Mapping[str, str] | None = None) -> tuple[Any, list[str], list[str]]:
    """``(config, errors, warnings)``: the effective configuration (defaults when it does not
    load), with what loading raised and warned, captured instead of printed."""
    from mooncake.config import load_config

    lg = logging.getLogger("mooncake.config")
    saved = lg.propagate, lg.handlers[:]
    lg.propagate, lg.handlers = False, [logging.NullHandler()]
    errors: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cfg = load_config(env=env)
            except ConfigError as e:
                errors.append(str(e))
                cfg = load_config(env={})
    finally:
        lg.propagate, lg.handlers = saved
    return cfg, errors, [str(w.message) for w in caught]


# ---- checks: configuration -----------------------------------------------------------------------


def _check_config(c: _Ctx, errors: list[str], warned: list[str]) -> None:
    for e in errors:
        c.add("config.load", "error", "configuration", e,
              fix="fix the variable it names (mooncake config show lists every option); "
                  "the checks below use the defaults")
    inert = set(c.cfg.inert.values())
    for msg in dict.fromkeys([*c.cfg.notes, *warned]):
        if any(r and r in msg for r in inert):
            continue
        c.add("config.note", "warn", "configuration", msg,
              fix="mooncake config show says what each option does")
    for name, why in sorted(c.cfg.inert.items()):
        c.add("config.inert", "info", name, why,
              fix=f"unset {name}, or see mooncake config show")
    if c.cfg[_METACACHE]:
        c.add("config.metacache", "warn", _METACACHE,
              f"true{_src(c.cfg, _METACACHE)}: every transfer fetches the peer's descriptor "
              "again", fix=f"unset {_METACACHE}", row=_CONNECT)
    wr, qps, cqe = c.cfg[_MAX_WR], c.cfg[_QP_PER_EP], c.cfg[_MAX_CQE]
    if c.topo.rdma_devices and cqe < wr * qps:
        c.add("config.cq_depth", "warn", _MAX_CQE,
              f"{cqe} CQEs per device < {_MAX_WR} x {_QP_PER_EP} = {wr * qps}: one endpoint's "
              "send queues can overflow the CQ", row=_TAIL,
              fix=f"export {_MAX_CQE}={max(4096, wr * qps)} (the seed: at least the sum of "
                  "the QPs' max_wr; 4096 or more in production)")


# ---- checks: RDMA --------------------------------------------------------------------------------


def _used_devices(c: _Ctx) -> list[T.RdmaDevice]:
    include, exclude = list(c.cfg[_FILTERS] or ()), list(c.cfg[_FILTERS_EXCLUDE] or ())
    names = {d.name for d in c.topo.rdma_devices}
    for n in [*include, *exclude]:
        if n not in names:
            which = _FILTERS if n in include else _FILTERS_EXCLUDE
            c.add("rdma.filter", "warn", which, f"names {n!r}, which is not a device here "
                  f"(devices: {_names(sorted(names))})", fix=f"correct {which}",
                  checklist=_CK_NIC)
    used = c.topo.filtered(include, exclude).rdma_devices
    if c.topo.rdma_devices and not used:
        c.add("rdma.filter", "error", "RDMA devices",
              f"{_FILTERS}/{_FILTERS_EXCLUDE} leave none of {_names(sorted(names))}",
              fix=f"correct {_FILTERS} / {_FILTERS_EXCLUDE}", checklist=_CK_NIC)
    return used


def _check_rdma(c: _Ctx) -> list[T.RdmaDevice]:
    topo = c.topo
    if not topo.rdma_devices:
        why = "; ".join(topo.notes) or "no RDMA devices"
        c.add("rdma.devices", "info", "RDMA devices", f"{why}: the rdma transport has "
              "nothing to open; tcp carries transfers between hosts (shm/cxl on one host)",
              fix="load the NIC's RDMA driver (modprobe mlx5_ib; Soft-RoCE: modprobe rdma_rxe "
                  "&& rdma link add rxe0 type rxe netdev IF)", checklist=_CK_NIC)
        return []
    used = _used_devices(c)
    soft = [d.name for d in topo.rdma_devices if d.kind == "soft"]
    c.add("rdma.devices", "info", "RDMA devices",
          f"{len(topo.rdma_devices)} found: {_names([d.name for d in topo.rdma_devices])}"
          + (f"; soft (rxe/siw): {_names(soft)}" if soft else "")
          + (f"; used: {_names([d.name for d in used])}" if len(used) != len(topo.rdma_devices)
             else ""), checklist=_CK_NIC)
    if c.cfg[_FORCE_TCP]:
        c.add("rdma.force_tcp", "info", _FORCE_TCP, f"true{_src(c.cfg, _FORCE_TCP)}: the "
              "engine installs tcp only; these devices stay unused", fix=f"unset {_FORCE_TCP}")
    port_no = c.cfg[_IB_PORT]
    layers = {}
    for d in used:
        _check_device(c, d, port_no)
        p = d.port(port_no)
        if p is not None:
            layers[d.name] = p.link_layer
    if len(set(layers.values())) > 1:
        c.add("rdma.link_layer", "warn", "RDMA devices",
              "mixed link layers: " + ", ".join(f"{n} {ll}" for n, ll in layers.items())
              + ": InfiniBand and RoCE ports cannot reach each other", checklist=_CK_NIC,
              fix=f"keep one fabric per engine: {_FILTERS}=<devices of one link layer>",
              row=_TIMEOUTS)
    return used


def _check_device(c: _Ctx, d: T.RdmaDevice, port_no: int) -> None:
    where = f"{d.pci_bus_id}, NUMA {d.numa_node}" if d.pci else d.note
    p = d.port(port_no)
    if p is None:
        c.add("rdma.port", "error", f"{d.name} port {port_no}",
              f"no port {port_no} (ports: {', '.join(str(x.num) for x in d.ports) or 'none'})",
              fix=f"export {_IB_PORT}=<a port of {d.name}>, or leave {d.name} out "
                  f"({_FILTERS_EXCLUDE})", checklist=_CK_NIC)
    for q in d.ports:
        used = q.num == port_no
        ll = "Ethernet (RoCE)" if q.roce else q.link_layer
        seen = (f"{q.state}, {q.phys_state}, {ll}, {q.rate or 'rate ?'}"
                + (f", netdev {q.netdev}" if q.netdev else "") + f"; {where}")
        if q.active:
            c.add("rdma.port", "ok", f"{d.name} port {q.num}", seen, checklist=_CK_NIC,
                  data={"state": q.state, "link_layer": q.link_layer, "rate": q.rate})
            continue
        if q.roce:
            fix = (f"bring the link up: ip link set {q.netdev or 'IF'} up; check cable and "
                   "switch port (ibstat, ibv_devinfo)")
        elif q.state == "INIT":
            fix = "no subnet manager configured the port: start opensm (or the switch's SM)"
        else:
            fix = "check cable and switch port (ibstat, ibv_devinfo); ARMED: the SM is not done"
        c.add("rdma.port", "error" if used else "info", f"{d.name} port {q.num}",
              seen + ("" if used else f"; not used ({_IB_PORT}={port_no})"), fix=fix,
              row=_TIMEOUTS if used else None, checklist=_CK_NIC,
              data={"state": q.state, "link_layer": q.link_layer, "rate": q.rate})
    if p is None:
        return
    _check_gid(c, d, p)
    _check_mtu(c, d, p)
    if d.kind == "pci" and d.pci:
        _check_pcie_link(c, d)


def _check_gid(c: _Ctx, d: T.RdmaDevice, p: T.Port) -> None:
    subj = f"{d.name} port {p.num}"
    want = c.cfg[_GID_INDEX]
    table = ", ".join(f"{g.index}:{g.type}" + (f" {g.ipv4}" if g.ipv4 else "")
                      for g in p.gids) or "empty"
    data = {"auto_index": p.gid_index, "configured": want,
            "gids": [asdict(g) for g in p.gids]}
    if want < 0:
        g = p.gid(p.gid_index) if p.gid_index is not None else None
        if g is None:
            c.add("rdma.gid", "error", subj, f"no usable GID (table: {table}): the rdma "
                  "transport refuses the device", checklist=_CK_GID, row=_TIMEOUTS, data=data,
                  fix=f"give netdev {p.netdev or 'IF'} an IP address (ip addr add ...), or "
                      f"export {_GID_INDEX}=<index>")
            return
        seen = f"auto ({_GID_INDEX}=-1): index {g.index}, {g.type}, " + (
            f"{g.ipv4}" if g.ipv4 else g.gid) + (f" on {g.netdev}" if g.netdev else "")
        if p.roce and not g.ipv4:
            c.add("rdma.gid", "warn", subj, seen + f"; no RoCE v2 GID on an IPv4 address "
                  f"(table: {table}): a link-local/IPv6 GID does not route beyond the L2 "
                  "segment", checklist=_CK_GID, row=_TIMEOUTS, data=data,
                  fix=f"give {p.netdev or 'the netdev'} an IPv4 address, or export "
                      f"{_GID_INDEX}=<the routable RoCE v2 index> (show_gids)")
            return
        c.add("rdma.gid", "ok", subj, seen, checklist=_CK_GID, data=data,
              fix=f"pin it: export {_GID_INDEX}={g.index}" if p.roce else "")
        return
    g = p.gid(want)
    if g is None:
        c.add("rdma.gid", "error", subj, f"{_GID_INDEX}={want}{_src(c.cfg, _GID_INDEX)}: "
              f"that slot is empty (table: {table}): the rdma transport refuses the device",
              checklist=_CK_GID, row=_TIMEOUTS, data=data,
              fix=f"export {_GID_INDEX}=" + (str(p.gid_index) if p.gid_index is not None
                                             else "-1") + " (show_gids)")
        return
    seen = f"{_GID_INDEX}={want}: {g.type}, {g.ipv4 or g.gid}"
    if p.roce and g.type != "RoCE v2":
        better = p.gid_index if p.gid_index is not None and p.gid(p.gid_index) and \
            p.gid(p.gid_index).type == "RoCE v2" else None
        c.add("rdma.gid", "warn", subj, seen + ": a RoCE v1 GID; peers on RoCE v2 (the auto "
              "pick) cannot reach it, and v1 does not route", checklist=_CK_GID,
              row=_TIMEOUTS, data=data,
              fix=f"export {_GID_INDEX}={better}" if better is not None else
              "configure a RoCE v2 GID (an IPv4 address on the netdev)")
        return
    sev, extra = "ok", ""
    if p.gid_index is not None and want != p.gid_index:
        sev, extra = "info", f" (the auto pick would be {p.gid_index})"
    c.add("rdma.gid", sev, subj, seen + extra, checklist=_CK_GID, data=data)


def _check_mtu(c: _Ctx, d: T.RdmaDevice, p: T.Port) -> None:
    subj = f"{d.name} port {p.num}"
    mtu = c.cfg[_MTU]
    data = {"active_mtu": p.active_mtu, "source": p.mtu_source, "configured": mtu,
            "netdev_mtu": p.netdev_mtu}
    if p.active_mtu is None:
        c.add("rdma.mtu", "info", subj, f"active MTU unknown (sysfs has none for "
              f"{p.link_layer}); {_MTU}={mtu}{_src(c.cfg, _MTU)}: the path MTU is the "
              "smaller of the two", fix=f"ibv_devinfo -d {d.name} shows active_mtu", data=data)
        return
    how = (f" (netdev {p.netdev} MTU {p.netdev_mtu})" if p.mtu_source == "netdev" else
           " (ibv_query_port)")
    eff = min(mtu, p.active_mtu)
    seen = f"active {p.active_mtu}{how}, {_MTU}={mtu}{_src(c.cfg, _MTU)}: path MTU {eff}"
    if p.active_mtu < mtu:
        fix = (f"ip link set dev {p.netdev} mtu 9000 (a 4096-byte path MTU needs a netdev "
               "MTU of at least 4192; switches too)" if p.roce and p.netdev else
               "raise the MTU of the IB partition (opensm partitions.conf mtu=5)")
        c.add("rdma.mtu", "warn", subj, seen, fix=fix, row=_THROUGHPUT, data=data)
    elif mtu < 4096 <= p.active_mtu:
        c.add("rdma.mtu", "info", subj, seen + "; the seed keeps 4096 unless the network "
              "is congested or lossy", fix=f"export {_MTU}=4096", row=_THROUGHPUT, data=data)
    else:
        c.add("rdma.mtu", "ok", subj, seen, data=data)


def _speed(text: str | None) -> float | None:
    m = re.match(r"\s*([\d.]+)\s*GT/s", text or "")
    return float(m.group(1)) if m else None


def _check_pcie_link(c: _Ctx, d: T.RdmaDevice) -> None:
    pci = d.pci
    cur, top = _speed(pci.link_speed), _speed(pci.max_link_speed)
    if cur is None or top is None or pci.link_width is None or pci.max_link_width is None:
        return
    seen = (f"{pci.bus_id}: {pci.link_speed} x{pci.link_width} (capable of "
            f"{pci.max_link_speed} x{pci.max_link_width})")
    if cur < top or pci.link_width < pci.max_link_width:
        c.add("pcie.link", "warn", d.name, seen + ": the link trained below its capability",
              row=_THROUGHPUT, fix=f"reseat the card or move it to a full-width slot; lspci "
                                   f"-vv -s {pci.bus_id} (LnkSta vs LnkCap), BIOS PCIe settings")
    else:
        c.add("pcie.link", "ok", d.name, seen)


# ---- checks: NUMA, GPUs, PCIe --------------------------------------------------------------------


def _check_numa(c: _Ctx, used: list[T.RdmaDevice]) -> None:
    topo = c.topo
    parts, data = [], {}
    for n in topo.numa_nodes:
        nics = [d.name for d in used if d.pci and topo.numa_of(d) == n.id]
        gpus = [g.name for g in topo.gpus if topo.numa_of(g) == n.id]
        mem = _human(n.mem_total_kib * 1024) if n.mem_total_kib else "?"
        parts.append(f"node{n.id}: CPUs {n.cpulist or '?'} ({len(n.cpus)}), {mem}, NICs "
                     f"{_names(nics)}" + (f", GPUs {_names(gpus)}" if topo.gpus else ""))
        data[str(n.id)] = {"cpus": n.cpulist, "mem_total_kib": n.mem_total_kib, "nics": nics,
                           "gpus": gpus}
    c.add("numa.layout", "info", f"{len(topo.numa_nodes)} NUMA node(s)", "; ".join(parts),
          checklist=_CK_NUMA, data=data)
    if topo.single_node or not used:
        return
    unknown = [d.name for d in used if d.pci and d.numa_node < 0]
    if unknown:
        c.add("numa.nic", "warn", _names(unknown), "NUMA node unknown (numa_node -1: the "
              "firmware does not say): NUMA-aware NIC choice treats them as remote",
              row=_TAIL, checklist=_CK_NUMA,
              fix="enable NUMA/SRAT reporting in the BIOS; meanwhile bind by hand (numactl "
                  "--cpunodebind=N --membind=N)")
    empty = [n.id for n in topo.numa_nodes if not data[str(n.id)]["nics"]]
    if empty and len(empty) < len(topo.numa_nodes):
        c.add("numa.nic", "info", ", ".join(f"node{i}" for i in empty),
              "no NIC on this node: its memory reaches every NIC across the socket (SYS)",
              row=_TAIL, checklist=_CK_NUMA,
              fix="numactl --cpunodebind=N --membind=N on a node with NICs (seed 12.10.2), "
                  "or register buffers there")
    with_nics = [k for k, v in data.items() if v["nics"]]
    if len(with_nics) > 1 and not c.cfg[_AFFINITY]:
        c.add("numa.affinity", "info", _AFFINITY,
              f"NICs on nodes {', '.join(with_nics)}; device affinity is off", row=_TAIL,
              checklist=_CK_NUMA,
              fix=f"bind each process to one node (numactl --cpunodebind=N --membind=N) and "
                  f"export {_AFFINITY}=1 (seed 12.10.3)")


def _check_gpus(c: _Ctx, used: list[T.RdmaDevice]) -> None:
    topo = c.topo
    if not topo.gpus:
        c.add("gpu.devices", "info", "GPUs", "none (no NVIDIA/AMD PCI display function): "
              "GPUDirect checks skipped", checklist=_CK_NUMA)
        return
    c.add("gpu.devices", "info", "GPUs",
          f"{len(topo.gpus)}: " + ", ".join(f"{g.name} {g.pci_bus_id} NUMA {g.numa_node}"
                                            + (f" {g.model}" if g.model else "")
                                            for g in topo.gpus), checklist=_CK_NUMA)
    if used:
        sub = topo.filtered([d.name for d in used])
        matrix = sub.gpu_nic_matrix()
        for g in topo.gpus:
            near = sub.nearest_nics(g)
            cls = matrix[g.name][near[0]] if near else None
            seen = (f"nearest NIC {_names(near)} ({cls}); " if near else "no NIC with a PCI "
                    "path; ") + " ".join(f"{n}:{v or '-'}" for n, v in matrix[g.name].items())
            data = {"nearest": near, "class": cls, "row": matrix[g.name]}
            if cls in ("PIX", "PXB"):
                c.add("gpu.nic_path", "ok", g.name, seen, checklist=_CK_NUMA, data=data)
            elif cls == "PHB":
                c.add("gpu.nic_path", "info", g.name, seen + ": GPUDirect crosses the host "
                      "bridge", checklist=_CK_NUMA, data=data, row=_GPUDIRECT,
                      fix="a NIC under the GPU's PCIe switch gives full GPUDirect bandwidth")
            else:
                c.add("gpu.nic_path", "warn", g.name, seen + ": GPUDirect RDMA would cross "
                      "root complexes or the socket", row=_GPUDIRECT, checklist=_CK_NUMA,
                      data=data, fix="use a NIC on the GPU's PCIe switch or at least its NUMA "
                                     "node (nvidia-smi topo -m; TENT's rank0 for cuda:N)")
    _check_peer_memory(c, used)


def _kernel(c: _Ctx) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", _read(c.path("proc", "sys", "kernel", "osrelease")) or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _check_peer_memory(c: _Ctx, used: list[T.RdmaDevice]) -> None:
    kern = _kernel(c)
    dmabuf_kernel = kern is not None and kern >= (5, 12)
    kv = ".".join(map(str, kern)) if kern else "?"
    for vendor in sorted({g.vendor for g in c.topo.gpus}):
        if vendor == "nvidia":
            peermem = os.path.isdir(c.path("sys", "module", "nvidia_peermem"))
            ver = _read(c.path("proc", "driver", "nvidia", "version")) or ""
            open_km = "open kernel module" in ver.lower()
            if peermem:
                sev, seen = "ok", "nvidia_peermem is loaded: NICs can pin GPU memory"
            elif dmabuf_kernel and open_km:
                sev, seen = "ok", (f"DMA-BUF: kernel {kv} and NVIDIA's open kernel module "
                                   "(nvidia_peermem not loaded)")
            else:
                sev = "warn" if used else "info"
                seen = (f"nvidia_peermem not loaded and no DMA-BUF path (kernel {kv}"
                        + (", proprietary kernel module" if ver else ", driver version ?")
                        + "): registering GPU memory with a NIC fails")
            c.add("gpu.peer_memory", sev, "nvidia", seen, row=None if sev == "ok" else
                  _GPUDIRECT, fix="" if sev == "ok" else "modprobe nvidia-peermem (or the "
                  "open kernel modules on Linux >= 5.12 for DMA-BUF)")
        else:
            sev = "ok" if dmabuf_kernel else ("warn" if used else "info")
            c.add("gpu.peer_memory", sev, "amd", f"DMA-BUF (amdgpu) needs Linux >= 5.12; "
                  f"kernel {kv}", fix="" if sev == "ok" else "a kernel >= 5.12 (ROCm peer "
                  "memory otherwise: the amdgpu/amdkfd peer-direct patches)")


def _check_relaxed(c: _Ctx, used: list[T.RdmaDevice]) -> None:
    pci = [d for d in used if d.kind == "pci" and d.pci]
    if not pci:
        return
    mode = c.cfg[_RELAXED]
    states = {d.name: T.relaxed_ordering(c.root, d.pci) for d in pci}
    on = [n for n, s in states.items() if s]
    off = [n for n, s in states.items() if s is False]
    unknown = [n for n, s in states.items() if s is None]
    shown = "; ".join(f"DevCtl RlxdOrd{sign}: {_names(ns)}"
                      for sign, ns in (("+", on), ("-", off), ("?", unknown)) if ns)
    if unknown:
        shown += " (? = config space not readable: run as root)"
    seen = f"{_RELAXED}={mode}{_src(c.cfg, _RELAXED)}; {shown}"
    data = {"mode": mode, "devices": states}
    gpus = bool(c.topo.gpus)
    if mode == 0:
        if gpus:
            c.add("pcie.relaxed_ordering", "warn", _RELAXED, seen + ": off on a GPU host",
                  row=_GPUDIRECT, data=data,
                  fix=f"export {_RELAXED}=1 (or 2: auto); A100/H100 with ConnectX-6/7 are "
                      "usually safe; 20-50% more GPUDirect throughput")
        else:
            c.add("pcie.relaxed_ordering", "info", _RELAXED, seen + ": matters for GPUDirect "
                  "(no GPU here)", data=data)
        return
    if off:
        c.add("pcie.relaxed_ordering", "warn", _RELAXED, seen + ": requested, but these "
              "functions have Relaxed Ordering disabled, so the MR flag does nothing",
              row=_GPUDIRECT, data=data,
              fix="enable Relaxed Ordering for the slot in the BIOS (lspci -vvv -s BDF | "
                  "grep RlxdOrd); or setpci -s BDF CAP_EXP+8.w=0010:0010")
    else:
        c.add("pcie.relaxed_ordering", "ok" if on and not unknown else "info", _RELAXED,
              seen, data=data)


# ---- checks: memory, network, security -----------------------------------------------------------


def _pools(c: _Ctx) -> dict[int, tuple[int, int]]:
    """``{page size bytes: (total, free)}`` of the HugeTLB pools."""
    base = c.path("sys", "kernel", "mm", "hugepages")
    out = {}
    try:
        names = os.listdir(base)
    except OSError:
        names = []
    for n in names:
        m = re.fullmatch(r"hugepages-(\d+)kB", n)
        if not m:
            continue
        tot = _read(os.path.join(base, n, "nr_hugepages"))
        free = _read(os.path.join(base, n, "free_hugepages"))
        try:
            out[int(m.group(1)) * 1024] = (int(tot or 0), int(free or 0))
        except ValueError:
            continue
    return dict(sorted(out.items()))


def _meminfo(c: _Ctx) -> dict[str, int]:
    out = {}
    for line in (_read(c.path("proc", "meminfo")) or "").splitlines():
        k, _, v = line.partition(":")
        try:
            out[k.strip()] = int(v.split()[0])
        except (ValueError, IndexError):
            continue
    return out


def _check_hugepages(c: _Ctx, used: list[T.RdmaDevice]) -> None:
    use, size = c.cfg[_USE_HUGE], c.cfg[_HUGE_SIZE]
    pools, mi = _pools(c), _meminfo(c)
    listing = ", ".join(f"{_human(s)}: {f} free of {t}" for s, (t, f) in pools.items()) or \
        "no HugeTLB pools"
    seen = (f"{listing}; /proc/meminfo HugePages_Total {mi.get('HugePages_Total', '?')}, "
            f"HugePages_Free {mi.get('HugePages_Free', '?')}, Hugepagesize "
            f"{mi.get('Hugepagesize', '?')} kB")
    data = {"pools": {str(k): {"total": t, "free": f} for k, (t, f) in pools.items()},
            "use": use, "size": size}
    reserve = (f"echo 2048 > /sys/kernel/mm/hugepages/hugepages-{size // 1024}kB/nr_hugepages"
               if size < GiB else "hugepagesz=1G hugepages=N on the kernel command line")
    if not use:
        c.add("memory.hugepages", "info", _USE_HUGE, f"off; {seen}", checklist=_CK_HUGE,
              data=data, fix=f"export {_USE_HUGE}=1 after reserving pages ({reserve}) to "
                             "cut TLB misses")
        return
    subj = f"{_USE_HUGE}=1, {_HUGE_SIZE}={_human(size)}"
    if size not in pools:
        c.add("memory.hugepages", "error", subj, f"the kernel offers no {_human(size)} huge "
              f"pages ({seen}): every managed buffer fails", checklist=_CK_HUGE, data=data,
              fix=f"export {_HUGE_SIZE}=" + (str(min(pools)) if pools else "2097152")
              + " or boot with that page size")
        return
    tot, free = pools[size]
    if free == 0:
        c.add("memory.hugepages", "error", subj, f"no free {_human(size)} pages ({seen}): "
              "allocate() raises HugepageUnavailable", checklist=_CK_HUGE, data=data,
              fix=reserve)
        return
    c.add("memory.hugepages", "ok", subj, f"{free} free {_human(size)} pages "
          f"({_human(free * size)}); {seen}", checklist=_CK_HUGE, data=data)


def _memlock(c: _Ctx) -> tuple[int | None, int | None, bool]:
    """``(soft, hard, CAP_IPC_LOCK)``; None = unlimited."""
    def lim(v: int) -> int | None:
        return None if v == resource.RLIM_INFINITY else v

    if c.live:
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        soft, hard = lim(soft), lim(hard)
    else:
        soft = hard = 0
        for line in (_read(c.path("proc", "self", "limits")) or "").splitlines():
            if line.startswith("Max locked memory"):
                f = line[len("Max locked memory"):].split()
                soft, hard = (None if x == "unlimited" else int(x) for x in f[:2])
    cap = False
    for line in (_read(c.path("proc", "self", "status")) or "").splitlines():
        if line.startswith("CapEff:"):
            cap = bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    return soft, hard, cap


def _check_memlock(c: _Ctx, used: list[T.RdmaDevice]) -> None:
    soft, hard, cap = _memlock(c)
    seen = f"RLIMIT_MEMLOCK soft {_human(soft) if soft is not None else 'unlimited'}, hard " \
           f"{_human(hard) if hard is not None else 'unlimited'}"
    data = {"soft": soft, "hard": hard, "cap_ipc_lock": cap}
    if soft is None:
        c.add("memory.memlock", "ok", "memlock", seen, data=data)
        return
    if cap:
        c.add("memory.memlock", "ok", "memlock", seen + "; CAP_IPC_LOCK: pinned memory is "
              "not limited", data=data)
        return
    fix = ("ulimit -l unlimited" + (" (the hard limit allows it)" if hard is None else
                                     " as root, or LimitMEMLOCK=infinity in the service unit")
           + "; containers: docker run --ulimit memlock=-1; /etc/security/limits.conf "
             "'* - memlock unlimited'")
    if used:
        c.add("memory.memlock", "warn", "memlock", seen + f": RDMA registration pins memory, "
              f"so registering more than {_human(soft)} in this process fails (ENOMEM); "
              "unlimited is what it needs", fix=fix, data=data)
    else:
        c.add("memory.memlock", "info", "memlock", seen + ": only RDMA registration pins "
              "memory (no RDMA device here)", fix=fix, data=data)


def _check_sysctls(c: _Ctx, used: list[T.RdmaDevice]) -> None:
    rdma_up = any(p.active for d in used for p in d.ports)
    for name, want in _SYSCTLS.items():
        text = _read(c.path("proc", "sys", *name.split(".")))
        if text is None:
            c.add("net.sysctl", "info", name, "not readable", data={"value": None})
            continue
        try:
            have = int(text.split()[-1])
        except (ValueError, IndexError):
            c.add("net.sysctl", "info", name, f"unexpected value {text!r}")
            continue
        shown = " ".join(text.split())
        data = {"value": shown, "recommended": _SYSCTL_SET[name].strip('"')}
        if have >= want:
            c.add("net.sysctl", "ok", name, f"{shown} (seed: {data['recommended']})",
                  data=data)
            continue
        sev = "info" if rdma_up else "warn"
        c.add("net.sysctl", sev, name, f"{shown}: below the seed's {_human(want)} for TCP "
              "transfers" + ("; RDMA carries data here, tcp is the fallback" if rdma_up else ""),
              row=_THROUGHPUT, data=data, fix=f"sysctl -w {name}={_SYSCTL_SET[name]} (root; "
                                             "/etc/sysctl.d/ to keep it)")


def _check_token(c: _Ctx, used: list[T.RdmaDevice]) -> None:
    token, path = c.cfg[_TOKEN], c.cfg[_TOKEN_FILE]
    subj = f"host {c.host}"
    if token or path:
        from mooncake.auth import open_auth

        try:
            open_auth(c.cfg)
        except ConfigError as e:
            c.add("security.cluster_token", "error", subj, str(e),
                  fix=f"set one of {_TOKEN} / {_TOKEN_FILE} (a readable file, mode 0600)")
            return
        which = _TOKEN_FILE if path else _TOKEN
        c.add("security.cluster_token", "ok", subj, f"{which} is set{_src(c.cfg, which)}: "
              "every connection proves the token")
        return
    if is_loopback(c.host):
        c.add("security.cluster_token", "ok", subj, "no cluster token, but the address is "
              "loopback: only processes on this host reach the ports")
        return
    c.add("security.cluster_token", "warn", subj, f"no cluster token ({_TOKEN} / "
          f"{_TOKEN_FILE} unset) and {c.host} is not loopback: any process that reaches the "
          "RPC and data ports may read and write registered memory",
          fix=f"export {_TOKEN}=$(openssl rand -hex 32) on every engine of the cluster (or "
              f"{_TOKEN_FILE}=<file, mode 0600>)")


def _check_transports(c: _Ctx, used: list[T.RdmaDevice]) -> None:
    if not c.live:
        return
    from mooncake.registry import transport_status

    rows = transport_status()
    c.add("transports", "info", "transports", "; ".join(
        f"{r.name}: {'available' if r.available else 'unavailable (' + r.reason + ')'}"
        for r in rows), fix="mooncake transports")
    rdma = next((r for r in rows if r.name == "rdma"), None)
    if used and rdma is not None and not rdma.available:
        c.add("transports.rdma", "warn", "rdma", f"RDMA devices exist but the rdma transport "
              f"is unavailable: {rdma.reason}", row=_THROUGHPUT,
              fix="install rdma-core's runtime library (Debian/Ubuntu: libibverbs1 "
                  "ibverbs-providers; RHEL/Fedora: libibverbs); no rebuild is needed")


# ---- --peer --------------------------------------------------------------------------------------


def _roundtrip(eng: Any, seg: str, buf: Any, size: int, read_only: bool) -> tuple[str, str]:
    """``(severity, what happened)`` of a read (+ write, read back, restore) of ``size``
    bytes at the start of the peer's buffer ``buf``."""
    import numpy as np

    n = min(size, buf.length)
    orig = np.zeros(n, np.uint8)
    back = np.zeros(n, np.uint8)
    pattern = np.random.default_rng().integers(0, 256, n, dtype=np.uint8)
    for a in (orig, back, pattern):
        eng.register(a)
    t0 = time.perf_counter()
    eng.read(seg, orig, buf.addr, n)
    t_read = time.perf_counter() - t0
    where = f"{_human(n)} at 0x{buf.addr:x} ({buf.location})"
    if read_only or not buf.writable:
        why = "no --write" if read_only else "the buffer is read-only"
        return "ok", f"read {where} in {t_read * 1e3:.2f} ms ({why}: no write)"
    t0 = time.perf_counter()
    eng.write(seg, pattern, buf.addr, n)
    t_write = time.perf_counter() - t0
    eng.read(seg, back, buf.addr, n)
    want, got = hashlib.sha256(pattern).hexdigest(), hashlib.sha256(back).hexdigest()
    eng.write(seg, orig, buf.addr, n)  # put the peer's bytes back
    eng.read(seg, back, buf.addr, n)
    restored = bytes(back) == bytes(orig)
    if want != got:
        return "error", (f"wrote {where}, read back a different checksum (sha256 {want[:16]} "
                         f"!= {got[:16]})" + ("" if restored else "; restoring failed too"))
    return ("ok" if restored else "warn"), (
        f"write+read {where}: sha256 {want[:16]} equal; write {t_write * 1e3:.2f} ms, read "
        f"{t_read * 1e3:.2f} ms; " + ("original bytes restored" if restored else
                                      "the restored bytes differ (the peer changed them?)"))


def _check_peer(c: _Ctx, seg: str, metadata: str, size: int, read_only: bool) -> None:
    from mooncake.engine import TransferEngine
    from mooncake.errors import MooncakeError, TransportUnavailable

    try:
        eng = TransferEngine(c.host, metadata, protocol="auto")
    except (MooncakeError, OSError) as e:
        c.add("peer.engine", "error", seg, f"cannot start a local engine on {c.host}: {e}",
              fix="--host an address of this machine")
        return
    try:
        t0 = time.perf_counter()
        try:
            eng.probe(seg)
        except (MooncakeError, OSError) as e:
            c.add("peer.probe", "error", seg, f"no answer: {e}", row=_TIMEOUTS,
                  fix="check the segment name (host:rpc_port), that the peer runs, firewalls, "
                      f"and that both sides use the same {_TOKEN}")
            return
        c.add("peer.probe", "ok", seg, f"answers on its RPC port "
              f"({(time.perf_counter() - t0) * 1e3:.1f} ms)")
        try:
            info = eng.explain(seg)
            desc = eng.segment(seg)
        except (MooncakeError, OSError) as e:
            c.add("peer.descriptor", "error", seg, f"cannot fetch its descriptor: {e}",
                  row=_CONNECT, fix="metadata: both sides must use the same --metadata")
            return
        reach = [x["transport"] for x in info["candidates"] if x["reachable"]]
        c.add("peer.route", "ok" if info["chosen"] else "error", seg,
              f"auto picks {info['chosen'] or 'nothing'}; " + "; ".join(
                  f"{x['transport']}: {x['reason']}" for x in info["candidates"]),
              data={"chosen": info["chosen"], "candidates": info["candidates"]},
              fix="" if info["chosen"] else "the peer must publish a transport this engine "
                                             "has (mooncake transports)")
    finally:
        eng.close()
    bufs = [b for b in desc.buffers if b.length > 0]
    if not bufs:
        c.add("peer.transfer", "info", seg, "the peer publishes no buffer: probe only")
        return
    buf = next((b for b in bufs if b.writable), bufs[0])
    for name in reach:
        try:
            e2 = TransferEngine(c.host, metadata, protocol=name)
        except (MooncakeError, OSError) as e:
            c.add("peer.transfer", "error", f"{seg} via {name}", f"engine failed: {e}")
            continue
        try:
            sev, seen = _roundtrip(e2, seg, buf, size, read_only)
            c.add("peer.transfer", sev, f"{seg} via {name}", seen,
                  row=_TIMEOUTS if sev == "error" else None)
        except TransportUnavailable as e:
            c.add("peer.transfer", "info", f"{seg} via {name}", f"not for this buffer: {e}")
        except (MooncakeError, OSError) as e:
            c.add("peer.transfer", "error", f"{seg} via {name}", f"{type(e).__name__}: {e}",
                  row=_TIMEOUTS, fix="MC_LOG_LEVEL=DEBUG shows the transport's view")
        finally:
            e2.close()


# ---- run and print -------------------------------------------------------------------------------


def run(root: str = "/", host: str | None = None, peer: str | None = None,
        env: Mapping[str, str] | None = None, metadata: str = "P2PHANDSHAKE",
        size: int = MiB, read_only: bool = True) -> Report:
    """Every check; ``env`` replaces ``os.environ`` for the configuration."""
    cfg, errors, warned = load(env)
    live = os.path.realpath(root) == "/"
    topo = T.discover(root)
    c = _Ctx(root, live, cfg, topo, host or cfg[_BIND] or primary_address())
    _guard(c, "config", lambda: _check_config(c, errors, warned))
    used = _guard(c, "rdma", lambda: _check_rdma(c)) or []
    checks: list[Callable[[_Ctx, list[T.RdmaDevice]], None]] = [
        _check_numa, _check_gpus, _check_relaxed, _check_hugepages, _check_memlock,
        _check_sysctls, _check_token, _check_transports]
    for check in checks:
        _guard(c, check.__name__[7:], lambda check=check: check(c, used))
    if peer:
        _guard(c, "peer", lambda: _check_peer(c, peer, metadata, size, read_only))
    return Report(root, c.host, c.out, topo)


def _guard(c: _Ctx, name: str, fn: Callable[[], Any]) -> Any:
    """Run one check; a check that crashes is an error finding, the others still run."""
    try:
        return fn()
    except Exception as e:  # the report must come out whatever one check runs into
        c.add(f"{name}.failed", "error", "doctor", f"the {name} check failed: "
              f"{type(e).__name__}: {e}", fix="a bug in mooncake doctor: please report it")
        return None


def _table(topo: T.Topology) -> list[str]:
    """GPU and NUMA rows against NIC columns (``nvidia-smi topo -m``'s shape)."""
    nics = [d.name for d in topo.rdma_devices]
    if not nics:
        return []
    rows = [(g.name, topo.gpu_nic_matrix()[g.name]) for g in topo.gpus]
    rows += [(f"cpu:{n}", m) for n, m in topo.numa_nic_matrix().items()]
    w0 = max(len(r[0]) for r in rows)
    ws = [max(len(n), 4) for n in nics]
    def line(head: str, cells: list[str]) -> str:
        return ("  " + head.ljust(w0) + "  " + "  ".join(
            c.ljust(w) for c, w in zip(cells, ws, strict=True))).rstrip()

    out = ["PCI paths (PIX < PXB < PHB < NODE < SYS; - no PCI device):", line("", nics)]
    out += [line(name, [m.get(n) or "-" for n in nics]) for name, m in rows]
    return out


def render(rep: Report, rich: bool | None = None) -> str:
    """The human report: aligned columns (rich's table on a terminal, when installed)."""
    fs = rep.findings
    if rich is None:
        rich = sys.stdout.isatty()
    if rich:
        try:
            return _render_rich(rep)
        except ImportError:
            pass
    w_sev = 5
    w_chk = max((len(f.check) for f in fs), default=5)
    w_sub = min(max((len(f.subject) for f in fs), default=7), 40)
    lines = [f"mooncake doctor: {rep.root} (host {rep.host})", ""]
    for f in fs:
        lines.append(f"{f.severity.upper():<{w_sev}}  {f.check:<{w_chk}}  "
                     f"{f.subject:<{w_sub}}  {f.seen}")
        pad = " " * (w_sev + 2)
        if f.fix:
            lines.append(f"{pad}fix: {f.fix}")
        if f.row:
            lines.append(f"{pad}seed 12.12.3: \"{f.row}\" ({ROWS[f.row][0]})")
    table = _table(rep.topology)
    if table:
        lines += ["", *table]
    s = rep.summary()
    lines += ["", f"{s['ok']} ok, {s['info']} info, {s['warn']} warnings, {s['error']} errors "
                  f"(exit status {rep.exit_status})"]
    return "\n".join(lines)


def _render_rich(rep: Report) -> str:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    colors = {"ok": "green", "info": "cyan", "warn": "yellow", "error": "bold red"}
    t = Table(title=f"mooncake doctor: {rep.root} (host {rep.host})", show_lines=False)
    for col in ("severity", "check", "subject", "seen / fix"):
        t.add_column(col, overflow="fold")
    for f in rep.findings:
        text = escape(f.seen) + (f"\n[dim]fix: {escape(f.fix)}[/dim]" if f.fix else "") + (
            f"\n[dim]seed 12.12.3: \"{f.row}\"[/dim]" if f.row else "")
        t.add_row(f"[{colors[f.severity]}]{f.severity}[/]", f.check, escape(f.subject), text)
    con = Console(record=True, width=max(100, Console().width))
    with con.capture() as cap:
        con.print(t)
        for line in _table(rep.topology):
            con.print(line, markup=False)
        s = rep.summary()
        con.print(f"{s['ok']} ok, {s['info']} info, {s['warn']} warnings, {s['error']} errors "
                  f"(exit status {rep.exit_status})")
    return cap.get().rstrip("\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="findings, topology and exit status "
                                                       "as JSON")
    p.add_argument("--peer", metavar="SEG", help="also probe this segment (host:rpc_port) "
                   "and run a checked 1 MiB write+read per transport that reaches it")
    p.add_argument("--host", help="this engine's address (default: MC_TCP_BIND_ADDRESS, else "
                                  "the machine's primary address); --peer binds to it")
    p.add_argument("--metadata", default="P2PHANDSHAKE",
                   help="metadata server for --peer (P2PHANDSHAKE, http://..., etcd://...)")
    p.add_argument("--write", action="store_true",
                   help="--peer: also write a pattern into the peer's buffer, read it back and "
                        "restore it (the peer's bytes change for a moment; default: read only)")
    p.add_argument("--root", default="/", help="root of the sysfs/procfs tree to read (a "
                                               "fixture, or a host's mounted elsewhere)")


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        p = argparse.ArgumentParser(prog="mooncake doctor", description=__doc__.split("\n")[0])
        add_arguments(p)
        args = p.parse_args(args)
    rep = run(args.root, args.host, args.peer, metadata=args.metadata,
              read_only=not args.write)
    if args.json:
        print(json.dumps(rep.to_json(), indent=2, default=str))
    else:
        print(render(rep))
    return rep.exit_status


if __name__ == "__main__":
    sys.exit(main())
