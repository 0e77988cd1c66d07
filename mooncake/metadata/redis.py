"""``redis://[user:password@]host:port[/db]``: segment descriptors in Redis (``rediss://``: TLS).

A client on redis-py (the ``redis`` package, ≥ 5: ``pip install 'mooncake[redis]'``), imported
when a store is made; without it the store raises a :class:`~mooncake.errors.ConfigError` naming
that command.  Credentials and the database come from the URL or, as in Mooncake, from
``MC_REDIS_USERNAME``, ``MC_REDIS_PASSWORD`` and ``MC_REDIS_DB_INDEX`` (0–255).  Keys are
written with ``SET key value PX ttl`` and kept alive by ``PEXPIRE`` every TTL/3 (one pipeline);
a key Redis no longer holds (it restarted, or the key expired during an outage) is written again.

Every new connection logs in first (redis-py sends ``AUTH [user] password``, then ``SELECT
db``).  ``rediss://`` connects over TLS verified against ``MC_REDIS_CA_FILE`` (default: the
system CAs) and the host name, presenting ``MC_REDIS_CERT_FILE``/``MC_REDIS_KEY_FILE`` to
servers that check clients (``tls-auth-clients``).  A refused login (``WRONGPASS``/``NOAUTH``/
``NOPERM``) or a certificate that does not verify raises
:class:`~mooncake.metadata.base.MetadataAuthError` naming the options to set; a server that
cannot be reached is a :class:`~mooncake.errors.PeerUnreachable`.  Each call (a command or a
pipeline, with every reply) has a whole-call deadline of ``timeout`` seconds, however slowly
the server drips its answer (redis-py's own socket timeout bounds each read, not the call).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from mooncake.errors import ConfigError, PeerUnreachable
from mooncake.metadata.base import (
    LeasedStore,
    MetadataAuthError,
    MetadataContext,
    tls_context,
    tls_refusal,
)

__all__ = ["RedisMetadata", "INSTALL_HINT"]

#: what to run when redis-py is missing
INSTALL_HINT = "pip install 'mooncake[redis]'"

T = TypeVar("T")
_CLASSES: tuple[Any, type, type] | None = None


def _redis_py() -> tuple[Any, type, type]:
    """(the ``redis`` module, our connection class, our TLS connection class), imported once."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    try:
        import redis
        from redis.connection import Connection, SSLConnection
    except ImportError as e:
        raise ConfigError(f"the redis metadata store needs redis-py (the 'redis' package, "
                          f">= 5): {INSTALL_HINT} ({e})") from None
    major = str(getattr(redis, "__version__", "0")).split(".", 1)[0]
    if not major.isdigit() or int(major) < 5:
        raise ConfigError(f"the redis metadata store needs redis-py >= 5, found "
                          f"{getattr(redis, '__version__', '?')}: {INSTALL_HINT}")

    class _Deadline:
        """A connection whose every call (send, then all its replies) ends by one deadline."""

        mc_deadline: float | None = None

        def _connect(self) -> Any:
            return _DeadlineSocket(super()._connect(), self)  # type: ignore[misc]

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            self.mc_deadline = time.monotonic() + float(self.socket_timeout)  # type: ignore
            super().send_packed_command(command, check_health)  # type: ignore[misc]

    plain = type("MooncakeRedisConnection", (_Deadline, Connection), {})
    tls = type("MooncakeRedisSSLConnection", (_Deadline, SSLConnection), {})
    _CLASSES = (redis, plain, tls)
    return _CLASSES


class _DeadlineSocket:
    """A socket (plain or TLS) whose blocking reads end at its connection's call deadline.

    redis-py sets the socket timeout to ``socket_timeout`` for ordinary reads and to other
    values for polls (``can_read``: 0); only the ordinary reads are clamped."""

    __slots__ = ("_sock", "_conn", "_timeout")

    def __init__(self, sock: socket.socket, conn: Any) -> None:
        self._sock = sock
        self._conn = conn
        self._timeout = sock.gettimeout()

    def settimeout(self, value: float | None) -> None:
        self._timeout = value
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def _arm(self) -> None:
        deadline = self._conn.mc_deadline
        if deadline is None or self._timeout is None or self._timeout != \
                self._conn.socket_timeout:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete reply within {self._conn.socket_timeout:g} s")
        self._sock.settimeout(min(left, self._timeout))

    def recv(self, *args: Any) -> bytes:
        self._arm()
        return self._sock.recv(*args)

    def recv_into(self, *args: Any) -> int:
        self._arm()
        return self._sock.recv_into(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _ssl_cause(e: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a redis-py error (it wraps the socket's), if any."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 8:
        if isinstance(cur, ssl.SSLError):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


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
        self._have_cert = bool(self.option("MC_REDIS_CERT_FILE", ""))
        self.timeout = max(1.0, min(10.0, self.ttl / 3 if self.ttl > 0 else 10.0))
        redis, plain, tls = _redis_py()
        self._errors = redis.exceptions
        kw: dict[str, Any] = {}
        if self._tls:
            # loads the files once here, so that an unreadable one is a ConfigError naming it
            tls_context(self, "MC_REDIS_CA_FILE", "MC_REDIS_CERT_FILE", "MC_REDIS_KEY_FILE")
            kw = {"ssl_ca_certs": str(self.option("MC_REDIS_CA_FILE", "") or "") or None,
                  "ssl_certfile": str(self.option("MC_REDIS_CERT_FILE", "") or "") or None,
                  "ssl_keyfile": str(self.option("MC_REDIS_KEY_FILE", "") or "") or None,
                  "ssl_cert_reqs": "required", "ssl_check_hostname": True}
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        pool = redis.ConnectionPool(
            connection_class=tls if self._tls else plain, host=self._host, port=self._port,
            db=self.db, username=self.username or None, password=self.password or None,
            socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            # a connection the server dropped (it restarted) is retried once, at once; a
            # timeout is not (the deadline is the caller's)
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            **kw)
        self._redis = redis.Redis(connection_pool=pool)
        self.connect()

    def __repr__(self) -> str:  # no password
        return f"<RedisMetadata {self.where} user={self.username or '-'}>"

    # -- errors --------------------------------------------------------------------------
    def _run(self, fn: Callable[[], T]) -> T:
        """``fn()`` with redis-py's errors turned into ours: refusals into
        :class:`MetadataAuthError`, a dead or slow server into ``OSError`` (the base class
        reports it as unreachable), an error reply into :class:`PeerUnreachable`."""
        E = self._errors
        try:
            return fn()
        except (E.AuthenticationError, E.NoPermissionError) as e:
            raise self._refused(e) from None
        except E.ConnectionError as e:  # also TLS handshakes and first reads under TLS
            cause = _ssl_cause(e)
            if cause is not None:
                refusal = tls_refusal(self.where, cause, "MC_REDIS_CA_FILE",
                                      "MC_REDIS_CERT_FILE", self._have_cert)
                if refusal is not None:
                    raise refusal from None
            raise ConnectionError(str(e) or type(e).__name__) from None
        except E.TimeoutError as e:
            raise TimeoutError(f"{e} (within {self.timeout:g} s)") from None
        except E.ResponseError as e:
            if "DB index" in str(e):
                raise MetadataAuthError(f"{self.where} refused the database: {e} (set "
                                        "MC_REDIS_DB_INDEX)") from None
            raise PeerUnreachable(f"{self.where} answered an error: {e}") from None
        except E.RedisError as e:
            raise PeerUnreachable(f"{self.where}: {type(e).__name__}: {e}") from None

    def _refused(self, e: Exception) -> MetadataAuthError:
        code = getattr(e, "status_code", None)  # redis-py strips the code from the message
        if not code:
            text = str(e).lower()
            code = "NOPERM" if isinstance(e, self._errors.NoPermissionError) else \
                "NOAUTH" if "required" in text else "WRONGPASS" if "invalid" in text else "ERR"
        return MetadataAuthError(f"{self.where} refused the login: {code} {e} (set "
                                 "MC_REDIS_USERNAME, MC_REDIS_PASSWORD)")

    def _set(self, pipe: Any, key: str, value: bytes) -> None:
        if self.ttl > 0:
            pipe.set(key, value, px=max(1, int(self.ttl * 1000)))
        else:
            pipe.set(key, value)

    # -- LeasedStore hooks ---------------------------------------------------------------
    def _ping(self) -> None:
        self._run(self._redis.ping)

    def _put(self, key: str, value: bytes) -> None:
        px = max(1, int(self.ttl * 1000)) if self.ttl > 0 else None
        self._run(lambda: self._redis.set(key, value, px=px))

    def _get(self, key: str) -> bytes | None:
        return self._run(lambda: self._redis.get(key))

    def _delete(self, key: str) -> None:
        self._run(lambda: self._redis.delete(key))

    def _refresh(self, items: dict[str, bytes]) -> None:
        if self.ttl <= 0:
            return
        keys = list(items)
        ms = max(1, int(self.ttl * 1000))

        def pexpire_all() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for k in keys:
                pipe.pexpire(k, ms)
            return pipe.execute()

        alive = self._run(pexpire_all)
        lost = [k for k, ok in zip(keys, alive, strict=True) if not ok]
        if lost:
            def put_lost() -> None:
                pipe = self._redis.pipeline(transaction=False)
                for k in lost:
                    self._set(pipe, k, items[k])
                pipe.execute()

            self._run(put_lost)

    def _close(self) -> None:
        self._redis.connection_pool.disconnect()

    def list_keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (for tools and tests)."""
        pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in prefix) + "*"
        return self._run(lambda: sorted({k.decode() for k in
                                         self._redis.scan_iter(match=pattern, count=1000)}))
