"""``TransferEngine``: segments, registered memory, batches, transports.

Two faces on one object.  The Mooncake-compatible methods (``initialize``, ``register_memory``,
``transfer_sync_write``...) keep Mooncake's names, argument order and integer return codes; they
live in :class:`mooncake.compat.MooncakeAPI`.  The Pythonic face raises typed exceptions and
accepts arrays and buffers::

    with TransferEngine("127.0.0.1", protocol="tcp") as eng:
        eng.register(buf)
        eng.write("127.0.0.1:15123", buf, remote_addr)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mooncake import quota as _quota
from mooncake._core import batch as _core
from mooncake._core import regions as _regions
from mooncake._core.regions import RegionTable, first_outside
from mooncake.auth import is_loopback, open_auth
from mooncake.batch import Status, TaskStatus, TransferBatch, settle
from mooncake.compat import MooncakeAPI, TransferNotify, TransferOpcode
from mooncake.config import Config, load_config
from mooncake.errors import (
    ConfigError,
    InvalidAddress,
    InvalidBatch,
    MooncakeError,
    PeerUnreachable,
    SegmentNotFound,
    TransferFailed,
    TransferTimeout,
    TransportUnavailable,
)
from mooncake.memory import ManagedBuffer, allocate_shm, buffer_info
from mooncake.metadata.base import MetadataContext, parse_metadata_server
from mooncake.metrics import EngineMeters
from mooncake.registry import get_metadata, get_transport, transport_classes, transport_names
from mooncake.rpc import RpcClient, RpcServer, port_candidates
from mooncake.segments import SegmentCache, host_identity
from mooncake.transport import Region, SegmentDesc, Transport, TransportContext, memory_kind

__all__ = ["TransferEngine", "TransferNotify", "TransferOpcode", "Status", "TaskStatus"]

log = logging.getLogger("mooncake.engine")

OPS = {"read": 0, "write": 1, 0: 0, 1: 1}
E_PEER = _core.E_PEER
E_CLOSED = _core.E_CLOSED
E_REFUSED = _core.E_REFUSED
MAX_LENGTH = 1 << 48
MAX_TIMEOUT = 86400.0


class TransferEngine(MooncakeAPI):
    """A transfer engine: one segment (``host:rpc_port``), its memory and its transports.

    ``TransferEngine()`` then :meth:`initialize` (Mooncake style), or
    ``TransferEngine(local_hostname, metadata="p2p", protocol="auto", **config)`` which starts at
    once and raises on failure.  ``config`` keys are option names (``slice_size=...`` or
    ``MC_SLICE_SIZE=...``) and win over the environment.
    """

    #: seconds a route chosen while a preferred transport could not reach the peer is kept
    #: before the preferred one is asked again (a failover is not forever)
    ROUTE_RECHECK_S: float = 5.0

    def __init__(self, local_hostname: str | None = None, metadata: str = "P2PHANDSHAKE",
                 protocol: str = "auto", device_name: str = "", **config: Any) -> None:
        self._started = False
        self._closed = False
        self._overrides = config
        self._lock = threading.RLock()
        self.config: Config | None = None
        if local_hostname is not None:
            self.start(local_hostname, metadata, protocol, device_name)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, local_hostname: str, metadata: str = "P2PHANDSHAKE", protocol: str = "auto",
              device_name: str = "") -> None:
        """Bind the RPC port, start the transports and publish the segment."""
        if self._started:
            raise MooncakeError("engine already initialized")
        cfg = self.config = load_config(self._overrides)
        _set_log_level(cfg["MC_LOG_LEVEL"], cfg["MC_LOG_DIR"])
        host, port = _split_host(local_hostname)
        bind = cfg["MC_TCP_BIND_ADDRESS"] or _resolve(host)
        self.protocol = (protocol or "auto").lower()
        self.device_name = device_name or ""
        self.host_id = host_identity()
        self.regions = RegionTable()
        self._regions: dict[int, Region] = {}
        self._managed: dict[int, ManagedBuffer] = {}
        self._batches: dict[int, TransferBatch] = {}
        self._next_batch = 1
        self._notifies: list[TransferNotify] = []
        self._notify_bytes = 0
        self.notifies_dropped = 0
        self._max_notifies = cfg["MC_MAX_NOTIFIES"]
        self._max_notify_bytes = cfg["MC_MAX_NOTIFY_BYTES"]
        self._stuck: dict[int, Region] = {}  # unregistered while something still held them
        #: segment -> (transport, the descriptor's timestamp, look again after: monotonic)
        self._routes: dict[str, tuple[Transport, float, float]] = {}
        #: segment -> the transport of a route dropped after a failure (for the failover log)
        self._was_routed: dict[str, str] = {}
        self._warned: set[str] = set()
        self._kinds: set[str] = set()  # memory kinds registered here ("cpu", "cuda", ...)
        #: transfer counters, kept in C per (transport, peer) (mooncake.metrics)
        self.meters = EngineMeters()
        self._metrics_server = None
        self._timeout = float(cfg["MC_TRANSFER_TIMEOUT"])
        # TENT's per-request deadline, when configured
        self._default_deadline = cfg["transports/rdma/max_timeout_ns"] / 1e9 \
            if cfg.source("transports/rdma/max_timeout_ns") != "default" else 0.0
        #: the cluster token (MC_CLUSTER_TOKEN): every connection proves it, descriptors carry it
        self.auth = open_auth(cfg)
        self._rpc_client = RpcClient(cfg["MC_HANDSHAKE_MAX_LENGTH"],
                                     float(cfg["MC_HANDSHAKE_CONNECT_TIMEOUT"]), self.auth)
        ports = [port] if port is not None else port_candidates(cfg["MC_MIN_RPC_PORT"],
                                                                 cfg["MC_MAX_RPC_PORT"])
        self._rpc = RpcServer(bind, ports, cfg["MC_HANDSHAKE_MAX_LENGTH"],
                              backlog=cfg["MC_HANDSHAKE_LISTEN_BACKLOG"],
                              frame_timeout=self._timeout, workers=cfg["MC_TENT_RPC_THREADS"],
                              auth=self.auth,
                              handshake_timeout=float(cfg["MC_HANDSHAKE_CONNECT_TIMEOUT"]),
                              max_connections=cfg["MC_MAX_CONNECTIONS"],
                              max_per_peer=cfg["MC_MAX_CONNECTIONS_PER_PEER"])
        try:
            self.segment_name = f"{host}:{self._rpc.port}"
            self._rpc.add_handler("segment.describe", lambda args: self.describe())
            self._rpc.add_handler("notify", self._on_notify)
            self._rpc.add_handler("probe", lambda args: {"segment": self.segment_name})
            scheme, addr = parse_metadata_server(metadata)
            store_cls = get_metadata(scheme)
            self.metadata = store_cls(addr, MetadataContext(cfg, self._rpc_call))
            self._segments = SegmentCache(
                self.metadata.fetch, enabled=not cfg["MC_DISABLE_METACACHE"],
                refresh_interval=float(cfg["MC_TE_METADATA_REFRESH_INTERVAL_SECONDS"]),
                verify=self.auth.verify)
            ctx = TransportContext(cfg, self.segment_name, bind, self.host_id, self.regions,
                                   self._rpc.add_handler, self._rpc_call, self.device_name,
                                   self.auth)
            self.transports = self._start_transports(ctx)
            self._segments.schemas = {n: (t.segment_fields, t.buffer_fields)
                                      for n, t in self.transports.items()}
            self._started = True
            port = cfg["MC_METRICS_PORT"] or (cfg["metrics/http_port"] if
                                              cfg["metrics/enabled"] else 0)
            if port:  # MC_METRICS_PORT, or TENT's metrics/enabled + http_port (+ http_host)
                from mooncake.metrics import start_exporter

                mc = bool(cfg["MC_METRICS_PORT"])
                host = bind if mc else cfg["metrics/http_host"] or bind
                self._metrics_server = start_exporter(
                    self, host, port, "MC_METRICS_PORT" if mc else "metrics/http_port")
            self._publish()
        except BaseException:
            self._shutdown()
            raise
        if cfg["MC_TE_METRIC"]:
            threading.Thread(target=self._metric_loop, daemon=True, name="mc-metric").start()
        log.info("engine %s up: transports %s, metadata %s", self.segment_name,
                 ", ".join(self.transports), scheme)
        if not self.auth.enabled and not is_loopback(bind):
            _warn_open_once(bind)

    def _start_transports(self, ctx: TransportContext) -> dict[str, Transport]:
        cfg = ctx.config
        if self.protocol not in ("auto", ""):
            wanted = [self.protocol]
        else:  # a transport's own switch (MC_FORCE_TCP) may make it the only one
            classes = transport_classes()
            wanted = [n for n, cls in classes.items() if cls.forced_by and cfg[cls.forced_by]] \
                or transport_names()
        out: dict[str, Transport] = {}
        for name in wanted:
            explicit = name == self.protocol
            try:
                if not explicit and not _enabled(cfg, name):
                    log.debug("transport %s disabled by configuration", name)
                    continue
                t = get_transport(name)(ctx)
                t.transport_fields = t.start()  # type: ignore[attr-defined]
            except Exception as e:
                if explicit:
                    if isinstance(e, TransportUnavailable):
                        raise
                    raise TransportUnavailable(f"transport {name!r} failed to start: {e}") from e
                log.debug("transport %s not used: %s", name, e)
                continue
            out[name] = t
        if not out:
            raise TransportUnavailable("no transport could start (see `mooncake transports`)")
        return dict(sorted(out.items(), key=lambda kv: kv[1].auto_priority))

    def close(self) -> None:
        """Remove our descriptor, stop transports and the RPC listener, free managed buffers.

        Work in flight ends FAILED ("the engine was closed"); this returns once no worker can
        touch registered memory any more."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        try:
            self.metadata.remove(self.segment_name)
        except Exception as e:
            log.debug("removing descriptor failed: %s", e)
        self._shutdown()

    def _shutdown(self) -> None:
        if getattr(self, "_metrics_server", None) is not None:
            self._metrics_server.close()
            self._metrics_server = None
        # Batches are cancelled before their memory is revoked, so what is in flight ends with
        # the reason "closed", not "unregistered"; again after, for one submitted meanwhile.
        self._cancel_batches(E_CLOSED)
        regions = list(getattr(self, "_regions", {}).values())
        for r in regions:
            r.handle.revoke()
        self._cancel_batches(E_CLOSED)
        for t in getattr(self, "transports", {}).values():
            try:
                t.close()
            except Exception as e:
                log.warning("closing transport %s: %s", t.name, e)
        if getattr(self, "metadata", None) is not None:
            try:
                self.metadata.close()
            except Exception as e:
                log.debug("closing metadata store: %s", e)
        if getattr(self, "_rpc", None) is not None:
            self._rpc.close()
            self._rpc_client.close()
        held = set()
        for r in regions:
            if r.handle.release(self._timeout):
                r.owner = None
            else:
                held.add(r.addr)
                log.error("close: 0x%x is still held by %d transfers after %ss; its memory is "
                          "left allocated", r.addr, r.handle.pins, self._timeout)
        self._regions = {}
        for addr, m in list(getattr(self, "_managed", {}).items()):
            if addr not in held and addr not in getattr(self, "_stuck", {}):
                m.close()
        self._managed = {}

    def _cancel_batches(self, code: int) -> None:
        for b in list(getattr(self, "_batches", {}).values()):
            b.core.cancel(code)

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._started and not self._closed:
                self.close()
        except Exception:
            pass

    # -- descriptor / metadata ----------------------------------------------------------------

    def describe(self) -> dict:
        """Our segment descriptor (what peers fetch)."""
        with self._lock:
            bufs = [r.describe() for r in sorted(self._regions.values(), key=lambda r: r.addr)
                    if r.flags & _regions.REMOTE_READ]  # 'local' regions are not published
        return self.auth.sign({
            "name": self.segment_name,
            "protocol": self.protocol,
            "host_id": self.host_id,
            "pid": os.getpid(),
            "timestamp": time.time(),
            "transports": {n: t.transport_fields for n, t in self.transports.items()},
            "buffers": bufs,
        })

    def _publish(self) -> None:
        if self._started:
            self.metadata.publish(self.segment_name, self.describe())

    def _rpc_call(self, segment: str, method: str, args: dict | None = None,
                  timeout: float = 10.0) -> Any:
        return self._rpc_client.call(segment, method, args, timeout)

    def segment(self, name: str, refresh: bool = False) -> SegmentDesc:
        """A peer's descriptor (cached; ``refresh`` refetches)."""
        self._check_started()
        return self._segments.get(name, refresh).desc

    def _peer(self, name: str):
        try:
            return self._segments.get(name)
        except PeerUnreachable as e:
            raise SegmentNotFound(f"segment {name!r} cannot be reached: {e}") from None

    # -- memory -------------------------------------------------------------------------------

    def register(self, obj: Any, length: int | None = None, location: str = "*",
                 access: str = "auto") -> Region:
        """Register memory: an int address (with ``length``) or a NumPy/CuPy array or buffer.

        The registration holds the object's buffer export until :meth:`unregister` (a
        registered ``bytearray`` cannot be resized meanwhile).  ``access`` (TENT's
        permissions): ``"rw"`` (remote read-write: local READs and peers' WRITEs may land in
        it), ``"ro"`` (remote read-only: a WRITE source and a READ target for peers only),
        ``"local"`` (not published: only this engine's own transfers use it; every target
        refuses peers' requests for it), or ``"auto"``: ``"ro"`` for read-only memory
        (``bytes``, a read-only array, a ``PROT_READ`` mapping), else ``"rw"``.  Returns the
        :class:`Region`.
        """
        self._check_started()
        flags = _access_flags(access)
        owner = None
        if isinstance(obj, int) and not isinstance(obj, bool):
            if length is None:
                raise InvalidAddress("register(addr, length): length is required for an address")
            addr, nbytes, loc = obj, length, "cpu:0"
        else:
            addr, nbytes, loc = buffer_info(obj)
            owner = obj
            if length is not None:
                if type(length) is not int or not 0 < length <= nbytes:
                    raise InvalidAddress(f"length {length!r} outside the buffer's {nbytes} bytes")
                nbytes = length
        return self._register(addr, nbytes, loc if location in ("*", "", None) else location,
                              owner, flags=flags)

    def _register(self, addr: int, length: int, location: str, owner: Any = None,
                  shm_name: str | None = None, publish: bool = True,
                  flags: int | None = None) -> Region:
        if type(addr) is not int or not 0 < addr < 2**64:
            raise InvalidAddress(f"address must be a positive int below 2**64, got {addr!r}")
        if type(length) is not int or not 0 < length <= MAX_LENGTH:
            raise InvalidAddress(f"length must be an int in 1..2**48, got {length!r}")
        if type(location) is not str or not location:
            raise InvalidAddress(f"location must be a string like 'cpu:0', got {location!r}")
        strict = flags is not None  # the caller chose; "auto" (None) follows the memory
        flags = _regions.ALL if flags is None else flags
        if memory_kind(location) == "cpu" and owner is None:
            flags = _check_mapped(addr, length, flags, strict)
        try:
            handle = self.regions.register(addr, length, flags, owner)
        except (BufferError, ValueError, TypeError) as e:
            if flags == _regions.READ_ONLY or not _read_only(owner):
                raise InvalidAddress(f"cannot register 0x{addr:x}+{length}: {e}") from None
            if strict:
                raise InvalidAddress(
                    f"cannot register 0x{addr:x}+{length} read-write: the buffer is read-only "
                    "(register it with access='ro': a WRITE source or a READ target for peers)"
                ) from None
            flags = _regions.READ_ONLY
            try:
                handle = self.regions.register(addr, length, flags, owner)
            except (BufferError, ValueError, TypeError) as e2:
                raise InvalidAddress(f"cannot register 0x{addr:x}+{length}: {e2}") from None
        region = Region(addr, length, location, shm_name, owner, flags=flags, handle=handle)
        try:
            for name, t in self.transports.items():
                try:
                    fields = t.register(region)
                except OSError as e:  # memlock, ENOMEM, a mapping the NIC cannot pin...
                    raise MooncakeError(
                        f"cannot register 0x{addr:x}+{length} with {name}: {e}" + _hint(e)
                    ) from e
                if fields:
                    region.fields[name] = fields
        except BaseException:
            handle.release(self._timeout)
            for t in self.transports.values():  # best-effort rollback; the first error wins
                try:
                    t.unregister(region)
                except Exception as e:
                    log.debug("rollback: %s.unregister(0x%x): %s", t.name, addr, e)
            raise
        with self._lock:
            self._regions[addr] = region
            self._kinds = {memory_kind(r.location) for r in self._regions.values()}
        if publish:
            self._publish()
        return region

    def unregister(self, obj: Any, publish: bool = True) -> None:
        """Unregister memory by address, buffer object or :class:`Region`.

        Work in flight that touches the region is failed (its tasks end FAILED, "unregistered
        while in flight"; peers' requests are refused); this returns only once no worker and no
        peer request can touch the memory any more (waiting up to ``MC_TRANSFER_TIMEOUT``).
        """
        self._check_started()
        if isinstance(obj, Region):
            addr = obj.addr
        elif isinstance(obj, int) and not isinstance(obj, bool):
            addr = obj
        else:
            addr = buffer_info(obj)[0]
        with self._lock:
            region = self._regions.pop(addr, None)
            self._kinds = {memory_kind(r.location) for r in self._regions.values()}
        if region is None:
            raise InvalidAddress(f"{addr!r} is not the start of a registered region")
        self._retire_region(region)
        if publish:
            self._publish()

    def _retire_region(self, region: Region) -> None:
        """Revoke, wait for every pin, let each transport let go, drop the buffer export."""
        h = region.handle
        h.revoke()
        if not h.wait_idle(self._timeout):
            self._stuck[region.addr] = region  # keep the memory alive: something still holds it
            raise TransferTimeout(f"unregister 0x{region.addr:x}: {h.pins} transfers still hold "
                                  f"the region after {self._timeout}s; it stays allocated")
        for t in self.transports.values():
            try:
                t.unregister(region)
            except Exception as e:  # a peer still inside a copy, an MR that would not go:
                self._stuck[region.addr] = region  # the memory must stay allocated
                if isinstance(e, MooncakeError):
                    raise
                raise MooncakeError(f"unregister 0x{region.addr:x}: {t.name}: {e}; the memory "
                                    "stays allocated") from e
        h.release(0.0)
        region.owner = None

    def allocate(self, length: int) -> ManagedBuffer:
        """Allocate and register a shm-backed buffer that same-host peers can map by name."""
        self._check_started()
        if type(length) is not int or not 0 < length <= MAX_LENGTH:
            raise InvalidAddress(f"managed buffer length must be an int in 1..2**48, got "
                                 f"{length!r}")
        try:
            if self.config["MC_STORE_USE_HUGEPAGE"]:
                from mooncake import hugepage

                mb = hugepage.allocate(length, self.config)
            else:
                mb = allocate_shm(length)
        except OSError as e:
            raise MooncakeError(f"cannot allocate a {length}-byte buffer: {e}") from None
        try:
            self._register(mb.addr, mb.length, "cpu:0", mb.mm, mb.shm_name)
        except BaseException:
            mb.close()
            raise
        self._managed[mb.addr] = mb
        return mb

    def free(self, addr: int) -> None:
        """Unregister and free a managed buffer (see :meth:`unregister` for work in flight)."""
        mb = self._managed.get(addr) if type(addr) is int else None
        if mb is None:
            raise InvalidAddress(f"{addr!r} is not a managed buffer of this engine")
        self.unregister(addr)
        del self._managed[addr]
        mb.close()

    # -- routing ------------------------------------------------------------------------------

    def _route(self, peer: SegmentDesc) -> Transport:
        hit = self._routes.get(peer.name)
        if hit is not None and hit[1] == peer.timestamp and \
                (hit[2] == _FOREVER or hit[2] > time.monotonic()):
            return hit[0]
        info = self.explain_desc(peer)
        chosen = info["chosen"]
        if chosen is None:
            raise TransportUnavailable(info["reason"])
        log.debug("segment %s via %s (%s)", peer.name, chosen, info["candidates"])
        before = hit[0].name if hit is not None else self._was_routed.pop(peer.name, None)
        if before is not None and before != chosen:  # a failover, or back after one
            why = "; ".join(f"{c['transport']}: {c['reason']}" for c in info["candidates"]
                            if not c["reachable"])
            log.warning("segment %s: now via %s instead of %s (%s)", peer.name, chosen,
                        before, why or "it is preferred again")
        if peer.host_id == self.host_id and peer.name not in self._warned:
            for c in info["candidates"]:  # a same-host path that should have worked did not
                t = self.transports[c["transport"]]
                if c["transport"] == chosen:
                    break
                if getattr(t, "same_host_only", False) and not c["reachable"]:
                    self._warned.add(peer.name)
                    log.warning("segment %s is on this host but %s cannot reach it (%s); "
                                "using %s", peer.name, c["transport"], c["reason"], chosen)
        t = self.transports[chosen]
        # a route chosen while a preferred transport could not reach the peer (every RDMA
        # rail paused...) is looked at again after ROUTE_RECHECK_S: back once it can
        fallback = any(not c["reachable"] and c["priority"] < t.auto_priority
                       for c in info["candidates"])
        until = time.monotonic() + self.ROUTE_RECHECK_S if fallback else _FOREVER
        self._routes[peer.name] = (t, peer.timestamp, until)
        return t

    def explain(self, segment: str, local: int | None = None, remote: int | None = None) -> dict:
        """Which transport a transfer to ``segment`` uses, why each other one does not, and
        (``path``) how the chosen one would move a transfer from ``local`` to ``remote``
        (addresses; default: the first registered buffer on each side): e.g. the NIC pairs
        rdma stripes over and why."""
        out = self.explain_desc(self._peer(segment).desc)
        chosen = self.transports.get(out["chosen"] or "")
        if chosen is not None:
            out["path"] = chosen.explain(self._peer(segment).desc, local, remote)
        return out

    def explain_desc(self, peer: SegmentDesc) -> dict:
        cands = []
        for name, t in self.transports.items():
            why = t.can_reach(peer)
            cands.append({"transport": name, "priority": t.auto_priority,
                          "reachable": why is None, "reason": why or "ok"})
        ok = [c["transport"] for c in cands if c["reachable"]]
        if self.protocol not in ("auto", ""):
            c = cands[0]
            chosen = c["transport"] if c["reachable"] else None
            reason = (f"protocol {self.protocol!r} cannot reach segment {peer.name!r}: "
                      f"{c['reason']}")
        else:
            chosen = ok[0] if ok else None
            reason = f"no transport reaches segment {peer.name!r}: " + "; ".join(
                f"{c['transport']}: {c['reason']}" for c in cands)
        return {"segment": peer.name, "protocol": self.protocol, "chosen": chosen,
                "reason": "ok" if chosen else reason, "candidates": cands}

    # -- transfers ----------------------------------------------------------------------------

    def _validate(self, segment: str, op: Any, local: Any, remote: Any, length: Any,
                  timeout: float | None = None, deadline: float | None = None,
                  priority: str | int | None = None):
        """The one validator of a transfer: ``(peer, transport, core batch, slices, timeout)``.

        Checks the opcode, the request arrays, the timeout, that every local range lies in one
        registered region (writable for a READ: the task pins it), that every remote range lies
        in a buffer the peer published (writable for a WRITE), and that the chosen transport can
        move both kinds of memory.  Raises :class:`InvalidAddress` (or ``ConfigError`` for the
        timeout or the priority) naming the first bad request.
        """
        if not self._started or self._closed:
            self._check_started()
        try:
            opc = OPS[op]
        except (KeyError, TypeError):
            raise InvalidAddress(f"op must be 'read' or 'write' (or 0/1), got {op!r}") from None
        tmo = None if timeout is None else _check_timeout(timeout)
        weight = 0 if priority is None else _priority_weight(priority)
        expired = False
        if deadline is not None:
            left = _check_deadline(deadline) - time.monotonic()
            expired = left <= 0
            tmo = max(left, 1e-3) if tmo is None else min(tmo, max(left, 1e-3))
        one = (type(local) is tuple and len(local) == 1 and type(local[0]) is int and
               type(remote) is tuple and len(remote) == 1 and type(remote[0]) is int and
               type(length) is tuple and len(length) == 1 and type(length[0]) is int)
        if one:
            la, ra, n = local[0], remote[0], length[0]
            one = 0 < n <= MAX_LENGTH and 0 <= la < 2**64 and 0 <= ra < 2**64
        if one:
            entry = self._peer(segment)
            if not entry.table.contains(ra, n):
                entry = self._segments.get(segment, refresh=True)
                _check_remote(entry, segment, opc, (ra,), (n,))
            elif opc == OPS["write"] and entry.read_only:
                _check_remote(entry, segment, opc, (ra,), (n,))
            peer = entry.desc
            t = self._route(peer)
            self._check_kinds(t, entry, (la,), (ra,), (n,))
            core = _core.Batch(1)
            meter = self.meters.get(t.name, peer.name)  # the kernel counts each task there
            try:
                slices = _core.slice_one(core, opc, la, ra, n, t.slice_size, t.fragment_ratio,
                                         self.regions, meter)
            except _core.SliceError as e:
                raise InvalidAddress(str(e)) from None
            total = n
        else:
            try:
                cnt = len(local), len(remote), len(length)
            except TypeError:
                raise InvalidAddress("local addresses, peer addresses and lengths must be "
                                     "sequences of ints") from None
            if not cnt[0] == cnt[1] == cnt[2]:
                raise InvalidAddress(f"buffers, peer addresses and lengths differ in length "
                                     f"({cnt[0]}, {cnt[1]}, {cnt[2]})")
            if cnt[0] == 0:
                raise InvalidAddress("empty batch: give at least one request")
            if cnt[0] >= 2**32:
                raise InvalidAddress(f"a batch holds at most 2**32-1 requests, got {cnt[0]}")
            length = _u64_array(length, "length", 1, MAX_LENGTH)
            local = _u64_array(local, "local address", 0, 2**64 - 1)
            remote = _u64_array(remote, "remote address", 0, 2**64 - 1)
            _check_ends(local, length, "local")
            _check_ends(remote, length, "remote")
            entry = self._peer(segment)
            if first_outside(entry.table, remote, length) >= 0:
                entry = self._segments.get(segment, refresh=True)  # it may have registered more
            _check_remote(entry, segment, opc, remote, length)
            peer = entry.desc
            t = self._route(peer)
            self._check_kinds(t, entry, local, remote, length)
            core = _core.Batch(cnt[0])
            meter = self.meters.get(t.name, peer.name)
            try:
                slices = _core.slice_requests(core, opc, local, remote, length, t.slice_size,
                                              t.fragment_ratio, self.regions, meter=meter)
            except _core.SliceError as e:
                raise InvalidAddress(str(e)) from None
            total = int(length.sum())
        if tmo is None:
            tmo = self._default_deadline if self._default_deadline else \
                self._timeout + total / 1e9
        if expired:  # past its deadline before it started: every task ends TIMEOUT, untouched
            core.cancel(_core.E_TIMEOUT)
            meter.count_infeasible()
        core.total_bytes = total
        core.priority = weight
        return peer, t, core, slices, tmo

    def transfer(self, segment: str, op: Any, local: Sequence[int], remote: Sequence[int],
                 length: Sequence[int], timeout: float | None = None, *,
                 deadline: float | None = None, priority: str | int | None = None) -> None:
        """Run a batch to completion; raises :class:`TransferFailed` if any request failed.

        ``timeout`` (seconds) or ``deadline`` (a ``time.monotonic()`` instant) bounds it; tasks
        past it end TIMEOUT.  Neither: TENT's ``max_timeout_ns`` when it was configured, else
        ``MC_TRANSFER_TIMEOUT`` plus one second per GB.

        ``priority``: the batch's class in the shared bandwidth quota (TENT's intents:
        ``foreground_get``, ``weight_loading``, ``migration``, ``checkpoint``, ``prefetch``, or
        a weight 1..65535); default the engine's ``MC_SHARED_QUOTA_PRIORITY``.  Under contention
        for a NIC, classes get bytes in proportion to their weights; alone, any class gets the
        whole link.  Without ``shared_quota_shm_path`` it changes nothing.

        When the connection to the peer is lost (it restarted, say), the descriptor is fetched
        again and the batch is retried once: READ and WRITE are idempotent.  After this raises,
        no byte of the batch lands in local memory any more.
        """
        try:
            return self._transfer(segment, op, local, remote, length, timeout, deadline,
                                  priority)
        except (TransferFailed, PeerUnreachable) as e:
            codes = {s.code for s in e.statuses} if isinstance(e, TransferFailed) else {E_PEER}
            if isinstance(e, TransferTimeout) or not codes & {E_PEER, E_REFUSED}:
                raise
            used = self._segments.cached(segment)
            route = self._routes.get(segment)
            failed = getattr(e, "transport", None) or (route and route[0].name)
            if E_PEER in codes:
                self._forget_peer(segment)
            try:  # is it back (restarted), or did it re-register that memory?
                fresh = self._segments.get(segment, refresh=True)
            except (SegmentNotFound, PeerUnreachable):
                raise e from None
            if E_PEER not in codes and used is not None and \
                    _buffers_of(fresh.desc) == _buffers_of(used.desc):
                raise  # refused by a peer whose registrations did not change: a real refusal
            log.info("segment %s: %s; retrying once on a fresh descriptor", segment,
                     "connection lost" if E_PEER in codes else "range refused by a stale "
                     "descriptor")
            try:
                return self._transfer(segment, op, local, remote, length, timeout, deadline,
                                      priority)
            finally:  # the fresh route may be another transport: a failover
                now = self._routes.get(segment)
                self.meters.failover(failed, now and now[0].name)

    def _transfer(self, segment: str, op: Any, local: Sequence[int], remote: Sequence[int],
                  length: Sequence[int], timeout: float | None,
                  deadline: float | None = None, priority: str | int | None = None) -> None:
        peer, t, core, slices, tmo = self._validate_counted(segment, op, local, remote, length,
                                                            timeout, deadline, priority)
        in_time = t.transfer(peer, slices, tmo)
        if in_time and core.first_not_completed() < 0:
            return
        if not in_time:
            settle(core, t, peer)
        b = TransferBatch(core, peer, t, 0.0)
        try:
            b.wait()
        except MooncakeError as e:
            self._after_failure(peer, b)
            e.transport = t.name  # type: ignore[attr-defined]  # a retry elsewhere: a failover
            raise

    def _check_kinds(self, t: Transport, entry, local, remote, length) -> None:
        """TransportUnavailable when a range is memory ``t`` cannot move (e.g. CUDA over tcp)."""
        if self._kinds <= t.memory_kinds and entry.kinds <= t.memory_kinds:
            return
        for i, (a, r, n) in enumerate(zip(local, remote, length, strict=True)):
            lk = memory_kind(next((x.location for x in self._regions.values()
                                   if x.contains(int(a), int(n))), "cpu"))
            buf = entry.desc.find_buffer(int(r), int(n))
            rk = memory_kind(buf.location if buf else "cpu")
            for side, kind in (("local", lk), ("remote", rk)):
                if kind not in t.memory_kinds:
                    raise TransportUnavailable(
                        f"request {i}: transport {t.name!r} cannot move {kind} memory ({side} "
                        f"range); it moves {', '.join(sorted(t.memory_kinds))}")

    def submit(self, segment: str, op: Any, local: Sequence[int], remote: Sequence[int],
               length: Sequence[int], timeout: float | None = None, *,
               deadline: float | None = None,
               priority: str | int | None = None) -> TransferBatch:
        """Start a batch and return at once; ``wait()`` it, ``await`` it or poll its status.
        ``timeout``/``deadline``/``priority`` as for :meth:`transfer`: past the deadline the
        batch's unfinished tasks end TIMEOUT, and no byte of them lands afterwards."""
        peer, t, core, slices, tmo = self._validate_counted(segment, op, local, remote, length,
                                                            timeout, deadline, priority)
        b = TransferBatch(core, peer, t, tmo, on_close=self._forget_batch)
        try:
            t.submit(peer, slices)
        except PeerUnreachable:
            self._forget_peer(segment)
            raise
        with self._lock:
            b.id = self._next_batch
            self._next_batch += 1
            self._batches[b.id] = b
        return b

    def batch(self, batch_id: int) -> TransferBatch:
        """The batch with this id; :class:`InvalidBatch` for an id never issued or freed."""
        b = self._batches.get(batch_id) if type(batch_id) is int else None
        if b is None:
            raise InvalidBatch(f"unknown batch id {batch_id!r} (never issued by this engine, "
                               "or already freed)")
        return b

    def _forget_batch(self, b: TransferBatch) -> None:
        with self._lock:
            self._batches.pop(getattr(b, "id", None), None)

    def _validate_counted(self, segment: str, op: Any, local: Any, remote: Any, length: Any,
                          timeout: float | None, deadline: float | None,
                          priority: str | int | None):
        """:meth:`_validate`, counting what it refuses (metrics: transport ``unspec``)."""
        try:
            return self._validate(segment, op, local, remote, length, timeout, deadline,
                                  priority)
        except MooncakeError:
            self._count_refused(op, length)
            raise

    def _count_refused(self, op: Any, length: Any) -> None:
        """Requests the validator refused: failures of no transport (``unspec``), like TENT."""
        if not self._started or self._closed:
            return
        try:
            opc = OPS[op]
            n = len(length)
        except (KeyError, TypeError):
            return
        self.meters.reject(opc, max(n, 1))

    def _forget_peer(self, segment: str) -> None:
        """A lane or RPC failure: the cached descriptor, route and RPC connections are stale."""
        self._segments.drop(segment)
        gone = self._routes.pop(segment, None)
        if gone is not None:  # the next route says when it is another transport
            self._was_routed[segment] = gone[0].name
        self._rpc_client.forget(segment)

    def _after_failure(self, peer: SegmentDesc, b: TransferBatch) -> None:
        if any(s.code == E_PEER for s in b.statuses()):
            self._forget_peer(peer.name)

    def write(self, segment: str, src: Any, remote_addr: int, length: int | None = None,
              timeout: float | None = None, *, deadline: float | None = None,
              priority: str | int | None = None) -> None:
        """Copy local ``src`` (address or registered buffer) to ``remote_addr`` in ``segment``."""
        addr, n = self._local(src, length)
        self.transfer(segment, "write", (addr,), (remote_addr,), (n,), timeout, deadline=deadline,
                      priority=priority)

    def read(self, segment: str, dst: Any, remote_addr: int, length: int | None = None,
             timeout: float | None = None, *, deadline: float | None = None,
             priority: str | int | None = None) -> None:
        """Copy ``length`` bytes at ``remote_addr`` in ``segment`` into local ``dst``."""
        addr, n = self._local(dst, length)
        self.transfer(segment, "read", (addr,), (remote_addr,), (n,), timeout, deadline=deadline,
                      priority=priority)

    @staticmethod
    def _local(obj: Any, length: int | None) -> tuple[int, int]:
        if isinstance(obj, int):
            if length is None:
                raise InvalidAddress("length is required when the local side is an address")
            return obj, length
        addr, n, _ = buffer_info(obj)
        return addr, n if length is None else length

    def notify(self, segment: str, name: str, msg: str) -> None:
        """Send a notification to a peer (it shows up in the peer's ``get_notifies()``)."""
        self._rpc_call(segment, "notify", {"name": name, "msg": msg})

    def _on_notify(self, args: dict) -> dict:
        name, msg = args.get("name", ""), args.get("msg", "")
        if type(name) is not str or type(msg) is not str:
            raise InvalidAddress("a notification's name and msg must be strings")
        size = len(name) + len(msg)
        with self._lock:
            if len(self._notifies) >= self._max_notifies or \
                    self._notify_bytes + size > self._max_notify_bytes:
                self.notifies_dropped += 1
                if self.notifies_dropped in (1, 10, 100) or self.notifies_dropped % 1000 == 0:
                    log.warning("notification queue full (%d kept, %d bytes): %d dropped so far; "
                                "call get_notifies()", len(self._notifies), self._notify_bytes,
                                self.notifies_dropped)
                raise MooncakeError("notification queue full")
            self._notifies.append(TransferNotify(name, msg))
            self._notify_bytes += size
        return {}

    def take_notifies(self) -> list[TransferNotify]:
        with self._lock:
            out, self._notifies = self._notifies, []
            self._notify_bytes = 0
        return out

    def probe(self, segment: str) -> None:
        """Raise :class:`PeerUnreachable` unless ``segment`` answers on its RPC port."""
        self._check_started()
        self._rpc_call(segment, "probe", {}, timeout=5.0)

    # -- misc ---------------------------------------------------------------------------------

    def topology(self) -> dict:
        """TENT's local topology (``nics``, ``mems`` with their preferred devices by rank;
        :mod:`mooncake.topology` over sysfs, restricted to the ``device_name`` whitelist) plus
        the transports; ``get_local_topology`` returns it as JSON."""
        from mooncake.topology import discover

        topo = discover()
        if self.device_name:
            topo = topo.filtered(include=[d for d in self.device_name.split(",") if d])
        out = topo.to_tent_json()
        out["transports"] = list(self.transports)
        return out

    def metrics(self) -> dict:
        """The transfer counters, read from the kernel's meters (:mod:`mooncake.metrics`):
        ``transports`` → transport → ``read``/``write`` → ``bytes``, ``requests``,
        ``failures``, ``inflight``, ``inflight_bytes``, log2 ``latency_ns``/``size`` buckets;
        ``peers`` → peer → transport → opcode → bytes/requests/failures; ``failovers``;
        ``deadline_infeasible``; ``rails`` → transport → per-rail rows (rdma: each NIC pair's
        work completions, counted by the kernel, its errors and pauses).  Requests the
        validator refused count under ``unspec``.  After :meth:`close` it still answers (the
        final counts)."""
        if getattr(self, "meters", None) is None:
            self._check_started()
        out = self.meters.snapshot(tuple(getattr(self, "transports", ())))
        out["rails"] = {n: rows for n, t in getattr(self, "transports", {}).items()
                        if (rows := t.rails())}
        return out

    def _metric_loop(self) -> None:
        """MC_TE_METRIC: one throughput line every MC_TE_METRIC_INTERVAL_SECONDS, on the
        ``mooncake.metrics`` logger, which MC_LOG_LEVEL does not filter (see
        :func:`mooncake.config.metric_logger`)."""
        from mooncake.config import metric_logger

        out = metric_logger()
        interval = float(self.config["MC_TE_METRIC_INTERVAL_SECONDS"])
        last, since = self.meters.total_bytes(), time.monotonic()
        while not self._closed:
            time.sleep(interval)
            if self._closed:
                break
            now, t = self.meters.total_bytes(), time.monotonic()
            out.info("throughput %.3f GB/s over %gs (%s, %d bytes in total)",
                     (now - last) / max(t - since, 1e-9) / 1e9, round(t - since, 3),
                     self.segment_name, now)
            last, since = now, t

    def _check_started(self) -> None:
        if not self._started or self._closed:
            raise MooncakeError("engine is not initialized (call initialize() or pass "
                                "local_hostname)" if not self._closed else "engine is closed")


def _u64_array(seq: Sequence[int], what: str, lo: int, hi: int) -> np.ndarray:
    """``seq`` as a uint64 array; InvalidAddress naming the first element outside ``[lo, hi]``."""
    if isinstance(seq, np.ndarray) and seq.dtype == np.uint64 and seq.ndim == 1:
        arr = seq
    else:
        try:
            a = np.asarray(seq)
            ok = a.ndim == 1 and a.dtype.kind in "iu"
        except (ValueError, TypeError, OverflowError):
            ok = False
        if not ok:  # mixed, float, huge or non-int values: find the culprit for the message
            for i, v in enumerate(seq):
                if type(v) is not int and not isinstance(v, np.integer) or not lo <= v <= hi:
                    raise InvalidAddress(f"request {i}: {what} must be an int in "
                                         f"{lo}..{hi:#x}, got {v!r}")
            a = np.array([int(v) for v in seq], dtype=np.uint64)
        if a.dtype.kind == "i" and a.size and int(a.min()) < lo:
            i = int(np.argmax(a < lo))
            raise InvalidAddress(f"request {i}: {what} must be in {lo}..{hi:#x}, got {a[i]}")
        arr = a.astype(np.uint64, copy=False)
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        i = int(np.argmax((arr < lo) | (arr > hi)))
        raise InvalidAddress(f"request {i}: {what} must be in {lo}..{hi:#x}, got {arr[i]}")
    return arr


def _enabled(cfg: Config, name: str) -> bool:
    try:
        return bool(cfg[f"transports/{name}/enable"])
    except KeyError:
        return True


def _split_host(local_hostname: str) -> tuple[str, int | None]:
    s = (local_hostname or "").strip()
    if not s:
        raise InvalidAddress("local_hostname must not be empty")
    if s.count(":") == 1:
        host, port = s.split(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidAddress(f"local_hostname {s!r}: port must be 1..65535")
        return host, int(port)
    return s, None


def _resolve(host: str) -> str:
    import socket

    try:
        return socket.gethostbyname(host)
    except OSError as e:
        raise InvalidAddress(f"local_hostname {host!r} does not resolve: {e}") from None


def _set_log_level(level: str, log_dir: str = "") -> None:
    """MC_LOG_LEVEL on every logger of the project: ``mooncake.*``, the first-party transports
    (``transports.*``) and any other package the mooncake distribution's plugins live in;
    ``log_dir`` (MC_LOG_DIR) adds ``<log_dir>/mooncake.log``.  MC_TE_METRIC's line is not
    filtered by it."""
    from mooncake.config import apply_log_level

    apply_log_level(level, log_dir)


def _buffers_of(desc: SegmentDesc) -> list:
    """What a descriptor says about the peer's registrations (not when it was made)."""
    return [(b.addr, b.length, b.writable, b.shm_name, repr(b.transports)) for b in desc.buffers]


def _access_flags(access: str) -> int | None:
    """Region flags for a ``register(access=...)`` value; None for ``"auto"``."""
    a = access.lower() if isinstance(access, str) else access
    if a in ("auto", None):
        return None
    if a in ("rw", "read-write", "remote-rw"):
        return _regions.ALL
    if a in ("ro", "read-only", "remote-ro"):
        return _regions.READ_ONLY
    if a == "local":
        return _regions.LOCAL_WRITE
    raise InvalidAddress(f"access={access!r}: allowed 'auto', 'rw' (read-write), 'ro' (read-only), "
                         "'local' (not published: this engine's transfers only)")


def _hint(e: OSError) -> str:
    import errno

    if e.errno in (errno.ENOMEM, errno.EAGAIN, errno.EPERM):
        return (" (the locked-memory limit is likely too low: raise `ulimit -l`, e.g. "
                "unlimited, or LimitMEMLOCK= in the service unit)")
    if e.errno == errno.EFAULT:
        return (" (the NIC cannot pin this mapping: shared read-only file mappings fail before "
                "Linux 6.2; map it MAP_PRIVATE or register it read-write)")
    return ""


def _read_only(owner: Any) -> bool:
    try:
        with memoryview(owner) as mv:
            return mv.readonly
    except TypeError:
        return False


def _check_mapped(addr: int, length: int, flags: int, strict: bool) -> int:
    """A raw CPU range must be mapped; a read-only mapping registers read-only (or, when the
    caller asked for read-write, is refused)."""
    from mooncake.procmaps import access_of

    acc = access_of(addr, length)
    if acc is None:
        raise InvalidAddress(f"0x{addr:x}+{length} is not (entirely) mapped readable memory "
                             "in this process")
    if acc == "r" and flags != _regions.READ_ONLY:
        if strict:
            raise InvalidAddress(f"0x{addr:x}+{length} is mapped read-only: register it with "
                                 "access='ro' (a WRITE source or a READ target for peers)")
        return _regions.READ_ONLY
    return flags


_warned_open: set[str] = set()


def _warn_open_once(bind: str) -> None:
    if bind in _warned_open:
        return
    _warned_open.add(bind)
    log.warning("engine listens on %s without a cluster token: any process that reaches it may "
                "read and write registered memory; set MC_CLUSTER_TOKEN on every engine (or "
                "bind to a trusted network)", bind)


#: a route that is never looked at again (until its descriptor changes)
_FOREVER = float("inf")

def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer,
                                                             np.floating)):
        raise ConfigError(f"timeout={timeout!r}: allowed a number of seconds in (0, "
                          f"{MAX_TIMEOUT:.0f}]")
    t = float(timeout)
    if not 0 < t <= MAX_TIMEOUT:
        raise ConfigError(f"timeout={timeout!r}: allowed a number of seconds in (0, "
                          f"{MAX_TIMEOUT:.0f}]")
    return t


def _priority_weight(priority: Any) -> int:
    try:
        return _quota.weight_of(priority)
    except _quota.QuotaError as e:
        raise ConfigError(f"priority={priority!r}: {e}") from None


def _check_deadline(deadline: Any) -> float:
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float, np.integer,
                                                               np.floating)) or \
            not np.isfinite(deadline):
        raise ConfigError(f"deadline={deadline!r}: allowed a time.monotonic() instant (seconds)")
    return float(deadline)


def _check_ends(addrs: np.ndarray, lengths: np.ndarray, what: str) -> None:
    bad = addrs > np.uint64(2**64 - 1) - lengths
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidAddress(f"request {i}: {what} range {int(addrs[i]):#x}+{int(lengths[i])} "
                             "runs past the end of the address space")


def _check_remote(entry, segment: str, op: int, remote, length) -> None:
    """Every remote range inside one published buffer; writable ones for a WRITE."""
    one = len(remote) == 1
    bad = (-1 if entry.table.contains(remote[0], length[0]) else 0) if one else \
        first_outside(entry.table, remote, length)
    if bad >= 0:
        raise InvalidAddress(
            f"request {bad}: remote range {int(remote[bad]):#x}+{int(length[bad])} is outside "
            f"the {len(entry.desc.buffers)} buffers segment {segment!r} registered")
    if op == OPS["write"] and entry.read_only:
        bad = first_outside(entry.table, remote, length, _regions.REMOTE_WRITE)
        if bad >= 0:
            raise InvalidAddress(
                f"request {bad}: remote range {int(remote[bad]):#x}+{int(length[bad])} of "
                f"segment {segment!r} is registered read-only: it cannot be written")
