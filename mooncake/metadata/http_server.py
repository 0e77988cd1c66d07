"""A built-in HTTP metadata server, wire-compatible with Mooncake's ``/metadata?key=K`` store.

Protocol (Mooncake's, plus an optional lease):

=========================== ==================================================================
``GET /metadata?key=K``     200 and the stored bytes, or 404
``PUT /metadata?key=K``     store the body (``Content-Length`` required, at most ``--max-body``)
``DELETE /metadata?key=K``  200, or 404 when there was no such key
``POST /metadata?key=K``    heartbeat: extend K's lease; 404 when K is unknown (the client
                            then PUTs it again — this is how engines re-publish after a restart)
``GET /keys?prefix=P``      JSON list of the live keys starting with P
``GET /health``             200 ``ok``
=========================== ==================================================================

Leases: a PUT or POST carrying ``X-Mooncake-TTL: <seconds>`` makes the key expire when no PUT or
POST refreshes it within that many seconds (mooncake clients send TTL = 3 × their heartbeat
period).  A PUT without the header (a Mooncake C++ client) never expires, unless the server was
started with ``--ttl S``, which gives such keys an S-second lease.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["MetadataServer", "TTL_HEADER", "main", "add_cli", "add_arguments"]

log = logging.getLogger(__name__)

TTL_HEADER = "X-Mooncake-TTL"
MAX_TTL = 7 * 24 * 3600.0
DEFAULT_MAX_BODY = 16 << 20
DEFAULT_MAX_KEYS = 1_000_000


@dataclass
class _Entry:
    value: bytes
    ttl: float  # 0 = never expires
    expires: float  # monotonic deadline; math.inf when ttl == 0


class _Table:
    """The key → value map with leases; every method is thread-safe."""

    def __init__(self, default_ttl: float, max_keys: int) -> None:
        self.default_ttl = default_ttl
        self.max_keys = max_keys
        self._d: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def _live(self, key: str, now: float) -> _Entry | None:
        e = self._d.get(key)
        if e is not None and e.expires <= now:
            del self._d[key]
            log.info("metadata-server: key %s expired (no heartbeat for %.1fs)", key, e.ttl)
            return None
        return e

    def get(self, key: str) -> bytes | None:
        with self._lock:
            e = self._live(key, time.monotonic())
            return None if e is None else e.value

    def put(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store; False when the table is full."""
        ttl = self.default_ttl if ttl is None else ttl
        now = time.monotonic()
        with self._lock:
            if key not in self._d and len(self._d) >= self.max_keys:
                self._sweep(now)
                if len(self._d) >= self.max_keys:
                    return False
            self._d[key] = _Entry(value, ttl, now + ttl if ttl > 0 else math.inf)
            return True

    def refresh(self, key: str, ttl: float | None) -> bool:
        now = time.monotonic()
        with self._lock:
            e = self._live(key, now)
            if e is None:
                return False
            if ttl is not None:
                e.ttl = ttl
            e.expires = now + e.ttl if e.ttl > 0 else math.inf
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._live(key, time.monotonic()) is not None and self._d.pop(key) is not None

    def keys(self, prefix: str) -> list[str]:
        with self._lock:
            self._sweep(time.monotonic())
            return sorted(k for k in self._d if k.startswith(prefix))

    def _sweep(self, now: float) -> None:
        for k in [k for k, e in self._d.items() if e.expires <= now]:
            log.info("metadata-server: key %s expired", k)
            del self._d[k]

    def sweep(self) -> None:
        with self._lock:
            self._sweep(time.monotonic())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mooncake-metadata"
    timeout = 30  # seconds a client may stall mid-request before its connection is dropped
    disable_nagle_algorithm = True  # small replies: no 40 ms Nagle/delayed-ACK stalls
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("metadata-server %s: " + format, self.client_address[0], *args)

    # -- helpers -------------------------------------------------------------------------
    def _reply(self, status: int, body: bytes | str = b"", ctype: str = "text/plain",
               close: bool = False) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _route(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return parts.path.rstrip("/") or "/", parse_qs(parts.query, keep_blank_values=True)

    def _key(self, q: dict[str, list[str]]) -> str | None:
        keys = q.get("key")
        if not keys or not keys[0]:
            self._discard_body()
            self._reply(HTTPStatus.BAD_REQUEST, "missing query parameter ?key=")
            return None
        return keys[0]

    def _ttl(self) -> tuple[bool, float | None]:
        raw = self.headers.get(TTL_HEADER)
        if raw is None:
            return True, None
        try:
            ttl = float(raw)
        except ValueError:
            ttl = -1.0
        if not 0 < ttl <= MAX_TTL:
            self._discard_body()
            self._reply(HTTPStatus.BAD_REQUEST,
                        f"{TTL_HEADER}: {raw!r} must be seconds in (0, {MAX_TTL:.0f}]")
            return False, None
        return True, ttl

    def _body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted; send "
                        "Content-Length", close=True)
            return None
        raw = self.headers.get("Content-Length")
        try:
            n = int(raw) if raw is not None else -1
        except ValueError:
            n = -1
        if n < 0:
            self._reply(HTTPStatus.LENGTH_REQUIRED, "PUT needs a Content-Length", close=True)
            return None
        limit = self.server.max_body
        if n > limit:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"body of {n} bytes exceeds the server's limit of {limit}", close=True)
            return None
        return self.rfile.read(n)

    def _discard_body(self) -> None:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = 0
        if 0 < n <= self.server.max_body:
            self.rfile.read(n)
        elif n:
            self.close_connection = True

    # -- methods -------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        path, q = self._route()
        table = self.server.table
        if path == self.server.path:
            key = self._key(q)
            if key is None:
                return
            value = table.get(key)
            if value is None:
                self._reply(HTTPStatus.NOT_FOUND, "metadata not found")
            else:
                self._reply(HTTPStatus.OK, value, "application/json")
        elif path == "/keys":
            prefix = q.get("prefix", [""])[0]
            self._reply(HTTPStatus.OK, json.dumps(table.keys(prefix)), "application/json")
        elif path == "/health":
            self._reply(HTTPStatus.OK, "ok")
        else:
            self._reply(HTTPStatus.NOT_FOUND, f"unknown path {path!r}; use {self.server.path}")

    do_HEAD = do_GET  # noqa: N815

    def do_PUT(self) -> None:  # noqa: N802
        path, q = self._route()
        if path != self.server.path:
            self._discard_body()
            self._reply(HTTPStatus.NOT_FOUND, f"unknown path {path!r}; use {self.server.path}")
            return
        key = self._key(q)
        if key is None:
            return
        ok, ttl = self._ttl()
        if not ok:
            return
        body = self._body()
        if body is None:
            return
        if not self.server.table.put(key, body, ttl):
            self._reply(HTTPStatus.INSUFFICIENT_STORAGE,
                        f"the server holds its limit of {self.server.table.max_keys} keys")
            return
        self._reply(HTTPStatus.OK, "metadata updated")

    def _bodyless_key(self) -> str | None:
        """The key of a POST/DELETE on the metadata path (body discarded), or None once an
        error reply was sent."""
        path, q = self._route()
        self._discard_body()
        if path != self.server.path:
            self._reply(HTTPStatus.NOT_FOUND, f"unknown path {path!r}; use {self.server.path}")
            return None
        return self._key(q)

    def do_POST(self) -> None:  # noqa: N802
        key = self._bodyless_key()
        if key is None:
            return
        ok, ttl = self._ttl()
        if not ok:
            return
        if self.server.table.refresh(key, ttl):
            self._reply(HTTPStatus.OK, "lease extended")
        else:
            self._reply(HTTPStatus.NOT_FOUND, "metadata not found")

    def do_DELETE(self) -> None:  # noqa: N802
        key = self._bodyless_key()
        if key is None:
            return
        if self.server.table.delete(key):
            self._reply(HTTPStatus.OK, "metadata deleted")
        else:
            self._reply(HTTPStatus.NOT_FOUND, "metadata not found")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    table: _Table
    max_body: int
    path: str

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished mid-reply is routine; anything else is logged with its trace."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("metadata-server: client %s: %s", client_address[0], exc)
        else:
            log.exception("metadata-server: error serving %s", client_address[0])


class MetadataServer:
    """The metadata server; ``start()`` serves in a background thread, ``serve_forever()`` here.

    ``ttl`` (seconds, 0 = never) is the lease of keys PUT without an ``X-Mooncake-TTL`` header.
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 8080, *, ttl: float = 0.0,
                 max_body: int = DEFAULT_MAX_BODY, max_keys: int = DEFAULT_MAX_KEYS,
                 path: str = "/metadata") -> None:
        if not 0 <= ttl <= MAX_TTL:
            raise ValueError(f"ttl={ttl} must be seconds in [0, {MAX_TTL:.0f}] (0 = never)")
        if max_body <= 0 or max_keys <= 0:
            raise ValueError("max_body and max_keys must be positive")
        self.httpd = _Server((host, port), _Handler)
        self.httpd.table = _Table(ttl, max_keys)
        self.httpd.max_body = max_body
        self.httpd.path = "/" + path.strip("/")
        self.host = host
        self.port: int = self.httpd.server_address[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        """The connection string engines pass as ``metadata_server``."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}{self.httpd.path}"

    @property
    def table(self) -> _Table:
        return self.httpd.table

    def _sweeper(self) -> None:
        while not self._stop.wait(0.5):
            self.httpd.table.sweep()

    def start(self) -> MetadataServer:
        for target in (self.httpd.serve_forever, self._sweeper):
            t = threading.Thread(target=target, daemon=True, name="mc-metadata-server")
            t.start()
            self._threads.append(t)
        return self

    def serve_forever(self) -> None:
        sweeper = threading.Thread(target=self._sweeper, daemon=True)
        sweeper.start()
        try:
            self.httpd.serve_forever()
        finally:
            self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> MetadataServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s} must be a positive integer")
    return v


def _ttl(s: str) -> float:
    v = float(s)
    if not 0 <= v <= MAX_TTL:
        raise argparse.ArgumentTypeError(f"{s} must be seconds in [0, {MAX_TTL:.0f}]")
    return v


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server's options to ``p``."""
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--ttl", type=_ttl, default=0.0,
                   help="lease in seconds of keys PUT without an X-Mooncake-TTL header "
                        "(default 0: they never expire, as in Mooncake)")
    p.add_argument("--max-body", type=_positive_int, default=DEFAULT_MAX_BODY,
                   help=f"largest accepted PUT body in bytes (default {DEFAULT_MAX_BODY})")
    p.add_argument("--max-keys", type=_positive_int, default=DEFAULT_MAX_KEYS,
                   help=f"most keys held (default {DEFAULT_MAX_KEYS})")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    return p


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = MetadataServer(args.host, args.port, ttl=args.ttl, max_body=args.max_body,
                                max_keys=args.max_keys)
    except OSError as e:
        log.error("metadata-server: cannot listen on %s:%s: %s", args.host, args.port, e)
        return 1

    def _term(signum: int, frame: object) -> None:
        threading.Thread(target=server.httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _term)
    log.info("metadata-server: listening on %s:%d (connection string %s)", args.host,
             server.port, server.url)
    print(f"mooncake metadata server listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mooncake metadata-server`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("metadata-server", help="run the HTTP metadata server",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    """``mooncake_http_metadata_server [--host H] [--port P] [--ttl S] ...``"""
    p = argparse.ArgumentParser(prog="mooncake_http_metadata_server",
                                description=__doc__.splitlines()[0])
    return _run(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
