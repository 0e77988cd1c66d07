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

Every row declares what it does (``tests/test_options_effect.py`` walks the table):

* ``reads``: the modules that consume it (each is checked to read it: ``cfg["NAME"]``, an alias,
  its TENT path, or the ``path::token`` text of an indirect read);
* ``pending``: why it is not (or, next to ``reads``, not wholly) in effect yet, and which issue
  wires it;
* or ``no_effect`` alone: why it cannot apply here (a Store-only variable...).

``mooncake config show`` prints a declared row's reason ("no effect: ..."), and setting such an
option warns once per process (:class:`mooncake.config.InertOptionWarning`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Option", "OPTIONS", "OWNERS", "KNOWN_UNUSED", "LOG_ROOTS", "METRIC_LOGGER", "KiB",
           "MiB", "GiB", "TiB", "DAY"]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
#: the longest duration any option accepts, in seconds (every timeout, period and lease is
#: bounded: a finite value that fits every OS timeout and every C int of milliseconds)
DAY = 86400
OWNERS = ("engine", "tcp", "rdma", "shm", "cxl", "metadata", "store", "tent")
#: the logger hierarchies ``MC_LOG_LEVEL`` governs: the framework (``mooncake.*``) and the
#: first-party transports (``transports.*``); the engine adds the top-level package of every
#: transport or metadata plugin the ``mooncake`` distribution itself declares
LOG_ROOTS = ("mooncake", "transports")
#: the logger of ``MC_TE_METRIC``'s periodic throughput line: its own level (INFO), so that
#: ``MC_LOG_LEVEL`` does not hide it
METRIC_LOGGER = "mooncake.metrics"


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
    #: the modules that read it, as repository paths (``transports/rdma.py``); an entry
    #: ``path::token`` names the literal text of an indirect read (``transports/{name}/enable``).
    #: ``tests/test_options_effect.py`` checks each one really reads the option.
    reads: tuple[str, ...] = ()
    #: why setting it changes nothing here, although Mooncake has it (a Store-only variable...)
    no_effect: str = ""
    #: why it is not in effect yet, and who will wire it (an open issue)
    pending: str = ""

    def __post_init__(self) -> None:
        if not self.env and "/" not in self.name:
            object.__setattr__(self, "env", (self.name,))
        assert self.owner in OWNERS, self.owner
        assert bool(self.no_effect) != bool(self.reads or self.pending), \
            f"{self.name}: declare reads and/or pending, or no_effect alone"

    @property
    def inert(self) -> bool:
        """Setting it changes nothing here (declared no_effect, or pending with no reader)."""
        return not self.reads

    @property
    def effect(self) -> str:
        """What setting it does, in words: ``read by ...``, ``no effect: ...``, ``not in effect
        yet: ...`` (or both ``read by`` and what is still pending)."""
        if self.no_effect:
            return f"no effect: {self.no_effect}"
        if not self.reads:
            return f"not in effect yet: {self.pending}"
        text = "read by " + ", ".join(r.split("::")[0] for r in self.reads)
        return f"{text}; not in effect yet: {self.pending}" if self.pending else text


_RDMA = "transports/rdma"
_O = Option

OPTIONS: tuple[Option, ...] = (
    # ---- transfer: slicing, retries, timeouts (engine) ---------------------------------------
    _O("MC_SLICE_SIZE", "size", 64 * KiB, tent=f"{_RDMA}/workers/block_size", range=(1, GiB),
       unit="bytes", doc="slice size: the unit one worker moves (one RDMA WRITE/READ)",
       hint="the most important knob: 16-32 KiB for small tensors/latency, 64 KiB for KV cache "
            "(default), 64-128 KiB for mixed load, 256 KiB-1 MiB for weights/bulk; raise it when "
            "throughput is far below line rate",
       reads=("mooncake/transport.py",)),
    _O("MC_FRAGMENT_RATIO", int, 4, range=(1, None),
       doc="a tail of at most slice_size/ratio bytes merges into the previous slice",
       hint="fragment_limit = slice_size / ratio (65536/4 = 16384 by default); a larger ratio "
            "means finer tail fragments: less wasted bandwidth, more WR submissions",
       reads=("mooncake/transport.py",)),
    _O("MC_WORKERS_PER_CTX", int, 2, tent=f"{_RDMA}/workers/num_workers", range=(1, 64),
       doc="worker threads per device (TENT: one per lane)",
       hint="raise to 4-8 for parallelism (costs CPU); match the number of RDMA NICs; TENT "
            "default 6; keep num_workers = num_cq_list = qp_mul_factor; low throughput: raise it",
       reads=("transports/rdma.py", "transports/shm.py", "transports/cxl.py")),
    _O("MC_RETRY_CNT", int, 9, tent=f"{_RDMA}/workers/max_retry_count", range=(1, 127),
       special=((0, "no retries"),),
       doc="re-posts of a failed slice (on another QP or a rebuilt endpoint) before it fails; "
           "TENT's workers/max_retry_count is the same knob",
       hint="raise on unstable networks or when transfers time out often; 5 in the low-latency "
            "template; TENT's default is 8 (the TE's 9 is kept here)",
       reads=("transports/rdma.py",)),
    _O("MC_TRANSFER_TIMEOUT", float, 30.0, range=(0, DAY), min_exclusive=True, unit="s",
       doc="timeout of a synchronous transfer (Mooncake uses max(5, v); we take v as given)",
       reads=("mooncake/engine.py", "transports/tcp.py", "transports/shm.py")),
    _O("MC_SLICE_TIMEOUT", float, -1.0, range=(0, 65535), min_exclusive=True,
       special=((-1, "off"),), unit="s",
       doc="per-slice timeout (rdma): slices in flight on an endpoint that completes nothing "
           "for this long end TIMEOUT, its QPs reset (after failure, silence: each on its "
           "flush); -1 off",
       reads=("transports/rdma.py",)),
    _O("MC_CONN_PAUSE_TTL_MS", int, 0, range=(0, 600000), unit="ms",
       doc="rdma: after a peer was torn down (found gone, or its handshake RPC failed), "
           "refuse to reconnect to it for this long; its slices fail at once (0 = off)",
       reads=("transports/rdma.py",)),
    # ---- control plane: RPC listener and handshakes (engine) ---------------------------------
    _O("MC_MIN_RPC_PORT", int, 15000, env=("MC_MIN_RPC_PORT", "MC_MIN_PRC_PORT"),
       range=(1024, 65535), doc="lowest RPC port (picked at random in [min, max])",
       hint="set the RPC port range for TCP setups (the seed uses the MC_MIN_PRC_PORT alias, "
            "15000)",
       reads=("mooncake/engine.py", "transports/tcp.py")),
    _O("MC_MAX_RPC_PORT", int, 17000, env=("MC_MAX_RPC_PORT", "MC_MAX_PRC_PORT"),
       range=(1024, 65535), doc="highest RPC port",
       hint="set the RPC port range for TCP setups (the seed uses the MC_MAX_PRC_PORT alias, "
            "17000)",
       reads=("mooncake/engine.py", "transports/tcp.py")),
    _O("MC_TCP_BIND_ADDRESS", str, "", doc="IP to bind and advertise (default: first LAN IP)",
       hint="pin the address on multi-homed hosts; for TCP also raise net.core.rmem_max/wmem_max "
            "and net.ipv4.tcp_rmem/tcp_wmem to 16 MiB (sysctl, root)",
       reads=("mooncake/engine.py", "transports/tcp.py")),
    _O("MC_USE_IPV6", bool, False, doc="use IPv6 sockets",
       pending="IPv6 is not implemented: the RPC listener (mooncake/rpc.py bind_first) and the "
               "TCP transport open AF_INET sockets only"),
    _O("MC_HANDSHAKE_MAX_LENGTH", "size", MiB, range=(1, 128 * MiB), unit="bytes",
       doc="largest RPC/handshake frame accepted, and largest descriptor read from a metadata "
           "store",
       reads=("mooncake/engine.py", "mooncake/metadata/base.py")),
    _O("MC_HANDSHAKE_CONNECT_TIMEOUT", float, 5.0, range=(0, 3599), min_exclusive=True, unit="s",
       doc="connect timeout of RPC/handshake connections",
       reads=("mooncake/engine.py", "transports/tcp.py", "transports/rdma.py")),
    _O("MC_HANDSHAKE_LISTEN_BACKLOG", int, 128, range=(1, 65535), doc="RPC listen backlog",
       reads=("mooncake/engine.py",)),
    _O("MC_TENT_RPC_THREADS", int, 4, tent="rpc_server_threads", range=(1, 256),
       doc="threads serving the engine's RPC port",
       hint="like the master's rpc_thread_num: 4 for <10 nodes, 8-16 for 10-100 nodes, 16-32 "
            "for >100 nodes so RPC does not become the bottleneck",
       reads=("mooncake/engine.py",)),
    # ---- TCP transport --------------------------------------------------------------------------
    _O("MC_FORCE_TCP", bool, False, owner="tcp",
       doc="install only the TCP transport (presence alone does not enable it here)",
       hint="use TCP when there is no RDMA, or to force it",
       reads=("mooncake/engine.py",)),
    _O("MC_TCP_SLICE_SIZE", "size", MiB, range=(4 * KiB, 256 * MiB), unit="bytes", owner="tcp",
       doc="slice size of the TCP transport (it does not use MC_SLICE_SIZE)",
       reads=("transports/tcp.py",)),
    _O("MC_TCP_LANES_PER_PEER", int, 4,
       env=("MC_TCP_LANES_PER_PEER", "MC_TCP_MAX_CONNECTIONS_PER_PEER"),
       deprecated=("MC_TCP_MAX_CONNECTIONS_PER_PEER",), range=(1, 16), owner="tcp",
       doc="persistent TCP connections (lanes) per peer",
       reads=("transports/tcp.py",)),
    _O("MC_TCP_SPIN_US", int, 30, range=(0, 10000), unit="µs", owner="tcp",
       doc="a synchronous TCP call polls its socket this long before sleeping, and a target's "
           "serve loop polls as long for the next request after answering one, yielding the "
           "CPU (0: never; never on a thread with one CPU)",
       hint="lower sync latency for a little CPU; 0 on oversubscribed hosts",
       reads=("transports/tcp.py",)),
    _O("transports/tcp/enable", bool, True, tent="transports/tcp/enable", owner="tcp",
       doc="TENT: enable the TCP transport",
       reads=("mooncake/engine.py::transports/{name}/enable",)),
    # ---- metadata ------------------------------------------------------------------------------
    _O("MC_METADATA_CLUSTER_ID", str, "", owner="metadata",
       doc="namespace of metadata keys: mooncake/<id>/ram/<segment>",
       reads=("mooncake/metadata/base.py",)),
    _O("MC_DISABLE_METACACHE", bool, False, owner="metadata",
       doc="do not cache peers' segment descriptors",
       hint="leave it off: slow connection setup often means the metadata cache is disabled",
       reads=("mooncake/engine.py",)),
    _O("MC_TE_METADATA_REFRESH_INTERVAL_SECONDS", float, 0.0, range=(0, DAY), unit="s",
       owner="metadata", doc="refresh cached descriptors in the background (0 = off)",
       reads=("mooncake/engine.py",)),
    _O("MC_METADATA_TTL", float, 10.0, range=(0, DAY), unit="s", owner="metadata",
       doc="lease of a published descriptor in etcd/redis/http, renewed every TTL/3 "
           "(0 = no expiry, no heartbeat; mooncake only)",
       reads=("mooncake/metadata/base.py",)),
    _O("MC_REDIS_USERNAME", str, "", owner="metadata", doc="redis metadata: ACL user name",
       reads=("mooncake/metadata/redis.py",)),
    _O("MC_REDIS_PASSWORD", str, "", owner="metadata", secret=True,
       doc="redis metadata: password",
       reads=("mooncake/metadata/redis.py",)),
    _O("MC_REDIS_DB_INDEX", int, 0, range=(0, 255), owner="metadata",
       doc="redis metadata: database index",
       reads=("mooncake/metadata/redis.py",)),
    _O("MC_REDIS_CA_FILE", str, "", owner="metadata",
       doc="redis metadata over TLS (rediss://): PEM file of the CA that signed the server's "
           "certificate (default: the system's trusted CAs)",
       reads=("mooncake/metadata/redis.py",)),
    _O("MC_REDIS_CERT_FILE", str, "", owner="metadata",
       doc="redis metadata over TLS: client certificate (PEM) for servers that verify "
           "clients (tls-auth-clients yes)",
       reads=("mooncake/metadata/redis.py",)),
    _O("MC_REDIS_KEY_FILE", str, "", owner="metadata",
       doc="redis metadata over TLS: private key of MC_REDIS_CERT_FILE (default: in that file)",
       reads=("mooncake/metadata/redis.py",)),
    _O("MC_METADATA_TOKEN", str, "", owner="metadata", secret=True,
       doc="http metadata: bearer token sent with every request (the server's --token, "
           "--token-file or MC_METADATA_TOKEN); the built-in server reads it too",
       hint="set it on the server and on every engine whenever the metadata port is reachable "
            "from untrusted hosts; without TLS in front it travels in clear text",
       reads=("mooncake/metadata/http.py", "mooncake/metadata/http_server.py")),
    _O("MC_METADATA_OWNER_SECRET", str, "", owner="metadata", secret=True,
       doc="http metadata: the owner secret this engine binds its keys with (16..512 "
           "characters; default: random per engine), so no other client may replace, "
           "refresh or delete them",
       hint="leave it unset; pin it only so a restarted engine with a fixed RPC port reclaims "
            "its key before the old lease ends",
       reads=("mooncake/metadata/http.py",)),
    _O("MC_ETCD_USERNAME", str, "", owner="metadata",
       doc="etcd metadata: user name (etcd auth enabled); with MC_ETCD_PASSWORD",
       reads=("mooncake/metadata/etcd.py",)),
    _O("MC_ETCD_PASSWORD", str, "", owner="metadata", secret=True,
       doc="etcd metadata: password of MC_ETCD_USERNAME",
       reads=("mooncake/metadata/etcd.py",)),
    _O("MC_ETCD_CA_FILE", str, "", owner="metadata",
       doc="etcd metadata over TLS (etcd://https://host:port): PEM file of the CA that signed "
           "etcd's certificate (default: the system's trusted CAs)",
       reads=("mooncake/metadata/etcd.py",)),
    _O("MC_ETCD_CERT_FILE", str, "", owner="metadata",
       doc="etcd metadata over TLS: client certificate (PEM) for --client-cert-auth",
       reads=("mooncake/metadata/etcd.py",)),
    _O("MC_ETCD_KEY_FILE", str, "", owner="metadata",
       doc="etcd metadata over TLS: private key of MC_ETCD_CERT_FILE (default: in that file)",
       reads=("mooncake/metadata/etcd.py",)),
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
       doc="path of a custom NIC priority matrix (JSON)",
       pending="per-buffer NIC choice from a priority matrix is issue 9 (topology, item 3); the "
               "rdma transport uses every device today"),
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
       special=((-1, "unset"),), owner="rdma", doc="service level of QPs",
       pending="needs ah_attr.sl in mooncake/_core/verbs.pyx QP.to_rtr; QoS is issue 9 item 6"),
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
       doc="prefer the peer NIC with the same name as the local one",
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
       pending="lanes are issue 9 item 4; today only the config's consistency check reads it "
               "(set num_workers, num_cq_list and qp_mul_factor instead)"),
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
    _O("MC_SHARED_QUOTA_PRIORITY", str, "foreground_get", tent=f"{_RDMA}/shared_quota_priority",
       doc="this engine's class in the shared quota (its weight): foreground_get (8), "
           "weight_loading (4), migration or checkpoint (2), prefetch (1), or a weight 1..65535",
       hint="give background traffic (prefetch, checkpoints) a lower class than foreground gets",
       reads=("mooncake/quota.py",)),
    _O(f"{_RDMA}/workers/rail_topo_path", str, "", tent=f"{_RDMA}/workers/rail_topo_path",
       owner="rdma", doc="TENT: rail topology JSON (allowed and preferred NIC pairs)",
       hint="measured topology for path choice; python -m mooncake.transfer_engine_topology_dump",
       pending="rail choice from a topology file is issue 9 item 3"),
    _O("topology/cluster_topology_path", str, "", tent="topology/cluster_topology_path",
       owner="rdma", doc="cluster-topology.json whose partition_matchings pick NIC pairs",
       hint="partition_matchings gives the best device pair per NUMA pair ('0-1': src_dev, "
            "dst_dev, bandwidth, latency)",
       pending="partition_matchings is issue 9 items 2-3 (topology generate, choice per buffer)"),
    # ---- security --------------------------------------------------------------------------------
    _O("MC_CLUSTER_TOKEN", str, "", secret=True,
       doc="cluster token: every RPC and tcp data connection proves it (mutual HMAC handshake) "
           "and descriptors are signed with it; engines without it (or with another) are refused",
       hint="set one secret per cluster on every engine whenever the ports are reachable from "
            "untrusted hosts; off (empty) means any process that reaches the ports may read "
            "and write registered memory",
       reads=("mooncake/auth.py",)),
    _O("MC_CLUSTER_TOKEN_FILE", str, "", doc="file holding the cluster token (mode 0600; at "
       "most 4 KiB; surrounding whitespace ignored), instead of MC_CLUSTER_TOKEN",
       reads=("mooncake/auth.py",)),
    _O("MC_MAX_CONNECTIONS", int, 512, range=(1, 1 << 20),
       doc="connections each listener (RPC, tcp data) holds at once; beyond it a newcomer is "
           "refused (RPC: the connection still in its handshake, else the longest idle, is "
           "evicted for it); counted",
       reads=("mooncake/engine.py", "transports/tcp.py")),
    _O("MC_MAX_CONNECTIONS_PER_PEER", int, 128, range=(0, 1 << 20), special=((0, "no limit"),),
       doc="connections one peer address may hold on each listener at once (0: no limit); "
           "beyond it a newcomer is refused and counted",
       hint="raise it when many engines share one host address (each opens "
            "MC_TCP_LANES_PER_PEER data connections per priority class)",
       reads=("mooncake/engine.py", "transports/tcp.py")),
    _O("MC_MAX_NOTIFIES", int, 4096, range=(1, 1 << 24),
       doc="notifications queued for get_notifies() at most; beyond it (or MC_MAX_NOTIFY_BYTES) "
           "a new one is dropped and counted (notifies_dropped)",
       reads=("mooncake/engine.py",)),
    _O("MC_MAX_NOTIFY_BYTES", "size", 16 << 20, range=(1, 1 << 40), unit="bytes",
       doc="bytes of queued notifications at most (names and messages)",
       reads=("mooncake/engine.py",)),
    # ---- SHM -------------------------------------------------------------------------------------
    _O("transports/shm/enable", bool, True, tent="transports/shm/enable", owner="shm",
       doc="TENT: enable the same-host shared-memory transport",
       hint="enable for same-node transfers",
       reads=("transports/shm.py",)),
    _O("transports/shm/async_memcpy_threshold", int, 64,
       tent="transports/shm/async_memcpy_threshold", range=(0, 1 << 20), unit="KiB",
       owner="shm",
       doc="KiB, TENT's unit (its copy transports read value x 1024): a call of at most this "
           "many bytes is copied by the calling thread; a larger synchronous call is split "
           "between the caller and the workers, a larger asynchronous one queued for them",
       hint="larger values keep more transfers on the calling thread (lowest latency, one "
            "core); 0 always involves the workers",
       reads=("transports/shm.py", "transports/cxl.py")),
    # ---- CXL ----------------------------------------------------------------------------------
    _O("MC_CXL_DEV_PATH", str, "", owner="cxl", doc="DAX device (or file) of the CXL window",
       hint="e.g. /dev/dax0.0",
       reads=("transports/cxl.py",)),
    _O("MC_CXL_DEV_SIZE", "size", None, range=(1, None), unit="bytes", owner="cxl",
       doc="CXL window size (unset: /sys/bus/dax/devices/<dev>/size)",
       hint="e.g. 68719476736 (64 GiB)",
       reads=("transports/cxl.py",)),
    _O("transports/cxl/enable", bool, True, tent="transports/cxl/enable", owner="cxl",
       doc="TENT: enable the CXL transport",
       reads=("transports/cxl.py",)),
    # ---- memory (store) ------------------------------------------------------------------------
    _O("MC_STORE_USE_HUGEPAGE", bool, False, owner="store",
       doc="back managed buffers with HugeTLB pages (fail if none)",
       hint="enable to cut TLB misses; reserve pages first (echo 2048 > "
            "/proc/sys/vm/nr_hugepages)",
       reads=("mooncake/engine.py", "mooncake/hugepage.py")),
    _O("MC_STORE_HUGEPAGE_SIZE", "size", 2 * MiB, choices=(2 * MiB, GiB), unit="bytes",
       owner="store", doc="HugeTLB page size; 2MB/1GB spellings are normalised to bytes",
       hint="optional page size in bytes, e.g. 2097152 (2 MiB)",
       reads=("mooncake/hugepage.py",)),
    _O("MC_STORE_MEMCPY", "auto", "auto", owner="store",
       doc="Mooncake Store: copy same-host objects with memcpy instead of the transfer engine "
           "(auto: when the engine is TCP-only)",
       hint="0 in the high-throughput template",
       no_effect="a Mooncake Store client option and there is no Store here; same-host "
                 "transfers of the engine already take shm (or cxl) with protocol='auto'"),
    # ---- operations --------------------------------------------------------------------------
    _O("MC_LOG_LEVEL", "enum", "INFO", tent="log_level",
       choices=("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"),
       doc="level of every mooncake logger: mooncake.* and the transports' (TRACE = DEBUG); "
           "MC_TE_METRIC's line is printed whatever the level",
       hint="WARNING in the production templates",
       reads=("mooncake/engine.py",)),
    _O("MC_LOG_DIR", str, "", doc="directory for log files (empty: stderr): <dir>/mooncake.log",
       reads=("mooncake/engine.py",)),
    _O("MC_TE_METRIC", bool, False,
       doc="print the engine's throughput every MC_TE_METRIC_INTERVAL_SECONDS, whatever "
           "MC_LOG_LEVEL (logger mooncake.metrics; to stderr when logging is not configured)",
       hint="1 in the high-throughput template",
       reads=("mooncake/engine.py",)),
    _O("MC_TE_METRIC_INTERVAL_SECONDS", float, 5.0, range=(0, DAY), min_exclusive=True,
       unit="s", doc="period of the throughput log",
       reads=("mooncake/engine.py",)),
    _O("MC_TENT_CONF", str, "", owner="tent",
       doc="TENT JSON config: a file path, or inline JSON starting with '{'",
       reads=('mooncake/config.py::o.name == "MC_TENT_CONF"',)),
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
