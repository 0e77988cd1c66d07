"""The ``tcp`` transport: persistent lanes per peer, Cython send/receive loops without the GIL.

Each peer gets ``MC_TCP_LANES_PER_PEER`` connections to its data port.  A synchronous transfer
takes an idle lane and drives it from the calling thread (no thread hand-offs: the latency of a
raw socket ping-pong); asynchronous batches are spread over the lanes, each driven by its own
worker thread with the same pipelined loop.  The target checks every range against its registered memory and refuses the
rest; a connection that sends garbage is closed, nothing else is affected.
"""

from __future__ import annotations

import logging
import socket
import threading
from itertools import count

from mooncake._core import tcp as _tcp
from mooncake._core.batch import Slices
from mooncake.errors import PeerUnreachable
from mooncake.transport import SegmentDesc, Transport, TransportContext

__all__ = ["TcpTransport"]

log = logging.getLogger(__name__)

E_PEER = 1001  # MC_E_PEER in mc_batch.h
MAX_FRAME = 1 << 30  # a request above this is a protocol violation, not a transfer


class _Peer:
    """The lanes to one peer."""

    def __init__(self) -> None:
        self.lanes: list[_tcp.Lane] = []
        self.threads: list[threading.Thread] = []
        self.rr = count()
        self.lock = threading.Lock()


class TcpTransport(Transport):
    """One-sided READ/WRITE over TCP."""

    name = "tcp"
    auto_priority = 100

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.slice_size = cfg["MC_TCP_SLICE_SIZE"]
        self.nlanes: int = cfg["MC_TCP_LANES_PER_PEER"]
        self.connect_timeout: float = float(cfg["MC_HANDSHAKE_CONNECT_TIMEOUT"])
        self.frame_timeout: float = float(cfg["MC_TRANSFER_TIMEOUT"])
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        self.listener: socket.socket | None = None

    # -- target side ---------------------------------------------------------------------------

    def start(self) -> dict:
        host = self.ctx.config["MC_TCP_BIND_ADDRESS"] or self.ctx.host
        lo, hi = self.ctx.config["MC_MIN_RPC_PORT"], self.ctx.config["MC_MAX_RPC_PORT"]
        self.listener = _listen(host, lo, hi)
        port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name=f"mc-tcp-accept-{port}",
                         daemon=True).start()
        return {"host": host, "data_port": port, "version": 1}

    def _accept_loop(self) -> None:
        assert self.listener is not None
        while True:
            try:
                conn, addr = self.listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                             name="mc-tcp-serve").start()

    def _serve(self, conn: socket.socket, addr: tuple) -> None:
        try:
            rc = _tcp.serve(conn.fileno(), self.ctx.regions, MAX_FRAME, self.frame_timeout)
            if rc == 1:
                log.warning("tcp: dropped data connection from %s:%s: malformed or stalled frame",
                            *addr[:2])
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    # -- initiator side ------------------------------------------------------------------------

    def can_reach(self, peer: SegmentDesc) -> str | None:
        info = peer.transports.get("tcp")
        if not info or "data_port" not in info:
            return f"segment {peer.name!r} publishes no tcp data port"
        return None

    def _lanes(self, peer: SegmentDesc) -> list[_tcp.Lane]:
        p = self._peers.get(peer.name)
        if p is not None and p.lanes and _tcp.all_alive(p.lanes):
            return p.lanes
        with self._lock:
            p = self._peers.setdefault(peer.name, _Peer())
        with p.lock:
            if not _tcp.all_alive(p.lanes):
                self._retire(p)
            if not p.lanes:
                info = peer.transports["tcp"]
                for _ in range(self.nlanes):
                    self._open_lane(p, info["host"], info["data_port"], peer.name)
            return list(p.lanes)

    def _open_lane(self, p: _Peer, host: str, port: int, name: str) -> None:
        try:
            s = socket.create_connection((host, port), timeout=self.connect_timeout)
        except OSError as e:
            raise PeerUnreachable(
                f"tcp: cannot connect to {name} data port {host}:{port}: {e}") from None
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lane = _tcp.Lane(s)
        t = threading.Thread(target=lane.run_worker, args=(self.frame_timeout,),
                             name=f"mc-tcp-lane-{name}", daemon=True)
        t.start()
        p.threads.append(t)
        p.lanes.append(lane)

    def _retire(self, p: _Peer) -> None:
        """Close every lane of a peer (caller holds p.lock); in-flight slices end FAILED."""
        for lane in p.lanes:
            lane.close()
        for t in p.threads:
            t.join(timeout=5)
        for lane in p.lanes:
            lane.abort(E_PEER)
            lane.sock.close()
        p.lanes, p.threads = [], []

    def submit(self, peer: SegmentDesc, slices: Slices) -> None:
        try:
            lanes = self._lanes(peer)
        except PeerUnreachable:
            slices.fail_all(E_PEER)
            raise
        p = self._peers[peer.name]
        _tcp.submit(lanes, slices, next(p.rr))

    def transfer(self, peer: SegmentDesc, slices: Slices, timeout: float) -> bool:
        lanes = self._lanes(peer)
        for lane in lanes:
            if _tcp.run(lane, slices, timeout):
                return True  # completed (or failed) on an idle lane, all slices reported
        start = next(self._peers[peer.name].rr)
        _tcp.submit(lanes, slices, start)
        return slices.batch.wait(timeout)

    def abort(self, peer: SegmentDesc) -> None:
        with self._lock:
            p = self._peers.get(peer.name)
        if p is not None:
            with p.lock:
                self._retire(p)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            peers = list(self._peers.values())
            self._peers.clear()
            conns = list(self._conns)
        for p in peers:
            with p.lock:
                self._retire(p)
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _listen(host: str, lo: int, hi: int) -> socket.socket:
    """Bind a listener on ``host`` at a free port in ``[lo, hi]`` (the configured RPC range)."""
    import random

    ports = list(range(lo, hi + 1))
    random.shuffle(ports)
    last: OSError | None = None
    for port in ports[:500]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on TIME_WAIT
        try:
            s.bind((host, port))
            s.listen(128)
            return s
        except OSError as e:
            s.close()
            last = e
    raise PeerUnreachable(f"tcp: no free data port on {host} in {lo}..{hi}: {last}")
