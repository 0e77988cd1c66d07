"""The rdma transport's rows of the configuration table (Mooncake's ``MC_*`` RDMA variables
and TENT's ``transports/rdma/...`` keys): data only, read by :mod:`mooncake.transports.rdma`."""

from __future__ import annotations

from mooncake.options import DAY, Option, TiB

_RDMA = "transports/rdma"
_O = Option

OPTIONS: tuple[Option, ...] = (
    # ---- RDMA device ---------------------------------------------------------------------------
    _O("MC_NUM_CQ_PER_CTX", int, 1, tent=f"{_RDMA}/device/num_cq_list", range=(1, 255),
       owner="rdma", doc="completion queues per device",
       hint="raise for more concurrent CQ processing (throughput); TENT default 6, keep equal "
            "to num_workers",
       reads=("transports/rdma.py",)),
    _O("MC_NUM_COMP_CHANNELS_PER_CTX", int, 1, tent=f"{_RDMA}/device/num_comp_channels",
       range=(1, 255), owner="rdma", doc="completion channels per device",
       hint="raise in event-driven setups (latency)",
       reads=("transports/rdma.py",)),
    _O("MC_IB_PORT", int, 1, tent=f"{_RDMA}/device/port", range=(1, 255), owner="rdma",
       doc="HCA port", hint="change when binding a multi-port HCA (connectivity)",
       reads=("transports/rdma.py",)),
    _O("MC_GID_INDEX", int, -1, env=("MC_GID_INDEX", "NCCL_IB_GID_INDEX"),
       tent=f"{_RDMA}/device/gid_index", range=(0, 255), special=((-1, "auto"),), owner="rdma",
       doc="GID index (-1: probe for a RoCEv2 GID)",
       hint="set it explicitly on RoCE (RoCEv2/IPv4 is usually 3 or higher); InfiniBand: 0",
       reads=("transports/rdma.py",)),
    _O("MC_AUTO_GID_MAX_RETRIES", int, 2, range=(0, 16), owner="rdma",
       doc="re-probes of the GID table, 0.5 s apart, when MC_GID_INDEX is auto and no usable "
           "GID is found (e.g. the netdev's address is still being assigned)",
       reads=("transports/rdma.py",)),
    _O("MC_MAX_CQE_PER_CTX", int, 4096, tent=f"{_RDMA}/device/max_cqe", range=(1, 65535),
       owner="rdma", doc="CQ depth; also caps outstanding WRs per device",
       hint="raise under high concurrency; must be at least the sum of max_wr of the QPs on it "
            "(CQ overflow stalls or drops connections); 4096 or more in production, 8192 in the "
            "high-throughput template; raise it when tail latency is high",
       reads=("transports/rdma.py",)),
    _O("MC_MAX_EP_PER_CTX", int, 65536, tent=f"{_RDMA}/endpoint/endpoint_store_cap",
       range=(1, 1 << 20), owner="rdma", doc="endpoint cache capacity per device",
       hint="raise for large clusters, or when the endpoint cache hit rate is low",
       reads=("transports/rdma.py",)),
    _O("MC_NUM_QP_PER_EP", int, 2, tent=f"{_RDMA}/endpoint/qp_mul_factor", range=(1, 255),
       owner="rdma", doc="RC QPs per endpoint (TENT: one per lane)",
       hint="raise for more parallelism per connection; TENT default 6, keep equal to "
            "num_workers",
       reads=("transports/rdma.py",)),
    _O("MC_PKEY_INDEX", int, 0, tent=f"{_RDMA}/endpoint/pkey_index", range=(0, 65535),
       owner="rdma", doc="QP partition key index",
       reads=("transports/rdma.py",)),
    _O("MC_TE_FILTERS", "list", (), tent="topology/rdma_whitelist", owner="rdma",
       doc="use only these RDMA devices (comma-separated)",
       reads=("transports/rdma.py",)),
    _O("MC_TE_FILTERS_EXCLUDE", "list", (), tent="topology/rdma_blacklist", owner="rdma",
       doc="never use these RDMA devices (comma-separated)",
       reads=("transports/rdma.py",)),
    _O("MC_CUSTOM_TOPO_JSON", str, "", tent="topology/custom_json_path", owner="rdma",
       doc="path of a custom NIC priority matrix (JSON: the classic {\"cpu:0\": [[preferred], "
           "[available]]} or TENT's nics/mems/device_list): which local NICs serve a buffer on "
           "each NUMA node, and which NICs the transport opens",
       reads=("transports/rdma.py",)),
    _O("MC_FORCE_HCA", bool, False, owner="rdma", doc="install RDMA even when no HCA is found",
       no_effect="Mooncake needs it where its sysfs topology scan finds no HCA; here discovery "
                 "is ibv_get_device_list itself, so rdma starts whenever verbs lists a device "
                 "and with none there is nothing to open"),
    # ---- RDMA transfer -------------------------------------------------------------------------
    _O("MC_MAX_WR", int, 256, tent=f"{_RDMA}/endpoint/max_qp_wr", range=(1, 65535),
       owner="rdma", doc="send-queue depth per QP (clamped to the device's max_qp_wr)",
       hint="256 suits most loads; 512-1024 for many concurrent small messages (avoids full "
            "send queues); 128-256 for large sequential transfers; too large exhausts HCA "
            "resources",
       reads=("transports/rdma.py",)),
    _O("MC_MAX_SGE", int, 4, tent=f"{_RDMA}/endpoint/max_sge", range=(1, 65535), owner="rdma",
       doc="scatter/gather entries per WR (clamped to the device)",
       hint="raise for scattered memory",
       reads=("transports/rdma.py",)),
    _O("MC_MAX_INLINE", int, 64, tent=f"{_RDMA}/endpoint/max_inline_bytes", range=(0, 65535),
       unit="bytes", owner="rdma", doc="bytes sent inline in a WR",
       hint="may be raised for small messages (small-message latency)",
       reads=("transports/rdma.py",)),
    _O("MC_MTU", int, 4096, tent=f"{_RDMA}/endpoint/path_mtu", choices=(512, 1024, 2048, 4096),
       unit="bytes", owner="rdma", doc="path MTU",
       hint="keep 4096; 2048 under congestion, 1024 on unstable links, 512 on low-bandwidth "
            "links; lower it only after confirming congestion or loss",
       reads=("transports/rdma.py",)),
    _O("MC_MAX_MR_SIZE", "size", TiB, range=(1, None), unit="bytes", owner="rdma",
       doc="largest region one MR may cover (clamped to the device's max_mr_size); a larger "
           "registration is refused",
       reads=("transports/rdma.py",)),
    _O("MC_RDMA_RAIL_PAUSE_SECONDS", int, 30, range=(1, 3599), unit="s", owner="rdma",
       doc="cool-down of a failed local/remote NIC pair (its QPs failed to come up, or its "
           "CQ failed): submits use the other pairs meanwhile, or fail at once if none",
       reads=("transports/rdma.py",)),
    # ---- RDMA advanced ---------------------------------------------------------------------------
    _O("MC_IB_TC", int, -1, tent=f"{_RDMA}/endpoint/traffic_class", range=(0, 255),
       special=((-1, "unset"),), owner="rdma", doc="traffic class of QPs",
       hint="set for multi-tenant QoS, e.g. 106 (DSCP to a high-priority ECN queue on RoCE); "
            "switches need a matching QoS policy",
       reads=("transports/rdma.py",)),
    _O("MC_IB_SL", int, -1, tent=f"{_RDMA}/endpoint/service_level", range=(0, 15),
       special=((-1, "unset"),), owner="rdma",
       doc="service level (IB SL) on every QP's address vector (unset: 0)",
       hint="map transfer-engine traffic to its own lane/queue on IB fabrics with QoS",
       reads=("transports/rdma.py",)),
    _O("MC_RDMA_SPIN_US", int, 1000, range=(0, 10000), unit="µs", owner="rdma",
       doc="a synchronous rdma call of a few slices polls its batch before sleeping: twice "
           "as long as such calls took lately, at most this (mooncake's; 0: never; never on a "
           "thread with one CPU)",
       hint="lower small-transfer latency for a little CPU; 0 on oversubscribed hosts",
       reads=("transports/rdma.py",)),
    _O("MC_IB_PCI_RELAXED_ORDERING", int, 0, choices=(0, 1, 2), owner="rdma",
       doc="PCIe relaxed ordering of MRs: 0 off, 1 on if supported, 2 auto "
           "(Mooncake's code defaults to 1, its tuning guide to 0)",
       hint="GPUDirect: set 1 (or 2 to auto-detect); needs GPU and NIC support (A100/H100 + "
            "ConnectX-6/7 are usually safe); 20-50% more GPUDirect throughput",
       reads=("transports/rdma.py",)),
    _O("MC_ENDPOINT_STORE_TYPE", "enum", "SIEVE", choices=("SIEVE", "FIFO"), owner="rdma",
       doc="endpoint cache eviction policy", hint="FIFO suits uniform access patterns",
       reads=("transports/rdma.py",)),
    _O("MC_ENABLE_DEST_DEVICE_AFFINITY", bool, False, owner="rdma",
       doc="send to the peer NICs on the remote buffer's NUMA node (the peer publishes each "
           "NIC's and each buffer's node); else the peer NIC of the same name",
       hint="enable for NUMA-aware transfers: prefer the device on the target memory's NUMA "
            "node",
       reads=("transports/rdma.py",)),
    _O("MC_ENABLE_HCA_PEER_AFFINITY", bool, False, owner="rdma",
       doc="pick peer NICs from MC_NIC_PEER_AFFINITY (when the peer publishes none of "
           "them: every NIC, with a warning)",
       reads=("transports/rdma.py",)),
    _O("MC_NIC_PEER_AFFINITY", str, "", owner="rdma",
       doc="local-to-peer NIC map: mlx5_0=mlx5_1,mlx5_2;mlx5_1=...",
       reads=("transports/rdma.py",)),
    _O("MC_PATH_ROUNDROBIN", bool, False, owner="rdma",
       doc="round-robin over preferred NICs instead of a random pick",
       hint="enable for large-block transfers to balance bandwidth over paths",
       reads=("transports/rdma.py",)),
    _O("MC_ENABLE_PARALLEL_REG_MR", int, -1, choices=(-1, 0, 1), owner="rdma",
       doc="register MRs on all NICs in parallel: -1 auto, 0 off, 1 on",
       hint="set 1 when registering large memory (registration speed)",
       reads=("transports/rdma.py",)),
    _O("MC_RDMA_BIND_ADDRESS", str, "", tent=f"{_RDMA}/bind_address", owner="rdma",
       doc="RDMA-reachable IP published in NIC paths (default: MC_TCP_BIND_ADDRESS)",
       no_effect="segments publish no RDMA server address: the QP handshake rides the engine's "
                 "RPC port (MC_TCP_BIND_ADDRESS) and RoCE routes by the GIDs each device "
                 "publishes"),
    # ---- TENT RDMA (JSON only) ----------------------------------------------------------------
    _O(f"{_RDMA}/enable", bool, True, tent=f"{_RDMA}/enable", owner="rdma",
       doc="TENT: enable the RDMA transport",
       reads=("mooncake/engine.py::transports/{name}/enable",)),
    _O(f"{_RDMA}/num_lanes", int, None, tent=f"{_RDMA}/num_lanes", range=(1, 64), owner="rdma",
       doc="TENT: one knob for workers = QPs per endpoint = CQs per device (unset: the three "
           "knobs decide)",
       hint="per NIC: 200G 4-6, 400G 6-8, 2x200G bond 6-8; 8x200G: 8-16 (1-2 per NIC)",
       reads=("transports/rdma.py",)),
    _O(f"{_RDMA}/workers/grace_period_ns", int, 5_000_000, tent=f"{_RDMA}/workers/grace_period_ns",
       range=(0, 10**11), unit="ns", owner="rdma",
       reads=("transports/shm.py", "transports/cxl.py", "transports/rdma.py",
              "transports/tcp.py"),
       doc="TENT: how long a worker keeps polling after work last moved before it sleeps "
           "(tcp lane workers, the shm/cxl copy pool, rdma workers)",
       hint="1-5 us for latency-sensitive inference, 5 ms default, 10-50 ms where CPU is scarce; "
            "start at 5 ms and lower it; raise it when CPU usage is high"),
    _O(f"{_RDMA}/max_timeout_ns", int, 10**10, tent=f"{_RDMA}/max_timeout_ns",
       range=(1, DAY * 10**9),
       unit="ns", owner="rdma",
       doc="TENT: a request's deadline when the caller gives none (set: every transport's "
           "batches default to it; unset: MC_TRANSFER_TIMEOUT plus 1 s per GB)",
       hint="5 s (5000000000) in the high-performance TENT template",
       reads=("mooncake/engine.py",)),
    _O(f"{_RDMA}/endpoint/send_timeout", int, 14, tent=f"{_RDMA}/endpoint/send_timeout",
       range=(0, 31), owner="rdma",
       doc="TENT: QP local ACK timeout exponent (4.096 us * 2^v), set at RTR->RTS",
       hint="TENT default 14 (fixed in the classic TE)",
       reads=("transports/rdma.py",)),
    _O(f"{_RDMA}/shared_quota_shm_path", str, "", tent=f"{_RDMA}/shared_quota_shm_path",
       owner="rdma", doc="TENT: POSIX shm name for cross-process bandwidth sharing: the tcp "
                         "lanes and the rdma workers share each NIC through it (the shm/cxl "
                         "copy pool does not join: same-host memory copies use no NIC)",
       hint="set (e.g. mooncake_quota_shm) when several processes on a node share NICs, so they "
            "share bandwidth fairly instead of fighting",
       reads=("mooncake/quota.py",)),
    _O(f"{_RDMA}/workers/rail_topo_path", str, "", tent=f"{_RDMA}/workers/rail_topo_path",
       owner="rdma", doc="TENT: rail topology JSON (allowed and preferred NIC pairs)",
       hint="measured topology for path choice; python -m mooncake.transfer_engine_topology_dump",
       reads=("transports/rdma.py",)),
    _O("topology/cluster_topology_path", str, "", tent="topology/cluster_topology_path",
       owner="rdma", doc="cluster-topology.json whose partition_matchings pick NIC pairs",
       hint="partition_matchings gives the best device pair per NUMA pair ('0-1': src_dev, "
            "dst_dev, bandwidth, latency); mooncake topology generate writes one",
       reads=("transports/rdma.py",)),
)
