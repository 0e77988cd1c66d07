"""The engine's control plane: one framed, length-bounded RPC listener per engine.

Frame: ``b"MCRP"``, u8 kind (1 request, 2 reply), u32 body length (little-endian), JSON body.
A request body is ``{"method": str, "args": {...}}``; a reply is ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": str, "type": str}``.  A malformed or oversized frame closes that
connection only.  Methods are registered with :meth:`RpcServer.add_handler`.

Distrust of the peer, in numbers:

* :class:`Listener` never stops accepting: EMFILE/ENFILE/ENOMEM/ENOBUFS back off (10 ms doubling
  to 1 s) and retry, per-connection errors (ECONNABORTED, EPROTO...) are skipped; beyond
  ``max_connections`` a connection is accepted and closed at once.  Counted in ``accepted``,
  ``refused`` and ``accept_errors``; warnings are rate-limited.
* :class:`RpcServer` serves every connection from one selector thread and runs complete
  requests on a bounded pool (one request in flight per connection).  A frame whose first byte
  arrived must be complete within ``frame_timeout``, a reply must be drained by the peer within
  ``frame_timeout``, a connection with nothing started is reaped after ``idle_timeout``; at the
  connection cap (or when accept runs out of descriptors) the longest-idle connection is evicted
  to make room.  No worker ever blocks on a peer.
* :meth:`RpcClient.call` has a whole-call deadline: ``timeout`` bounds connect + send + the
  whole reply, however slowly the peer drips it.
* Every connection starts with the cluster-token handshake (:mod:`mooncake.auth`, channel
  ``rpc``): the server sends its hello on accept and reads nothing else before a valid answer.
"""

from __future__ import annotations

import collections
import errno
import io
import json
import logging
import math
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mooncake.auth import ANSWER, REFUSED, ClusterAuth
from mooncake.errors import AuthError, MooncakeError, PeerUnreachable, ProtocolError

__all__ = ["Listener", "RpcServer", "RpcClient", "RemoteError", "DeadlineReader", "bind_first",
           "port_candidates"]

log = logging.getLogger(__name__)

MAGIC = b"MCRP"
HEADER = struct.Struct("<4sBI")
REQUEST, REPLY = 1, 2

#: the longest single socket timeout we hand to the OS (``settimeout`` overflows beyond ~1e9 s)
_MAX_OS_TIMEOUT = 86400.0 * 365


class RemoteError(MooncakeError):
    """The peer's handler raised; ``type`` is its exception class name."""

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(message)
        self.type = type_name


class _Deadline(Exception):
    """The whole-call deadline of an RPC passed (internal to :class:`RpcClient`)."""


class _Throttle:
    """Warnings logged at most once per ``interval`` seconds per message format, with a count
    of the suppressed ones."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._state: dict[str, list] = {}  # format -> [next allowed time, suppressed]
        self._lock = threading.Lock()

    def warn(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            st = self._state.setdefault(msg, [0.0, 0])
            if now < st[0]:
                st[1] += 1
                return
            n, st[0], st[1] = st[1], now + self.interval, 0
        if n:
            msg, args = msg + " (%d more like this suppressed)", (*args, n)
        log.warning(msg, *args)


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (monotonic), as a socket timeout; raise once it passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Deadline
    return min(left, _MAX_OS_TIMEOUT)


class DeadlineReader(io.RawIOBase):
    """Raw reads of ``sock`` that all end by one ``deadline`` (a :func:`time.monotonic` value,
    settable between exchanges; None: the socket's own timeout).  Wrap it in
    :class:`io.BufferedReader` to give a protocol parser (http.client, RESP) a whole-call
    deadline that a peer dripping one byte at a time cannot stretch; past it, TimeoutError."""

    def __init__(self, sock: socket.socket, deadline: float | None = None) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the whole-call deadline passed before the reply was complete")
            self._sock.settimeout(min(left, _MAX_OS_TIMEOUT))
        try:
            return self._sock.recv_into(b)
        except TimeoutError:
            if self.deadline is None:
                raise
            raise TimeoutError("the whole-call deadline passed before the reply was "
                               "complete") from None


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            sock.settimeout(_remaining(deadline))
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError:
            if deadline is not None:
                raise _Deadline from None
            raise
        if k == 0:
            raise ConnectionError("connection closed")
        got += k
    return bytes(buf)


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: deeply nested JSON
        raise ProtocolError(f"RPC body is not JSON: {str(e)[:200]}") from None


def _check_header(head: bytes, max_length: int) -> tuple[int, int]:
    magic, kind, length = HEADER.unpack(head)
    if magic != MAGIC or kind not in (REQUEST, REPLY):
        raise ProtocolError(f"bad RPC frame header {magic!r}/{kind}")
    if length > max_length:
        raise ProtocolError(
            f"RPC frame of {length} bytes exceeds MC_HANDSHAKE_MAX_LENGTH={max_length}")
    return kind, length


def encode_frame(kind: int, obj: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, kind, len(body)) + body


def send_frame(sock: socket.socket, kind: int, obj: Any) -> None:
    sock.sendall(encode_frame(kind, obj))


def recv_frame(sock: socket.socket, max_length: int, frame_timeout: float | None = None,
               deadline: float | None = None) -> tuple[int, Any]:
    """Read one frame (blocking).

    With ``frame_timeout``, wait for its first byte as long as it takes, then give the rest of
    the frame that many seconds (a stalled half-frame is dropped).  With ``deadline`` (a
    :func:`time.monotonic` value) the whole frame must arrive before it, however it is dripped.
    """
    if frame_timeout is not None and deadline is None:
        sock.settimeout(None)
        first = _recv_exact(sock, 1)
        sock.settimeout(min(frame_timeout, _MAX_OS_TIMEOUT))
        head = first + _recv_exact(sock, HEADER.size - 1)
    else:
        head = _recv_exact(sock, HEADER.size, deadline)
    kind, length = _check_header(head, max_length)
    return kind, _decode(_recv_exact(sock, length, deadline))


# ---- listener ---------------------------------------------------------------------------------

#: accept() errors that mean "out of a resource": back off, then retry
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: accept() errors of that one connection (Linux passes pending network errors through accept)
_TRANSIENT = frozenset(getattr(errno, n) for n in (
    "ECONNABORTED", "EPROTO", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP",
    "ENETUNREACH", "ENETDOWN", "EINTR", "EAGAIN", "ETIMEDOUT", "ECONNRESET", "EPERM")
    if hasattr(errno, n))
#: accept() errors that mean the listening socket is gone
_FATAL = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})


class Listener:
    """A TCP listener that keeps accepting whatever happens.

    By default each accepted connection is served by ``serve(conn, addr)`` in a daemon thread of
    its own (the TCP data port: ``serve`` blocks in C); the listener closes the socket afterwards.
    With ``adopt``, ``adopt(conn, addr)`` is called on the accept thread instead and takes the
    socket over (it must not block; :class:`RpcServer` hands it to its selector).

    Accept errors never end the loop: out of descriptors/memory (EMFILE, ENFILE, ENOMEM,
    ENOBUFS) backs off 10 ms doubling to 1 s and calls ``on_exhausted()`` (a chance to shed an
    idle connection), a failed handshake (ECONNABORTED...) is skipped.  In thread mode, beyond
    ``max_connections`` open connections a new one is accepted and closed at once.  Counters:
    ``accepted``, ``refused``, ``accept_errors``.  :meth:`close` stops accepting and shuts every
    open connection (thread mode) down.
    """

    BACKOFF_MIN, BACKOFF_MAX = 0.01, 1.0

    def __init__(self, host: str, ports: list[int],
                 serve: Callable[[socket.socket, tuple], None] | None, name: str,
                 backlog: int = 128, max_connections: int = 512, *,
                 adopt: Callable[[socket.socket, tuple], None] | None = None,
                 on_exhausted: Callable[[], None] | None = None,
                 max_per_peer: int = 0) -> None:
        if (serve is None) == (adopt is None):
            raise ValueError("Listener needs exactly one of serve and adopt")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.name = name
        self.max_connections = max_connections
        #: connections one peer address may hold at once (thread mode; 0 = no limit)
        self.max_per_peer = max_per_peer
        self.accepted = 0
        self.refused = 0
        #: of ``refused``: those refused because their address held max_per_peer already
        self.refused_per_peer = 0
        self._per_peer: dict[str, int] = {}
        self.accept_errors = 0
        self._serve = serve
        self._adopt = adopt
        self._on_exhausted = on_exhausted
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._warn = _Throttle()
        self.sock = bind_first(host, ports, backlog, name)
        self.port: int = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"mc-listen-{self.port}",
                                        daemon=True)
        self._thread.start()

    @property
    def open_connections(self) -> int:
        """Connections being served now (thread mode; 0 with ``adopt``)."""
        return len(self._conns)

    def _accept_loop(self) -> None:
        backoff = self.BACKOFF_MIN
        while not self._closed:
            try:
                conn, addr = self.sock.accept()
            except OSError as e:
                if self._closed or e.errno in _FATAL:
                    return
                self.accept_errors += 1
                if e.errno in _TRANSIENT:
                    continue
                self._warn.warn("%s on port %d: accept failed (%s); retrying in %.2f s",
                                       self.name, self.port, e, backoff)
                if e.errno in (errno.EMFILE, errno.ENFILE) and self._on_exhausted is not None:
                    try:
                        self._on_exhausted()
                    except Exception:  # a shedding hook must never end the loop
                        log.debug("%s: on_exhausted failed", self.name, exc_info=True)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, self.BACKOFF_MAX)
                continue
            backoff = self.BACKOFF_MIN
            self.accepted += 1
            try:
                self._admit(conn, addr)
            except Exception as e:  # e.g. no thread could be started: refuse, keep accepting
                self.refused += 1
                self._warn.warn("%s on port %d: refused a connection: %s",
                                        self.name, self.port, e)
                conn.close()

    def _admit(self, conn: socket.socket, addr: tuple) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # reset before we got to it: it is gone
            conn.close()
            return
        if self._adopt is not None:
            self._adopt(conn, addr)
            return
        with self._lock:
            if self._closed:
                conn.close()
                return
            host = addr[0] if addr else ""
            mine = self._per_peer.get(host, 0)
            over = self.max_per_peer and mine >= self.max_per_peer
            if len(self._conns) >= self.max_connections or over:
                self.refused += 1
                self.refused_per_peer += 1 if over else 0
                full = True
            else:
                self._conns.add(conn)
                self._per_peer[host] = mine + 1
                full = False
        if full:
            conn.close()
            if over:
                self._warn.warn("%s on port %d: %s holds %d connections (the per-peer cap); "
                                "refused one (%d so far)", self.name, self.port, host,
                                self.max_per_peer, self.refused_per_peer)
            else:
                self._warn.warn("%s on port %d: %d connections open (the cap); refused one "
                                "(%d refused so far)", self.name, self.port,
                                self.max_connections, self.refused)
            return
        try:
            threading.Thread(target=self._run, args=(conn, addr), daemon=True,
                             name=self._thread.name + "-conn").start()
        except BaseException:
            self._forget(conn, addr)
            raise

    def _forget(self, conn: socket.socket, addr: tuple) -> None:
        host = addr[0] if addr else ""
        with self._lock:
            if conn in self._conns:
                self._conns.discard(conn)
                left = self._per_peer.get(host, 1) - 1
                if left > 0:
                    self._per_peer[host] = left
                else:
                    self._per_peer.pop(host, None)

    def _run(self, conn: socket.socket, addr: tuple) -> None:
        try:
            self._serve(conn, addr)
        except Exception:
            log.debug("%s: serving %s failed", self.name, addr, exc_info=True)
        finally:
            self._forget(conn, addr)
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        self._stop.set()
        for s in [self.sock, *conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sock.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2)


# ---- server -----------------------------------------------------------------------------------


class _Conn:
    """One RPC connection's state, owned by the selector thread."""

    __slots__ = ("sock", "addr", "inbuf", "out", "frame_start", "write_deadline", "last_active",
                 "busy", "events", "closed", "nonce")

    def __init__(self, sock: socket.socket, addr: tuple, now: float) -> None:
        self.sock = sock
        self.addr = addr
        self.inbuf = bytearray()
        self.out: memoryview | None = None  # the reply still to send
        self.frame_start: float | None = None  # first byte of an incomplete frame
        self.write_deadline = 0.0
        self.last_active = now
        self.busy = False  # a request of this connection is on the pool
        self.events = 0  # what the selector watches now (0: not registered)
        self.closed = False
        self.nonce: bytes | None = None  # our handshake nonce until the client answered

    @property
    def idle(self) -> bool:
        return not self.busy and self.out is None and self.frame_start is None


class RpcServer:
    """The engine's RPC listener on ``(host, port)``: methods added with :meth:`add_handler`.

    One selector thread reads and writes every connection (non-blocking); complete requests run
    on a pool of ``workers`` threads, one request in flight per connection.  Limits:
    ``frame_timeout`` for a started frame to complete and for a reply to be drained,
    ``idle_timeout`` for a connection with nothing started, ``handshake_timeout`` for the
    cluster-token handshake (``auth``) to complete, ``max_connections`` open at once (a
    connection still in its handshake, else the longest-idle one, is evicted for a newcomer).
    Counters: ``accepted``, ``refused``, ``accept_errors`` (the listener's), ``evicted``,
    ``reaped``, ``dropped``, ``auth.refused``; :meth:`stats`.
    """

    #: the selector wakes at least this often (sweeps deadlines)
    TICK = 1.0

    def __init__(self, host: str, ports: list[int], max_length: int, backlog: int = 128,
                 frame_timeout: float = 30.0, idle_timeout: float = 300.0, workers: int = 4,
                 max_connections: int = 512, auth: ClusterAuth | None = None,
                 handshake_timeout: float = 5.0, max_per_peer: int = 0) -> None:
        for what, v in (("frame_timeout", frame_timeout), ("idle_timeout", idle_timeout)):
            if not (isinstance(v, (int, float)) and v > 0 and not math.isnan(v)):
                raise ValueError(f"RpcServer {what} must be > 0 seconds, got {v!r}")
        if workers < 1 or max_connections < 1:
            raise ValueError("RpcServer needs workers >= 1 and max_connections >= 1")
        self.max_length = max_length
        self.auth = auth or ClusterAuth(None)
        self.frame_timeout = float(frame_timeout)
        self.handshake_timeout = min(float(handshake_timeout), self.frame_timeout)
        self.idle_timeout = float(idle_timeout)
        self.max_connections = max_connections
        #: connections one peer address may hold at once (0 = no limit)
        self.max_per_peer = max_per_peer
        self.refused_per_peer = 0
        self._per_peer: dict[str, int] = {}
        self.evicted = 0
        self.reaped = 0
        self.dropped = 0
        self._refused = 0
        self._handlers: dict[str, Callable[[dict], Any]] = {}
        self._conns: dict[int, _Conn] = {}  # by id(_Conn)
        self._inbox: collections.deque = collections.deque()
        self._closed = False
        self._next_sweep = 0.0
        self._warn = _Throttle()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mc-rpc-worker")
        try:
            self._listener = Listener(host, ports, None, "RPC listener", backlog,
                                      max_connections, adopt=self._adopt,
                                      on_exhausted=self._shed)
        except BaseException:
            self._teardown()
            self._pool.shutdown(wait=False)
            raise
        self.port = self._listener.port
        self._thread = threading.Thread(target=self._loop, name=f"mc-rpc-{self.port}",
                                        daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------------------------------
    def add_handler(self, method: str, fn: Callable[[dict], Any]) -> None:
        self._handlers[method] = fn

    @property
    def accepted(self) -> int:
        return self._listener.accepted

    @property
    def refused(self) -> int:
        return self._listener.refused + self._refused

    @property
    def accept_errors(self) -> int:
        return self._listener.accept_errors

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def stats(self) -> dict[str, int]:
        return {"accepted": self.accepted, "refused": self.refused,
                "accept_errors": self.accept_errors, "evicted": self.evicted,
                "reaped": self.reaped, "dropped": self.dropped, "open": self.open_connections,
                "refused_per_peer": self.refused_per_peer, "auth_refused": self.auth.refused}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._listener.close()
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- other threads -> selector thread -----------------------------------------------------
    def _post(self, item: tuple) -> None:
        self._inbox.append(item)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (the selector will wake anyway) or closed
            pass

    def _adopt(self, sock: socket.socket, addr: tuple) -> None:
        if self._closed:
            sock.close()
            return
        self._post(("new", sock, addr))

    def _shed(self) -> None:
        self._post(("shed", None, None))

    # -- the selector thread ------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._closed:
                now = time.monotonic()
                timeout = max(0.0, min(self._next_sweep, now + self.TICK) - now)
                try:
                    events = self._sel.select(timeout)
                except OSError as e:  # EINTR is retried by Python; anything else: log, go on
                    log.warning("RPC selector failed: %s", e)
                    time.sleep(0.01)
                    continue
                for key, mask in events:
                    if key.data is None:
                        self._drain_inbox()
                        continue
                    c: _Conn = key.data
                    try:
                        if mask & selectors.EVENT_READ and not c.closed:
                            self._on_read(c)
                        if mask & selectors.EVENT_WRITE and not c.closed:
                            self._on_write(c)
                    except Exception:  # a bug must cost one connection, not the server
                        log.exception("RPC: error serving %s", c.addr)
                        self._drop(c)
                now = time.monotonic()
                if now >= self._next_sweep:
                    self._sweep(now)
        finally:
            self._teardown()

    def _teardown(self) -> None:
        for c in list(self._conns.values()):
            self._close_conn(c)
        while self._inbox:
            kind, sock, _ = self._inbox.popleft()
            if kind == "new":
                sock.close()
        for s in (self._wake_r, self._wake_w):
            s.close()
        self._sel.close()

    def _drain_inbox(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        while self._inbox:
            kind, a, b = self._inbox.popleft()
            if kind == "new":
                self._add(a, b)
            elif kind == "reply":
                if not a.closed:
                    self._start_reply(a, b)
            elif kind == "drop":
                if not a.closed:
                    self._warn.warn("RPC: dropping connection from %s: %s",
                                         _where(a.addr), b)
                    self._drop(a)
            elif kind == "shed":
                self._evict_one()

    def _add(self, sock: socket.socket, addr: tuple) -> None:
        if self._closed:
            sock.close()
            return
        if len(self._conns) >= self.max_connections and not self._evict_one():
            self._refused += 1
            sock.close()
            self._warn.warn("RPC port %d: %d connections open and none idle; refused one",
                                 self.port, len(self._conns))
            return
        host = addr[0] if addr else ""
        if self.max_per_peer and self._per_peer.get(host, 0) >= self.max_per_peer:
            self._refused += 1
            self.refused_per_peer += 1
            sock.close()
            self._warn.warn("RPC port %d: %s holds %d connections (the per-peer cap); refused "
                            "one (%d so far)", self.port, host, self.max_per_peer,
                            self.refused_per_peer)
            return
        try:
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        c = _Conn(sock, addr, time.monotonic())
        hello, c.nonce = self.auth.hello()
        try:  # a few bytes into an empty socket: all of them go, or the peer is gone
            if sock.send(hello) != len(hello):
                raise OSError("short send")
        except OSError:
            sock.close()
            return
        c.frame_start = c.last_active  # the handshake must complete like a frame
        self._conns[id(c)] = c
        self._per_peer[host] = self._per_peer.get(host, 0) + 1
        self._watch(c, selectors.EVENT_READ)
        self._next_sweep = min(self._next_sweep, c.last_active + self.handshake_timeout)
        self._on_read(c)  # a request already waiting makes it busy, not the next one evicted

    def _evict_one(self) -> bool:
        """Close the oldest connection still in its handshake, else the longest-idle one
        (nothing started, nothing in flight)."""
        idle = [c for c in self._conns.values() if c.nonce is not None] or \
            [c for c in self._conns.values() if c.idle]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last_active)
        self.evicted += 1
        self._warn.warn("RPC port %d: %d connections open; evicted the longest idle "
                             "(%d evicted so far)", self.port, len(self._conns), self.evicted)
        self._close_conn(victim)
        return True

    def _watch(self, c: _Conn, events: int) -> None:
        if events == c.events:
            return
        if c.events == 0:
            self._sel.register(c.sock, events, c)
        elif events == 0:
            self._sel.unregister(c.sock)
        else:
            self._sel.modify(c.sock, events, c)
        c.events = events

    def _close_conn(self, c: _Conn) -> None:
        if c.closed:
            return
        c.closed = True
        if self._conns.get(id(c)) is c:
            host = c.addr[0] if c.addr else ""
            left = self._per_peer.get(host, 1) - 1
            if left > 0:
                self._per_peer[host] = left
            else:
                self._per_peer.pop(host, None)
        if c.events:
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError, OSError):
                pass
            c.events = 0
        c.inbuf = bytearray()
        c.out = None
        try:
            c.sock.close()
        except OSError:
            pass
        self._conns.pop(id(c), None)  # after the close: a count of 0 means no descriptor held

    def _drop(self, c: _Conn) -> None:
        if not c.closed:
            self.dropped += 1
            self._close_conn(c)

    def _on_read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_conn(c)
            return
        if not data:  # the peer closed (or half-closed: it cannot read our reply then anyway)
            self._close_conn(c)
            return
        now = time.monotonic()
        if not c.inbuf and c.nonce is None:
            c.frame_start = now
            self._next_sweep = min(self._next_sweep, now + self.frame_timeout)
        c.inbuf += data
        if c.nonce is not None and not self._handshake(c, now):
            return
        self._parse(c, now)

    def _handshake(self, c: _Conn, now: float) -> bool:
        """The client's answer to our hello, once all of it is here: True when accepted."""
        if len(c.inbuf) < ANSWER.size:
            return False
        verdict = self.auth.check_answer("rpc", c.nonce, bytes(c.inbuf[:ANSWER.size]),
                                         _where(c.addr))
        try:
            c.sock.send(verdict or REFUSED)
        except OSError:
            verdict = None
        if verdict is None:
            self._close_conn(c)
            return False
        del c.inbuf[:ANSWER.size]
        c.nonce = None
        c.frame_start = now if c.inbuf else None
        c.last_active = now
        return True

    def _parse(self, c: _Conn, now: float) -> None:
        """Hand a complete request to the pool (at most one in flight per connection)."""
        if c.busy or len(c.inbuf) < HEADER.size:
            return
        try:
            kind, length = _check_header(bytes(c.inbuf[:HEADER.size]), self.max_length)
            if kind != REQUEST:
                raise ProtocolError("expected a request frame")
        except ProtocolError as e:
            self._warn.warn("RPC: dropping connection from %s: %s", _where(c.addr), e)
            self._drop(c)
            return
        end = HEADER.size + length
        if len(c.inbuf) < end:
            return
        body = bytes(c.inbuf[HEADER.size:end])
        del c.inbuf[:end]
        c.busy = True
        c.frame_start = None
        c.last_active = now
        self._watch(c, 0)  # read no more until the reply is out
        try:
            self._pool.submit(self._work, c, body)
        except RuntimeError:  # shut down
            self._close_conn(c)

    def _start_reply(self, c: _Conn, data: bytes) -> None:
        c.out = memoryview(data)
        c.write_deadline = time.monotonic() + self.frame_timeout
        self._on_write(c)
        if c.out is not None and not c.closed:
            self._watch(c, selectors.EVENT_WRITE)
            self._next_sweep = min(self._next_sweep, c.write_deadline)

    def _on_write(self, c: _Conn) -> None:
        while c.out is not None:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close_conn(c)
                return
            c.out = c.out[n:] if n < len(c.out) else None
        now = time.monotonic()
        c.busy = False
        c.last_active = now
        self._watch(c, selectors.EVENT_READ)
        if c.inbuf:  # the peer pipelined its next request: its frame clock starts now
            c.frame_start = now
            self._next_sweep = min(self._next_sweep, now + self.frame_timeout)
            self._parse(c, now)

    def _sweep(self, now: float) -> None:
        nxt = now + self.TICK
        for c in list(self._conns.values()):
            if c.out is not None:
                if now >= c.write_deadline:
                    self._warn.warn("RPC: dropping connection from %s: reply not drained "
                                         "in %ss", _where(c.addr), self.frame_timeout)
                    self._drop(c)
                    continue
                nxt = min(nxt, c.write_deadline)
            elif c.busy:
                continue
            elif c.frame_start is not None:
                limit = c.frame_start + (self.handshake_timeout if c.nonce is not None else
                                         self.frame_timeout)
                if now >= limit:
                    self._warn.warn("RPC: dropping connection from %s: frame not "
                                         "completed in %ss", _where(c.addr), self.frame_timeout)
                    self._drop(c)
                    continue
                nxt = min(nxt, limit)
            else:
                limit = c.last_active + self.idle_timeout
                if now >= limit:
                    self.reaped += 1
                    log.debug("RPC: closing %s: idle for %ss", _where(c.addr), self.idle_timeout)
                    self._close_conn(c)
                    continue
                nxt = min(nxt, limit)
        self._next_sweep = nxt

    # -- pool workers -------------------------------------------------------------------------
    def _work(self, c: _Conn, body: bytes) -> None:
        try:
            msg = _decode(body)
            if not isinstance(msg, dict) or not isinstance(msg.get("method"), str):
                raise ProtocolError("expected a request object with a 'method'")
            reply = self._dispatch(msg["method"], msg.get("args") or {})
            try:
                data = encode_frame(REPLY, reply)
            except (TypeError, ValueError, RecursionError) as e:
                data = encode_frame(REPLY, {"ok": False, "type": "ProtocolError",
                                            "error": f"RPC {msg['method']}: result is not "
                                                     f"JSON: {str(e)[:200]}"})
        except ProtocolError as e:
            self._post(("drop", c, str(e)))
        except BaseException as e:  # never leave the connection busy forever
            self._post(("drop", c, f"internal error: {e!r}"))
            if not isinstance(e, Exception):
                raise
        else:
            self._post(("reply", c, data))

    def _dispatch(self, method: str, args: dict) -> dict:
        fn = self._handlers.get(method)
        if fn is None:
            return {"ok": False, "error": f"unknown RPC method {method!r}", "type": "ProtocolError"}
        try:
            return {"ok": True, "result": fn(args)}
        except Exception as e:  # the caller gets the error; the server goes on
            log.debug("RPC %s failed: %s", method, e, exc_info=True)
            return {"ok": False, "error": str(e), "type": type(e).__name__}


def _where(addr: Any) -> str:
    try:
        return f"{addr[0]}:{addr[1]}"
    except (TypeError, IndexError):
        return str(addr)


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


# ---- client -----------------------------------------------------------------------------------


class RpcClient:
    """Pooled RPC connections to peers, one per ``host:port``; thread-safe."""

    #: idle connections kept per peer
    MAX_IDLE = 8

    def __init__(self, max_length: int, connect_timeout: float,
                 auth: ClusterAuth | None = None) -> None:
        self.max_length = max_length
        self.connect_timeout = connect_timeout
        self.auth = auth or ClusterAuth(None)
        self._lock = threading.Lock()
        self._idle: dict[str, list[socket.socket]] = {}

    def call(self, segment: str, method: str, args: dict | None = None,
             timeout: float = 10.0) -> Any:
        """Call ``method`` on the engine named ``segment`` (``host:port``).

        ``timeout`` bounds the whole call: connect (at most ``connect_timeout`` of it), sending
        the request and receiving the whole reply.  Past it, :class:`PeerUnreachable` (and the
        connection is closed, not pooled).  A pooled connection the peer has closed meanwhile
        (it restarted, or reaped it as idle) is replaced once, within the same deadline.
        """
        if timeout is None:
            timeout = 10.0
        if not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout <= 0:
            raise ValueError(f"RPC {method} to {segment}: timeout must be > 0 s, got {timeout!r}")
        deadline = time.monotonic() + min(float(timeout), _MAX_OS_TIMEOUT)
        frame = encode_frame(REQUEST, {"method": method, "args": args or {}})
        late = f"RPC {method} to segment {segment!r}: no complete reply within {timeout:g} s"
        for attempt in (0, 1):
            try:
                sock, pooled = self._checkout(segment, attempt == 1, deadline)
            except _Deadline:
                raise PeerUnreachable(f"{late} (connecting)") from None
            try:
                sock.settimeout(_remaining(deadline))
                try:
                    sock.sendall(frame)
                except TimeoutError:
                    raise _Deadline from None
                kind, reply = recv_frame(sock, self.max_length, deadline=deadline)
                break
            except _Deadline:
                sock.close()
                raise PeerUnreachable(late) from None
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

    def _checkout(self, segment: str, fresh: bool = False,
                  deadline: float | None = None) -> tuple[socket.socket, bool]:
        with self._lock:
            idle = self._idle.get(segment)
            if idle and not fresh:
                return idle.pop(), True
        host, port = split_segment(segment)
        limit = self.connect_timeout
        if deadline is not None:
            limit = min(limit, _remaining(deadline))
        try:
            s = socket.create_connection((host, port), timeout=limit)
        except TimeoutError as e:
            if deadline is not None and time.monotonic() >= deadline:
                raise _Deadline from None
            raise PeerUnreachable(f"cannot reach segment {segment!r}: {e}") from None
        except (OSError, OverflowError) as e:
            raise PeerUnreachable(f"cannot reach segment {segment!r}: {e}") from None
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        limit = self.connect_timeout if deadline is None else \
            min(self.connect_timeout, _remaining(deadline))
        try:
            self.auth.client(s, "rpc", f"segment {segment!r}", max(limit, 1e-3))
        except AuthError:
            s.close()
            raise
        except TimeoutError:
            s.close()
            if deadline is not None and time.monotonic() >= deadline:
                raise _Deadline from None
            raise PeerUnreachable(f"segment {segment!r}: no handshake within {limit:g}s") \
                from None
        except OSError as e:
            s.close()
            raise PeerUnreachable(f"cannot reach segment {segment!r}: {e}") from None
        return s, False

    def _checkin(self, segment: str, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(segment, [])
            if len(idle) < self.MAX_IDLE:
                idle.append(sock)
                return
        sock.close()

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
