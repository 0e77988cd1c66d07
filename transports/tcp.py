"""The ``tcp`` transport: persistent lanes per peer, Cython send/receive loops without the GIL.

Each peer gets ``MC_TCP_LANES_PER_PEER`` connections to its data port.  A synchronous transfer
takes an idle lane and drives it from the calling thread (no thread hand-offs: the latency of a
raw socket ping-pong); one of several slices is spread over the idle lanes, the caller driving
the first part and the lanes' workers the others.  Asynchronous batches are spread over the
lanes, each driven by its own worker thread with the same pipelined loop.  The target checks
every range against its registered memory and refuses the rest; a connection that sends garbage
is closed, nothing else is affected.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from itertools import count
from typing import Any

from mooncake import quota as _quota
from mooncake._core import batch as _batch
from mooncake._core import tcp as _tcp
from mooncake._core.batch import Slices
from mooncake.auth import ClusterAuth
from mooncake.errors import AuthError, PeerUnreachable
from mooncake.fields import Field
from mooncake.options import KiB, MiB, Option
from mooncake.rpc import Listener, port_candidates
from mooncake.transport import SegmentDesc, Transport, TransportContext

__all__ = ["TcpTransport"]

log = logging.getLogger(__name__)

E_PEER = _batch.E_PEER
E_CLOSED = _batch.E_CLOSED
E_TIMEOUT = _batch.E_TIMEOUT
E_AUTH = _batch.E_AUTH
#: seconds a refused cluster-token handshake is reported again before reconnecting
AUTH_RETRY = 5.0
MAX_FRAME = 1 << 30  # a request above this is a protocol violation, not a transfer
#: a data connection that carries no request for this long is closed (the initiator reconnects)
IDLE_TIMEOUT = 300.0


#: the rows of the configuration table this transport reads
OPTIONS: tuple[Option, ...] = (
    # ---- TCP transport --------------------------------------------------------------------------
    Option("MC_FORCE_TCP", bool, False, owner="tcp",
           doc="install only the TCP transport (presence alone does not enable it here)",
           hint="use TCP when there is no RDMA, or to force it",
           reads=("mooncake/engine.py::cfg[cls.forced_by]", "transports/tcp.py")),
    Option("MC_TCP_SLICE_SIZE", "size", MiB, range=(4 * KiB, 256 * MiB), unit="bytes", owner="tcp",
           doc="slice size of the TCP transport (it does not use MC_SLICE_SIZE)",
           reads=("transports/tcp.py",)),
    Option("MC_TCP_LANES_PER_PEER", int, 4,
           env=("MC_TCP_LANES_PER_PEER", "MC_TCP_MAX_CONNECTIONS_PER_PEER"),
           deprecated=("MC_TCP_MAX_CONNECTIONS_PER_PEER",), range=(1, 16), owner="tcp",
           doc="persistent TCP connections (lanes) per peer",
           reads=("transports/tcp.py",)),
    Option("MC_TCP_SPIN_US", int, 30, range=(0, 10000), unit="µs", owner="tcp",
           doc="a synchronous TCP call polls its socket this long before sleeping, and a target's "
               "serve loop polls as long for the next request after answering one, yielding the "
               "CPU (0: never; never on a thread with one CPU)",
           hint="lower sync latency for a little CPU; 0 on oversubscribed hosts",
           reads=("transports/tcp.py",)),
    Option("transports/tcp/enable", bool, True, tent="transports/tcp/enable", owner="tcp",
           doc="TENT: enable the TCP transport",
           reads=("mooncake/engine.py::transports/{name}/enable", "transports/tcp.py")),
)


class _Peer:
    """The lanes to one peer."""

    def __init__(self) -> None:
        self.lanes: list[_tcp.Lane] = []
        self.threads: list[threading.Thread] = []
        self.rr = count()
        self.lock = threading.Lock()
        #: (when, AuthError) of the last handshake the peer refused
        self.refused: tuple[float, AuthError] | None = None


class TcpTransport(Transport):
    """One-sided READ/WRITE over TCP."""

    name = "tcp"
    auto_priority = 100
    options = OPTIONS
    forced_by = "MC_FORCE_TCP"
    segment_fields = {
        "host": Field("str", max_len=255, pattern=r"[A-Za-z0-9._:\-\[\]%]+"),
        "data_port": Field("int", 1, 65535),
        "version": Field("int", 1, 1),
    }


    @classmethod
    def check_config(cls, v: Mapping[str, Any], src: Mapping[str, str],
                     warn: Callable[[str], None]) -> None:
        if v["MC_FORCE_TCP"] and not v["transports/tcp/enable"]:
            warn("MC_FORCE_TCP is on but transports/tcp/enable="
                 f"{v['transports/tcp/enable']} ({src['transports/tcp/enable']}); no transport "
                 "would remain")
    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.slice_size = cfg["MC_TCP_SLICE_SIZE"]
        self.nlanes: int = cfg["MC_TCP_LANES_PER_PEER"]
        self.connect_timeout: float = float(cfg["MC_HANDSHAKE_CONNECT_TIMEOUT"])
        self.frame_timeout: float = float(cfg["MC_TRANSFER_TIMEOUT"])
        self.auth: ClusterAuth = ctx.auth or ClusterAuth(None)
        # spinning only pays when the peer can run meanwhile on another CPU: the kernel checks
        # the calling thread's affinity each time
        self.spin: float = cfg["MC_TCP_SPIN_US"] / 1e6
        #: TENT's grace period: a lane's worker polls its queue this long after a drive
        self.poll_grace: float = cfg["transports/rdma/workers/grace_period_ns"] / 1e9
        #: lanes per (peer, quota weight): a batch of another priority class than the engine's
        #: (with the shared quota on) gets lanes of its own, so a class the quota holds back
        #: never blocks another class's jobs queued behind it; 0 = the engine's class
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._lock = threading.Lock()
        self.listener: Listener | None = None
        # shared bandwidth quota (shared_quota_shm_path): one slot per local NIC, joined when
        # the first route through it opens; a table that is not ours fails the start here
        self.quota = _quota.EngineSlots(cfg, "tcp")

    # -- target side ---------------------------------------------------------------------------

    def start(self) -> dict:
        cfg = self.ctx.config
        host = cfg["MC_TCP_BIND_ADDRESS"] or self.ctx.host
        ports = port_candidates(cfg["MC_MIN_RPC_PORT"], cfg["MC_MAX_RPC_PORT"])
        self.listener = Listener(host, ports, self._serve, "tcp data listener",
                                 max_connections=cfg["MC_MAX_CONNECTIONS"],
                                 max_per_peer=cfg["MC_MAX_CONNECTIONS_PER_PEER"])
        return {"host": host, "data_port": self.listener.port, "version": 1}

    def _serve(self, conn: socket.socket, addr: tuple) -> None:
        # the cluster-token handshake before any frame is read
        if not self.auth.serve(conn, "tcp-data", f"{addr[0]}:{addr[1]}", self.connect_timeout):
            return
        rc = _tcp.serve(conn.fileno(), self.ctx.regions, MAX_FRAME, self.frame_timeout,
                        IDLE_TIMEOUT, self.spin)
        if rc == 1:
            log.warning("tcp: dropped data connection from %s:%s: malformed or stalled frame, "
                        "or replies not drained for %ss", *addr[:2], self.frame_timeout)
        elif rc == 2:
            log.info("tcp: dropped data connection from %s:%s: a READ reply was cut by an "
                     "unregister", *addr[:2])

    # -- initiator side ------------------------------------------------------------------------

    def can_reach(self, peer: SegmentDesc) -> str | None:
        info = peer.transports.get("tcp")
        if not info or "data_port" not in info:
            return f"segment {peer.name!r} publishes no tcp data port"
        return None

    def _weight(self, slices: Slices) -> int:
        """The quota weight whose lanes carry ``slices``: 0 (the engine's) unless the batch
        names another class and the shared quota is on."""
        w = slices.batch.priority
        return w if w and self.quota.table is not None and w != self.quota.weight else 0

    def _lanes(self, peer: SegmentDesc, weight: int = 0) -> tuple[_Peer, list[_tcp.Lane]]:
        key = (peer.name, weight)
        p = self._peers.get(key)
        if p is not None and p.lanes and _tcp.all_alive(p.lanes):
            return p, p.lanes
        with self._lock:
            p = self._peers.setdefault(key, _Peer())
        if p.refused is not None:
            when, err = p.refused
            if time.monotonic() - when < AUTH_RETRY:
                raise err  # the peer refused our token moments ago: say so, do not hammer it
            p.refused = None
        with p.lock:
            if not _tcp.all_alive(p.lanes):
                self._retire(p)
            if not p.lanes:
                info = peer.transports["tcp"]
                for _ in range(self.nlanes):
                    self._open_lane(p, info["host"], info["data_port"], peer.name, weight)
            return p, list(p.lanes)

    def _open_lane(self, p: _Peer, host: str, port: int, name: str, weight: int = 0) -> None:
        try:
            s = socket.create_connection((host, port), timeout=self.connect_timeout)
        except OSError as e:
            raise PeerUnreachable(
                f"tcp: cannot connect to {name} data port {host}:{port}: {e}") from None
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # held until its worker thread has done the cluster-token handshake: callers queue
        # work meanwhile (bounded by their own deadlines), nobody blocks on a silent peer here
        lane = _tcp.Lane(s, self.spin, min(3.0, self.frame_timeout), self.poll_grace, True)
        slot = self.quota.get(_quota.nic_key_for_ip(s.getsockname()[0]), weight or None)
        if slot is not None:
            lane.set_quota(slot.core, slot.sid)
        t = threading.Thread(target=self._lane_main, args=(p, lane, f"{name} data port "
                             f"{host}:{port}"), name=f"mc-tcp-lane-{name}", daemon=True)
        t.start()
        p.threads.append(t)
        p.lanes.append(lane)

    def _lane_main(self, p: _Peer, lane: _tcp.Lane, where: str) -> None:
        """A lane's thread: the handshake, then the worker loop until the lane closes."""
        try:
            self.auth.client(lane.sock, "tcp-data", where, self.connect_timeout)
        except AuthError as e:
            p.refused = (time.monotonic(), e)
            log.warning("tcp: %s", e)
            lane.abort(E_AUTH)
            return
        except OSError as e:
            log.info("tcp: %s: handshake failed: %s", where, e)
            lane.abort(E_PEER)
            return
        lane.sock.settimeout(None)
        lane.release()
        lane.run_worker(self.frame_timeout)

    def _retire(self, p: _Peer, err: int = E_PEER) -> None:
        """Close every lane of a peer (caller holds p.lock); in-flight slices end with ``err``."""
        for lane in p.lanes:
            lane.close(err)
        for t in p.threads:
            t.join(timeout=5)
        for lane in p.lanes:
            lane.abort(err)
            lane.sock.close()
        p.lanes, p.threads = [], []

    def submit(self, peer: SegmentDesc, slices: Slices) -> None:
        try:
            p, lanes = self._lanes(peer, self._weight(slices))
        except PeerUnreachable:
            slices.fail_all(E_PEER)
            raise
        _tcp.submit(lanes, slices, next(p.rr))

    def transfer(self, peer: SegmentDesc, slices: Slices, timeout: float) -> bool:
        try:
            p, lanes = self._lanes(peer, self._weight(slices))
        except PeerUnreachable:
            slices.fail_all(E_PEER)
            raise
        if len(slices) > 1:  # more than a slice: spread over the idle lanes
            t0 = time.monotonic()
            done = _tcp.run_spread(lanes, slices, timeout)
            if done == 1:
                return True
            if done == 2:
                return slices.batch.wait(max(0.0, timeout - (time.monotonic() - t0)))
        else:
            for lane in lanes:
                if _tcp.run(lane, slices, timeout):
                    return True  # completed (or failed) on an idle lane, all slices reported
        _tcp.submit(lanes, slices, next(p.rr))
        return slices.batch.wait(timeout)

    def abort(self, peer: SegmentDesc) -> None:
        with self._lock:
            mine = [p for (name, _), p in self._peers.items() if name == peer.name]
        for p in mine:
            with p.lock:
                self._retire(p, E_TIMEOUT)

    def close(self) -> None:
        with self._lock:
            peers = list(self._peers.values())
            self._peers.clear()
        for p in peers:
            with p.lock:
                self._retire(p, E_CLOSED)
        self.quota.release()
        if self.listener is not None:
            self.listener.close()
