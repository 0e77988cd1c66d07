"""The engine's control plane: one framed, length-bounded RPC listener per engine.

Frame: ``b"MCRP"``, u8 kind (1 request, 2 reply), u32 body length (little-endian), JSON body.
A request body is ``{"method": str, "args": {...}}``; a reply is ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": str, "type": str}``.  A malformed or oversized frame closes that
connection only.  Methods are registered with :meth:`RpcServer.add_handler`.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from mooncake.errors import MooncakeError, PeerUnreachable, ProtocolError

__all__ = ["Listener", "RpcServer", "RpcClient", "RemoteError", "bind_first",
           "port_candidates"]

log = logging.getLogger(__name__)

MAGIC = b"MCRP"
HEADER = struct.Struct("<4sBI")
REQUEST, REPLY = 1, 2


class RemoteError(MooncakeError):
    """The peer's handler raised; ``type`` is its exception class name."""

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(message)
        self.type = type_name


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed")
        got += k
    return bytes(buf)


def send_frame(sock: socket.socket, kind: int, obj: Any) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(HEADER.pack(MAGIC, kind, len(body)) + body)


def recv_frame(sock: socket.socket, max_length: int,
               frame_timeout: float | None = None) -> tuple[int, Any]:
    """Read one frame.  With ``frame_timeout``, wait for its first byte as long as it takes, then
    give the rest of the frame that many seconds (a stalled half-frame is dropped)."""
    if frame_timeout is not None:
        sock.settimeout(None)
        first = _recv_exact(sock, 1)
        sock.settimeout(frame_timeout)
        head = first + _recv_exact(sock, HEADER.size - 1)
    else:
        head = _recv_exact(sock, HEADER.size)
    magic, kind, length = HEADER.unpack(head)
    if magic != MAGIC or kind not in (REQUEST, REPLY):
        raise ProtocolError(f"bad RPC frame header {magic!r}/{kind}")
    if length > max_length:
        raise ProtocolError(
            f"RPC frame of {length} bytes exceeds MC_HANDSHAKE_MAX_LENGTH={max_length}")
    try:
        return kind, json.loads(_recv_exact(sock, length))
    except ValueError as e:
        raise ProtocolError(f"RPC body is not JSON: {e}") from None


class Listener:
    """A TCP listener that serves each accepted connection in a daemon thread of its own.

    ``serve(conn, addr)`` runs per connection; the listener closes the socket afterwards.
    :meth:`close` stops accepting and shuts every open connection down.
    """

    def __init__(self, host: str, ports: list[int], serve: Callable[[socket.socket, tuple], None],
                 name: str, backlog: int = 128) -> None:
        self._serve = serve
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.sock = bind_first(host, ports, backlog, name)
        self.port: int = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"mc-listen-{self.port}",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._run, args=(conn, addr), daemon=True,
                             name=self._thread.name + "-conn").start()

    def _run(self, conn: socket.socket, addr: tuple) -> None:
        try:
            self._serve(conn, addr)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        for s in [self.sock, *conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sock.close()
        self._thread.join(timeout=2)


class RpcServer:
    """The engine's RPC listener on ``(host, port)``: methods added with :meth:`add_handler`."""

    def __init__(self, host: str, ports: list[int], max_length: int, backlog: int = 128,
                 frame_timeout: float = 30.0) -> None:
        self.max_length = max_length
        self.frame_timeout = frame_timeout
        self._handlers: dict[str, Callable[[dict], Any]] = {}
        self._listener = Listener(host, ports, self._serve, "RPC listener", backlog)
        self.port = self._listener.port

    def add_handler(self, method: str, fn: Callable[[dict], Any]) -> None:
        self._handlers[method] = fn

    def _serve(self, conn: socket.socket, addr: tuple) -> None:
        try:
            while True:
                kind, msg = recv_frame(conn, self.max_length, self.frame_timeout)
                if kind != REQUEST or not isinstance(msg, dict) or not isinstance(
                        msg.get("method"), str):
                    raise ProtocolError("expected a request object with a 'method'")
                send_frame(conn, REPLY, self._dispatch(msg["method"], msg.get("args") or {}))
        except TimeoutError:
            log.warning("RPC: dropping connection: frame not completed in %ss", self.frame_timeout)
        except (ConnectionError, OSError, struct.error):
            pass
        except ProtocolError as e:
            log.warning("RPC: dropping connection: %s", e)

    def _dispatch(self, method: str, args: dict) -> dict:
        fn = self._handlers.get(method)
        if fn is None:
            return {"ok": False, "error": f"unknown RPC method {method!r}", "type": "ProtocolError"}
        try:
            return {"ok": True, "result": fn(args)}
        except Exception as e:  # the caller gets the error; the server goes on
            log.debug("RPC %s failed: %s", method, e, exc_info=True)
            return {"ok": False, "error": str(e), "type": type(e).__name__}

    def close(self) -> None:
        self._listener.close()


def port_candidates(lo: int, hi: int, limit: int = 500) -> list[int]:
    """Up to ``limit`` ports of ``[lo, hi]`` in random order (as Mooncake: 500 attempts)."""
    ports = list(range(lo, hi + 1))
    random.shuffle(ports)
    return ports[:limit]


def bind_first(host: str, ports: list[int], backlog: int, what: str = "listener") -> socket.socket:
    """A socket listening on ``host`` at the first port of ``ports`` that binds."""
    last: OSError | None = None
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on TIME_WAIT
        try:
            s.bind((host, port))
            s.listen(backlog)
            return s
        except OSError as e:
            s.close()
            last = e
    shown = f"{ports[0]}" if len(ports) == 1 else f"{min(ports)}..{max(ports)}"
    raise PeerUnreachable(f"cannot bind the {what} on {host}:{shown}: {last}")


class RpcClient:
    """Pooled RPC connections to peers, one per ``host:port``; thread-safe."""

    def __init__(self, max_length: int, connect_timeout: float) -> None:
        self.max_length = max_length
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._idle: dict[str, list[socket.socket]] = {}

    def call(self, segment: str, method: str, args: dict | None = None,
             timeout: float = 10.0) -> Any:
        """Call ``method`` on the engine named ``segment`` (``host:port``).

        A pooled connection the peer has closed meanwhile (it restarted) is replaced once.
        """
        for attempt in (0, 1):
            sock, pooled = self._checkout(segment, fresh=attempt == 1)
            try:
                sock.settimeout(timeout)
                send_frame(sock, REQUEST, {"method": method, "args": args or {}})
                kind, reply = recv_frame(sock, self.max_length)
                break
            except (OSError, ProtocolError, struct.error) as e:
                sock.close()
                if pooled and attempt == 0 and isinstance(e, ConnectionError):
                    continue
                raise PeerUnreachable(f"RPC {method} to {segment} failed: {e}") from None
        self._checkin(segment, sock)
        if kind != REPLY or not isinstance(reply, dict):
            raise PeerUnreachable(f"RPC {method} to {segment}: malformed reply")
        if not reply.get("ok"):
            raise RemoteError(f"{segment}: {reply.get('error')}", reply.get("type", ""))
        return reply.get("result")

    def _checkout(self, segment: str, fresh: bool = False) -> tuple[socket.socket, bool]:
        with self._lock:
            idle = self._idle.get(segment)
            if idle and not fresh:
                return idle.pop(), True
        host, port = split_segment(segment)
        try:
            s = socket.create_connection((host, port), timeout=self.connect_timeout)
        except OSError as e:
            raise PeerUnreachable(f"cannot reach segment {segment!r}: {e}") from None
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s, False

    def _checkin(self, segment: str, sock: socket.socket) -> None:
        with self._lock:
            self._idle.setdefault(segment, []).append(sock)

    def forget(self, segment: str) -> None:
        with self._lock:
            for s in self._idle.pop(segment, []):
                s.close()

    def close(self) -> None:
        with self._lock:
            for socks in self._idle.values():
                for s in socks:
                    s.close()
            self._idle.clear()


def split_segment(segment: str) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; ``SegmentNotFound`` style errors as ValueError."""
    host, sep, port = segment.rpartition(":")
    if not sep or not port.isdigit() or not host:
        from mooncake.errors import SegmentNotFound

        raise SegmentNotFound(f"segment name {segment!r} is not host:port")
    return host.strip("[]"), int(port)
