"""``http://host:port/metadata``: Mooncake's HTTP metadata store (``GET/PUT/DELETE ?key=K``).

Heartbeat (see :mod:`mooncake.metadata.http_server`): PUTs carry ``X-Mooncake-TTL: TTL``;
every TTL/3 the client POSTs ``?key=K`` to extend the lease and re-PUTs the descriptor when the
server answers 404 (it restarted, or the key expired) or 405 (a plain Mooncake server that has
no leases).  Standard library only (``http.client``), one keep-alive connection per thread.

Every request has a whole-call deadline (:func:`exchange`): connect, send and the whole response
within ``timeout`` seconds, however slowly the server drips it, and a response body of at most
:data:`MAX_RESPONSE` bytes.

Credentials: with ``MC_METADATA_TOKEN`` set every request carries ``Authorization: Bearer
<token>``; every write (PUT/POST/DELETE) carries ``X-Mooncake-Owner: <secret>``, a random secret
made when the store is created (one per engine; ``MC_METADATA_OWNER_SECRET`` pins it, e.g. so
that a restarted engine reclaims its key before the old lease ends), so our server binds our keys
to us and refuses other writers.  Neither is ever logged.  A 401 or 403 raises
:class:`~mooncake.metadata.base.MetadataAuthError` naming the key and what to set.
"""

from __future__ import annotations

import functools
import http.client
import io
import re
import secrets
import ssl
import threading
import time
from urllib.parse import quote, urlsplit

from mooncake.errors import ConfigError, PeerUnreachable
from mooncake.metadata.base import LeasedStore, MetadataAuthError, MetadataContext
from mooncake.metadata.http_server import OWNER_HEADER, TTL_HEADER
from mooncake.rpc import DeadlineReader

__all__ = ["HttpMetadata", "exchange", "MAX_RESPONSE"]

#: the largest response body a metadata store may send (descriptors are kilobytes)
MAX_RESPONSE = 64 << 20


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTP response whose every read ends by one deadline (see :class:`DeadlineReader`)."""

    def __init__(self, sock, *args, deadline: float, **kwargs) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the plain makefile() reader: replaced, the socket stays open
        self.fp = io.BufferedReader(DeadlineReader(sock, deadline))


def exchange(c: http.client.HTTPConnection, method: str, url: str, body: bytes | None,
             headers: dict[str, str], timeout: float) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on ``c`` and its whole response, all within ``timeout`` seconds: connecting
    (if ``c`` is not connected), sending, and reading the status, headers and body (at most
    :data:`MAX_RESPONSE` bytes).  Past the deadline, TimeoutError; the caller drops ``c``."""
    deadline = time.monotonic() + timeout
    c.timeout = timeout
    if c.sock is not None:
        c.sock.settimeout(timeout)
    c.response_class = functools.partial(_DeadlineResponse, deadline=deadline)
    c.request(method, url, body=body, headers=headers)
    r = c.getresponse()
    data = r.read(MAX_RESPONSE + 1)
    if len(data) > MAX_RESPONSE:
        raise ConnectionError(f"response body larger than {MAX_RESPONSE} bytes")
    if not r.isclosed():  # a body without a length ends with the connection
        r.close()
        c.close()
    return r, data


class HttpMetadata(LeasedStore):
    """Client of an HTTP metadata server (ours, Mooncake's Go/Python demo, or any compatible)."""

    name = "http"

    def __init__(self, address: str, ctx: MetadataContext) -> None:
        super().__init__(address, ctx)
        u = urlsplit(address)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"metadata_server {address!r}: expected http://host:port/metadata")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            raise ConfigError(f"metadata_server {address!r}: bad port") from None
        self._https = u.scheme == "https"
        self._host, self._port = u.hostname, port
        self._path = u.path or "/metadata"
        self.where = f"http server {address}"
        self.timeout = max(1.0, min(10.0, self.ttl / 3 if self.ttl > 0 else 10.0))
        token = self._secret("MC_METADATA_TOKEN", 1)
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._owner = self._secret("MC_METADATA_OWNER_SECRET", 16) or secrets.token_urlsafe(32)
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()
        self.connect()

    def __repr__(self) -> str:  # no secrets
        return f"<HttpMetadata {self.address} token={'set' if self._auth else 'none'}>"

    def _secret(self, name: str, min_len: int) -> str:
        """A secret option: visible ASCII (it goes into a header); never echoed in errors."""
        v = str(self.option(name, "") or "").strip()
        if v and (len(v) < min_len or len(v) > 512 or not re.fullmatch(r"[\x21-\x7e]+", v)):
            raise ConfigError(f"{name} must be {min_len}..512 visible ASCII characters without "
                              "spaces (its value is not shown)")
        return v

    # -- transport -----------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            if self._https:
                c = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                context=ssl.create_default_context())
            else:
                c = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    def _drop_conn(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None
            with self._conns_lock:
                if c in self._conns:
                    self._conns.remove(c)

    def _request(self, method: str, key: str | None, body: bytes | None = None,
                 headers: dict[str, str] | None = None, path: str | None = None
                 ) -> tuple[int, bytes]:
        url = path or self._path
        if key is not None:
            url += "?key=" + quote(key, safe="")
        hdrs = {**self._auth, **(headers or {})}
        if method in ("PUT", "POST", "DELETE"):
            hdrs[OWNER_HEADER] = self._owner
        if body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        for attempt in (0, 1):  # a kept-alive connection the server closed: retry once, fresh
            reused = getattr(self._local, "conn", None) is not None
            c = self._conn()
            try:
                r, data = exchange(c, method, url, body, hdrs, self.timeout)
                if r.will_close:
                    self._drop_conn()
                return r.status, data
            except (OSError, http.client.HTTPException) as e:
                self._drop_conn()
                if attempt == 0 and reused and not isinstance(e, TimeoutError):
                    continue
                if isinstance(e, OSError):
                    raise
                raise ConnectionError(f"bad HTTP exchange: {e!r}") from None
        raise AssertionError("unreachable")

    def _fail(self, status: int, data: bytes, doing: str,
              key: str | None = None) -> PeerUnreachable | MetadataAuthError:
        text = data[:200].decode(errors="replace").strip()
        what = f"metadata store {self.where} answered {status} while {doing}"
        if status == 401:
            fix = ("the token differs from the server's: set MC_METADATA_TOKEN to the token the "
                   "server was started with" if self._auth else "the server requires a token: "
                   "set MC_METADATA_TOKEN to the token the server was started with")
            return MetadataAuthError(f"{what} (key {key!r}): {fix}")
        if status == 403:
            return MetadataAuthError(
                f"{what}: {text}; key {key!r} belongs to another client (another engine "
                "publishing the same segment name, an earlier run of this engine whose lease "
                "has not expired yet, or an impostor): wait for its lease to end, or set "
                "MC_METADATA_OWNER_SECRET to the secret the owning engine used")
        return PeerUnreachable(f"{what}: {text}")

    def _lease_headers(self) -> dict[str, str]:
        return {TTL_HEADER: f"{self.ttl:g}"} if self.ttl > 0 else {}

    # -- LeasedStore hooks ---------------------------------------------------------------
    def _ping(self) -> None:
        # A GET of a key nobody writes: 200/404 both prove a metadata server answers.
        status, data = self._request("GET", self.key("__mooncake_ping__"))
        if status not in (200, 404):
            raise self._fail(status, data, "connecting", self.key("__mooncake_ping__"))

    def _put(self, key: str, value: bytes) -> None:
        status, data = self._request("PUT", key, value, self._lease_headers())
        if status != 200:
            raise self._fail(status, data, f"writing {key!r}", key)

    def _get(self, key: str) -> bytes | None:
        status, data = self._request("GET", key)
        if status == 404:
            return None
        if status != 200:
            raise self._fail(status, data, f"reading {key!r}", key)
        return data

    def _delete(self, key: str) -> None:
        status, data = self._request("DELETE", key)
        if status not in (200, 404):
            raise self._fail(status, data, f"deleting {key!r}", key)

    def _refresh(self, items: dict[str, bytes]) -> None:
        for key, value in items.items():
            status, data = self._request("POST", key, b"", self._lease_headers())
            if status in (404, 405, 501):  # lost (restart/expiry) or a server without leases
                self._put(key, value)
            elif status != 200:
                raise self._fail(status, data, f"refreshing {key!r}", key)

    def _close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.close()
