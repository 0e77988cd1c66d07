"""The configuration table: every ``MC_*`` variable and TENT JSON key mooncake understands.

Data only; parsing, precedence and checks live in :mod:`mooncake.config`.  One row per knob,
ordered by area.  A row's ``name`` is its primary env name (``MC_SLICE_SIZE``), or for a
TENT-only row its JSON path (``transports/shm/enable``).  ``hint`` is the tuning advice of the
Mooncake performance-tuning chapter (shared/seed), translated; ``owner`` is the layer that reads it.

Types: ``int``, ``float``, ``bool``, ``str``, or one of these strings:

* ``"size"``: an int of bytes.  Strings may carry a binary suffix: ``K``/``M``/``G``/``T``
  (optionally followed by ``B`` or ``iB``, any case) multiply by 1024, 1024², ...; so ``2MB``,
  ``2M`` and ``2MiB`` all mean 2097152.  ``0x`` hex is accepted too.
* ``"enum"``: a str from ``choices``, matched case-insensitively, normalised to the spelling
  in ``choices``.
* ``"list"``: a tuple of str; comma-separated in the environment, a JSON list in TENT.
* ``"auto"``: the string ``"auto"`` or a bool.

``range`` is ``(lo, hi)``, inclusive, either end may be None; ``min_exclusive`` makes ``lo``
exclusive.  ``special`` lists ``(value, meaning)`` pairs allowed outside the range (``-1`` =
auto).  A default of ``None`` means "unset": the owner derives the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Option", "OPTIONS", "OWNERS", "KNOWN_UNUSED", "KiB", "MiB", "GiB", "TiB", "DAY"]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
#: the longest duration any option accepts, in seconds (every timeout, period and lease is
#: bounded: a finite value that fits every OS timeout and every C int of milliseconds)
DAY = 86400
OWNERS = ("engine", "tcp", "rdma", "shm", "cxl", "metadata", "store", "tent")


@dataclass(frozen=True)
class Option:
    """One knob.  ``env`` defaults to ``(name,)`` for env-named rows."""

    name: str
    type: type | str
    default: Any
    env: tuple[str, ...] = ()
    tent: str | None = None
    range: tuple[Any, Any] | None = None
    choices: tuple[Any, ...] | None = None
    special: tuple[tuple[Any, str], ...] = ()
    min_exclusive: bool = False
    unit: str = ""
    doc: str = ""
    hint: str = ""
    owner: str = "engine"
    #: env names in ``env`` that still work but warn
    deprecated: tuple[str, ...] = ()
    #: masked by ``mooncake config show``
    secret: bool = False

    def __post_init__(self) -> None:
        if not self.env and "/" not in self.name:
            object.__setattr__(self, "env", (self.name,))
        assert self.owner in OWNERS, self.owner


_RDMA = "transports/rdma"
_O = Option

OPTIONS: tuple[Option, ...] = (
    # ---- transfer: slicing, retries, timeouts (engine) ---------------------------------------
    _O("MC_SLICE_SIZE", "size", 64 * KiB, tent=f"{_RDMA}/workers/block_size", range=(1, GiB),
       unit="bytes", doc="slice size: the unit one worker moves (one RDMA WRITE/READ)",
       hint="the most important knob: 16-32 KiB for small tensors/latency, 64 KiB for KV cache "
            "(default), 64-128 KiB for mixed load, 256 KiB-1 MiB for weights/bulk; raise it when "
            "throughput is far below line rate"),
    _O("MC_FRAGMENT_RATIO", int, 4, range=(1, None),
       doc="a tail of at most slice_size/ratio bytes merges into the previous slice",
       hint="fragment_limit = slice_size / ratio (65536/4 = 16384 by default); a larger ratio "
            "means finer tail fragments: less wasted bandwidth, more WR submissions"),
    _O("MC_WORKERS_PER_CTX", int, 2, tent=f"{_RDMA}/workers/num_workers", range=(1, 64),
       doc="worker threads per device (TENT: one per lane)",
       hint="raise to 4-8 for parallelism (costs CPU); match the number of RDMA NICs; TENT "
            "default 6; keep num_workers = num_cq_list = qp_mul_factor; low throughput: raise it"),
    _O("MC_RETRY_CNT", int, 9, range=(1, 127), doc="attempts per slice before it fails",
       hint="raise on unstable networks or when transfers time out often; 5 in the low-latency "
            "template"),
    _O("MC_TRANSFER_TIMEOUT", float, 30.0, range=(0, DAY), min_exclusive=True, unit="s",
       doc="timeout of a synchronous transfer (Mooncake uses max(5, v); we take v as given)"),
    _O("MC_SLICE_TIMEOUT", float, -1.0, range=(0, 65535), min_exclusive=True,
       special=((-1, "off"),), unit="s",
       doc="per-slice timeout: a slice older than this ends TIMEOUT"),
    _O("MC_CONN_PAUSE_TTL_MS", int, 0, range=(0, 600000), unit="ms",
       doc="pause reconnects to a peer that was torn down (0 = off)"),
    # ---- control plane: RPC listener and handshakes (engine) ---------------------------------
    _O("MC_MIN_RPC_PORT", int, 15000, env=("MC_MIN_RPC_PORT", "MC_MIN_PRC_PORT"),
       range=(1024, 65535), doc="lowest RPC port (picked at random in [min, max])",
       hint="set the RPC port range for TCP setups (the seed uses the MC_MIN_PRC_PORT alias, "
            "15000)"),
    _O("MC_MAX_RPC_PORT", int, 17000, env=("MC_MAX_RPC_PORT", "MC_MAX_PRC_PORT"),
       range=(1024, 65535), doc="highest RPC port",
       hint="set the RPC port range for TCP setups (the seed uses the MC_MAX_PRC_PORT alias, "
            "17000)"),
    _O("MC_TCP_BIND_ADDRESS", str, "", doc="IP to bind and advertise (default: first LAN IP)",
       hint="pin the address on multi-homed hosts; for TCP also raise net.core.rmem_max/wmem_max "
            "and net.ipv4.tcp_rmem/tcp_wmem to 16 MiB (sysctl, root)"),
    _O("MC_USE_IPV6", bool, False, doc="use IPv6 sockets"),
    _O("MC_HANDSHAKE_MAX_LENGTH", "size", MiB, range=(1, 128 * MiB), unit="bytes",
       doc="largest RPC/handshake frame accepted"),
    _O("MC_HANDSHAKE_CONNECT_TIMEOUT", float, 5.0, range=(0, 3599), min_exclusive=True, unit="s",
       doc="connect timeout of RPC/handshake connections"),
    _O("MC_HANDSHAKE_LISTEN_BACKLOG", int, 128, range=(1, 65535), doc="RPC listen backlog"),
    _O("MC_TENT_RPC_THREADS", int, 4, tent="rpc_server_threads", range=(1, 256),
       doc="threads serving the engine's RPC port",
       hint="like the master's rpc_thread_num: 4 for <10 nodes, 8-16 for 10-100 nodes, 16-32 "
            "for >100 nodes so RPC does not become the bottleneck"),
    # ---- TCP transport --------------------------------------------------------------------------
    _O("MC_FORCE_TCP", bool, False, owner="tcp",
       doc="install only the TCP transport (presence alone does not enable it here)",
       hint="use TCP when there is no RDMA, or to force it"),
    _O("MC_TCP_SLICE_SIZE", "size", MiB, range=(4 * KiB, 256 * MiB), unit="bytes", owner="tcp",
       doc="slice size of the TCP transport (it does not use MC_SLICE_SIZE)"),
    _O("MC_TCP_LANES_PER_PEER", int, 4,
       env=("MC_TCP_LANES_PER_PEER", "MC_TCP_MAX_CONNECTIONS_PER_PEER"),
       deprecated=("MC_TCP_MAX_CONNECTIONS_PER_PEER",), range=(1, 16), owner="tcp",
       doc="persistent TCP connections (lanes) per peer"),
    _O("MC_TCP_SPIN_US", int, 30, range=(0, 10000), unit="µs", owner="tcp",
       doc="a synchronous TCP call polls its socket this long before sleeping (0: never)",
       hint="lower sync latency for a little CPU; 0 on oversubscribed hosts"),
    _O("transports/tcp/enable", bool, True, tent="transports/tcp/enable", owner="tcp",
       doc="TENT: enable the TCP transport"),
    # ---- metadata ------------------------------------------------------------------------------
    _O("MC_METADATA_CLUSTER_ID", str, "", owner="metadata",
       doc="namespace of metadata keys: mooncake/<id>/ram/<segment>"),
    _O("MC_DISABLE_METACACHE", bool, False, owner="metadata",
       doc="do not cache peers' segment descriptors",
       hint="leave it off: slow connection setup often means the metadata cache is disabled"),
    _O("MC_TE_METADATA_REFRESH_INTERVAL_SECONDS", float, 0.0, range=(0, DAY), unit="s",
       owner="metadata", doc="refresh cached descriptors in the background (0 = off)"),
    _O("MC_METADATA_TTL", float, 10.0, range=(0, DAY), unit="s", owner="metadata",
       doc="lease of a published descriptor in etcd/redis/http, renewed every TTL/3 "
           "(0 = no expiry, no heartbeat; mooncake only)"),
    _O("MC_REDIS_USERNAME", str, "", owner="metadata", doc="redis metadata: ACL user name"),
    _O("MC_REDIS_PASSWORD", str, "", owner="metadata", secret=True,
       doc="redis metadata: password"),
    _O("MC_REDIS_DB_INDEX", int, 0, range=(0, 255), owner="metadata",
       doc="redis metadata: database index"),
    # ---- RDMA device ---------------------------------------------------------------------------
    _O("MC_NUM_CQ_PER_CTX", int, 1, tent=f"{_RDMA}/device/num_cq_list", range=(1, 255),
       owner="rdma", doc="completion queues per device",
       hint="raise for more concurrent CQ processing (throughput); TENT default 6, keep equal "
            "to num_workers"),
    _O("MC_NUM_COMP_CHANNELS_PER_CTX", int, 1, tent=f"{_RDMA}/device/num_comp_channels",
       range=(1, 255), owner="rdma", doc="completion channels per device",
       hint="raise in event-driven setups (latency)"),
    _O("MC_IB_PORT", int, 1, tent=f"{_RDMA}/device/port", range=(1, 255), owner="rdma",
       doc="HCA port", hint="change when binding a multi-port HCA (connectivity)"),
    _O("MC_GID_INDEX", int, -1, env=("MC_GID_INDEX", "NCCL_IB_GID_INDEX"),
       tent=f"{_RDMA}/device/gid_index", range=(0, 255), special=((-1, "auto"),), owner="rdma",
       doc="GID index (-1: probe for a RoCEv2 GID)",
       hint="set it explicitly on RoCE (RoCEv2/IPv4 is usually 3 or higher); InfiniBand: 0"),
    _O("MC_AUTO_GID_MAX_RETRIES", int, 2, range=(0, 16), owner="rdma",
       doc="re-probes of the GID table when MC_GID_INDEX is auto"),
    _O("MC_MAX_CQE_PER_CTX", int, 4096, tent=f"{_RDMA}/device/max_cqe", range=(1, 65535),
       owner="rdma", doc="CQ depth; also caps outstanding WRs per device",
       hint="raise under high concurrency; must be at least the sum of max_wr of the QPs on it "
            "(CQ overflow stalls or drops connections); 4096 or more in production, 8192 in the "
            "high-throughput template; raise it when tail latency is high"),
    _O("MC_MAX_EP_PER_CTX", int, 65536, tent=f"{_RDMA}/endpoint/endpoint_store_cap",
       range=(1, 1 << 20), owner="rdma", doc="endpoint cache capacity per device",
       hint="raise for large clusters, or when the endpoint cache hit rate is low"),
    _O("MC_NUM_QP_PER_EP", int, 2, tent=f"{_RDMA}/endpoint/qp_mul_factor", range=(1, 255),
       owner="rdma", doc="RC QPs per endpoint (TENT: one per lane)",
       hint="raise for more parallelism per connection; TENT default 6, keep equal to "
            "num_workers"),
    _O("MC_PKEY_INDEX", int, 0, tent=f"{_RDMA}/endpoint/pkey_index", range=(0, 65535),
       owner="rdma", doc="QP partition key index"),
    _O("MC_TE_FILTERS", "list", (), tent="topology/rdma_whitelist", owner="rdma",
       doc="use only these RDMA devices (comma-separated)"),
    _O("MC_TE_FILTERS_EXCLUDE", "list", (), tent="topology/rdma_blacklist", owner="rdma",
       doc="never use these RDMA devices (comma-separated)"),
    _O("MC_CUSTOM_TOPO_JSON", str, "", tent="topology/custom_json_path", owner="rdma",
       doc="path of a custom NIC priority matrix (JSON)"),
    _O("MC_FORCE_HCA", bool, False, owner="rdma", doc="install RDMA even when no HCA is found"),
    # ---- RDMA transfer -------------------------------------------------------------------------
    _O("MC_MAX_WR", int, 256, tent=f"{_RDMA}/endpoint/max_qp_wr", range=(1, 65535),
       owner="rdma", doc="send-queue depth per QP (clamped to the device's max_qp_wr)",
       hint="256 suits most loads; 512-1024 for many concurrent small messages (avoids full "
            "send queues); 128-256 for large sequential transfers; too large exhausts HCA "
            "resources"),
    _O("MC_MAX_SGE", int, 4, tent=f"{_RDMA}/endpoint/max_sge", range=(1, 65535), owner="rdma",
       doc="scatter/gather entries per WR (clamped to the device)",
       hint="raise for scattered memory"),
    _O("MC_MAX_INLINE", int, 64, tent=f"{_RDMA}/endpoint/max_inline_bytes", range=(0, 65535),
       unit="bytes", owner="rdma", doc="bytes sent inline in a WR",
       hint="may be raised for small messages (small-message latency)"),
    _O("MC_MTU", int, 4096, tent=f"{_RDMA}/endpoint/path_mtu", choices=(512, 1024, 2048, 4096),
       unit="bytes", owner="rdma", doc="path MTU",
       hint="keep 4096; 2048 under congestion, 1024 on unstable links, 512 on low-bandwidth "
            "links; lower it only after confirming congestion or loss"),
    _O("MC_MAX_MR_SIZE", "size", TiB, range=(1, None), unit="bytes", owner="rdma",
       doc="largest memory region (clamped to the device)"),
    _O("MC_RDMA_RAIL_PAUSE_SECONDS", int, 30, range=(1, 3599), unit="s", owner="rdma",
       doc="cool-down of a failed local/remote NIC pair"),
    # ---- RDMA advanced ---------------------------------------------------------------------------
    _O("MC_IB_TC", int, -1, tent=f"{_RDMA}/endpoint/traffic_class", range=(0, 255),
       special=((-1, "unset"),), owner="rdma", doc="traffic class of QPs",
       hint="set for multi-tenant QoS, e.g. 106 (DSCP to a high-priority ECN queue on RoCE); "
            "switches need a matching QoS policy"),
    _O("MC_IB_SL", int, -1, tent=f"{_RDMA}/endpoint/service_level", range=(0, 15),
       special=((-1, "unset"),), owner="rdma", doc="service level of QPs"),
    _O("MC_IB_PCI_RELAXED_ORDERING", int, 0, choices=(0, 1, 2), owner="rdma",
       doc="PCIe relaxed ordering of MRs: 0 off, 1 on if supported, 2 auto "
           "(Mooncake's code defaults to 1, its tuning guide to 0)",
       hint="GPUDirect: set 1 (or 2 to auto-detect); needs GPU and NIC support (A100/H100 + "
            "ConnectX-6/7 are usually safe); 20-50% more GPUDirect throughput"),
    _O("MC_ENDPOINT_STORE_TYPE", "enum", "SIEVE", choices=("SIEVE", "FIFO"), owner="rdma",
       doc="endpoint cache eviction policy", hint="FIFO suits uniform access patterns"),
    _O("MC_ENABLE_DEST_DEVICE_AFFINITY", bool, False, owner="rdma",
       doc="prefer the peer NIC with the same name as the local one",
       hint="enable for NUMA-aware transfers: prefer the device on the target memory's NUMA "
            "node"),
    _O("MC_ENABLE_HCA_PEER_AFFINITY", bool, False, owner="rdma",
       doc="pick peer NICs from MC_NIC_PEER_AFFINITY"),
    _O("MC_NIC_PEER_AFFINITY", str, "", owner="rdma",
       doc="local-to-peer NIC map: mlx5_0=mlx5_1,mlx5_2;mlx5_1=..."),
    _O("MC_PATH_ROUNDROBIN", bool, False, owner="rdma",
       doc="round-robin over preferred NICs instead of a random pick",
       hint="enable for large-block transfers to balance bandwidth over paths"),
    _O("MC_ENABLE_PARALLEL_REG_MR", int, -1, choices=(-1, 0, 1), owner="rdma",
       doc="register MRs on all NICs in parallel: -1 auto, 0 off, 1 on",
       hint="set 1 when registering large memory (registration speed)"),
    _O("MC_RDMA_BIND_ADDRESS", str, "", tent=f"{_RDMA}/bind_address", owner="rdma",
       doc="RDMA-reachable IP published in NIC paths (default: MC_TCP_BIND_ADDRESS)"),
    # ---- TENT RDMA (JSON only) ----------------------------------------------------------------
    _O(f"{_RDMA}/enable", bool, True, tent=f"{_RDMA}/enable", owner="rdma",
       doc="TENT: enable the RDMA transport"),
    _O(f"{_RDMA}/num_lanes", int, None, tent=f"{_RDMA}/num_lanes", range=(1, 64), owner="rdma",
       doc="TENT: one knob for workers = QPs per endpoint = CQs per device (unset: the three "
           "knobs decide)",
       hint="per NIC: 200G 4-6, 400G 6-8, 2x200G bond 6-8; 8x200G: 8-16 (1-2 per NIC)"),
    _O(f"{_RDMA}/workers/grace_period_ns", int, 5_000_000, tent=f"{_RDMA}/workers/grace_period_ns",
       range=(0, 10**11), unit="ns", owner="rdma",
       doc="TENT: how long an idle worker keeps polling before it sleeps",
       hint="1-5 us for latency-sensitive inference, 5 ms default, 10-50 ms where CPU is scarce; "
            "start at 5 ms and lower it; raise it when CPU usage is high"),
    _O(f"{_RDMA}/workers/max_retry_count", int, 8, tent=f"{_RDMA}/workers/max_retry_count",
       range=(0, 127), owner="rdma", doc="TENT: resubmissions of a failed slice",
       hint="TENT default 8 (the TE's MC_RETRY_CNT is 9)"),
    _O(f"{_RDMA}/max_timeout_ns", int, 10**10, tent=f"{_RDMA}/max_timeout_ns",
       range=(1, DAY * 10**9),
       unit="ns", owner="rdma", doc="TENT: software slice timeout; the endpoint is disabled after",
       hint="5 s (5000000000) in the high-performance TENT template"),
    _O(f"{_RDMA}/endpoint/send_timeout", int, 14, tent=f"{_RDMA}/endpoint/send_timeout",
       range=(0, 31), owner="rdma", doc="TENT: QP local ACK timeout exponent (4.096 us * 2^v)",
       hint="TENT default 14 (fixed in the classic TE)"),
    _O(f"{_RDMA}/shared_quota_shm_path", str, "", tent=f"{_RDMA}/shared_quota_shm_path",
       owner="rdma", doc="TENT: POSIX shm name for cross-process bandwidth sharing",
       hint="set (e.g. mooncake_quota_shm) when several processes on a node share NICs, so they "
            "share bandwidth fairly instead of fighting"),
    _O(f"{_RDMA}/workers/rail_topo_path", str, "", tent=f"{_RDMA}/workers/rail_topo_path",
       owner="rdma", doc="TENT: rail topology JSON (allowed and preferred NIC pairs)",
       hint="measured topology for path choice; python -m mooncake.transfer_engine_topology_dump"),
    _O("topology/cluster_topology_path", str, "", tent="topology/cluster_topology_path",
       owner="rdma", doc="cluster-topology.json whose partition_matchings pick NIC pairs",
       hint="partition_matchings gives the best device pair per NUMA pair ('0-1': src_dev, "
            "dst_dev, bandwidth, latency); Mooncake never reads it, we do"),
    # ---- SHM -------------------------------------------------------------------------------------
    _O("transports/shm/enable", bool, True, tent="transports/shm/enable", owner="shm",
       doc="TENT: enable the same-host shared-memory transport",
       hint="enable for same-node transfers"),
    _O("transports/shm/async_memcpy_threshold", "size", 64 * KiB,
       tent="transports/shm/async_memcpy_threshold", range=(0, GiB), unit="bytes", owner="shm",
       doc="copies of at least this many bytes run on worker threads; smaller ones inline",
       hint="larger values send more transfers down the synchronous path"),
    # ---- CXL ----------------------------------------------------------------------------------
    _O("MC_CXL_DEV_PATH", str, "", owner="cxl", doc="DAX device (or file) of the CXL window",
       hint="e.g. /dev/dax0.0"),
    _O("MC_CXL_DEV_SIZE", "size", None, range=(1, None), unit="bytes", owner="cxl",
       doc="CXL window size (unset: /sys/bus/dax/devices/<dev>/size)",
       hint="e.g. 68719476736 (64 GiB)"),
    _O("transports/cxl/enable", bool, True, tent="transports/cxl/enable", owner="cxl",
       doc="TENT: enable the CXL transport"),
    # ---- memory (store) ------------------------------------------------------------------------
    _O("MC_STORE_USE_HUGEPAGE", bool, False, owner="store",
       doc="back managed buffers with HugeTLB pages (fail if none)",
       hint="enable to cut TLB misses; reserve pages first (echo 2048 > "
            "/proc/sys/vm/nr_hugepages)"),
    _O("MC_STORE_HUGEPAGE_SIZE", "size", 2 * MiB, choices=(2 * MiB, GiB), unit="bytes",
       owner="store", doc="HugeTLB page size; 2MB/1GB spellings are normalised to bytes",
       hint="optional page size in bytes, e.g. 2097152 (2 MiB)"),
    _O("MC_STORE_MEMCPY", "auto", "auto", owner="store",
       doc="copy same-host transfers locally (auto: when the engine is TCP-only)",
       hint="0 in the high-throughput template"),
    # ---- operations --------------------------------------------------------------------------
    _O("MC_LOG_LEVEL", "enum", "INFO", tent="log_level",
       choices=("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"), doc="log level of mooncake",
       hint="WARNING in the production templates"),
    _O("MC_LOG_DIR", str, "", doc="directory for log files (empty: stderr)"),
    _O("MC_TE_METRIC", bool, False, doc="log throughput periodically",
       hint="1 in the high-throughput template"),
    _O("MC_TE_METRIC_INTERVAL_SECONDS", float, 5.0, range=(0, DAY), min_exclusive=True,
       unit="s", doc="period of the throughput log"),
    _O("MC_TENT_CONF", str, "", owner="tent",
       doc="TENT JSON config: a file path, or inline JSON starting with '{'"),
)

#: Mooncake variables that mooncake deliberately does not read (vendor transports, Store-only,
#: build/diagnostic switches); they are never reported as typos.
KNOWN_UNUSED: frozenset[str] = frozenset({
    "MC_USE_TENT", "MC_USE_TEV1", "MC_HANDSHAKE_PORT", "MC_LEGACY_RPC_PORT_BINDING",
    "MC_MIN_REG_SIZE", "MC_LOG_RDMA_SLICE_AFFINITY", "MC_TRACK_RDMA_POSTED_SLICES",
    "MC_MAX_CONCURRENT_REG_MR", "MC_EFA_NIC_SELECTION", "MC_EFA_CQ_THREADS",
    "MC_MLX5_QP_UDP_SPORTS", "MC_MLX5_QP_LAG_PORT_BALANCE", "MC_FORCE_MNNVL", "MC_FORCE_MUSA",
    "MC_INTRANODE_NVLINK", "MC_DISABLE_HIP", "MC_DISABLE_MACA", "MC_DISABLE_MUSA",
    "MC_TCP_ENABLE_CONNECTION_POOL", "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER",
    "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER", "MC_TCP_ADMISSION_TIMEOUT_MS", "MC_TCP_PROTO",
    "MC_TCP_STATUS_TIMEOUT_SEC", "MC_NUM_TCP_IO_THREADS", "MC_TE_RPC_CLIENT_IO_THREADS",
    "MC_RPC_CLIENT_IO_THREADS", "MC_MMAP_ARENA_POOL_SIZE", "MC_DISABLE_MMAP_ARENA",
})
