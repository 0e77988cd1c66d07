"""The ``rdma`` transport: one-sided RDMA WRITE/READ over RC QPs, on libibverbs.

Per local device: one protection domain, ``MC_NUM_CQ_PER_CTX`` CQs on
``MC_NUM_COMP_CHANNELS_PER_CTX`` completion channels, ``MC_WORKERS_PER_CTX`` worker threads
(nogil post+poll loops in ``mooncake._core.verbs_kernel``) and an endpoint store of
``MC_MAX_EP_PER_CTX`` endpoints (``MC_NUM_QP_PER_EP`` QPs each, SIEVE/FIFO eviction).
Endpoints are set up lazily by an ``rdma.connect`` RPC that exchanges GID, LID, QPNs, PSNs and
MTU; the peer's side of the pair serves one-sided operations.  Every registered buffer gets an
MR on every device (without remote-write access when the region is read-only, so the NIC itself
refuses peers' WRITEs); its rkeys are published per buffer (``rkey0``, ``rkey1``...), the
devices (``ndevs``, ``dev<i>``, ``gid<i>``, ``lid<i>``) per segment, all declared as
:class:`~mooncake.fields.Field` rows so the engine's validator checks a peer's before use.

After failure, silence: a slice is reported only once the NIC is done with it (its completion
polled, or its QP moved to ERR and the flush polled; at close, its QP destroyed).  A timed-out
batch is cancelled by the engine (slices not yet posted end at once); if its posted work does
not drain, :meth:`RdmaTransport.abort` resets the endpoints to that peer: their QPs go to ERR,
the cancelled slices end on their flushes, and other callers' slices move to a rebuilt endpoint.

Timeouts and pauses: TENT's ``endpoint/send_timeout`` is each QP's ACK timeout (RTR->RTS);
``MC_RETRY_CNT`` (TENT ``workers/max_retry_count``) the workers' re-posts per slice;
``MC_SLICE_TIMEOUT`` ends the slices of an endpoint that completes nothing for that long with
TIMEOUT (its QPs reset, each slice reported on its flush); a NIC pair whose QPs fail to come up,
or whose CQ fails, is skipped for ``MC_RDMA_RAIL_PAUSE_SECONDS``; a peer found gone (or whose
handshake RPC fails) is not reconnected to for ``MC_CONN_PAUSE_TTL_MS``.  With
``MC_ENABLE_HCA_PEER_AFFINITY`` the peer NICs come from ``MC_NIC_PEER_AFFINITY``.

Rails (issue 9): every submit stripes its slices over NIC pairs (``MC_PATH_ROUNDROBIN``:
in turn, else at random), chosen per buffer: a ``rail_topo_path``'s direct pairs; else the
``topology/cluster_topology_path`` partition_matchings for (local buffer's NUMA node, remote
buffer's node); else the local NICs an ``MC_CUSTOM_TOPO_JSON`` priority matrix prefers for the
buffer's ``cpu:<node>`` (its available ones when none of those is open), or without one the
NICs on the local buffer's node (``move_pages``; every NIC when none is there or the node is
unknown), towards the peer NICs ``MC_NIC_PEER_AFFINITY`` maps, or
with ``MC_ENABLE_DEST_DEVICE_AFFINITY`` those on the remote buffer's node (the peer publishes
``numa<i>`` per NIC and ``numa`` per buffer).  :meth:`RdmaTransport.explain` says which and why.
Workers run pinned to their NIC's NUMA node CPUs; TENT's ``num_lanes`` sets workers = QPs per
endpoint = CQs per device (a disagreeing explicit knob is refused).  Rail monitor: 3 errors on a
NIC pair within 10 s pause it, each repeated pause twice as long (``MC_RDMA_RAIL_PAUSE_SECONDS``
first, at most 300 s), a completion clears it; with every rail to a peer paused ``can_reach``
says so and the engine moves the peer to the next transport (tcp) until a rail is back.
``MC_IB_SL``/``MC_IB_TC`` go on every QP's address vector.

Shared bandwidth quota (TENT's ``shared_quota_shm_path``, :mod:`mooncake.quota`): the first
transfer through a local device joins this engine's slot on the device's NIC
(:func:`~mooncake.quota.nic_key_for_rdma`: a RoCE port shares the entry of its netdev with the
tcp transport) at ``MC_SHARED_QUOTA_PRIORITY``; the device's workers ask for every window of
work requests and charge what they post (``verbs_kernel.Worker.set_quota``).  A table with no
slot left: the device runs unregulated (a warning, once per NIC).  Slots go back at close.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
import uuid
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mooncake import numa as _numa
from mooncake import quota as _quota
from mooncake import topology as _topo
from mooncake._core import batch as _batch
from mooncake.errors import ConfigError, MooncakeError, PeerUnreachable, TransportUnavailable
from mooncake.fields import Field, FieldError, check_fields
from mooncake.options import Option
from mooncake.rpc import RemoteError
from mooncake.transport import (
    LOCAL_WRITE,
    REMOTE_READ,
    REMOTE_WRITE,
    Region,
    SegmentDesc,
    Transport,
    TransportContext,
)
from mooncake.transports.rdma_endpoints import EndpointStore
from mooncake.transports.rdma_options import OPTIONS

try:
    from mooncake._core import verbs as V
    from mooncake._core import verbs_kernel as K
except ImportError:  # the verbs kernels are not built (MOONCAKE_EXT left them out)
    V = K = None  # type: ignore[assignment]

_E_PEER = _batch.E_PEER
_E_TIMEOUT = _batch.E_TIMEOUT
_E_CLOSED = _batch.E_CLOSED

__all__ = ["RdmaTransport", "select_gid", "parse_nic_affinity"]

log = logging.getLogger(__name__)

_SOFT_VENDOR = 0xFFFFFF  # rxe/siw report this vendor id: no PCIe, relaxed ordering is moot
#: devices one segment may publish (and one engine may open)
MAX_DEVICES = 16
#: QPs one endpoint may have (the handshake's lists are at most this long)
MAX_QPS = 255
#: NIC pairs one submit stripes over (the kernel's MAX_PATHS)
MAX_PATHS = 64
#: quota classes besides the engine's that get workers of their own (more share the last)
MAX_CLASSES = 7
#: work-completion statuses that say the path failed (ibv_wc_status), as opposed to a peer
#: refusing a range or our own abort: each counts against its rail
RAIL_FAULTS = {2: "local QP operation error (Soft-RoCE: its port went down)",
               12: "transport retries exceeded", 13: "RNR retries exceeded", 19: "fatal",
               20: "response timeout", 21: "general error"}
_DEV_NAME = r"[A-Za-z0-9_.:-]{1,64}"
_HEX32 = r"[0-9a-f]{32}"
_MTUS = (256, 512, 1024, 2048, 4096)
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_U24 = (1 << 24) - 1
#: seconds between two tries to join a quota table that had no slot left for a device's NIC
QUOTA_RETRY_S = 5.0


class RailDown(MooncakeError):
    """The passive side of a handshake could not bring its QPs up (its NIC's link is down,
    say): the rail is at fault, not the peer."""


def _dev_fields(i: int) -> dict[str, Field]:
    req = i == 0
    return {f"dev{i}": Field("str", max_len=64, pattern=_DEV_NAME, required=req),
            f"gid{i}": Field("str", max_len=32, pattern=_HEX32, required=req),
            f"lid{i}": Field("int", 0, 0xFFFF, required=req),
            f"numa{i}": Field("int", -1, 1023, required=False)}


#: what ``start`` publishes per segment: the instance (changes when the process restarts) and
#: each device's name, GID and LID
SEGMENT_FIELDS: dict[str, Field] = {
    "instance": Field("str", max_len=32, pattern=_HEX32),
    "ndevs": Field("int", 1, MAX_DEVICES),
    **{k: v for i in range(MAX_DEVICES) for k, v in _dev_fields(i).items()},
}
#: what ``register`` publishes per buffer: one rkey per device, in the segment's device order
BUFFER_FIELDS: dict[str, Field] = {
    **{f"rkey{i}": Field("int", 0, _U32, required=i == 0) for i in range(MAX_DEVICES)},
    "numa": Field("int", -1, 1023, required=False)}
#: the scalar fields of an ``rdma.connect`` request and reply (the lists are checked apart)
_HANDSHAKE_FIELDS: dict[str, Field] = {
    "instance": Field("str", max_len=32, pattern=_HEX32),
    "gid": Field("str", max_len=32, pattern=_HEX32),
    "lid": Field("int", 0, 0xFFFF),
    "mtu": Field("int", 256, 4096),
}
_CONNECT_FIELDS: dict[str, Field] = {
    **_HANDSHAKE_FIELDS,
    "segment": Field("str", max_len=300),
    "src_dev": Field("str", max_len=64, pattern=_DEV_NAME),
    "dst_dev": Field("str", max_len=64, pattern=_DEV_NAME),
    #: which of the NIC pair's lanes (num_lanes) this endpoint is; absent: 0
    "lane": Field("int", 0, MAX_PATHS * (MAX_CLASSES + 1) - 1, required=False),
}


def _check_handshake(msg: Any, spec: dict[str, Field], nqp: int | None, where: str) -> None:
    """FieldError unless ``msg`` is a well-formed handshake (``nqp``: the QP count it must
    carry, None: 1..MAX_QPS)."""
    check_fields(msg, spec, where)
    if msg["mtu"] not in _MTUS:
        raise FieldError(f"{where}.mtu {msg['mtu']} is not one of {_MTUS}")
    for key in ("qpns", "psns"):
        v = msg.get(key)
        if not isinstance(v, list) or not 1 <= len(v) <= MAX_QPS:
            raise FieldError(f"{where}.{key} must be a list of 1..{MAX_QPS} integers")
        if nqp is not None and len(v) != nqp:
            raise FieldError(f"{where}.{key} lists {len(v)} QPs, expected {nqp}")
        if any(type(x) is not int or not 0 <= x <= _U24 for x in v):
            raise FieldError(f"{where}.{key} must hold integers in 0..2**24-1")
    if len(msg["qpns"]) != len(msg["psns"]):
        raise FieldError(f"{where}: qpns and psns differ in length")


def parse_nic_affinity(text: str) -> dict[str, list[str]]:
    """``MC_NIC_PEER_AFFINITY`` (``mlx5_0=mlx5_1,mlx5_2;mlx5_1=mlx5_3``) as ``{local: [peer
    devices, in order]}``; ConfigError naming the bad entry."""
    out: dict[str, list[str]] = {}
    for entry in (e.strip() for e in str(text or "").split(";")):
        if not entry:
            continue
        local, eq, peers = entry.partition("=")
        local = local.strip()
        names = [p.strip() for p in peers.split(",") if p.strip()]
        if (not eq or not re.fullmatch(_DEV_NAME, local) or not names
                or not all(re.fullmatch(_DEV_NAME, n) for n in names)):
            raise ConfigError(f"MC_NIC_PEER_AFFINITY={text!r}: entry {entry!r} is invalid; "
                              "allowed: LOCAL=PEER[,PEER...] entries separated by ';' "
                              "(device names)")
        have = out.setdefault(local, [])
        have.extend(n for n in dict.fromkeys(names) if n not in have)
    return out


def _read_rail_topo(path: str) -> dict[str, list[tuple[str, str]]]:
    """TENT's ``rail_topo_path`` file: ``{"all": [{"local": NIC, "remote": NIC}, ...],
    "direct": [...]}`` (the pairs allowed; the preferred pairing) as lists of name pairs;
    ConfigError naming what is wrong.  An empty path: no file ({})."""
    if not path:
        return {}
    where = f"transports/rdma/workers/rail_topo_path={path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read it: {e}") from None
    if not isinstance(doc, dict) or not set(doc) <= {"all", "direct"} or not doc:
        raise ConfigError(f"{where}: must be an object with the lists \"all\" and/or "
                          "\"direct\"")
    out: dict[str, list[tuple[str, str]]] = {"all": [], "direct": []}
    for key, rows in doc.items():
        if not isinstance(rows, list) or len(rows) > MAX_DEVICES * MAX_DEVICES:
            raise ConfigError(f"{where}: {key!r} must be a list of at most "
                              f"{MAX_DEVICES * MAX_DEVICES} pairs")
        for r in rows:
            ok = isinstance(r, dict) and set(r) == {"local", "remote"} and all(
                isinstance(r[k], str) and re.fullmatch(_DEV_NAME, r[k]) for k in r)
            if not ok:
                raise ConfigError(f"{where}: {key!r} holds {r!r}; allowed: "
                                  "{\"local\": NIC name, \"remote\": NIC name}")
            out[key].append((r["local"], r["remote"]))
    return out


def _node_cpus() -> dict[int, set[int]]:
    """NUMA node -> the CPUs of it this process may run on (empty without NUMA info)."""
    try:
        allowed = os.sched_getaffinity(0)
        return {n.id: set(n.cpus) & allowed for n in _topo.discover("/", verbs=False).numa_nodes}
    except Exception:  # no sysfs: workers float, as before
        return {}


def _run_pinned(worker: Any, cpus: set[int], dev: str) -> None:
    """A worker thread's body: pinned to ``cpus`` (its NIC's NUMA node, when this process may
    use some of them), then the kernel's post/poll loop."""
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)  # this thread only
        except OSError as e:
            log.debug("rdma: %s worker not pinned: %s", dev, e)
    worker.run()


def peer_devices(info: Any) -> list[str] | None:
    """The device names a peer's segment publishes (in rkey order), or None when its RDMA
    fields are missing or incomplete."""
    if not isinstance(info, dict):
        return None
    n = info.get("ndevs")
    if type(n) is not int or not 1 <= n <= MAX_DEVICES:
        return None
    names = [info.get(f"dev{i}") for i in range(n)]
    return names if all(isinstance(x, str) and x for x in names) else None


def select_gid(entries: list[tuple[int, bytes, int]], link_layer_ib: bool) -> int | None:
    """Pick a GID index from ``(index, gid, type)`` rows: a RoCE v2 IPv4-mapped GID first, then
    any RoCE v2 GID, then (InfiniBand) index 0 / the first non-zero GID; None when empty."""
    valid = [(i, g, t) for i, g, t in entries if any(g)]
    v4 = bytes(10) + b"\xff\xff"
    for pred in (lambda g, t: t == V.GID_TYPE_ROCE_V2 and g[:12] == v4,
                 lambda g, t: t == V.GID_TYPE_ROCE_V2):
        for i, g, t in valid:
            if pred(g, t):
                return i
    if link_layer_ib and valid:
        return valid[0][0]
    return valid[0][0] if valid else None


@dataclass(eq=False)
class _Dev:
    """One opened local device and everything hanging off it."""

    index: int
    dev: Any
    port: int
    gid_index: int
    gid: bytes
    lid: int
    mtu: int
    slots: list = field(default_factory=list)
    channels: list = field(default_factory=list)
    workers: list = field(default_factory=list)
    threads: list = field(default_factory=list)
    store: EndpointStore | None = None
    ep_seq: int = 0
    #: this engine's shared-quota slot on the device's NIC (None: not joined, or no room)
    qslot: Any = None
    #: no quota slot before this time.monotonic() (the table was full)
    qretry: float = 0.0
    #: the NUMA node of its PCI device (-1: unknown)
    numa: int = -1
    #: quota classes other than the engine's (a batch's ``priority``): class index (1..) ->
    #: its own worker, CQ and quota slot on this device, made on first use
    classes: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.dev.name

    def all_workers(self) -> list:
        return self.workers + [c.worker for c in self.classes.values()]

    def all_slots(self) -> list:
        return self.slots + [c.slot for c in self.classes.values()]


@dataclass
class _Class:
    """A quota class's worker on one device: its endpoints are its own (their lanes are
    ``lane + MAX_PATHS * index``), so a class the quota holds back never delays another's
    slices queued behind it."""

    index: int
    weight: int
    worker: Any
    slot: Any
    thread: threading.Thread


class RdmaTransport(Transport):
    """RDMA (RoCE/InfiniBand) transport on real verbs."""

    name: ClassVar[str] = "rdma"
    options: ClassVar[tuple[Option, ...]] = OPTIONS
    auto_priority: ClassVar[int] = 20
    memory_kinds: ClassVar[frozenset[str]] = frozenset({"cpu"})
    segment_fields: ClassVar[dict[str, Field]] = SEGMENT_FIELDS
    buffer_fields: ClassVar[dict[str, Field]] = BUFFER_FIELDS


    @classmethod
    def check_config(cls, v: Mapping[str, Any], src: Mapping[str, str],
                     warn: Callable[[str], None]) -> None:
        def at(name: str) -> str:
            return f"{name}={v[name]} ({src[name]})"

        # TENT: one lane knob; only values someone actually set are compared
        lane = "transports/rdma/num_lanes"
        knobs = {lane: "num_lanes", "MC_WORKERS_PER_CTX": "num_workers",
                 "MC_NUM_CQ_PER_CTX": "num_cq_list", "MC_NUM_QP_PER_EP": "qp_mul_factor"}
        lanes = {n: f"{k}={v[n]} ({n if n != lane else src[n]}" +
                 (f", {src[n]})" if n != lane else ")")
                 for n, k in knobs.items() if src[n] != "default"}
        if lane in lanes and len({v[n] for n in lanes}) > 1:  # TENT refuses this install
            other = [lanes[n] for n in lanes if n != lane and v[n] != v[lane]]
            raise ConfigError(f"inconsistent RDMA lanes: {lanes[lane]} sets workers = QPs per "
                              f"endpoint = CQs per device, but {', '.join(other)}; allowed: "
                              f"drop those, or set them to {v[lane]} too")
        if len({v[n] for n in lanes}) > 1:
            warn(f"inconsistent RDMA lanes: {', '.join(lanes.values())}; TENT wants one lane "
                 "count: num_lanes = num_workers (MC_WORKERS_PER_CTX) = num_cq_list "
                 "(MC_NUM_CQ_PER_CTX) = qp_mul_factor (MC_NUM_QP_PER_EP)")
        outstanding = v["MC_NUM_QP_PER_EP"] * v["MC_MAX_WR"]
        if v["MC_MAX_CQE_PER_CTX"] < outstanding:
            warn(f"{at('MC_MAX_CQE_PER_CTX')} is below MC_NUM_QP_PER_EP * MC_MAX_WR = "
                 f"{outstanding} (one endpoint's QPs can overflow the CQ); raise "
                 "MC_MAX_CQE_PER_CTX")
        if v["MC_ENABLE_DEST_DEVICE_AFFINITY"] and v["MC_ENABLE_HCA_PEER_AFFINITY"]:
            warn("MC_ENABLE_DEST_DEVICE_AFFINITY and MC_ENABLE_HCA_PEER_AFFINITY exclude each "
                 "other; MC_ENABLE_HCA_PEER_AFFINITY wins")
    @classmethod
    def probe(cls) -> str | None:
        if V is None:
            return "unavailable: the verbs kernels are not built (python setup.py build_ext)"
        if V.library_error():
            return f"unavailable: {V.library_error()}"
        if not V.device_names():
            return "no RDMA device (ibv_get_device_list found none)"
        return None

    @classmethod
    def describe(cls) -> str:
        """How the verbs layer was built and loaded, and how many devices it sees."""
        if V is None:
            return "verbs kernels not built"
        lib = V.library()
        head = f"verbs declarations: {V.DECLARATIONS}; {lib['soname']}"
        if lib["error"]:
            return f"{head}: not loaded"
        return f"{head}: loaded from {lib['path']}; devices: {len(V.device_names())}"

    #: seconds between two probes of the GID table (MC_AUTO_GID_MAX_RETRIES)
    GID_RETRY_DELAY_S: ClassVar[float] = 0.5
    #: the rail monitor (TENT's defaults): this many errors on one NIC pair within the window
    #: pause it; each repeated pause doubles, up to the cap
    RAIL_ERROR_THRESHOLD: ClassVar[int] = 3
    RAIL_ERROR_WINDOW_S: ClassVar[float] = 10.0
    RAIL_MAX_COOLDOWN_S: ClassVar[float] = 300.0
    #: seconds submit reuses a path choice at most (paused rails come back after this)
    ROUTE_CACHE_S: ClassVar[float] = 1.0

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        why = self.probe() if V is None or V.library_error() else None
        if why:
            raise TransportUnavailable(f"rdma transport {why}")
        g = self._cfg
        self.port = int(g("MC_IB_PORT"))
        self.num_cq = int(g("MC_NUM_CQ_PER_CTX"))
        self.num_chan = int(g("MC_NUM_COMP_CHANNELS_PER_CTX"))
        self.workers_per_ctx = int(g("MC_WORKERS_PER_CTX"))
        self.qp_per_ep = int(g("MC_NUM_QP_PER_EP"))
        lanes = g("transports/rdma/num_lanes")
        #: endpoints per NIC pair, one per worker (TENT's lanes: worker i posts on QP i of the
        #: pair); 1 without num_lanes: one endpoint of MC_NUM_QP_PER_EP QPs on one worker
        self.lanes = 1
        if lanes is not None:  # workers = QPs per NIC pair = CQs per device
            self.workers_per_ctx = self.num_cq = self.lanes = int(lanes)
            self.qp_per_ep = 1
        self.max_ep = int(g("MC_MAX_EP_PER_CTX"))
        self.store_type = str(g("MC_ENDPOINT_STORE_TYPE")).upper()
        self.retry_cnt = int(g("MC_RETRY_CNT"))
        #: TENT's grace period: workers keep polling this long after work last moved
        self.grace = int(g("transports/rdma/workers/grace_period_ns")) / 1e9
        self.max_wr = int(g("MC_MAX_WR"))
        self.max_sge = int(g("MC_MAX_SGE"))
        self.max_inline = int(g("MC_MAX_INLINE"))
        self.max_cqe = int(g("MC_MAX_CQE_PER_CTX"))
        self.mtu = int(g("MC_MTU"))
        self.gid_index_cfg = int(g("MC_GID_INDEX"))
        tc = int(g("MC_IB_TC"))
        self.tc = 0 if tc < 0 else tc
        #: seconds a small synchronous call spins on its batch before sleeping
        self.spin_s = int(g("MC_RDMA_SPIN_US")) / 1e6
        #: how long small synchronous calls waited lately, per size (up to 16 KiB, 256 KiB,
        #: more): they poll twice that, at most spin_s
        self._spin = [_batch.SpinGauge(self.spin_s) for _ in range(3)]
        sl = int(g("MC_IB_SL"))
        self.sl = 0 if sl < 0 else sl
        #: TENT's rail_topo_path ({"all": [...], "direct": [...]} pairs of NIC names) and
        #: topology/cluster_topology_path (partition_matchings per NUMA pair), read at start
        self.rail_topo = _read_rail_topo(str(g("transports/rdma/workers/rail_topo_path")))
        cpath = str(g("topology/cluster_topology_path"))
        self.matchings = _topo.load_cluster_topology(cpath) if cpath else {}
        #: MC_CUSTOM_TOPO_JSON: location -> (preferred NICs, available NICs), read at start
        ppath = str(g("MC_CUSTOM_TOPO_JSON"))
        self.priority = _topo.load_priority_matrix(ppath) if ppath else {}
        #: region start -> (length, NUMA node or None while its pages are not yet placed)
        self._region_numa: dict[int, list] = {}
        self._region_starts: list[int] = []
        self._rnodes: dict[tuple, list] = {}
        #: (descriptor, local region, remote buffer) -> (generation, until, remote key table,
        #: endpoints, remote columns, local columns, descriptor): submit's path choice cache
        self._choices: dict[tuple, tuple] = {}
        #: (descriptor, local region start, end, peer buffer start, end, class, choice): the
        #: choice used last, checked before the dict
        self._hot: tuple | None = None
        #: bumped by whatever can change a path choice (pauses, endpoints, registrations)
        self._gen = 0
        self.relaxed = int(g("MC_IB_PCI_RELAXED_ORDERING"))
        self.parallel_reg = int(g("MC_ENABLE_PARALLEL_REG_MR"))
        self.dest_affinity = bool(g("MC_ENABLE_DEST_DEVICE_AFFINITY"))
        self.roundrobin = bool(g("MC_PATH_ROUNDROBIN"))
        self.connect_timeout = float(g("MC_HANDSHAKE_CONNECT_TIMEOUT"))
        self.pkey_index = int(g("MC_PKEY_INDEX"))
        self.send_timeout = int(g("transports/rdma/endpoint/send_timeout"))
        self.slice_timeout = float(g("MC_SLICE_TIMEOUT"))  # -1: off
        self.conn_pause_s = int(g("MC_CONN_PAUSE_TTL_MS")) / 1000.0
        self.rail_pause_s = float(g("MC_RDMA_RAIL_PAUSE_SECONDS"))
        self.gid_retries = int(g("MC_AUTO_GID_MAX_RETRIES"))
        self.max_mr_size = int(g("MC_MAX_MR_SIZE"))
        self.hca_affinity = bool(g("MC_ENABLE_HCA_PEER_AFFINITY"))
        # the map is read (and checked) only when it is used, as in Mooncake
        self.peer_affinity = (parse_nic_affinity(g("MC_NIC_PEER_AFFINITY"))
                              if self.hca_affinity else {})
        if self.hca_affinity and not self.peer_affinity:
            log.warning("rdma: MC_ENABLE_HCA_PEER_AFFINITY is on but MC_NIC_PEER_AFFINITY is "
                        "empty: every peer NIC is used")
        if self.mtu not in V.MTU_ENUM:
            raise ConfigError(f"MC_MTU={self.mtu} is not allowed; use one of {sorted(V.MTU_ENUM)}")
        if self.relaxed not in (0, 1, 2):
            raise ConfigError(f"MC_IB_PCI_RELAXED_ORDERING={self.relaxed} is not allowed; "
                              "use 0 (off), 1 (on) or 2 (auto)")
        EndpointStore(self.max_ep, self.store_type)  # validates both knobs early
        self.device_filter = [d.strip() for d in
                              (getattr(ctx, "device_name", "") or "").split(",") if d.strip()]
        self.instance = uuid.uuid4().hex
        self.devs: list[_Dev] = []
        #: knob -> (asked, used, why) for every value clamped to a device limit
        self.clamped: dict[str, tuple[int, int, str]] = {}
        self._lock = threading.RLock()
        self._key_locks: dict[tuple, threading.Lock] = {}
        self._by_id: dict[int, Any] = {}
        self._retired: list = []
        self._mrs: dict[int, list] = {}
        self._rtabs: dict[tuple, Any] = {}
        #: (peer segment, instance) -> (remote key table, peer device names) of the newest
        #: descriptor submitted to: what a failed rail's slices are re-keyed with
        self._last_rtab: dict[tuple, tuple[Any, list[str]]] = {}
        self._ep_ids = 0
        self._rr = 0
        self._hub = None
        self.ltab: Any = None
        self._repair_thread: threading.Thread | None = None
        self._closing = False
        self._started = False
        #: endpoint id -> (completions seen, since when): stall detection
        self._progress: dict[int, tuple[int, float]] = {}
        #: CQ slot -> poll errors already acted on
        self._cq_errors: dict[int, int] = {}
        self._last_watch = 0.0
        #: seconds without a completion, with work in flight, before the peer is pinged
        self.stall_s = 1.0
        #: endpoint id -> when its live peer last answered a stall ping
        self._pinged: dict[int, float] = {}
        #: (local dev, peer segment, peer instance, peer dev) -> (until, why): NIC pairs
        #: cooling down (MC_RDMA_RAIL_PAUSE_SECONDS)
        self._paused_rails: dict[tuple, tuple[float, str]] = {}
        #: NIC pair -> recent error times / how many times in a row it was paused
        self._rail_errors: dict[tuple, deque] = {}
        self._rail_level: dict[tuple, int] = {}
        #: (local dev, peer, peer dev) -> completions of retired endpoints / errors / pauses
        self._rail_done: dict[tuple, int] = {}
        self._rail_counts: dict[tuple, list[int]] = {}
        #: (peer segment, instance) -> (until, why): peers not to reconnect to yet
        #: (MC_CONN_PAUSE_TTL_MS)
        self._paused_peers: dict[tuple, tuple[float, str]] = {}
        self._affinity_warned: set[tuple] = set()
        # shared bandwidth quota: one slot per local NIC, joined on the first transfer through
        # it; a table that is not ours fails the start here
        self.quota = _quota.EngineSlots(ctx.config, "rdma")
        self._qlock = threading.Lock()  # the devices' qslot / qretry

    # ------------------------------------------------------------------ config helpers
    def _cfg(self, key: str) -> Any:
        return self.ctx.config[key]

    def _clamp(self, key: str, value: int, limit: int, what: str) -> int:
        """Lower a knob to a device limit: warn naming both values and record it in the
        config (``config.clamp``) and in ``self.clamped``."""
        if value <= limit:
            return value
        reason = f"device {what}={limit}"
        self.clamped[key] = (value, limit, reason)
        cfg = self.ctx.config
        try:
            if cfg[key] > limit:
                cfg.clamp(key, limit, reason)  # warns "KEY=value clamped to limit (reason)"
        except (AttributeError, KeyError):
            log.warning("%s=%d clamped to %d (%s)", key, value, limit, reason)
        return limit

    # ------------------------------------------------------------------ lifecycle
    def _pick_devices(self) -> list[str]:
        """The devices to open: ``device_name``'s; else every one verbs lists (the NICs of an
        MC_CUSTOM_TOPO_JSON only, where one is given) that MC_TE_FILTERS keep."""
        have = V.device_names()
        allow = set(self._cfg("MC_TE_FILTERS") or ())
        deny = set(self._cfg("MC_TE_FILTERS_EXCLUDE") or ())
        if not self.device_filter:
            if self.priority:
                named = {n for pref, avail in self.priority.values() for n in pref + avail}
                if not named & set(have):
                    raise TransportUnavailable(
                        f"rdma: MC_CUSTOM_TOPO_JSON names {', '.join(sorted(named)) or 'no NIC'}"
                        f", none of which is here (have: {', '.join(have) or 'none'})")
                have = [d for d in have if d in named]
            return [d for d in have if (not allow or d in allow) and d not in deny]
        missing = [d for d in self.device_filter if d not in have]
        if missing:
            raise TransportUnavailable(f"rdma: device(s) {', '.join(missing)} not found "
                                       f"(have: {', '.join(have) or 'none'})")
        return list(self.device_filter)

    def _open(self, index: int, name: str, numa: int) -> _Dev:
        """Open ``name``; its CQs (like its QPs later) are allocated on its NUMA node."""
        dev = V.Device(name)
        lim = dev.limits
        if self.port < 1 or self.port > lim["phys_port_cnt"]:
            raise ConfigError(f"MC_IB_PORT={self.port} is not allowed on {name}: it has ports "
                              f"1..{lim['phys_port_cnt']}")
        port = dev.query_port(self.port)
        if port["state"] != V.PORT_ACTIVE:
            log.warning("rdma: %s port %d is not ACTIVE (state %d)", name, self.port,
                        port["state"])
        self.max_wr = self._clamp("MC_MAX_WR", self.max_wr, lim["max_qp_wr"], "max_qp_wr")
        self.max_sge = self._clamp("MC_MAX_SGE", self.max_sge, lim["max_sge"], "max_sge")
        self.max_cqe = self._clamp("MC_MAX_CQE_PER_CTX", self.max_cqe, lim["max_cqe"],
                                   "max_cqe")
        self.num_cq = self._clamp("MC_NUM_CQ_PER_CTX", self.num_cq, lim["max_cq"], "max_cq")
        self.max_ep = self._clamp("MC_MAX_EP_PER_CTX", self.max_ep,
                                  max(1, lim["max_qp"] // self.qp_per_ep), "max_qp/qp_per_ep")
        if lim.get("max_mr_size"):
            self.max_mr_size = self._clamp("MC_MAX_MR_SIZE", self.max_mr_size,
                                           lim["max_mr_size"], "max_mr_size")
        ll_ib = port["link_layer"] != V.LINK_LAYER_ETHERNET
        if self.gid_index_cfg < 0:
            gidx = self._auto_gid(dev, name, port, ll_ib)
        else:
            gidx = self.gid_index_cfg
            if gidx >= port["gid_tbl_len"] or dev.gid_entry(self.port, gidx) is None:
                raise ConfigError(f"MC_GID_INDEX={gidx} is not allowed on {name} port "
                                  f"{self.port}: that GID slot is empty (auto: -1)")
        gid = dev.query_gid(self.port, gidx)
        mtu = min(self.mtu, port["active_mtu"] or self.mtu)
        d = _Dev(index=index, dev=dev, port=self.port, gid_index=gidx, gid=gid,
                 lid=port["lid"], mtu=mtu, numa=numa)
        d.channels = [V.CompChannel(dev) for _ in range(self.num_chan)]
        # a CQ belongs to one worker (it posts and polls its endpoints alone): at least one each
        ncq = max(self.num_cq, self.workers_per_ctx)
        if ncq > self.num_cq:
            log.debug("rdma: %s: %d CQs for %d workers (MC_NUM_CQ_PER_CTX=%d)", name, ncq,
                      self.workers_per_ctx, self.num_cq)
        with _numa.preferred(numa):
            d.slots = [K.CQSlot(V.CQ(dev, self.max_cqe, d.channels[i % self.num_chan], i))
                       for i in range(ncq)]
        for w in range(self.workers_per_ctx):
            mine = [s for i, s in enumerate(d.slots) if i % self.workers_per_ctx == w]
            d.workers.append(K.Worker(mine, self._hub, self.retry_cnt, grace=self.grace))
        d.store = EndpointStore(self.max_ep, self.store_type)
        return d

    def _auto_gid(self, dev: Any, name: str, port: dict, ll_ib: bool) -> int:
        """The GID index to use when MC_GID_INDEX is auto: :func:`select_gid` over the port's
        table, probed again up to MC_AUTO_GID_MAX_RETRIES times, GID_RETRY_DELAY_S apart,
        while it holds no usable GID (a netdev whose address is still being assigned)."""
        probes = self.gid_retries + 1
        for attempt in range(probes):
            if attempt:
                time.sleep(self.GID_RETRY_DELAY_S)
                port = dev.query_port(self.port)
            rows = []
            for i in range(min(port["gid_tbl_len"], 256)):
                e = dev.gid_entry(self.port, i)
                if e is not None:
                    rows.append((i, e[0], e[1]))
            gidx = select_gid(rows, ll_ib)
            if gidx is not None:
                if attempt:
                    log.info("rdma: %s port %d: GID %d usable at probe %d", name, self.port,
                             gidx, attempt + 1)
                return gidx
            log.debug("rdma: %s port %d: no usable GID at probe %d of %d", name, self.port,
                      attempt + 1, probes)
        raise TransportUnavailable(f"rdma: {name} port {self.port} has no usable GID after "
                                   f"{probes} probes (MC_AUTO_GID_MAX_RETRIES="
                                   f"{self.gid_retries})")

    def start(self) -> dict:
        """Open the devices, start workers and the repair thread; publish the devices."""
        names = self._pick_devices()
        if not names:
            raise TransportUnavailable("rdma: no RDMA device found")
        if len(names) > MAX_DEVICES:
            log.warning("rdma: using the first %d of %d devices", MAX_DEVICES, len(names))
            names = names[:MAX_DEVICES]
        self._hub = K.Hub()
        try:  # where each NIC sits (its PCI device's NUMA node; rxe: its netdev's)
            topo = _topo.discover("/", verbs=False)  # a one-node host: every NIC on node 0
            found = {x.name: topo.numa_of(x) for x in topo.rdma_devices}
        except Exception as e:  # a sysfs we cannot read costs the NUMA choice, nothing else
            log.warning("rdma: NIC NUMA nodes unknown (%s): every NIC serves every buffer", e)
            found = {}
        self.devs = [self._open(i, n, int(found.get(n, -1))) for i, n in enumerate(names)]
        self._rebuild_ltabs()
        cpus = _node_cpus()
        for d in self.devs:
            mine = cpus.get(d.numa, set())
            for i, w in enumerate(d.workers):
                t = threading.Thread(target=_run_pinned, args=(w, mine, d.name),
                                     name=f"mc-rdma-{d.name}-w{i}", daemon=True)
                t.start()
                d.threads.append(t)
        self._repair_thread = threading.Thread(target=self._repair_loop, name="mc-rdma-repair",
                                               daemon=True)
        self._repair_thread.start()
        self.ctx.add_rpc_handler("rdma.connect", self._on_connect)
        self.ctx.add_rpc_handler("rdma.ping", lambda args: {"instance": self.instance})
        self._started = True
        out: dict[str, Any] = {"instance": self.instance, "ndevs": len(self.devs)}
        for i, d in enumerate(self.devs):
            out[f"dev{i}"] = d.name
            out[f"gid{i}"] = d.gid.hex()
            out[f"lid{i}"] = d.lid
            out[f"numa{i}"] = d.numa
        check_fields(out, SEGMENT_FIELDS, "rdma segment fields")  # what we publish is strict
        return out

    def _access(self, d: _Dev, flags: int) -> int:
        """MR access for a region's flags: a read-only region gets no remote-write access (the
        NIC refuses peers' WRITEs), and no local-write access unless it grants LOCAL_WRITE
        (read-only pages cannot be registered with it)."""
        acc = 0
        if flags & LOCAL_WRITE:
            acc |= V.ACCESS_LOCAL_WRITE
        if flags & REMOTE_READ:
            acc |= V.ACCESS_REMOTE_READ
        if flags & REMOTE_WRITE and flags & LOCAL_WRITE:  # verbs: remote write needs local
            acc |= V.ACCESS_REMOTE_WRITE
        if self.relaxed == 1 or (self.relaxed == 2 and d.dev.limits["vendor_id"] != _SOFT_VENDOR):
            acc |= V.ACCESS_RELAXED_ORDERING  # an optional flag: ignored where unsupported
        return acc

    def register(self, region: Region) -> dict | None:
        """Register ``region`` on every device; publish its rkeys (one per device)."""
        flags = getattr(region, "flags", LOCAL_WRITE | REMOTE_READ | REMOTE_WRITE)
        if region.length > self.max_mr_size:
            raise MooncakeError(f"rdma: cannot register 0x{region.addr:x}+{region.length}: "
                                f"larger than MC_MAX_MR_SIZE={self.max_mr_size} (one memory "
                                "region per buffer); register it in smaller pieces")

        def reg(d: _Dev) -> Any:
            return V.MR(d.dev, region.addr, region.length, self._access(d, flags))

        parallel = self.parallel_reg == 1 or (self.parallel_reg == -1 and len(self.devs) > 1)
        if parallel and len(self.devs) > 1:
            with ThreadPoolExecutor(len(self.devs)) as ex:
                mrs = list(ex.map(reg, self.devs))
        else:
            mrs = [reg(d) for d in self.devs]
        node = _numa.node_of(region.addr, region.length)
        with self._lock:
            self._mrs[region.addr] = mrs
            self._rebuild_ltabs()
            self._region_numa[region.addr] = [region.length, node]
            self._region_starts = sorted(self._region_numa)
        out = {f"rkey{i}": m.rkey for i, m in enumerate(mrs)}
        out["numa"] = -1 if node is None else node
        return out

    def unregister(self, region: Region) -> None:
        """Deregister the region's MRs.  The engine has waited for every task pinning the
        region, and slices are reported only once the NIC is done with them, so no posted work
        request uses these MRs; after ``ibv_dereg_mr`` returns the NIC cannot touch the memory
        (a stray request would fail with a protection error, never land)."""
        with self._lock:
            mrs = self._mrs.pop(region.addr, None)
            self._rebuild_ltabs()  # new submits no longer find the lkey
            self._region_numa.pop(region.addr, None)
            self._region_starts = sorted(self._region_numa)
        for m in mrs or []:
            m.close()

    def _allowed_pairs(self, pdevs: list[str]) -> list[tuple[_Dev, str]]:
        """Every (local device, peer device) pair a transfer may use: ``rail_topo_path``'s
        pairs where one is given, else all of them."""
        if self.rail_topo:
            allowed = set(self.rail_topo["all"]) | set(self.rail_topo["direct"])
            return [(d, p) for d in self.devs for p in pdevs if (d.name, p) in allowed]
        return [(d, p) for d in self.devs for p in pdevs]

    def _rebuild_ltabs(self) -> None:
        """One local key table, a column per device (a region has an MR on each): a submit's
        paths may start at any of them."""
        self.ltab = K.KeyTable([(m[0].addr, m[0].length, [x.lkey for x in m])
                                for m in self._mrs.values()], max(1, len(self.devs)))
        self._gen += 1

    def can_reach(self, peer: SegmentDesc) -> str | None:
        info = peer.transports.get(self.name)
        pdevs = peer_devices(info)
        if not info or pdevs is None:
            return f"peer {peer.name} publishes no RDMA devices"
        if not self.devs:
            return "rdma transport not started"
        if self._paused_rails or self._paused_peers:  # every rail down: another transport
            now, inst, why = time.monotonic(), info.get("instance", ""), ""
            for d, pdev in self._allowed_pairs(pdevs):
                why = self._paused(d.name, peer.name, inst, pdev, now)
                if why is None:
                    return None
            return f"every RDMA rail to {peer.name} is paused (the last: {why})"
        return None

    # ------------------------------------------------------------------ endpoints
    def _new_qps(self, d: _Dev, n: int, slot: Any) -> list:
        qps = []
        with _numa.preferred(d.numa):  # the queues on the NIC's node
            for _ in range(n):
                qp = V.QP(d.dev, slot.cq, self.max_wr, self.max_sge, self.max_inline)
                qp.to_init(d.port, V.ACCESS_RW, self.pkey_index)
                qps.append(qp)
        return qps

    def _bring_up(self, d: _Dev, qps: list, remote: dict, my_psns: list) -> None:
        """RTR/RTS towards a validated handshake (``_check_handshake``)."""
        gid = bytes.fromhex(remote["gid"])
        mtu = min(d.mtu, int(remote["mtu"]))
        for qp, rqpn, rpsn, mpsn in zip(qps, remote["qpns"], remote["psns"], my_psns,
                                               strict=True):
            qp.to_rtr(rqpn, gid, int(remote["lid"]), rpsn, mtu, d.port, d.gid_index, self.tc,
                      service_level=self.sl)
            qp.to_rts(mpsn, self.send_timeout)  # TENT's endpoint/send_timeout (ACK timeout)

    def _make_ep(self, d: _Dev, qps: list, slot: Any, worker: Any, key: tuple) -> Any:
        with self._lock:
            self._ep_ids += 1
            ep = K.Endpoint(self._ep_ids, qps, worker, slot)
            ep.info = {"dev": d, "key": key}
            self._by_id[ep.id] = ep
        return ep

    def _place(self, d: _Dev, lane: int | None = None) -> tuple[Any, Any]:
        """The (worker, CQ slot) of the next endpoint on ``d``: lane ``i``'s on worker ``i``;
        a quota class's lanes (``i + MAX_PATHS * index``) on that class's worker."""
        if lane is not None and lane >= MAX_PATHS:
            c = d.classes[lane // MAX_PATHS]
            return c.worker, c.slot
        d.ep_seq += 1
        w = d.ep_seq % len(d.workers) if lane is None else lane % len(d.workers)
        worker = d.workers[w]
        return worker, worker.slots[(d.ep_seq // len(d.workers)) % len(worker.slots)]

    def _retire(self, eps: list) -> None:
        for ep in eps:
            if ep is not None:
                self._retired.append(ep)
                self._gen += 1  # no cached path choice may hand it out again
                info = getattr(ep, "info", None) or {}
                if "dev" in info:  # its completions stay on its rail's count
                    rail = (info["dev"].name, *info["key"][:1], info["key"][2])
                    self._rail_done[rail] = self._rail_done.get(rail, 0) + ep.completions

    def _install(self, d: _Dev, key: tuple, ep: Any) -> None:
        with self._lock:
            self._retire(d.store.insert(key, ep))  # an eviction retires: a new generation

    def _on_connect(self, args: dict) -> dict:
        """RPC ``rdma.connect``: the passive side of an endpoint handshake."""
        if self._closing:
            raise PeerUnreachable("rdma transport is closing")
        try:
            _check_handshake(args, _CONNECT_FIELDS, None, "rdma.connect")
        except FieldError as e:
            raise ValueError(f"malformed rdma.connect request: {e}") from None
        name = args["dst_dev"]
        d = next((x for x in self.devs if x.name == name), None)
        if d is None:
            raise ValueError(f"no RDMA device {name!r} here (have: "
                             f"{', '.join(x.name for x in self.devs)})")
        n = len(args["qpns"])
        lane = int(args.get("lane", 0))
        with self._lock:  # (a passive endpoint carries no work: any worker polls it)
            worker, slot = self._place(d, lane % MAX_PATHS if self.lanes > 1 else None)
        qps = self._new_qps(d, n, slot)
        psns = [random.getrandbits(24) for _ in qps]
        try:
            self._bring_up(d, qps, args, psns)
        except BaseException as e:
            for q in qps:
                q.close()
            if isinstance(e, Exception):
                raise RailDown(f"{name}: its QPs did not come up: {e}") from e
            raise
        key = (args["segment"], args["instance"], args["src_dev"], lane)
        self._install(d, key, self._make_ep(d, qps, slot, worker, key))
        return {"instance": self.instance, "gid": d.gid.hex(), "lid": d.lid,
                "qpns": [q.qp_num for q in qps], "psns": psns, "mtu": d.mtu}

    def _connect(self, d: _Dev, peer_name: str, inst: str, pdev: str, lane: int = 0) -> Any:
        with self._lock:
            worker, slot = self._place(d, lane if self.lanes > 1 or lane >= MAX_PATHS else None)
        qps = self._new_qps(d, self.qp_per_ep, slot)
        psns = [random.getrandbits(24) for _ in qps]
        args = {"segment": self.ctx.segment_name, "instance": self.instance, "src_dev": d.name,
                "dst_dev": pdev, "gid": d.gid.hex(), "lid": d.lid,
                "qpns": [q.qp_num for q in qps], "psns": psns, "mtu": d.mtu}
        if lane:
            args["lane"] = lane
        try:
            remote = self.ctx.rpc_call(peer_name, "rdma.connect", args, self.connect_timeout)
        except Exception as e:
            for q in qps:
                q.close()
            if isinstance(e, RemoteError) and e.type == RailDown.__name__:
                self._pause_rail(d.name, peer_name, inst, pdev, f"the peer's side did not come "
                                 f"up: {e}")
            else:
                self._pause_peer(peer_name, inst, f"its rdma.connect RPC failed: {e}")
            raise PeerUnreachable(f"rdma handshake with {peer_name} ({pdev}) failed: {e}") from e
        try:
            _check_handshake(remote, _HANDSHAKE_FIELDS, len(qps), "rdma.connect reply")
        except FieldError as e:
            for q in qps:
                q.close()
            raise PeerUnreachable(f"{peer_name} sent a malformed rdma.connect reply: {e}") \
                from None
        if inst and remote.get("instance") != inst:
            for q in qps:
                q.close()
            raise PeerUnreachable(f"{peer_name} restarted (instance {remote.get('instance')}, "
                                  f"expected {inst})")
        try:
            self._bring_up(d, qps, remote, psns)
        except Exception as e:
            for q in qps:
                q.close()
            why = f"its QPs did not come up: {e}"
            self._pause_rail(d.name, peer_name, inst, pdev, why)
            raise PeerUnreachable(f"rdma: {d.name} -> {peer_name} ({pdev}): {why}") from e
        except BaseException:
            for q in qps:
                q.close()
            raise
        key = (peer_name, inst, pdev, lane)
        ep = self._make_ep(d, qps, slot, worker, key)
        self._install(d, key, ep)
        return ep

    def _endpoint(self, d: _Dev, peer_name: str, inst: str, pdev: str, lane: int = 0) -> Any:
        key = (peer_name, inst, pdev, lane)
        with self._lock:
            ep = d.store.get(key)
            if ep is not None and ep.healthy == len(ep.qps) and not ep.aborted:
                if ep.completions:
                    self._rail_ok(d.name, peer_name, inst, pdev)
                return ep
            lock = self._key_locks.setdefault((d.index, key), threading.Lock())
        with lock:
            with self._lock:
                ep = d.store.get(key)
                if ep is not None and ep.healthy == len(ep.qps) and not ep.aborted:
                    return ep
                if ep is not None:
                    self._drop_failed(d, key, ep)
            why = self._paused(d.name, peer_name, inst, pdev, time.monotonic())
            if why:
                raise PeerUnreachable(f"rdma: not connecting {d.name} -> {peer_name} ({pdev}): "
                                      f"{why}")
            return self._connect(d, peer_name, inst, pdev, lane)

    def _drop_failed(self, d: _Dev, key: tuple, ep: Any) -> None:
        """Retire an endpoint whose QPs failed; a link fault (not the peer refusing a range,
        not our abort) counts once as an error of its rail."""
        with self._lock:
            gone = d.store.remove(key, ep)
            self._retire([gone])
        status = ep.last_status
        if gone is not None and not ep.aborted and (status in RAIL_FAULTS or status < 0):
            self._rail_error(d.name, key[0], key[1], key[2],
                             f"a work completion failed with status {status} "
                             f"({RAIL_FAULTS.get(status, 'post failed')})")

    # ------------------------------------------------------------------ pauses
    def _pause_rail(self, dev: str, peer: str, inst: str, pdev: str, why: str) -> None:
        """Leave the NIC pair ``dev -> peer/pdev`` alone a while: MC_RDMA_RAIL_PAUSE_SECONDS
        the first time, twice as long each time it fails again before it carried work, at most
        RAIL_MAX_COOLDOWN_S (TENT's rail monitor)."""
        key = (dev, peer, inst, pdev)
        with self._lock:
            level = self._rail_level.get(key, 0)
            pause = min(self.rail_pause_s * 2 ** level,
                        max(self.RAIL_MAX_COOLDOWN_S, self.rail_pause_s))
            self._rail_level[key] = level + 1
            self._rail_errors.pop(key, None)
            self._rail_counts.setdefault((dev, peer, pdev), [0, 0])[1] += 1
            self._paused_rails[key] = (time.monotonic() + pause, why)
            self._gen += 1
        log.warning("rdma: rail %s -> %s (%s) paused for %gs (MC_RDMA_RAIL_PAUSE_SECONDS, "
                    "doubled per repeated failure): %s", dev, peer, pdev, pause, why)

    def _rail_error(self, dev: str, peer: str, inst: str, pdev: str, why: str) -> None:
        """Count an error on a NIC pair: RAIL_ERROR_THRESHOLD of them within
        RAIL_ERROR_WINDOW_S pause it (TENT's defaults: 3 in 10 s)."""
        key, now = (dev, peer, inst, pdev), time.monotonic()
        with self._lock:
            self._rail_counts.setdefault((dev, peer, pdev), [0, 0])[0] += 1
            self._gen += 1  # the next submit avoids it while another rail is clean
            q = self._rail_errors.setdefault(key, deque())
            q.append(now)
            while q and q[0] < now - self.RAIL_ERROR_WINDOW_S:
                q.popleft()
            n = len(q)
        log.info("rdma: rail %s -> %s (%s): error %d of %d allowed in %gs: %s", dev, peer, pdev,
                 n, self.RAIL_ERROR_THRESHOLD, self.RAIL_ERROR_WINDOW_S, why)
        if n >= self.RAIL_ERROR_THRESHOLD:
            self._pause_rail(dev, peer, inst, pdev,
                             f"{n} errors within {self.RAIL_ERROR_WINDOW_S:g}s, the last: {why}")

    def rails(self) -> list[dict]:
        """Each NIC pair used: work completions (the kernel's count, live endpoints and retired
        ones), errors the rail monitor counted, pauses, and whether it is paused now."""
        with self._lock:
            done = dict(self._rail_done)
            for d in self.devs:
                for key, ep in zip(d.store.keys(), d.store.values(), strict=True):
                    rail = (d.name, key[0], key[2])
                    done[rail] = done.get(rail, 0) + ep.completions
            counts = {k: list(v) for k, v in self._rail_counts.items()}
            now = time.monotonic()
            paused = {(k[0], k[1], k[3]) for k, v in self._paused_rails.items() if v[0] > now}
        rows = []
        for rail in sorted(set(done) | set(counts)):
            errors, pauses = counts.get(rail, (0, 0))
            rows.append({"local": rail[0], "peer": rail[1], "remote": rail[2],
                         "completions": done.get(rail, 0), "errors": errors, "pauses": pauses,
                         "paused": rail in paused})
        return rows

    def _rail_ok(self, dev: str, peer: str, inst: str, pdev: str) -> None:
        """The NIC pair completed work: forget its errors and its cooldown doubling."""
        key = (dev, peer, inst, pdev)
        if key in self._rail_level or key in self._rail_errors:
            with self._lock:
                self._rail_level.pop(key, None)
                self._rail_errors.pop(key, None)

    def _pause_peer(self, peer: str, inst: str, why: str) -> None:
        """MC_CONN_PAUSE_TTL_MS: do not reconnect to a torn-down peer for a while (0: off)."""
        if self.conn_pause_s <= 0:
            return
        with self._lock:
            self._paused_peers[(peer, inst)] = (time.monotonic() + self.conn_pause_s, why)
            self._gen += 1
        log.warning("rdma: reconnects to %s paused for %gs (MC_CONN_PAUSE_TTL_MS): %s", peer,
                    self.conn_pause_s, why)

    def _paused(self, dev: str, peer: str, inst: str, pdev: str, now: float) -> str | None:
        """Why the rail ``dev -> peer/pdev`` must not be (re)connected now, or None."""
        if not self._paused_rails and not self._paused_peers:
            return None
        with self._lock:
            for table, key, knob in ((self._paused_peers, (peer, inst), "MC_CONN_PAUSE_TTL_MS"),
                                     (self._paused_rails, (dev, peer, inst, pdev),
                                      "MC_RDMA_RAIL_PAUSE_SECONDS")):
                hit = table.get(key)
                if hit is None:
                    continue
                if hit[0] <= now:
                    del table[key]
                    continue
                return f"paused for {hit[0] - now:.1f}s more ({knob}): {hit[1]}"
        return None

    def _cols(self, d: _Dev, pdevs: list[str], peer: str, info: dict,
              rnode: int | None) -> tuple[list[int], str]:
        """The peer devices (indices in ``pdevs``) that ``d`` sends to, and the rule."""
        if self.hca_affinity:
            want = self.peer_affinity.get(d.name)
            if want:
                cols = [pdevs.index(x) for x in want if x in pdevs]
                if cols:
                    return cols, "MC_NIC_PEER_AFFINITY"
                if (d.name, peer) not in self._affinity_warned:
                    self._affinity_warned.add((d.name, peer))
                    log.warning("rdma: MC_NIC_PEER_AFFINITY maps %s to %s but %s publishes %s: "
                                "using every NIC", d.name, ",".join(want), peer,
                                ",".join(pdevs))
                return list(range(len(pdevs))), "every peer NIC (MC_NIC_PEER_AFFINITY names " \
                    "none it publishes)"
        elif self.dest_affinity:
            if rnode is not None:  # the peer NICs on the remote buffer's NUMA node
                near = [c for c in range(len(pdevs)) if info.get(f"numa{c}") == rnode]
                if near:
                    return near, f"MC_ENABLE_DEST_DEVICE_AFFINITY: peer NICs on the remote " \
                        f"buffer's node {rnode}"
            if d.name in pdevs:
                return [pdevs.index(d.name)], "MC_ENABLE_DEST_DEVICE_AFFINITY: the peer NIC " \
                    "of the same name (the remote buffer's node is " + \
                    ("unknown)" if rnode is None else f"{rnode}, no peer NIC on it)")
            return list(range(len(pdevs))), "every peer NIC (MC_ENABLE_DEST_DEVICE_AFFINITY " \
                "found no NIC near the remote buffer nor one of the same name)"
        return list(range(len(pdevs))), "every peer NIC"

    def _local_node(self, addr: int, length: int) -> int | None:
        """The NUMA node of the registered region holding ``addr`` (asked once its pages are
        placed)."""
        starts = self._region_starts
        k = bisect_right(starts, addr) - 1
        if k < 0:
            return None
        ent = self._region_numa.get(starts[k])
        if ent is None or addr >= starts[k] + ent[0]:
            return None
        if ent[1] is None:  # registered before its pages were touched: ask now
            ent[1] = _numa.node_of(addr, length)
        return ent[1]

    def _remote_rows(self, peer: SegmentDesc) -> list:
        ck = (peer.name, id(peer), peer.timestamp, len(peer.buffers))
        rows = self._rnodes.get(ck)
        if rows is None:
            rows = sorted((b.addr, b.length, (b.transports.get(self.name) or {}).get("numa", -1))
                          for b in peer.buffers)
            if len(self._rnodes) > 256:
                self._rnodes.clear()
            self._rnodes[ck] = rows
        return rows

    def _remote_row(self, peer: SegmentDesc, addr: int) -> int:
        """The index of the peer's buffer holding ``addr`` (-1: none)."""
        rows = self._remote_rows(peer)
        k = bisect_right(rows, (addr, _U64, 0)) - 1
        return k if k >= 0 and addr < rows[k][0] + rows[k][1] else -1

    def _remote_node(self, peer: SegmentDesc, addr: int) -> int | None:
        """The NUMA node the peer published for the buffer holding ``addr``."""
        k = self._remote_row(peer, addr)
        node = self._remote_rows(peer)[k][2] if k >= 0 else -1
        return None if node < 0 else node

    def _paths(self, peer: SegmentDesc, info: dict, pdevs: list[str], laddr: int, llen: int,
               raddr: int) -> tuple[list[tuple[_Dev, int]], dict]:
        """The NIC pairs ``(local device, peer device column)`` one submit stripes over, and
        why (what :meth:`explain` shows).  A rail_topo_path's direct pairs, else the cluster
        topology's partition_matchings for the (local buffer node, remote buffer node), else
        the NICs on the local buffer's node towards the peer NICs :meth:`_cols` picks."""
        lnode = self._local_node(laddr, llen)
        rnode = self._remote_node(peer, raddr) if (self.dest_affinity or self.matchings) \
            else None
        names = {d.name: d for d in self.devs}
        pairs: list[tuple[_Dev, int]] = []
        rule = ""
        if self.rail_topo:
            allowed = self.rail_topo["direct"] or self.rail_topo["all"]
            pairs = [(names[a], pdevs.index(b)) for a, b in allowed if a in names and b in pdevs]
            rule = "rail_topo_path " + ("direct pairs" if self.rail_topo["direct"] else "pairs")
        elif self.matchings and lnode is not None and rnode is not None:
            for m in self.matchings.get((lnode, rnode), ()):
                if m.src_dev in names and m.dst_dev in pdevs:
                    pairs.append((names[m.src_dev], pdevs.index(m.dst_dev)))
            if pairs:
                rule = f"cluster topology partition {lnode}-{rnode}"
        if not pairs:
            local, why_local = self._local_nics(lnode)
            col_rules = set()
            for d in local:
                cols, why = self._cols(d, pdevs, peer.name, info, rnode)
                col_rules.add(why)
                pairs.extend((d, c) for c in cols)
            rule = f"{why_local}, towards {'; '.join(sorted(col_rules))}"
        choice = {"local_numa": lnode, "remote_numa": rnode, "rule": rule,
                  "pairs": [f"{d.name}->{pdevs[c]}" for d, c in pairs]}
        return pairs[:MAX_PATHS], choice

    def _local_nics(self, lnode: int | None) -> tuple[list[_Dev], str]:
        """The local NICs for a buffer on NUMA node ``lnode`` (None: unknown), and why: an
        MC_CUSTOM_TOPO_JSON's row for ``cpu:<node>`` (else its ``*`` row), its preferred NICs
        that are open here, else its available ones; without one (or with none of its NICs
        open), the NICs on the buffer's node, else every NIC."""
        names = {d.name: d for d in self.devs}
        loc = "*" if lnode is None else f"cpu:{lnode}"
        row = self.priority.get(loc) or self.priority.get("*")
        if row is not None:
            at = loc if loc in self.priority else "*"
            for tier, what in ((row[0], "preferred"), (row[1], "available")):
                got = [names[n] for n in tier if n in names]
                if got:
                    return got, f"MC_CUSTOM_TOPO_JSON {at}: its {what} NICs"
        near = [d for d in self.devs if lnode is not None and d.numa == lnode]
        why = (f"the NICs on the local buffer's node {lnode}" if near else
               "every NIC (the local buffer's node is unknown)" if lnode is None else
               f"every NIC (none on the local buffer's node {lnode})")
        if self.priority:
            why += f" (MC_CUSTOM_TOPO_JSON has no row for {loc} naming a NIC open here)"
        return near or self.devs, why

    def explain(self, peer: SegmentDesc, local: int | None = None,
                remote: int | None = None) -> dict:
        """The NIC pairs a transfer from ``local`` to ``remote`` (addresses; default: the first
        registered buffer on each side) would stripe over, the rule that chose them, and the
        rails paused now with why."""
        info = peer.transports.get(self.name) or {}
        pdevs = peer_devices(info)
        if not pdevs or not self.devs:
            return {"pairs": [], "rule": self.can_reach(peer) or "no devices"}
        if local is None:
            local = self._region_starts[0] if self._region_starts else 0
        if remote is None:
            remote = peer.buffers[0].addr if peer.buffers else 0
        pairs, choice = self._paths(peer, info, pdevs, local, 1, remote)
        now, inst = time.monotonic(), info.get("instance", "")
        choice["paused"] = {f"{d.name}->{pdevs[c]}": why for d, c in pairs
                            if (why := self._paused(d.name, peer.name, inst, pdevs[c], now))}
        choice["devices"] = {d.name: {"numa": d.numa} for d in self.devs}
        choice["peer_devices"] = {n: {"numa": info.get(f"numa{i}", -1)}
                                  for i, n in enumerate(pdevs)}
        return choice

    # ------------------------------------------------------------------ data path
    def _remote_table(self, peer: SegmentDesc, pdevs: list[str]) -> Any:
        ck = (peer.name, id(peer), peer.timestamp, len(peer.buffers))
        t = self._rtabs.get(ck)
        if t is None:
            rows = []
            for b in peer.buffers:  # a buffer without every device's rkey is not reachable
                f = b.transports.get(self.name) or {}
                keys = [f.get(f"rkey{i}") for i in range(len(pdevs))]
                if all(type(k) is int and 0 <= k <= _U32 for k in keys):
                    rows.append((b.addr, b.length, keys, getattr(b, "writable", True)))
            try:
                t = K.KeyTable(rows, max(1, len(pdevs)))
            except (ValueError, OverflowError) as e:  # the validator should have caught it
                log.warning("rdma: segment %s publishes unusable buffers: %s", peer.name, e)
                t = K.KeyTable([], max(1, len(pdevs)))
            if len(self._rtabs) > 256:
                self._rtabs.clear()
            self._rtabs[ck] = t
        return t

    def submit(self, peer: SegmentDesc, slices: Any) -> None:
        if self._closing or not self.devs:
            slices.fail_all(_E_CLOSED)
            return
        first = slices.head()
        if first is None:
            return
        la, ra, ln = first
        w = slices.batch.priority  # another quota class than the engine's: its own workers
        weight = w if w and self.quota.table is not None and w != self.quota.weight else 0
        # the last choice for this (descriptor, local region, remote buffer), while its
        # endpoints are healthy and nothing changed (a pause, an endpoint, a registration),
        # for at most ROUTE_CACHE_S: a small transfer pays no path selection; the newest one
        # used is checked first by identity and address bounds alone
        hot = self._hot
        if hot is not None and hot[0] is peer and hot[1] <= la < hot[2] and \
                hot[3] <= ra < hot[4] and hot[5] == weight:
            hit = hot[6]
            if hit[0] == self._gen and hit[1] > time.monotonic() and K.usable(hit[3]):
                K.submit(slices, self.ltab, 0, hit[2], hit[4], hit[3], self.roundrobin, hit[5])
                return
        k = bisect_right(self._region_starts, la) - 1
        row = self._remote_row(peer, ra)
        ck = (peer.name, id(peer), peer.timestamp, self._region_starts[k] if k >= 0 else -1,
              row, weight)
        hit = self._choices.get(ck)
        if hit is not None and hit[6] is peer and hit[0] == self._gen and \
                hit[1] > time.monotonic() and K.usable(hit[3]):
            self._remember(peer, k, row, weight, hit)
            K.submit(slices, self.ltab, 0, hit[2], hit[4], hit[3], self.roundrobin, hit[5])
            return
        info = peer.transports.get(self.name) or {}
        pdevs = peer_devices(info)
        if not pdevs:
            slices.fail_all(_E_PEER)
            return
        inst = info.get("instance", "")
        gen = self._gen
        pairs, choice = self._paths(peer, info, pdevs, la, ln, ra)
        if self._rail_errors:  # a rail that just failed is left out while a clean one remains
            clean = [(d, c) for d, c in pairs
                     if not self._rail_errors.get((d.name, peer.name, inst, pdevs[c]))]
            if clean and len(clean) < len(pairs):
                choice["avoided"] = [f"{d.name}->{pdevs[c]}" for d, c in pairs
                                     if (d, c) not in clean]
                pairs = clean
        eps, cols, lcols, used, why = [], [], [], set(), None
        now = time.monotonic()
        for d, c in pairs:  # every pair not cooling down that connects: its lanes are paths
            w = self._paused(d.name, peer.name, inst, pdevs[c], now)
            if w is not None:
                why = w
                continue
            try:
                base = MAX_PATHS * self._class_of(d, weight).index if weight else 0
            except Exception as e:  # closing, or no CQ left for a class worker
                why = str(e)
                continue
            for lane in range(min(self.lanes, MAX_PATHS - len(eps))):
                try:
                    ep = self._endpoint(d, peer.name, inst, pdevs[c], base + lane)
                except Exception as e:  # the other rails may still work
                    why = str(e)
                    break
                eps.append(ep)
                cols.append(c)
                lcols.append(d.index)
                used.add(d.index)
        if not eps:  # every slice must be reported, failures included
            (log.warning if pairs else log.debug)("rdma: no endpoint to %s: %s", peer.name, why)
            slices.fail_all(_E_PEER)
            return
        if self.quota.table is not None and not weight:  # (a class joins as it is made)
            for k in used:
                if self.devs[k].qslot is None:
                    self._join_quota(self.devs[k])
        try:
            rtab = self._remote_table(peer, pdevs)
        except Exception as e:
            log.warning("rdma: cannot use segment %s: %s", peer.name, e)
            slices.fail_all(_E_PEER)
            return
        if len(self._choices) > 1024:
            self._choices.clear()
        hit = self._choices[ck] = (gen, time.monotonic() + self.ROUTE_CACHE_S, rtab, eps, cols,
                                   lcols, peer)  # the very descriptor: an id() may be reused
        self._remember(peer, k, row, weight, hit)
        if len(self._last_rtab) > 256:
            self._last_rtab.clear()
        self._last_rtab[(peer.name, inst)] = (rtab, pdevs)
        K.submit(slices, self.ltab, 0, rtab, cols, eps, self.roundrobin, lcols)

    def _remember(self, peer: SegmentDesc, k: int, row: int, weight: int, hit: tuple) -> None:
        """Make ``hit`` the choice checked first: for the local region ``k`` and the peer's
        buffer ``row`` (none when either is unknown)."""
        if k < 0 or row < 0:
            self._hot = None
            return
        start = self._region_starts[k]
        ent = self._region_numa.get(start)
        rows = self._remote_rows(peer)
        if ent is None or row >= len(rows):
            self._hot = None
            return
        self._hot = (peer, start, start + ent[0], rows[row][0], rows[row][0] + rows[row][1],
                     weight, hit)

    #: a synchronous call of at most this many slices spins (MC_RDMA_SPIN_US) before it sleeps
    SPIN_SLICES: ClassVar[int] = 4

    def transfer(self, peer: SegmentDesc, slices: Any, timeout: float) -> bool:
        """Submit and wait; a small call first polls its batch for twice as long as small calls
        of about its size waited lately (an average), at most ``MC_RDMA_SPIN_US``: the
        completion usually lands within it, sparing the caller's wake-up, and a fast fabric
        spins for microseconds only (the kernel never spins on a thread that has one CPU)."""
        self.submit(peer, slices)
        if len(slices) > self.SPIN_SLICES:
            return slices.batch.wait(timeout, 0.0)
        b = slices.batch
        n = b.total_bytes
        return b.wait_spun(timeout, self._spin[0 if n <= 16384 else 1 if n <= 262144 else 2])

    def _join_quota(self, d: _Dev) -> None:
        """Hand ``d``'s workers this engine's quota slot on ``d``'s NIC, joined on first use;
        when the table has no room the device runs unregulated (said once per NIC; joining is
        tried again QUOTA_RETRY_S later)."""
        with self._qlock:
            now = time.monotonic()
            if d.qslot is not None or now < d.qretry:
                return
            slot = self.quota.get(_quota.nic_key_for_rdma(d.name, d.port))
            if slot is None:
                d.qretry = now + QUOTA_RETRY_S
                return
            for w in d.workers:
                w.set_quota(slot.core, slot.sid)
            d.qslot = slot

    def _class_of(self, d: _Dev, weight: int) -> _Class:
        """The worker of quota class ``weight`` on ``d``: made on first use (a CQ on the NIC's
        node, a pinned thread, a quota slot at that weight; no room in the table: the class
        runs unregulated, as the engine's would).  Past MAX_CLASSES classes, the last one
        made carries the rest."""
        with self._qlock:
            for c in d.classes.values():
                if c.weight == weight:
                    return c
            if self._closing:
                raise PeerUnreachable("rdma transport is closing")
            if len(d.classes) >= MAX_CLASSES:
                return d.classes[len(d.classes)]
            index = len(d.classes) + 1
            with _numa.preferred(d.numa):
                slot = K.CQSlot(V.CQ(d.dev, self.max_cqe, d.channels[index % len(d.channels)],
                                     index))
            worker = K.Worker([slot], self._hub, self.retry_cnt, grace=self.grace)
            q = self.quota.get(_quota.nic_key_for_rdma(d.name, d.port), weight)
            if q is not None:
                worker.set_quota(q.core, q.sid)
            t = threading.Thread(target=_run_pinned,
                                 args=(worker, _node_cpus().get(d.numa, set()), d.name),
                                 name=f"mc-rdma-{d.name}-c{weight}", daemon=True)
            c = _Class(index, weight, worker, slot, t)
            d.classes[index] = c
            t.start()
            log.debug("rdma: %s: quota class %d has its own worker (slot %s)", d.name, weight,
                      None if q is None else q.sid)
            return c

    def _repair_loop(self) -> None:
        while not self._closing:
            orphans = self._hub.take(0.1)
            if orphans is not None:
                for ep_id in orphans.groups():
                    self._repair(orphans, ep_id)
            self._reclaim()
            self._watch()

    def _watch(self) -> None:
        """Find endpoints with work in flight and no completion for ``stall_s``; if their peer
        is gone (RPC fails, or another process answers), abort them with MC_E_PEER: QPs to
        ERR, each slice reported on its flush.  (A dead peer's QP does not always time out:
        Soft-RoCE may retransmit forever.)  Endpoints on a CQ that failed to poll are aborted
        the same way."""
        now = time.monotonic()
        period = self.stall_s if self.slice_timeout <= 0 else min(self.stall_s, self.slice_timeout)
        if now - self._last_watch < period / 2:
            return
        self._last_watch = now
        stalled, broken, expired = [], [], []
        with self._lock:
            live = set()
            bad_slots = set()
            for d in self.devs:
                for sl in d.all_slots():
                    n = sl.errors
                    if n != self._cq_errors.get(id(sl), 0):
                        self._cq_errors[id(sl)] = n
                        bad_slots.add(id(sl))
                        log.error("rdma: %s: ibv_poll_cq failed %d times (last %d): aborting "
                                  "its endpoints", d.name, n, sl.last_error)
                for key, ep in zip(d.store.keys(), d.store.values(), strict=True):
                    live.add(ep.id)
                    if id(ep.slot) in bad_slots:
                        broken.append((d, key, ep))
                        continue
                    done = ep.completions
                    seen = self._progress.get(ep.id)
                    if ep.users == 0 or seen is None or seen[0] != done:
                        self._progress[ep.id] = (done, now)
                        self._pinged.pop(ep.id, None)
                    elif 0 < self.slice_timeout <= now - seen[1]:
                        expired.append((d, key, ep, now - seen[1]))
                    elif now - max(seen[1], self._pinged.get(ep.id, 0.0)) >= self.stall_s:
                        stalled.append((d, key, ep))
            for k in [k for k in self._progress if k not in live]:
                del self._progress[k]
                self._pinged.pop(k, None)
            for d, key, ep in broken:
                d.store.remove(key, ep)
                self._pause_rail(d.name, *key[:3], "its CQ failed to poll")
                self._abort_ep(ep, _E_PEER, False)
            for d, key, ep, idle in expired:  # MC_SLICE_TIMEOUT: its slices end TIMEOUT
                d.store.remove(key, ep)
                log.warning("rdma: endpoint %d to %s (%s): no completion for %.3gs with %d "
                            "slices in flight (MC_SLICE_TIMEOUT=%g): they end TIMEOUT",
                            ep.id, key[0], key[2], idle, ep.users, self.slice_timeout)
                self._abort_ep(ep, _E_TIMEOUT, False)
        for d, key, ep in stalled:
            peer, inst, pdev = key[:3]
            try:
                who = self.ctx.rpc_call(peer, "rdma.ping", {}, max(2.0, self.stall_s))
                if not inst or who.get("instance") == inst:
                    self._pinged[ep.id] = time.monotonic()  # the slice-timeout clock runs on
                    continue  # alive, just slow
                why = f"another process ({who.get('instance')}) answers there now"
            except Exception as e:
                why = str(e)
            log.warning("rdma: peer %s (%s) is gone (%s): failing its endpoint", peer, pdev, why)
            self._pause_peer(peer, inst, f"it is gone ({why})")
            with self._lock:
                d.store.remove(key, ep)
                self._abort_ep(ep, _E_PEER, False)

    def _abort_ep(self, ep: Any, err: int, requeue: bool) -> None:
        """Abort one endpoint (caller holds the lock and took it out of the store)."""
        for e in ep.abort(err, requeue):
            log.error("rdma: endpoint %d: a QP did not move to ERR (%s): its posted work may "
                      "only end at close", ep.id, e)
        self._retire([ep])

    def _repair(self, orphans: Any, ep_id: int) -> None:
        old = self._by_id.get(ep_id)
        if old is None or self._closing or (old.aborted and not old.requeue):
            err = _E_CLOSED if self._closing else (
                old.abort_error if old is not None and old.aborted else _E_PEER)
            orphans.fail(ep_id, err)
            return
        d, key = old.info["dev"], old.info["key"]
        if not old.aborted and self._move_off(orphans, ep_id, old, d, key):
            return
        try:
            new = self._endpoint(d, *key)
        except Exception as e:  # the peer is gone (or restarted), or every rail is down
            if not old.aborted and self._move_off(orphans, ep_id, old, d, key, any_rail=True):
                return
            log.warning("rdma: cannot rebuild endpoint to %s/%s: %s", key[0], key[2], e)
            orphans.fail(ep_id, _E_PEER)
            return
        orphans.resubmit(ep_id, new)

    def _other_rails(self, d: _Dev, key: tuple, pdevs: list[str],
                     any_rail: bool) -> list[tuple[Any, _Dev, str]]:
        """Healthy endpoints to the peer instance of ``key`` on rails other than ``d ->
        key's peer device`` that are not cooling down and (unless ``any_rail``) did not just
        fail; when there is none, one connected on the first such rail that connects
        (``rail_topo_path``'s pairs only, where one is given; a rail that does not pauses)."""
        peer, inst, pdev = key[:3]
        now = time.monotonic()

        def usable(d2: _Dev, p2: str) -> bool:
            return (d2 is not d or p2 != pdev) and p2 in pdevs and \
                (any_rail or not self._rail_errors.get((d2.name, peer, inst, p2))) and \
                self._paused(d2.name, peer, inst, p2, now) is None

        with self._lock:
            live = [(ep, d2, k2[2]) for d2 in self.devs
                    for k2, ep in zip(d2.store.keys(), d2.store.values(), strict=True)
                    if k2[0] == peer and k2[1] == inst and not ep.aborted and
                    ep.healthy == len(ep.qps)]
        out = [x for x in live if usable(x[1], x[2])]
        if out:
            return out[:MAX_PATHS]
        for d2, p2 in self._allowed_pairs(pdevs):
            if usable(d2, p2):
                try:
                    return [(self._endpoint(d2, peer, inst, p2, 0), d2, p2)]
                except Exception as e:
                    log.info("rdma: %s -> %s (%s) cannot take over: %s", d2.name, peer, p2, e)
        return []

    def _move_off(self, orphans: Any, ep_id: int, old: Any, d: _Dev, key: tuple,
                  any_rail: bool = False) -> bool:
        """Re-post the slices of ``old`` (its QPs failed: the NIC is done with them and their
        tasks were not reported) on the other rails to the same peer, re-keyed for each; the
        failed rail counts an error.  False when no other rail is usable: first the caller
        rebuilds the same one, and if that fails asks again with ``any_rail`` (rails that just
        failed too, as long as they are not cooling down)."""
        got = self._last_rtab.get(key[:2])
        if got is None:
            return False
        rtab, pdevs = got
        self._drop_failed(d, key, old)
        alt = self._other_rails(d, key, pdevs, any_rail)
        if not alt:
            return False
        n = orphans.move(ep_id, [ep for ep, _, _ in alt], self.ltab, [x.index for _, x, _ in alt],
                         rtab, [pdevs.index(p) for _, _, p in alt])
        log.warning("rdma: rail %s -> %s (%s) failed (status %d): %d slices re-posted on %s",
                    d.name, key[0], key[2], old.last_status, n,
                    ", ".join(sorted({f"{x.name}->{p}" for _, x, p in alt})))
        return True

    def _reclaim(self) -> None:
        with self._lock:
            keep = []
            for ep in self._retired:
                if ep.users == 0:
                    ep.destroy()
                    self._by_id.pop(ep.id, None)
                else:
                    keep.append(ep)
            self._retired = keep
        K.reap_graves()

    def endpoints(self) -> list[tuple]:
        """``(local device, key, endpoint)`` for every stored endpoint (diagnostics, tests)."""
        with self._lock:
            return [(d.name, k, ep) for d in self.devs for k, ep in
                    zip(d.store.keys(), d.store.values(), strict=True)]

    def abort(self, peer: SegmentDesc) -> None:
        """A batch to ``peer`` was cancelled (it timed out) and its posted work did not drain:
        reset every endpoint to ``peer`` that has work on it.  The QPs go to ERR; each posted
        slice is reported on its flush completion (the NIC no longer touches it): a cancelled
        batch's with its cancel code, other callers' moved to a rebuilt endpoint (or failed
        with MC_E_PEER if the peer cannot be reached).  Idle endpoints stay."""
        with self._lock:
            for d in self.devs:
                for k, ep in zip(d.store.keys(), d.store.values(), strict=True):
                    if k[0] == peer.name and ep.users > 0:
                        d.store.remove(k, ep)
                        log.info("rdma: resetting endpoint %d to %s (%s): %d slices on it",
                                 ep.id, peer.name, k[2], ep.users)
                        self._abort_ep(ep, _E_TIMEOUT, True)

    def close(self) -> None:
        """Stop everything.  In-flight work ends FAILED (MC_E_CLOSED) and is reported only once
        the NIC is done with it: QPs go to ERR and their flushes are polled; what has not
        flushed when the workers stop is reported after its QP is destroyed."""
        if self._closing:
            return
        self._closing = True
        with self._lock:
            for d in self.devs:
                for k in d.store.keys():
                    self._abort_ep(d.store.remove(k), _E_CLOSED, False)
        if self._repair_thread is not None:
            self._repair_thread.join(5)
        deadline = time.monotonic() + 5.0  # flush completions come at once on a live device
        while time.monotonic() < deadline:
            with self._lock:
                if all(ep.users == 0 for ep in self._retired):
                    break
            time.sleep(0.01)
        for d in self.devs:
            with self._qlock:  # no class is made from now on (the lock orders it)
                classes = list(d.classes.values())
            for w in d.all_workers():
                w.stop()
            for t in d.threads + [c.thread for c in classes]:
                t.join(5)
        with self._qlock:   # the workers left their slots; give them back
            for d in self.devs:
                d.qslot = None
                d.qretry = float("inf")   # a late submit must not join again
        self.quota.release()
        with self._lock:
            for ep in self._retired:
                if ep.users == 0:
                    continue
                if not ep.worker.stopped:
                    log.error("rdma: endpoint %d: its worker did not stop; %d slices stay in "
                              "flight (their memory is not released)", ep.id, ep.users)
                    continue
                n = ep.teardown(_E_CLOSED)  # QPs destroyed first: then the slices end
                if n:
                    log.warning("rdma: endpoint %d: %d slices had not flushed at close",
                                ep.id, n)
        if self._hub is not None:
            self._hub.close()
            while (o := self._hub.take(0)) is not None:
                o.fail(-1, _E_CLOSED)
        self._reclaim()
        for mrs in self._mrs.values():
            for m in mrs:
                m.close()
        self._mrs.clear()
        self.devs = []

    def stats(self) -> dict:
        """Per-device worker counters, CQ poll errors, endpoint counts and clamped knobs."""
        per = {d.name: {"workers": [w.stats() for w in d.all_workers()],
                        "endpoints": len(d.store), "evictions": d.store.evictions,
                        "cq_errors": sum(sl.errors for sl in d.all_slots())} for d in self.devs}
        return per | {"clamped": dict(self.clamped), "retired": len(self._retired)}
