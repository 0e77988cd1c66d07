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

__all__ = ["Option", "CORE_OPTIONS", "OWNERS", "KNOWN_UNUSED", "LOG_ROOTS", "METRIC_LOGGER", "KiB",
           "MiB", "GiB", "TiB", "DAY"]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
#: the longest duration any option accepts, in seconds (every timeout, period and lease is
#: bounded: a finite value that fits every OS timeout and every C int of milliseconds)
DAY = 86400
#: owners of the framework's rows; a transport's rows name the transport
OWNERS = ("engine", "metadata", "store", "tent")
#: the logger hierarchies ``MC_LOG_LEVEL`` governs: the framework and the first-party
#: transports (``mooncake.*``, ``mooncake.transports.*``); the engine adds the top-level package
#: of every transport or metadata plugin the ``mooncake`` distribution itself declares
LOG_ROOTS = ("mooncake",)
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
        assert self.owner and self.owner.isidentifier(), self.owner
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

#: the framework's rows; each transport declares its own (``Transport.options``) and
#: :func:`mooncake.config.all_options` gathers them all
CORE_OPTIONS: tuple[Option, ...] = (
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
    # ---- TENT RDMA (JSON only) ----------------------------------------------------------------
    _O("MC_SHARED_QUOTA_PRIORITY", str, "foreground_get", tent=f"{_RDMA}/shared_quota_priority",
       doc="this engine's class in the shared quota (its weight): foreground_get (8), "
           "weight_loading (4), migration or checkpoint (2), prefetch (1), or a weight 1..65535",
       hint="give background traffic (prefetch, checkpoints) a lower class than foreground gets",
       reads=("mooncake/quota.py",)),
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
       tent="metrics/report_interval_seconds", unit="s", doc="period of the throughput log",
       reads=("mooncake/engine.py",)),
    _O("MC_METRICS_PORT", int, 0, range=(0, 65535),
       doc="serve Prometheus /metrics (TENT's tent_* names) and /health on this port of the "
           "engine's bind address; 0 = off; needs the metrics extra (prometheus_client)",
       reads=("mooncake/engine.py",)),
    _O("metrics/enabled", bool, False, tent="metrics/enabled",
       doc="TENT: serve the Prometheus exporter on metrics/http_port (MC_METRICS_PORT, when set, "
           "wins)", reads=("mooncake/engine.py",)),
    _O("metrics/http_port", int, 9100, tent="metrics/http_port", range=(1, 65535),
       doc="TENT: the exporter's port when metrics/enabled", reads=("mooncake/engine.py",)),
    _O("metrics/http_host", str, "", tent="metrics/http_host",
       doc="TENT: the exporter's address (default: the engine's bind address)",
       reads=("mooncake/engine.py",)),
    _O("metrics/http_server_threads", int, 2, tent="metrics/http_server_threads",
       range=(1, 1024), doc="TENT: threads of its metrics HTTP server",
       no_effect="each scrape is served on a thread of its own (the exporter is a threading "
                 "HTTP server): there is no pool to size"),
    _O("MC_TENT_CONF", str, "", owner="tent",
       doc="TENT JSON config: a file path, or inline JSON starting with '{'",
       reads=('mooncake/config.py::exact["MC_TENT_CONF"]',)),
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
