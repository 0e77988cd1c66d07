"""``mooncake topology show|dump|generate``: this host's hardware layer, and the NIC pairs to a
peer as measured.

* ``show [--root DIR] [--json]``: tables of what :func:`mooncake.topology.discover` finds: RDMA
  devices (per port: state, link layer, rate, netdev, the GID index Mooncake's auto pick uses
  and its type, NUMA node, PCI address), NUMA nodes (CPUs, memory), GPUs, and the GPU/NUMA x NIC
  path classes (``PIX``/``PXB``/``PHB``/``NODE``/``SYS``, what ``nvidia-smi topo -m`` prints).
  rich tables with the ``cli`` extra, aligned text without it.
* ``dump [flags]``: TENT's topology JSON; exactly ``python -m
  mooncake.transfer_engine_topology_dump [flags]`` (same flags: ``--backend``, ``--root``...).
* ``generate --peer SEGMENT``: every local NIC x peer NIC pair measured with the engine itself:
  one engine per measurement opened on the local NIC only (``device_name``), pinned to the peer
  NIC with ``MC_ENABLE_HCA_PEER_AFFINITY=1 MC_NIC_PEER_AFFINITY=<local>=<peer>``, running
  :func:`mooncake.bench.run_initiator` against the peer's first registered buffer: WRITE for
  ``--duration`` s, READ for ``--duration`` s (``--size`` bytes per request), then 4 KiB
  synchronous WRITEs for ``--duration`` s (their median round trip is the latency).  Writes
  TENT's ``cluster-topology.json``::

      {"src_host": this host, "dst_host": SEGMENT, "endpoints": [every pair measured],
       "partition_matchings": {"SRC_NUMA-DST_NUMA": [{"src_dev", "dst_dev", "src_numa",
           "dst_numa", "bandwidth": MB/s, "latency": us}, ...]}}

  ``bandwidth`` is the lower of the WRITE and READ bandwidths (decimal MB/s, as Mooncake's
  generator records ``ib_write_bw``'s), ``latency`` the 4 KiB WRITE's median in microseconds.
  A partition (a local NUMA node, a peer NUMA node: the local NIC's from discovery, the peer's
  from the ``numa<i>`` its segment publishes, -1 when it publishes none) lists a one-to-one
  matching of its NICs, best first: the pairs by bandwidth (then latency), each taken when
  neither of its NICs is already taken (Mooncake's generator solves a min-latency assignment
  with scipy instead).  A pair that fails is reported and left out; when none succeeds nothing
  is written and the exit status is 1.  The file is read back through
  :func:`mooncake.topology.load_cluster_topology` before the command says it is written.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from mooncake.topology import MAX_NUMA_NODE, Topology, discover, load_cluster_topology

__all__ = ["main", "show_data", "PairResult", "partition_matchings", "LATENCY_SIZE"]

#: bytes of one latency probe (a synchronous WRITE)
LATENCY_SIZE = 4096


def _dash(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _numa(n: int) -> str:
    return "unknown" if n < 0 else str(n)


# ---- show ----------------------------------------------------------------------------------------


def show_data(topo: Topology) -> dict[str, Any]:
    """What ``show`` prints, JSON-ready: one row per RDMA port, the NUMA nodes, the GPUs and
    the path classes ``{"cuda:N" | "cpu:N": {nic: class or None}}``."""
    ports = []
    for d in topo.rdma_devices:
        for p in d.ports or [None]:
            g = p.gid(p.gid_index) if p is not None and p.gid_index is not None else None
            ports.append({
                "name": d.name, "kind": d.kind, "port": p.num if p else None,
                "state": p.state if p else None, "link_layer": p.link_layer if p else None,
                "rate": p.rate if p else None, "rate_gbps": p.rate_gbps if p else None,
                "netdev": p.netdev if p else None, "gid_index": p.gid_index if p else None,
                "gid_type": g.type if g else None, "gid": g.gid if g else None,
                "ipv4": g.ipv4 if g else None, "active_mtu": p.active_mtu if p else None,
                "numa_node": d.numa_node, "pci_bus_id": d.pci_bus_id, "note": d.note})
    paths: dict[str, dict[str, str | None]] = dict(topo.gpu_nic_matrix())
    paths.update({f"cpu:{n}": row for n, row in topo.numa_nic_matrix().items()})
    return {
        "root": topo.root,
        "rdma_devices": ports,
        "numa_nodes": [{"id": n.id, "cpulist": n.cpulist, "cpus": len(n.cpus),
                        "mem_total_kib": n.mem_total_kib} for n in topo.numa_nodes],
        "gpus": [{"name": g.name, "vendor": g.vendor, "model": g.model,
                  "pci_bus_id": g.pci_bus_id, "numa_node": g.numa_node} for g in topo.gpus],
        "paths": paths,
        "notes": list(topo.notes),
    }


def _gib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / (1 << 20):.1f}"


def print_show(data: dict[str, Any], stream: TextIO | None = None) -> None:
    """``show``'s tables (:func:`mooncake.console.print_table`: rich, or aligned text)."""
    from mooncake.console import print_table

    out = stream or sys.stdout
    devs = data["rdma_devices"]
    if devs:
        rows = [[d["name"], _dash(d["port"]), _dash(d["state"]), _dash(d["link_layer"]),
                 "-" if d["rate_gbps"] is None else f"{d['rate_gbps']:g} Gb/s",
                 _dash(d["netdev"]), _dash(d["gid_index"]), _dash(d["gid_type"]),
                 _dash(d["ipv4"]), _dash(d["active_mtu"]),
                 "-" if d["numa_node"] < 0 else str(d["numa_node"]), _dash(d["pci_bus_id"])]
                for d in devs]
        print_table(["device", "port", "state", "link", "rate", "netdev", "gid", "gid type",
                     "gid ipv4", "mtu", "numa", "pci"], rows,
                    title=f"RDMA devices ({len({d['name'] for d in devs})}; gid: the index "
                          "Mooncake's auto pick uses; numa -: unknown)", stream=out)
        for d in devs:
            if d["note"] and d["port"] in (None, 1):
                out.write(f"  {d['name']}: {d['note']}\n")
    else:
        out.write("RDMA devices: none\n")
    for n in data["notes"]:
        out.write(f"note: {n}\n")
    out.write("\n")
    print_table(["node", "cpus", "cpulist", "memory GiB"],
                [[str(n["id"]), str(n["cpus"]), n["cpulist"] or "-", _gib(n["mem_total_kib"])]
                 for n in data["numa_nodes"]], title="NUMA nodes", stream=out)
    out.write("\n")
    if data["gpus"]:
        print_table(["gpu", "vendor", "model", "pci", "numa"],
                    [[g["name"], g["vendor"], _dash(g["model"]), g["pci_bus_id"],
                      "-" if g["numa_node"] < 0 else str(g["numa_node"])]
                     for g in data["gpus"]], title="GPUs", stream=out)
    else:
        out.write("GPUs: none (no NVIDIA/AMD display-class PCI function)\n")
    nics = list(dict.fromkeys(d["name"] for d in devs))
    if nics:
        out.write("\n")
        print_table(["", *nics],
                    [[row, *(_dash(c.get(n)) for n in nics)] for row, c in data["paths"].items()],
                    title="PCI path classes, GPU/NUMA node x NIC (nearest first: PIX PXB PHB "
                          "NODE SYS; -: no PCI path)", stream=out)


def _show(a: argparse.Namespace) -> int:
    try:
        topo = discover(a.root)
    except OSError as e:
        print(f"mooncake topology show: error: {e}", file=sys.stderr)
        return 1
    data = show_data(topo)
    if a.json:
        print(json.dumps(data, indent=2))
    else:
        print_show(data)
    return 0


# ---- generate ------------------------------------------------------------------------------------


@dataclass
class PairResult:
    """One local NIC -> peer NIC pair, measured (or why not)."""

    src_dev: str
    src_numa: int
    dst_dev: str
    dst_numa: int
    write_mbps: float = 0.0
    read_mbps: float = 0.0
    latency_us: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def bandwidth(self) -> float:
        """What the file records: the lower of the two directions, MB/s."""
        return round(min(self.write_mbps, self.read_mbps), 2)

    def matching(self) -> dict[str, Any]:
        return {"src_dev": self.src_dev, "dst_dev": self.dst_dev, "src_numa": self.src_numa,
                "dst_numa": self.dst_numa, "bandwidth": self.bandwidth,
                "latency": round(self.latency_us, 2)}


def partition_matchings(results: Sequence[PairResult]) -> dict[str, list[dict[str, Any]]]:
    """The successful pairs grouped by ``"src_numa-dst_numa"``; in each a one-to-one matching
    of NICs, best first (highest bandwidth, then lowest latency; a pair joins when neither of
    its NICs is taken yet)."""
    groups: dict[str, list[PairResult]] = {}
    for r in results:
        if r.ok:
            groups.setdefault(f"{r.src_numa}-{r.dst_numa}", []).append(r)
    out: dict[str, list[dict[str, Any]]] = {}
    for key, rows in groups.items():
        taken_src: set[str] = set()
        taken_dst: set[str] = set()
        chosen = []
        for r in sorted(rows, key=lambda r: (-r.bandwidth, r.latency_us, r.src_dev, r.dst_dev)):
            if r.src_dev in taken_src or r.dst_dev in taken_dst:
                continue
            taken_src.add(r.src_dev)
            taken_dst.add(r.dst_dev)
            chosen.append(r.matching())
        out[key] = chosen
    return out


def _peer_nics(desc: Any) -> list[tuple[str, int]] | None:
    """``[(name, NUMA node or -1)]`` the peer's rdma fields publish (``dev<i>``, ``numa<i>``),
    or None when it publishes no RDMA device."""
    from mooncake.transports.rdma import peer_devices

    info = desc.transports.get("rdma") or {}
    names = peer_devices(info)
    if not names:
        return None
    out = []
    for i, n in enumerate(names):
        v = info.get(f"numa{i}", -1)
        out.append((n, v if type(v) is int and -1 <= v <= MAX_NUMA_NODE else -1))
    return out


def _run(a: argparse.Namespace, segment: str, local: str, peer: str, op: str, block: int,
         batch: int, threads: int) -> Any:
    """One :func:`mooncake.bench.run_initiator` run on an rdma engine that has only ``local``
    open and sends only to ``peer``."""
    from mooncake.bench import run_initiator
    from mooncake.errors import MooncakeError

    ns = argparse.Namespace(local_server_name=a.local_server_name,
                            metadata_server=a.metadata_server, protocol="rdma",
                            device_name=local, operation=op, block_size=block,
                            batch_size=batch, threads=threads,
                            buffer_size=block * batch * threads, duration=a.duration,
                            report_unit="MB", report_precision=2)
    config = {"MC_ENABLE_HCA_PEER_AFFINITY": True, "MC_NIC_PEER_AFFINITY": f"{local}={peer}",
              "MC_ENABLE_DEST_DEVICE_AFFINITY": False,
              # a configured pairing file would override the affinity: none while measuring
              "topology/cluster_topology_path": "",
              "transports/rdma/workers/rail_topo_path": ""}
    r = run_initiator(ns, segment, False, config)
    if r.error:
        raise MooncakeError(r.error)
    if not r.batches:
        raise MooncakeError(f"{op} completed no batch in {a.duration:g} s")
    return r


def measure_pair(a: argparse.Namespace, segment: str, src: tuple[str, int],
                 dst: tuple[str, int], step: Any = None) -> PairResult:
    """WRITE and READ bandwidth and the 4 KiB WRITE latency of one NIC pair."""
    from mooncake.errors import MooncakeError

    res = PairResult(src[0], src[1], dst[0], dst[1])
    try:
        for op in ("write", "read"):
            if step:
                step(f"{src[0]} -> {dst[0]} {op}")
            r = _run(a, segment, src[0], dst[0], op, a.size, a.batch_size, a.threads)
            mbps = r.bytes / r.elapsed_s / 1e6
            if op == "write":
                res.write_mbps = mbps
            else:
                res.read_mbps = mbps
        if step:
            step(f"{src[0]} -> {dst[0]} latency")
        r = _run(a, segment, src[0], dst[0], "write", LATENCY_SIZE, 1, 1)
        res.latency_us = r.percentile(0.5) * 1e6
    except (MooncakeError, OSError, RuntimeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _writable_dir(path: str) -> str | None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        return f"--output {path!r}: directory {d} does not exist or is not writable"
    return None


def _write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=4)
        f.write("\n")
    os.replace(tmp, path)


def _fail(msg: str) -> int:
    print(f"mooncake topology generate: error: {msg}", file=sys.stderr)
    return 1


def _plan(a: argparse.Namespace) -> tuple[list[tuple[str, int]], list[tuple[str, int]]] | str:
    """The local and peer NICs, or why there is nothing to measure."""
    from mooncake.engine import TransferEngine
    from mooncake.errors import MooncakeError

    why = []
    topo = discover("/")
    want = [n.strip() for n in a.device_name.split(",") if n.strip()]
    devs = topo.filtered(want).rdma_devices if want else topo.rdma_devices
    missing = [n for n in want if topo.device(n) is None]
    if missing:
        why.append(f"--device-name {', '.join(missing)}: not found on this host (have: "
                   f"{', '.join(d.name for d in topo.rdma_devices) or 'none'})")
    elif not devs:
        why.append("this host has no RDMA device (" + "; ".join(topo.notes or ["none found"]) +
                   ")")
    local = [(d.name, topo.numa_of(d)) for d in devs]
    try:
        eng = TransferEngine(a.local_server_name, a.metadata_server, "tcp")
    except MooncakeError as e:
        return f"cannot start an engine to read the peer's descriptor: {e}"
    try:
        desc = eng.segment(a.peer, refresh=True)
    except MooncakeError as e:
        why.append(f"cannot read peer {a.peer}'s segment descriptor: {type(e).__name__}: {e}")
        desc = None
    finally:
        eng.close()
    peer: list[tuple[str, int]] = []
    if desc is not None:
        got = _peer_nics(desc)
        if got is None:
            why.append(f"peer {a.peer} publishes no RDMA device (its transports: "
                       f"{', '.join(sorted(desc.transports)) or 'none'}): start it with "
                       "protocol rdma")
        else:
            peer = got
        span = a.size * a.batch_size * a.threads
        bufs = desc.buffers
        if not bufs:
            why.append(f"peer {a.peer} registers no buffer to measure against")
        elif min(bufs, key=lambda b: b.addr).length < span:
            first = min(bufs, key=lambda b: b.addr)
            why.append(f"peer {a.peer}'s first buffer has {first.length} bytes; this run needs "
                       f"--size * --batch-size * --threads = {span}")
    return "; ".join(why) if why else (local, peer)


def _report(a: argparse.Namespace, results: list[PairResult], pm: dict, wrote: str | None,
            why: str) -> None:
    from mooncake.console import print_table

    if a.json:
        print(json.dumps({"peer": a.peer, "output": wrote, "error": why or None,
                          "pairs": [asdict(r) | {"bandwidth": r.bandwidth if r.ok else None}
                                    for r in results],
                          "partition_matchings": pm}, indent=2))
        return
    rows = [[r.src_dev, _numa(r.src_numa), r.dst_dev, _numa(r.dst_numa),
             f"{r.write_mbps:.2f}" if r.ok else "-", f"{r.read_mbps:.2f}" if r.ok else "-",
             f"{r.latency_us:.2f}" if r.ok else "-", "ok" if r.ok else "failed"]
            for r in results]
    print_table(["local NIC", "numa", "peer NIC", "peer numa", "write MB/s", "read MB/s",
                 "4K write us", "result"], rows,
                title=f"NIC pairs to {a.peer} ({a.size} B requests, {a.duration:g} s each)")
    for r in results:
        if not r.ok:
            print(f"  {r.src_dev} -> {r.dst_dev}: {r.error}")
    for key, ms in pm.items():
        print(f"partition {key}: " + ", ".join(
            f"{m['src_dev']}->{m['dst_dev']} ({m['bandwidth']:.2f} MB/s, {m['latency']:.2f} us)"
            for m in ms))
    if wrote:
        n = sum(len(v) for v in pm.values())
        print(f"wrote {wrote}: {n} matching(s) in {len(pm)} partition(s), read back through "
              "load_cluster_topology")


def _generate(a: argparse.Namespace) -> int:
    from mooncake.console import Progress
    from mooncake.errors import ConfigError

    bad = _writable_dir(a.output)
    if bad:
        return _fail(bad)
    plan = _plan(a)
    if isinstance(plan, str):
        return _fail(plan)
    local, peer = plan
    pairs = [(s, d) for s in local for d in peer]
    results: list[PairResult] = []
    progress = a.progress == "on" or (a.progress == "auto" and not a.json)
    with Progress(len(pairs) * 3, "topology generate", progress) as bar:
        done = [0]

        def step(status: str) -> None:
            bar.update(done[0], status)
            done[0] += 1

        for s, d in pairs:
            results.append(measure_pair(a, a.peer, s, d, step))
        bar.update(done[0], "done")
    pm = partition_matchings(results)
    if not pm:
        why = "no NIC pair could be measured (" + "; ".join(
            f"{r.src_dev}->{r.dst_dev}: {r.error}" for r in results) + ")"
        _report(a, results, pm, None, why)
        return _fail(why)
    doc = {"src_host": socket.gethostname()[:256], "dst_host": a.peer[:256],
           "endpoints": [r.matching() for r in results if r.ok], "partition_matchings": pm}
    try:
        _write_json(a.output, doc)
        load_cluster_topology(a.output)
    except (OSError, ConfigError) as e:
        return _fail(f"writing {a.output}: {e}")
    _report(a, results, pm, a.output, "")
    return 0


# ---- entry ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from mooncake.bench import _positive_int, _seconds, parse_size

    p = argparse.ArgumentParser(prog="mooncake topology", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("show", help="tables of RDMA devices, NUMA nodes, GPUs and the "
                                    "GPU/NUMA x NIC path classes")
    s.add_argument("--root", default="/", help="root of the sysfs/procfs tree to read "
                                               "(default: this host)")
    s.add_argument("--json", action="store_true", help="the same, as JSON")
    s.set_defaults(fn=_show)
    sub.add_parser("dump", add_help=False,
                   help="TENT's topology JSON (python -m mooncake.transfer_engine_topology_dump "
                        "and its flags)")
    g = sub.add_parser("generate", help="measure every local NIC x peer NIC pair and write "
                                        "cluster-topology.json (partition_matchings)")
    g.add_argument("--peer", required=True, metavar="SEGMENT",
                   help="the peer's segment name (host:port), an engine with rdma and a "
                        "registered buffer (e.g. `mooncake bench --mode target --protocol rdma`)")
    g.add_argument("--output", default="cluster-topology.json",
                   help="file to write (default: cluster-topology.json)")
    g.add_argument("--size", type=parse_size, default=65536,
                   help="bytes per request of the bandwidth runs (default: 64K)")
    g.add_argument("--duration", type=_seconds, default=1.0,
                   help="seconds of each of a pair's three runs: WRITE, READ, 4 KiB WRITE "
                        "latency (default: 1)")
    g.add_argument("--batch-size", type=_positive_int, default=32,
                   help="requests per batch of the bandwidth runs (default: 32)")
    g.add_argument("--threads", type=_positive_int, default=2,
                   help="submitting threads of the bandwidth runs (default: 2); the peer's "
                        "first buffer must hold size * batch-size * threads bytes")
    g.add_argument("--device-name", default="",
                   help="local NICs to measure (comma-separated; default: every RDMA device)")
    g.add_argument("--metadata-server", default="P2PHANDSHAKE",
                   help="P2PHANDSHAKE (default), http://..., etcd://..., redis://...")
    g.add_argument("--local-server-name", default="127.0.0.1",
                   help="this engine's host (default: 127.0.0.1)")
    g.add_argument("--json", action="store_true", help="print the pairs and matchings as JSON")
    g.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar on stderr (auto: on unless --json)")
    g.set_defaults(fn=_generate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mooncake topology show|dump|generate ...``; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "dump":  # every flag of the dump tool, as it is
        from mooncake import transfer_engine_topology_dump

        return transfer_engine_topology_dump.main(argv[1:])
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
