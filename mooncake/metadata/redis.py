"""``redis://[user:password@]host:port[/db]``: segment descriptors in Redis (``rediss://``: TLS).

A small RESP2 client on the standard library (no ``redis`` package needed).  Credentials and the
database come from the URL or, as in Mooncake, from ``MC_REDIS_USERNAME``, ``MC_REDIS_PASSWORD``
and ``MC_REDIS_DB_INDEX`` (0–255).  Keys are written with ``SET key value PX ttl`` and kept alive
by ``PEXPIRE`` every TTL/3; a key Redis no longer holds (it restarted, or the key expired during
an outage) is written again.

Every new connection logs in first (``AUTH [user] password``, then ``SELECT db``).  ``rediss://``
connects over TLS verified against ``MC_REDIS_CA_FILE`` (default: the system CAs), presenting
``MC_REDIS_CERT_FILE``/``MC_REDIS_KEY_FILE`` to servers that check clients
(``tls-auth-clients``).  A refused login (``WRONGPASS``/``NOAUTH``/``NOPERM``) or a certificate
that does not verify raises :class:`~mooncake.metadata.base.MetadataAuthError` naming the
options to set.
"""

from __future__ import annotations

import io
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from mooncake.errors import ConfigError, PeerUnreachable
from mooncake.metadata.base import (
    LeasedStore,
    MetadataAuthError,
    MetadataContext,
    tls_context,
    tls_refusal,
)
from mooncake.rpc import DeadlineReader

__all__ = ["RedisMetadata", "RespError", "RespConnection"]

_MAX_BULK = 512 << 20


class RespError(Exception):
    """An error reply (``-ERR ...``) from the server."""


class RespConnection:
    """One RESP2 connection: ``call(*args)`` and ``pipeline([...])``; not thread-safe.

    Each pipeline has a whole-call deadline of ``timeout`` seconds: sending and every reply,
    however slowly the server drips them (past it, TimeoutError)."""

    def __init__(self, host: str, port: int, timeout: float, tls: bool | ssl.SSLContext = False
                 ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            ctx = tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context()
            try:
                sock = ctx.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self.timeout = timeout
        self._reader = DeadlineReader(sock)
        self.rfile = io.BufferedReader(self._reader)

    @staticmethod
    def _encode(args: tuple[Any, ...]) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def _line(self) -> bytes:
        line = self.rfile.readline(1 << 16)
        if not line.endswith(b"\r\n"):
            raise ConnectionError("redis connection closed" if not line else
                                  "malformed RESP line")
        return line[:-2]

    def _reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            if n > _MAX_BULK:
                raise ConnectionError(f"RESP bulk reply of {n} bytes is too large")
            data = self.rfile.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("redis connection closed mid-reply")
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ConnectionError(f"malformed RESP reply {line[:40]!r}")

    def pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send all, read all; error replies come back as :class:`RespError` values."""
        self._reader.deadline = time.monotonic() + self.timeout
        self.sock.settimeout(self.timeout)
        self.sock.sendall(b"".join(self._encode(c) for c in commands))
        return [self._reply() for _ in commands]

    def call(self, *args: Any) -> Any:
        r = self.pipeline([args])[0]
        if isinstance(r, RespError):
            raise r
        return r

    def close(self) -> None:
        try:
            self.rfile.close()
            self.sock.close()
        except OSError:
            pass


class RedisMetadata(LeasedStore):
    """Client of a Redis server (≥ 6 for ``MC_REDIS_USERNAME``; any version otherwise)."""

    name = "redis"

    def __init__(self, address: str, ctx: MetadataContext) -> None:
        super().__init__(address, ctx)
        url = address if "://" in address else "redis://" + address
        u = urlsplit(url)
        if u.scheme not in ("redis", "rediss") or not u.hostname:
            raise ConfigError(f"metadata_server {address!r}: expected redis://host:port[/db]")
        try:
            self._port = u.port or 6379
        except ValueError:
            raise ConfigError(f"metadata_server {address!r}: bad port") from None
        self._host = u.hostname
        self._tls = u.scheme == "rediss"
        self.username = unquote(u.username) if u.username else \
            (self.option("MC_REDIS_USERNAME", "") or "")
        self.password = unquote(u.password) if u.password is not None else \
            (self.option("MC_REDIS_PASSWORD", "") or "")
        db: Any = u.path.strip("/") or self.option("MC_REDIS_DB_INDEX", 0)
        try:
            self.db = int(db or 0)
        except (TypeError, ValueError):
            self.db = -1
        if not 0 <= self.db <= 255:
            raise ConfigError(f"redis database index {db!r} (MC_REDIS_DB_INDEX or the URL path) "
                              "must be an integer in 0..255")
        self.where = f"{u.scheme} at {self._host}:{self._port}/{self.db}" if self._tls else \
            f"redis at {self._host}:{self._port}/{self.db}"
        self._ssl: ssl.SSLContext | None = None
        self._have_cert = bool(self.option("MC_REDIS_CERT_FILE", ""))
        if self._tls:
            self._ssl = tls_context(self, "MC_REDIS_CA_FILE", "MC_REDIS_CERT_FILE",
                                    "MC_REDIS_KEY_FILE")
        self.timeout = max(1.0, min(10.0, self.ttl / 3 if self.ttl > 0 else 10.0))
        self._conn: RespConnection | None = None
        self._io = threading.Lock()
        self.connect()

    # -- transport -----------------------------------------------------------------------
    def __repr__(self) -> str:  # no password
        return f"<RedisMetadata {self.where} user={self.username or '-'}>"

    def _tls_refusal(self, e: BaseException) -> MetadataAuthError | None:
        return tls_refusal(self.where, e, "MC_REDIS_CA_FILE", "MC_REDIS_CERT_FILE",
                           self._have_cert)

    def _open(self) -> RespConnection:
        try:
            c = RespConnection(self._host, self._port, self.timeout, self._ssl or False)
        except OSError as e:
            refusal = self._tls_refusal(e)
            if refusal is not None:
                raise refusal from None
            raise
        try:
            if self.password:
                args = ("AUTH", self.username, self.password) if self.username else \
                    ("AUTH", self.password)
                c.call(*args)
            if self.db:
                c.call("SELECT", self.db)
        except RespError as e:
            c.close()
            raise MetadataAuthError(f"{self.where} refused the login: {e} (set "
                                    "MC_REDIS_USERNAME, MC_REDIS_PASSWORD, MC_REDIS_DB_INDEX)"
                                    ) from None
        except OSError as e:
            c.close()
            # TLS 1.3: a server that rejects our client certificate says so on the first read
            refusal = self._tls_refusal(e)
            if refusal is not None:
                raise refusal from None
            raise
        except BaseException:
            c.close()
            raise
        return c

    def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        with self._io:
            for attempt in (0, 1):  # a connection the server dropped: reconnect once
                reused = self._conn is not None
                if self._conn is None:
                    self._conn = self._open()
                try:
                    out = self._conn.pipeline(commands)
                    break
                except (OSError, ValueError) as e:
                    self._conn.close()
                    self._conn = None
                    refusal = self._tls_refusal(e) if self._tls else None
                    if refusal is not None:
                        raise refusal from None
                    if attempt == 0 and reused and not isinstance(e, TimeoutError):
                        continue
                    if isinstance(e, OSError):
                        raise
                    raise ConnectionError(f"bad reply from redis: {e}") from None
        for r in out:
            if isinstance(r, RespError):
                if str(r).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
                    raise MetadataAuthError(f"{self.where} refused: {r} (set "
                                            "MC_REDIS_USERNAME, MC_REDIS_PASSWORD)")
                raise PeerUnreachable(f"{self.where} answered an error: {r}")
        return out

    def _set(self, key: str, value: bytes) -> tuple[Any, ...]:
        if self.ttl > 0:
            return ("SET", key, value, "PX", max(1, int(self.ttl * 1000)))
        return ("SET", key, value)

    # -- LeasedStore hooks ---------------------------------------------------------------
    def _ping(self) -> None:
        self._pipeline([("PING",)])

    def _put(self, key: str, value: bytes) -> None:
        self._pipeline([self._set(key, value)])

    def _get(self, key: str) -> bytes | None:
        return self._pipeline([("GET", key)])[0]

    def _delete(self, key: str) -> None:
        self._pipeline([("DEL", key)])

    def _refresh(self, items: dict[str, bytes]) -> None:
        if self.ttl <= 0:
            return
        keys = list(items)
        ms = max(1, int(self.ttl * 1000))
        alive = self._pipeline([("PEXPIRE", k, ms) for k in keys])
        lost = [k for k, ok in zip(keys, alive, strict=True) if ok != 1]
        if lost:
            self._pipeline([self._set(k, items[k]) for k in lost])

    def _close(self) -> None:
        with self._io:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def list_keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (for tools and tests)."""
        pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in prefix) + "*"
        cursor, keys = b"0", set()
        while True:
            cursor, batch = self._pipeline([("SCAN", cursor, "MATCH", pattern,
                                             "COUNT", 1000)])[0]
            keys.update(k.decode() for k in batch)
            if cursor in (b"0", 0):
                return sorted(keys)
