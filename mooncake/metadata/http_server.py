"""A built-in HTTP metadata server, wire-compatible with Mooncake's ``/metadata?key=K`` store.

Protocol (Mooncake's, plus an optional lease, owners and a bearer token):

=========================== ==================================================================
``GET /metadata?key=K``     200 and the stored bytes, or 404
``PUT /metadata?key=K``     store the body (``Content-Length`` required, at most ``--max-body``)
``DELETE /metadata?key=K``  200, or 404 when there was no such key
``POST /metadata?key=K``    heartbeat: extend K's lease; 404 when K is unknown (the client
                            then PUTs it again — this is how engines re-publish after a restart)
``GET /keys?prefix=P``      JSON list of the live keys starting with P
``GET /stats``              JSON counters (the same as :attr:`MetadataServer.stats`)
``GET /health``             200 ``ok``
=========================== ==================================================================

Leases: a PUT or POST carrying ``X-Mooncake-TTL: <seconds>`` makes the key expire when no PUT or
POST refreshes it within that many seconds (mooncake clients send TTL = 3 × their heartbeat
period).  A PUT without the header (a Mooncake C++ client) never expires, unless the server was
started with ``--ttl S``, which gives such keys an S-second lease.

Who may do what — the three switches and what each protects:

* **Owners (always on).**  A PUT carrying ``X-Mooncake-Owner: <secret>`` binds the key to that
  secret (the server keeps only a salted SHA-256 of it).  Until the key expires or its owner
  DELETEs it, a PUT, POST (heartbeat) or DELETE of that key with another secret, or with none,
  gets 403: nobody can replace an engine's descriptor (redirecting its peers' WRITEs), keep a
  forgery alive or hide the engine.  Every mooncake engine sends a random secret of its own
  (``MC_METADATA_OWNER_SECRET`` pins it), so its own heartbeats and re-PUTs keep working.  A key
  PUT without the header is *unowned*: anyone may overwrite or delete it, and an owner's PUT
  claims it.  Owners protect keys from other writers, not from readers.
* **``--require-owner``**: writes (PUT/POST/DELETE) without an owner header get 403, so no key
  is ever unowned (Mooncake's C++ client, which sends no owner, may still read but not publish).
* **``--token T`` / ``--token-file F`` / ``MC_METADATA_TOKEN``**: every request, reads and
  ``/health`` included, needs ``Authorization: Bearer T`` (compared in constant time; the token
  is never logged nor echoed), otherwise 401.  This keeps clients that do not hold the token
  from reading the cluster's descriptors and from writing at all.  With a token, writes without
  an owner header are refused too (as with ``--require-owner``).
* **``--allow-anonymous``**: accept writes without an owner header even with a token or
  ``--require-owner`` (such keys stay unowned, writable by every client that passes the token).

**Default (no flags): as before** — no token, anonymous writes accepted, so Mooncake's plain
clients work unchanged; only keys that their writer bound to an owner are protected, and
anybody who reaches the port can read every descriptor and squat names nobody owns yet.  The
token travels in clear text over ``http://``: on untrusted networks put the server behind TLS.

Resource limits (each refusal is counted in :attr:`MetadataServer.stats`): a body of more than
``--max-body`` bytes gets 413 before it is read; more than ``--max-keys`` keys or more than
``--max-bytes`` bytes stored (key + value lengths) gets 507; at most ``--max-connections``
connections are open at once (beyond, a connection is accepted, answered 503 and closed at
once); a request (line, headers and body) must arrive within ``--frame-timeout`` seconds of its
first byte and its response be read within as long (else 408/closed), and a kept-alive
connection with nothing started is closed after ``--idle-timeout``.  Every connection is served
by one selector thread, so thousands of stalled (slowloris) connections cost descriptors and a
few kilobytes each, never a thread, and cannot starve a client that sends its request.
Bodies larger than 64 KiB in flight at once are bounded too (4 × ``--max-body``; beyond, 503).

``stats`` / ``GET /stats`` counters: ``requests``, ``refused_auth`` (401), ``refused_owner``
(403), ``over_quota`` (413/507), ``conn_refused`` (over the connection cap), ``timeouts``
(frame timeouts), ``idle_closed``, ``bad_requests`` (4xx framing errors), ``busy`` (503 for
bodies in flight); gauges ``connections``, ``keys``, ``bytes``.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["MetadataServer", "TTL_HEADER", "OWNER_HEADER", "TOKEN_ENV", "main", "add_cli",
           "add_arguments"]

log = logging.getLogger(__name__)

TTL_HEADER = "X-Mooncake-TTL"
OWNER_HEADER = "X-Mooncake-Owner"
TOKEN_ENV = "MC_METADATA_TOKEN"
MAX_TTL = 7 * 24 * 3600.0
DEFAULT_MAX_BODY = 16 << 20
DEFAULT_MAX_KEYS = 1_000_000
DEFAULT_MAX_BYTES = 256 << 20
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_FRAME_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 60.0
#: request line + headers
MAX_HEAD = 64 << 10
MAX_HEADERS = 100
#: the longest owner secret accepted
MAX_OWNER = 512
#: bodies up to this size need no share of the in-flight budget
SMALL_BODY = 64 << 10
#: a closing connection's unread input is drained (so the reply is not lost to a RST) this long
LINGER = 2.0
_TICK = 0.2
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")


class _Counters:
    """The server's counters (mutated by the loop thread only; read from anywhere)."""

    NAMES = ("requests", "refused_auth", "refused_owner", "over_quota", "conn_refused",
             "timeouts", "idle_closed", "bad_requests", "busy")

    def __init__(self) -> None:
        for n in self.NAMES:
            setattr(self, n, 0)

    def snapshot(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in self.NAMES}


@dataclass
class _Entry:
    value: bytes
    ttl: float  # 0 = never expires
    expires: float  # monotonic deadline; math.inf when ttl == 0
    owner: bytes | None = None  # salted SHA-256 of the owner secret; None = unowned


OK, FORBIDDEN, NOT_FOUND, FULL_KEYS, FULL_BYTES = "ok", "forbidden", "not found", "keys", "bytes"


class _Table:
    """The key → value map with leases, owners and quotas; every method is thread-safe."""

    def __init__(self, default_ttl: float, max_keys: int,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.default_ttl = default_ttl
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.bytes = 0  # sum of len(key) + len(value) over stored entries
        self._d: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _size(key: str, e: _Entry) -> int:
        return len(key) + len(e.value)

    def _drop(self, key: str) -> _Entry:
        e = self._d.pop(key)
        self.bytes -= self._size(key, e)
        return e

    def _live(self, key: str, now: float) -> _Entry | None:
        e = self._d.get(key)
        if e is not None and e.expires <= now:
            self._drop(key)
            log.info("metadata-server: key %s expired (no heartbeat for %.1fs)", key, e.ttl)
            return None
        return e

    @staticmethod
    def _may(e: _Entry | None, owner: bytes | None) -> bool:
        """May a writer holding ``owner`` (None: no owner header) modify ``e``?"""
        if e is None or e.owner is None:
            return True
        return owner is not None and hmac.compare_digest(e.owner, owner)

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            e = self._live(key, time.monotonic())
            return None if e is None else e.value

    def owned(self, key: str) -> bool:
        with self._lock:
            e = self._live(key, time.monotonic())
            return e is not None and e.owner is not None

    def put(self, key: str, value: bytes, ttl: float | None, owner: bytes | None = None) -> str:
        """Store; ``OK``, or ``FORBIDDEN`` (another owner's key), ``FULL_KEYS``, ``FULL_BYTES``.

        A PUT with an owner binds an unowned (or new) key to it."""
        ttl = self.default_ttl if ttl is None else ttl
        now = time.monotonic()
        with self._lock:
            e = self._live(key, now)
            if not self._may(e, owner):
                return FORBIDDEN
            if e is None and len(self._d) >= self.max_keys:
                self._sweep(now)
                if len(self._d) >= self.max_keys:
                    return FULL_KEYS
            old = self._size(key, e) if e is not None else 0
            new = len(key) + len(value)
            if self.bytes - old + new > self.max_bytes:
                self._sweep(now)
                if self.bytes - old + new > self.max_bytes:
                    return FULL_BYTES
            if owner is None and e is not None:
                owner = e.owner
            if e is not None:
                self._drop(key)
            self._d[key] = _Entry(value, ttl, now + ttl if ttl > 0 else math.inf, owner)
            self.bytes += new
            return OK

    def refresh(self, key: str, ttl: float | None, owner: bytes | None = None) -> str:
        """Extend a lease: ``OK``, ``NOT_FOUND`` or ``FORBIDDEN``."""
        now = time.monotonic()
        with self._lock:
            e = self._live(key, now)
            if e is None:
                return NOT_FOUND
            if not self._may(e, owner):
                return FORBIDDEN
            if ttl is not None:
                e.ttl = ttl
            e.expires = now + e.ttl if e.ttl > 0 else math.inf
            return OK

    def delete(self, key: str, owner: bytes | None = None) -> str:
        """``OK``, ``NOT_FOUND`` or ``FORBIDDEN``."""
        with self._lock:
            e = self._live(key, time.monotonic())
            if e is None:
                return NOT_FOUND
            if not self._may(e, owner):
                return FORBIDDEN
            self._drop(key)
            return OK

    def keys(self, prefix: str) -> list[str]:
        with self._lock:
            self._sweep(time.monotonic())
            return sorted(k for k in self._d if k.startswith(prefix))

    def _sweep(self, now: float) -> None:
        for k in [k for k, e in self._d.items() if e.expires <= now]:
            log.info("metadata-server: key %s expired", k)
            self._drop(k)

    def sweep(self) -> None:
        with self._lock:
            self._sweep(time.monotonic())


# --------------------------------------------------------------------------- connections

IDLE, HEAD, BODY, WRITE, LINGERING = range(5)
_METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE")


class _Request:
    __slots__ = ("method", "target", "version", "headers", "keep_alive", "length")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]) -> None:
        self.method, self.target, self.version, self.headers = method, target, version, headers
        conn = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self.keep_alive = "keep-alive" in conn
        else:
            self.keep_alive = "close" not in conn
        self.length = 0


class _Conn:
    __slots__ = ("sock", "peer", "inbuf", "out", "phase", "deadline", "req", "close_after",
                 "reserved", "drained", "mask")

    def __init__(self, sock: socket.socket, peer: str, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.out: list[memoryview] = []
        self.phase = IDLE
        self.deadline = deadline
        self.req: _Request | None = None
        self.close_after = False
        self.reserved = 0  # bytes of the in-flight body budget this request holds
        self.drained = 0
        self.mask = 0


class _Reject(Exception):
    """A request that gets an error reply (and, with ``close``, the end of its connection)."""

    def __init__(self, status: int, text: str, close: bool = False,
                 counter: str = "bad_requests", headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.text, self.close, self.counter = status, text, close, counter
        self.headers = headers or {}


def _parse_head(raw: bytes) -> _Request:
    text = raw.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _Reject(HTTPStatus.BAD_REQUEST, "malformed request line", close=True)
    method, target, version = parts
    if not re.fullmatch(r"HTTP/\d\.\d", version):
        raise _Reject(HTTPStatus.BAD_REQUEST, "malformed request line", close=True)
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _Reject(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.0 and 1.1", close=True)
    if not re.fullmatch(r"[A-Za-z]+", method) or not target.startswith("/"):
        raise _Reject(HTTPStatus.BAD_REQUEST, "malformed request line", close=True)
    if len(lines) - 1 > MAX_HEADERS:
        raise _Reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                      f"more than {MAX_HEADERS} header fields", close=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise _Reject(HTTPStatus.BAD_REQUEST, "malformed header field", close=True)
        name, value = name.lower(), value.strip(" \t")
        if name == "content-length" and headers.get(name, value) != value:
            raise _Reject(HTTPStatus.BAD_REQUEST, "conflicting Content-Length", close=True)
        headers[name] = value
    return _Request(method, target, version, headers)


def _hash_owner(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


class _Loop:
    """One selector thread serving every connection (see the module docstring)."""

    def __init__(self, server: MetadataServer, listener: socket.socket) -> None:
        self.s = server
        self.listener = listener
        self.sel = selectors.DefaultSelector()
        self.conns: set[_Conn] = set()
        self.inflight = 0  # bytes reserved by large bodies being received
        self.stop = threading.Event()
        self.done = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._accept_paused_until = 0.0
        self._emfile_logged = 0.0

    # -- life cycle ------------------------------------------------------------------------
    def wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def run(self) -> None:
        self.done.clear()
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_tick = 0.0
        try:
            while not self.stop.is_set():
                for key, mask in self.sel.select(_TICK):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        c: _Conn = key.data
                        if mask & selectors.EVENT_READ and c in self.conns:
                            self._on_read(c)
                        if mask & selectors.EVENT_WRITE and c in self.conns:
                            self._flush(c)
                            self._resume(c)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + _TICK
                    self._expire(now)
                    self.s.table.sweep()
        finally:
            for c in list(self.conns):
                self._close(c)
            for obj in (self.listener, self._wake_r):
                try:
                    self.sel.unregister(obj)
                except (KeyError, ValueError, OSError):
                    pass
            self.done.set()

    def close(self) -> None:
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- accept ----------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    now = time.monotonic()
                    if now - self._emfile_logged > 10:
                        self._emfile_logged = now
                        log.warning("metadata-server: accept failed (%s); pausing accepts", e)
                    self.sel.unregister(self.listener)
                    self._accept_paused_until = now + 0.1
                return  # ECONNABORTED and friends: that connection only
            peer = addr[0] if isinstance(addr, tuple) else str(addr)
            if len(self.conns) >= self.s.max_connections:
                self.s.counters.conn_refused += 1
                log.debug("metadata-server: %s refused: %d connections open", peer,
                          len(self.conns))
                self._refuse(sock)
                continue
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            c = _Conn(sock, peer, time.monotonic() + self.s.idle_timeout)
            self.conns.add(c)
            self._watch(c)

    @staticmethod
    def _refuse(sock: socket.socket) -> None:
        body = b"too many connections"
        try:
            sock.setblocking(False)
            sock.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                      b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        sock.close()

    # -- selector bookkeeping --------------------------------------------------------------
    def _watch(self, c: _Conn) -> None:
        mask = 0
        if c.phase != WRITE:
            mask |= selectors.EVENT_READ
        if c.out:
            mask |= selectors.EVENT_WRITE
        if mask == c.mask:
            return
        if c.mask == 0:
            self.sel.register(c.sock, mask, c)
        elif mask == 0:
            self.sel.unregister(c.sock)
        else:
            self.sel.modify(c.sock, mask, c)
        c.mask = mask

    def _close(self, c: _Conn) -> None:
        if c not in self.conns:
            return
        self.conns.discard(c)
        self.inflight -= c.reserved
        c.reserved = 0
        if c.mask:
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError, OSError):
                pass
            c.mask = 0
        try:
            c.sock.close()
        except OSError:
            pass

    def _expire(self, now: float) -> None:
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        for c in [c for c in self.conns if c.deadline <= now]:
            if c.phase == IDLE:
                self.s.counters.idle_closed += 1
            elif c.phase in (HEAD, BODY, WRITE):
                self.s.counters.timeouts += 1
                log.debug("metadata-server: %s: frame timeout", c.peer)
                if c.phase != WRITE and not c.out:
                    body = b"request not complete within the frame timeout"
                    try:
                        c.sock.send(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: %d\r\n"
                                    b"Connection: close\r\n\r\n%s" % (len(body), body))
                    except OSError:
                        pass
            self._close(c)

    # -- reading ---------------------------------------------------------------------------
    def _on_read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        if not data:
            self._close(c)
            return
        if c.phase == LINGERING:
            c.drained += len(data)
            if c.drained > (1 << 20):
                self._close(c)
            return
        c.inbuf += data
        if c.phase == IDLE:
            c.phase = HEAD
            c.deadline = time.monotonic() + self.s.frame_timeout
        self._process(c)

    def _process(self, c: _Conn) -> None:
        while c in self.conns and c.phase in (HEAD, BODY):
            if c.phase == HEAD:
                while c.inbuf.startswith(b"\r\n"):  # tolerated between requests
                    del c.inbuf[:2]
                end = c.inbuf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
                if end < 0:
                    if len(c.inbuf) > MAX_HEAD:
                        self._reject(c, _Reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                                f"request head larger than {MAX_HEAD} bytes",
                                                close=True))
                    elif not c.inbuf:
                        c.phase = IDLE
                        c.deadline = time.monotonic() + self.s.idle_timeout
                    return
                raw = bytes(c.inbuf[:end])
                del c.inbuf[:end + 4]
                try:
                    req = _parse_head(raw)
                    c.req = req
                    self._admit(c, req)
                except _Reject as r:
                    self._reject(c, r)
                    continue  # a kept-alive connection may hold the next request already
                c.phase = BODY
                if req.length and req.version == "HTTP/1.1" and \
                        req.headers.get("expect", "").lower() == "100-continue":
                    c.out.append(memoryview(b"HTTP/1.1 100 Continue\r\n\r\n"))
                    self._flush(c)
                    if c not in self.conns:
                        return
            if c.phase == BODY:
                req = c.req
                assert req is not None
                if len(c.inbuf) < req.length:
                    self._watch(c)
                    return
                body = bytes(c.inbuf[:req.length])
                del c.inbuf[:req.length]
                self.inflight -= c.reserved
                c.reserved = 0
                self._dispatch(c, req, body)  # on to the next request once this reply is out

    def _admit(self, c: _Conn, req: _Request) -> None:
        """Checks on the head alone, before any body byte is read."""
        h = req.headers
        if "transfer-encoding" in h:
            raise _Reject(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted; send "
                          "Content-Length", close=True)
        raw = h.get("content-length")
        if raw is not None and not raw.isdigit():
            raise _Reject(HTTPStatus.BAD_REQUEST, "bad Content-Length", close=True)
        self.s.counters.requests += 1
        if self.s.token is not None and not self.s._authorized(h.get("authorization")):
            raise _Reject(HTTPStatus.UNAUTHORIZED,
                          "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                          f"(mooncake clients: set {TOKEN_ENV})", close=bool(raw and raw != "0"),
                          counter="refused_auth",
                          headers={"WWW-Authenticate": 'Bearer realm="mooncake-metadata"'})
        if req.method not in _METHODS:
            raise _Reject(HTTPStatus.NOT_IMPLEMENTED, f"method {req.method[:20]!r} not "
                          "implemented", close=True)
        if raw is None:
            if req.method == "PUT":
                raise _Reject(HTTPStatus.LENGTH_REQUIRED, "PUT needs a Content-Length",
                              close=True)
            raw = "0"
        n = int(raw)
        limit = self.s.max_body
        if n > limit:
            raise _Reject(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"body of {n} bytes exceeds the server's limit of {limit}", close=True,
                          counter="over_quota")
        if n > SMALL_BODY:
            if self.inflight + n > self.s.max_inflight:
                raise _Reject(HTTPStatus.SERVICE_UNAVAILABLE,
                              f"too many large bodies in flight ({self.inflight} bytes); retry",
                              close=True, counter="busy")
            self.inflight += n
            c.reserved = n
        req.length = n

    # -- replies ---------------------------------------------------------------------------
    def _reject(self, c: _Conn, r: _Reject) -> None:
        setattr(self.s.counters, r.counter, getattr(self.s.counters, r.counter) + 1)
        log.debug("metadata-server %s: %d %s", c.peer, r.status, r.text)
        self._reply(c, r.status, r.text, close=r.close, headers=r.headers)

    def _reply(self, c: _Conn, status: int, body: bytes | str = b"",
               ctype: str = "text/plain", close: bool = False,
               headers: dict[str, str] | None = None, head_only: bool = False) -> None:
        data = body.encode() if isinstance(body, str) else body
        req = c.req
        if req is not None and not req.keep_alive:
            close = True
        head_only = head_only or (req is not None and req.method == "HEAD")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        lines = [f"HTTP/1.1 {int(status)} {phrase}", "Server: mooncake-metadata",
                 f"Content-Type: {ctype}", f"Content-Length: {len(data)}"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if close:
            lines.append("Connection: close")
        elif req is not None and req.version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        c.out.append(memoryview(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")))
        if data and not head_only:
            c.out.append(memoryview(data))
        c.close_after = close
        c.phase = WRITE
        c.deadline = time.monotonic() + self.s.frame_timeout
        self._flush(c)

    def _flush(self, c: _Conn) -> None:
        while c.out:
            try:
                n = c.sock.send(c.out[0])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(c)
                return
            if n == len(c.out[0]):
                c.out.pop(0)
            else:
                c.out[0] = c.out[0][n:]
                break
        if not c.out and c.phase == WRITE:
            c.req = None
            if c.close_after:
                try:
                    c.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self._close(c)
                    return
                c.phase = LINGERING
                c.deadline = time.monotonic() + min(LINGER, self.s.frame_timeout)
                c.inbuf = bytearray()
            else:  # the caller (_process, or the loop via _resume) parses what is buffered
                c.phase = HEAD if c.inbuf else IDLE
                c.deadline = time.monotonic() + (self.s.frame_timeout if c.inbuf
                                                 else self.s.idle_timeout)
        self._watch(c)

    def _resume(self, c: _Conn) -> None:
        if c in self.conns and c.phase == HEAD and c.inbuf:
            self._process(c)

    # -- the protocol ----------------------------------------------------------------------
    def _dispatch(self, c: _Conn, req: _Request, body: bytes) -> None:
        parts = urlsplit(req.target)
        path = parts.path.rstrip("/") or "/"
        q = parse_qs(parts.query, keep_blank_values=True)
        s = self.s
        try:
            if req.method in ("GET", "HEAD"):
                self._get(c, req, path, q)
                return
            if path != s.path:
                self._reply(c, HTTPStatus.NOT_FOUND, f"unknown path {path!r}; use {s.path}")
                return
            key = self._key(q)
            if req.method == "DELETE":
                ttl = None
            else:
                ttl = self._ttl(req.headers)
            owner = self._owner(req.headers)
            if owner is None and not s.anonymous_writes:
                raise _Reject(HTTPStatus.FORBIDDEN,
                              f"this server accepts writes only with an {OWNER_HEADER} header "
                              "(start it with --allow-anonymous to accept anonymous writes)",
                              counter="refused_owner")
            if req.method == "PUT":
                result = s.table.put(key, body, ttl, owner)
                ok_text = "metadata updated"
            elif req.method == "POST":
                result = s.table.refresh(key, ttl, owner)
                ok_text = "lease extended"
            else:
                result = s.table.delete(key, owner)
                ok_text = "metadata deleted"
        except _Reject as r:
            self._reject(c, r)
            return
        if result == OK:
            self._reply(c, HTTPStatus.OK, ok_text)
        elif result == NOT_FOUND:
            self._reply(c, HTTPStatus.NOT_FOUND, "metadata not found")
        elif result == FORBIDDEN:
            s.counters.refused_owner += 1
            log.info("metadata-server: %s %s of %s refused: the key belongs to another owner",
                     c.peer, req.method, key)
            self._reply(c, HTTPStatus.FORBIDDEN,
                        f"key {key!r} belongs to another owner: only the client that published "
                        "it may PUT, refresh or DELETE it, until its lease expires or it "
                        "deletes it")
        elif result == FULL_KEYS:
            s.counters.over_quota += 1
            self._reply(c, HTTPStatus.INSUFFICIENT_STORAGE,
                        f"the server holds its limit of {s.table.max_keys} keys")
        else:
            s.counters.over_quota += 1
            self._reply(c, HTTPStatus.INSUFFICIENT_STORAGE,
                        f"storing {len(key) + len(body)} bytes for key {key!r} would exceed the "
                        f"server's limit of {s.table.max_bytes} bytes stored "
                        f"({s.table.bytes} in use)")

    def _get(self, c: _Conn, req: _Request, path: str, q: dict[str, list[str]]) -> None:
        s = self.s
        head = req.method == "HEAD"
        if path == s.path:
            try:
                key = self._key(q)
            except _Reject as r:
                self._reject(c, r)
                return
            value = s.table.get(key)
            if value is None:
                self._reply(c, HTTPStatus.NOT_FOUND, "metadata not found", head_only=head)
            else:
                self._reply(c, HTTPStatus.OK, value, "application/json", head_only=head)
        elif path == "/keys":
            prefix = q.get("prefix", [""])[0]
            self._reply(c, HTTPStatus.OK, json.dumps(s.table.keys(prefix)), "application/json",
                        head_only=head)
        elif path == "/stats":
            self._reply(c, HTTPStatus.OK, json.dumps(s.stats), "application/json",
                        head_only=head)
        elif path == "/health":
            self._reply(c, HTTPStatus.OK, "ok", head_only=head)
        else:
            self._reply(c, HTTPStatus.NOT_FOUND, f"unknown path {path!r}; use {s.path}",
                        head_only=head)

    @staticmethod
    def _key(q: dict[str, list[str]]) -> str:
        keys = q.get("key")
        if not keys or not keys[0]:
            raise _Reject(HTTPStatus.BAD_REQUEST, "missing query parameter ?key=")
        return keys[0]

    @staticmethod
    def _ttl(headers: dict[str, str]) -> float | None:
        raw = headers.get(TTL_HEADER.lower())
        if raw is None:
            return None
        try:
            ttl = float(raw)
        except ValueError:
            ttl = -1.0
        if not 0 < ttl <= MAX_TTL:
            raise _Reject(HTTPStatus.BAD_REQUEST,
                          f"{TTL_HEADER}: {raw[:40]!r} must be seconds in (0, {MAX_TTL:.0f}]")
        return ttl

    def _owner(self, headers: dict[str, str]) -> bytes | None:
        raw = headers.get(OWNER_HEADER.lower())
        if raw is None:
            return None
        if not 0 < len(raw) <= MAX_OWNER or not _TOKEN_CHARS.fullmatch(raw):
            raise _Reject(HTTPStatus.BAD_REQUEST, f"{OWNER_HEADER} must be 1..{MAX_OWNER} "
                          "visible ASCII characters")
        return _hash_owner(self.s._salt, raw)


# --------------------------------------------------------------------------- the server


def _fd_limit() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    except (ImportError, OSError, ValueError):
        return 1024


def check_token(token: str, what: str = "token") -> str:
    """A bearer token as given (surrounding whitespace dropped); ValueError when unusable."""
    token = token.strip()
    if not token:
        raise ValueError(f"the {what} is empty")
    if not _TOKEN_CHARS.fullmatch(token) or len(token) > 4096:
        raise ValueError(f"the {what} must be at most 4096 visible ASCII characters (no spaces)")
    return token


class MetadataServer:
    """The metadata server; ``start()`` serves in a background thread, ``serve_forever()`` here.

    ``ttl`` (seconds, 0 = never) is the lease of keys PUT without an ``X-Mooncake-TTL`` header.
    ``token``: the bearer token every request must carry (None: none needed).
    ``require_owner``/``allow_anonymous``: see the module docstring.  ``max_connections``
    defaults to 4096, or less when the process's descriptor limit is lower.
    :attr:`stats` holds the counters.
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 8080, *, ttl: float = 0.0,
                 max_body: int = DEFAULT_MAX_BODY, max_keys: int = DEFAULT_MAX_KEYS,
                 path: str = "/metadata", token: str | None = None,
                 require_owner: bool = False, allow_anonymous: bool = False,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_connections: int | None = None,
                 frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        if not 0 <= ttl <= MAX_TTL:
            raise ValueError(f"ttl={ttl} must be seconds in [0, {MAX_TTL:.0f}] (0 = never)")
        if max_body <= 0 or max_keys <= 0 or max_bytes <= 0:
            raise ValueError("max_body, max_keys and max_bytes must be positive")
        if max_connections is None:
            max_connections = max(16, min(DEFAULT_MAX_CONNECTIONS, _fd_limit() - 64))
        if max_connections <= 0:
            raise ValueError("max_connections must be positive")
        for name, v in (("frame_timeout", frame_timeout), ("idle_timeout", idle_timeout)):
            if not 0 < v <= 86400:
                raise ValueError(f"{name}={v} must be seconds in (0, 86400]")
        self.token = None if token is None else check_token(token)
        self.require_owner = require_owner
        self.allow_anonymous = allow_anonymous
        #: writes without an owner header are accepted
        self.anonymous_writes = allow_anonymous or not (require_owner or self.token is not None)
        self.max_body = max_body
        self.max_inflight = max(4 * max_body, 4 * SMALL_BODY)
        self.max_connections = max_connections
        self.frame_timeout = float(frame_timeout)
        self.idle_timeout = float(idle_timeout)
        self.path = "/" + path.strip("/")
        self.counters = _Counters()
        self._salt = secrets.token_bytes(16)
        self._table = _Table(ttl, max_keys, max_bytes)
        self.host = host
        self._listener = socket.create_server((host, port), backlog=1024,
                                              reuse_port=False)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._loop = _Loop(self, self._listener)
        self._thread: threading.Thread | None = None
        self._closed = False

    def __repr__(self) -> str:  # never the token
        return (f"MetadataServer({self.url!r}, token={'set' if self.token else 'none'}, "
                f"anonymous_writes={self.anonymous_writes})")

    @property
    def url(self) -> str:
        """The connection string engines pass as ``metadata_server``."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}{self.path}"

    @property
    def table(self) -> _Table:
        return self._table

    @property
    def mode(self) -> str:
        """``open``, ``owners`` (--require-owner) or ``token``; ``+anonymous`` when
        --allow-anonymous relaxes one of the latter."""
        m = "token" if self.token is not None else "owners" if self.require_owner else "open"
        return m + ("+anonymous" if m != "open" and self.allow_anonymous else "")

    @property
    def stats(self) -> dict[str, Any]:
        """Counters (``refused_auth``, ``refused_owner``, ``over_quota``, ``conn_refused``,
        ``timeouts``, ...) and gauges (``connections``, ``keys``, ``bytes``)."""
        out: dict[str, Any] = self.counters.snapshot()
        out.update(connections=len(self._loop.conns), keys=len(self._table),
                   bytes=self._table.bytes, max_connections=self.max_connections,
                   mode=self.mode)
        return out

    def _authorized(self, header: str | None) -> bool:
        assert self.token is not None
        scheme, _, given = (header or "").strip().partition(" ")
        ok = hmac.compare_digest(given.strip().encode("latin-1", "replace"),
                                 self.token.encode())
        return ok and scheme.lower() == "bearer"

    def start(self) -> MetadataServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop.run, daemon=True,
                                            name="mc-metadata-server")
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`shutdown` (from another thread or a signal)."""
        self._loop.run()

    def shutdown(self) -> None:
        """Make the serving loop return (safe from a signal handler)."""
        self._loop.stop.set()
        self._loop.wake()

    def stop(self) -> None:
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.server_close()

    def server_close(self) -> None:
        if not self._closed:
            self._closed = True
            self._listener.close()
            self._loop.close()

    def __enter__(self) -> MetadataServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s} must be a positive integer")
    return v


def _size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", s, re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive number of bytes (K/M/G "
                                         "suffixes allowed)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def _ttl(s: str) -> float:
    v = float(s)
    if not 0 <= v <= MAX_TTL:
        raise argparse.ArgumentTypeError(f"{s} must be seconds in [0, {MAX_TTL:.0f}]")
    return v


def _seconds(s: str) -> float:
    v = float(s)
    if not 0 < v <= 86400:
        raise argparse.ArgumentTypeError(f"{s} must be seconds in (0, 86400]")
    return v


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server's options to ``p``."""
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--ttl", type=_ttl, default=0.0,
                   help="lease in seconds of keys PUT without an X-Mooncake-TTL header "
                        "(default 0: they never expire, as in Mooncake)")
    p.add_argument("--max-body", type=_size, default=DEFAULT_MAX_BODY,
                   help=f"largest accepted PUT body in bytes (default {DEFAULT_MAX_BODY})")
    p.add_argument("--max-keys", type=_positive_int, default=DEFAULT_MAX_KEYS,
                   help=f"most keys held (default {DEFAULT_MAX_KEYS})")
    p.add_argument("--max-bytes", type=_size, default=DEFAULT_MAX_BYTES,
                   help="most bytes stored, keys and values together (default "
                        f"{DEFAULT_MAX_BYTES >> 20} MiB)")
    p.add_argument("--max-connections", type=_positive_int, default=None,
                   help=f"most connections open at once (default {DEFAULT_MAX_CONNECTIONS}, or "
                        "less under a lower descriptor limit)")
    p.add_argument("--frame-timeout", type=_seconds, default=DEFAULT_FRAME_TIMEOUT,
                   help="seconds a request may take to arrive once its first byte did, and a "
                        f"response to be read (default {DEFAULT_FRAME_TIMEOUT:g})")
    p.add_argument("--idle-timeout", type=_seconds, default=DEFAULT_IDLE_TIMEOUT,
                   help="seconds a kept-alive connection may sit idle (default "
                        f"{DEFAULT_IDLE_TIMEOUT:g})")
    p.add_argument("--token", default=None,
                   help=f"bearer token every request must carry (default: ${TOKEN_ENV}, else "
                        "none; prefer --token-file or the environment: a command line is "
                        "visible to every local user)")
    p.add_argument("--token-file", default=None,
                   help="file holding the bearer token (surrounding whitespace ignored)")
    p.add_argument("--require-owner", action="store_true",
                   help="refuse PUT/POST/DELETE without an X-Mooncake-Owner header")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="accept writes without an X-Mooncake-Owner header even with a token or "
                        "--require-owner (those keys stay writable by any client)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    return p


def _token_from(args: argparse.Namespace) -> str | None:
    """--token, else --token-file, else $MC_METADATA_TOKEN; None when none is given."""
    if args.token is not None:
        return check_token(args.token, "--token")
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                text = f.read(8192)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--token-file {args.token_file}: {e}") from None
        return check_token(text, f"token in {args.token_file}")
    env = os.environ.get("MC_METADATA_TOKEN")
    if env:
        return check_token(env, TOKEN_ENV)
    return None


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        token = _token_from(args)
    except ValueError as e:
        log.error("metadata-server: %s", e)
        return 2
    try:
        server = MetadataServer(args.host, args.port, ttl=args.ttl, max_body=args.max_body,
                                max_keys=args.max_keys, max_bytes=args.max_bytes,
                                max_connections=args.max_connections,
                                frame_timeout=args.frame_timeout,
                                idle_timeout=args.idle_timeout, token=token,
                                require_owner=args.require_owner,
                                allow_anonymous=args.allow_anonymous)
    except OSError as e:
        log.error("metadata-server: cannot listen on %s:%s: %s", args.host, args.port, e)
        return 1

    def _term(signum: int, frame: object) -> None:
        server.shutdown()

    signal.signal(signal.SIGTERM, _term)
    log.info("metadata-server: listening on %s:%d (connection string %s), mode %s, "
             "at most %d connections", args.host, server.port, server.url, server.mode,
             server.max_connections)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("metadata-server: no token: anyone who reaches %s:%d can read every "
                    "descriptor%s", args.host, server.port,
                    "" if not server.anonymous_writes else
                    " and write every key no owner holds (see --token, --require-owner)")
    print(f"mooncake metadata server listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mooncake metadata-server`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("metadata-server", help="run the HTTP metadata server",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    """``mooncake_http_metadata_server [--host H] [--port P] [--ttl S] [--token-file F] ...``"""
    p = argparse.ArgumentParser(prog="mooncake_http_metadata_server",
                                description=__doc__.splitlines()[0])
    return _run(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
