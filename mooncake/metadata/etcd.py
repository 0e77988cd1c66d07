"""``etcd://host:port`` (or a bare ``host:port``): segment descriptors in etcd v3.

Speaks etcd's JSON gRPC-gateway (``/v3/kv/put``, ``/v3/kv/range``, ``/v3/kv/deleterange``,
``/v3/lease/grant``, ``/v3/lease/keepalive``, ``/v3/lease/revoke``; keys and values base64) with
the standard library's ``http.client``.  ``etcd3gw``, the maintained client of the same gateway,
was measured against it and is not used: it has no authentication (no token, no
``/v3/auth/authenticate``), one endpoint per client, per-read timeouts only (a server that drips
its reply holds a call for hours) and one exception for most HTTP statuses; and it costs
1.8-2x per request (README "Metadata clients", ``bench/test_bench_metadata.py``).
All our keys hang on one lease of
``MC_METADATA_TTL`` seconds, kept alive every TTL/3; when etcd reports the lease gone (it expired
during an outage, or etcd came back empty) a new lease is granted and every key written again.
Several endpoints may be given, comma-separated: ``etcd://h1:2379,h2:2379``.

Security: ``MC_ETCD_USERNAME``/``MC_ETCD_PASSWORD`` log in (``/v3/auth/authenticate``) and send
the token in the ``Authorization`` header; a token etcd no longer accepts (expired, or issued by
another member after a fail-over) is replaced by logging in again, once per request.  An
endpoint written ``https://host:port`` (``etcd://https://h1:2379,https://h2:2379``) is reached
over TLS, verified against ``MC_ETCD_CA_FILE`` (default: the system CAs), with the client
certificate ``MC_ETCD_CERT_FILE``/``MC_ETCD_KEY_FILE`` when etcd checks clients.  A refused login,
a missing permission or a certificate that does not verify raises
:class:`~mooncake.metadata.base.MetadataAuthError` naming the option to set.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import threading
from typing import Any

from mooncake.errors import ConfigError, PeerUnreachable
from mooncake.metadata.base import (
    LeasedStore,
    MetadataAuthError,
    MetadataContext,
    tls_context,
    tls_refusal,
)
from mooncake.metadata.http import exchange

log = logging.getLogger(__name__)

#: etcd error texts that mean "who are you" / "not allowed" rather than "unreachable"
_AUTH_ERRORS = ("user name is empty", "permission denied", "invalid auth token",
                "authentication failed", "user name not found", "auth token",
                "invalid user id or password")
_STALE_TOKEN = ("invalid auth token", "auth token is expired", "token is expired")
_CREDS = "set MC_ETCD_USERNAME and MC_ETCD_PASSWORD"

__all__ = ["EtcdMetadata"]


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


class EtcdMetadata(LeasedStore):
    """Client of etcd ≥ 3.4 through its HTTP/JSON gateway."""

    name = "etcd"

    def __init__(self, address: str, ctx: MetadataContext) -> None:
        super().__init__(address, ctx)
        self.endpoints: list[tuple[str, int]] = []
        self._tls_endpoints: set[int] = set()
        for ep in address.replace(";", ",").split(","):
            ep = ep.strip().removeprefix("etcd://").rstrip("/")
            tls = ep.lower().startswith("https://")
            ep = ep[len("https://"):] if tls else ep.removeprefix("http://")
            if not ep:
                continue
            host, _, port = ep.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"metadata_server etcd endpoint {ep!r} is not host:port")
            if tls:
                self._tls_endpoints.add(len(self.endpoints))
            self.endpoints.append((host.strip("[]"), int(port)))
        if not self.endpoints:
            raise ConfigError(f"metadata_server {address!r}: no etcd endpoint (host:port)")
        self.where = "etcd at " + ",".join(
            ("https://" if i in self._tls_endpoints else "") + f"{h}:{p}"
            for i, (h, p) in enumerate(self.endpoints))
        self.timeout = max(1.0, min(10.0, self.ttl / 3 if self.ttl > 0 else 10.0))
        self._ssl: ssl.SSLContext | None = None
        self._have_cert = bool(self.option("MC_ETCD_CERT_FILE", ""))
        if self._tls_endpoints:
            self._ssl = tls_context(self, "MC_ETCD_CA_FILE", "MC_ETCD_CERT_FILE",
                                    "MC_ETCD_KEY_FILE")
        elif self.option("MC_ETCD_CA_FILE", "") or self.option("MC_ETCD_CERT_FILE", ""):
            log.warning("metadata: MC_ETCD_CA_FILE/MC_ETCD_CERT_FILE are set but no etcd "
                        "endpoint is https:// (write etcd://https://host:port); not using TLS")
        self._user = str(self.option("MC_ETCD_USERNAME", "") or "")
        self._password = str(self.option("MC_ETCD_PASSWORD", "") or "")
        if bool(self._user) != bool(self._password):
            raise ConfigError("MC_ETCD_USERNAME and MC_ETCD_PASSWORD go together: set both "
                              "(or neither, when etcd has auth disabled)")
        self._tokens: dict[int, str] = {}  # endpoint index -> auth token ("" = auth disabled)
        self._lease: int = 0
        self._current = 0  # index of the endpoint that answered last
        self._local = threading.local()
        self._all_conns: list[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()
        self.connect()

    # -- transport -----------------------------------------------------------------------
    def __repr__(self) -> str:  # no credentials
        return f"<EtcdMetadata {self.where} user={self._user or '-'}>"

    def _post(self, idx: int, path: str, body: dict, token: str | None) -> tuple[int, dict]:
        """One POST to endpoint ``idx`` (retried once on a kept-alive connection it closed)."""
        host, port = self.endpoints[idx]
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        for attempt in (0, 1):
            c = conns.get(idx)
            reused = c is not None
            if c is None:
                if idx in self._tls_endpoints:
                    c = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                                    context=self._ssl)
                else:
                    c = http.client.HTTPConnection(host, port, timeout=self.timeout)
                conns[idx] = c
                with self._conns_lock:
                    self._all_conns.append(c)
            try:
                r, raw = exchange(c, "POST", path, data, headers,
                                  self.timeout)  # a whole-call deadline
                if r.will_close:
                    self._forget(conns, idx)
            except (OSError, http.client.HTTPException) as e:
                self._forget(conns, idx)
                refusal = tls_refusal(f"etcd at https://{host}:{port}", e, "MC_ETCD_CA_FILE",
                                      "MC_ETCD_CERT_FILE", self._have_cert)
                if refusal is not None:
                    raise refusal from None
                if attempt == 0 and reused and not isinstance(e, TimeoutError):
                    continue
                if isinstance(e, OSError):
                    raise
                raise ConnectionError(f"bad HTTP exchange with etcd: {e!r}") from None
            try:
                out = json.loads(raw) if raw else {}
            except ValueError:
                if b"CommonName of client" in raw:
                    raise MetadataAuthError(
                        f"etcd at {host}:{port} refuses client certificates that carry a "
                        "CommonName on its JSON gateway while auth is on: set "
                        "MC_ETCD_CERT_FILE to a certificate without CN (log in with "
                        "MC_ETCD_USERNAME/MC_ETCD_PASSWORD)") from None
                if b"HTTP request to an HTTPS server" in raw:
                    raise ConfigError(f"etcd at {host}:{port} speaks TLS: write the endpoint "
                                      f"as https://{host}:{port} (etcd://https://...)") from None
                raise ConnectionError(f"{host}:{port} is not an etcd JSON gateway "
                                      f"(answered {raw[:80]!r})") from None
            return r.status, out if isinstance(out, dict) else {}
        raise AssertionError("unreachable")

    def _login(self, idx: int) -> str:
        """Authenticate at endpoint ``idx``; the token ("" when etcd has auth disabled)."""
        status, out = self._post(idx, "/v3/auth/authenticate",
                                 {"name": self._user, "password": self._password}, None)
        msg = str(out.get("message") or out.get("error") or "")
        if status == 200 and out.get("token"):
            token = str(out["token"])
        elif "not enabled" in msg:
            log.info("metadata: %s has authentication disabled; MC_ETCD_USERNAME unused",
                     self.where)
            token = ""
        else:
            raise MetadataAuthError(f"{self.where} refused the login of user {self._user!r}: "
                                    f"HTTP {status} {msg} ({_CREDS})")
        self._tokens[idx] = token
        return token

    def _call_one(self, idx: int, path: str, body: dict) -> tuple[int, dict]:
        if not self._user:
            return self._post(idx, path, body, None)
        token = self._tokens.get(idx)
        fresh = token is None
        if token is None:
            token = self._login(idx)
        status, out = self._post(idx, path, body, token)
        msg = str(out.get("message") or out.get("error") or "").lower()
        if status != 200 and not fresh and any(m in msg for m in _STALE_TOKEN):
            status, out = self._post(idx, path, body, self._login(idx))  # expired: log in again
        return status, out

    def _forget(self, conns: dict[int, http.client.HTTPConnection], idx: int) -> None:
        c = conns.pop(idx, None)
        if c is not None:
            c.close()
            with self._conns_lock:
                if c in self._all_conns:
                    self._all_conns.remove(c)

    def _call(self, path: str, body: dict) -> tuple[int, dict]:
        """POST to the endpoint that last answered, failing over to the others."""
        last: OSError | None = None
        n = len(self.endpoints)
        for i in range(n):
            idx = (self._current + i) % n
            try:
                status, out = self._call_one(idx, path, body)
            except OSError as e:
                last = e
                continue
            self._current = idx
            return status, out
        assert last is not None
        raise last

    def _check(self, status: int, out: dict, doing: str) -> dict:
        if status != 200:
            msg = str(out.get("message") or out.get("error") or "")
            if status in (401, 403) or any(m in msg.lower() for m in _AUTH_ERRORS):
                who = f"user {self._user!r}" if self._user else "an anonymous client"
                raise MetadataAuthError(f"{self.where} refused {doing} to {who}: HTTP {status} "
                                        f"{msg} ({_CREDS}: a user whose roles grant read-write "
                                        "on the mooncake/ prefix)")
            raise PeerUnreachable(f"{self.where} refused {doing}: HTTP {status} {msg}")
        return out

    # -- lease ---------------------------------------------------------------------------
    def _grant(self) -> int:
        out = self._check(*self._call("/v3/lease/grant", {"TTL": max(1, round(self.ttl))}),
                          "a lease grant")
        lease = int(out.get("ID", 0))
        if not lease:
            raise PeerUnreachable(f"{self.where} granted no lease: {out}")
        self._lease = lease
        return lease

    def _keepalive(self) -> bool:
        """Refresh our lease; False when etcd no longer knows it."""
        status, out = self._call("/v3/lease/keepalive", {"ID": str(self._lease)})
        if status == 404:
            return False
        result: Any = self._check(status, out, "a lease keep-alive").get("result", {})
        return int(result.get("TTL", 0) or 0) > 0

    # -- LeasedStore hooks ---------------------------------------------------------------
    def _ping(self) -> None:
        self._check(*self._call("/v3/kv/range", {"key": _b64(self.key("__mooncake_ping__"))}),
                    "a read")

    def _put(self, key: str, value: bytes) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if self.ttl > 0:
            if not self._lease:
                self._grant()
            body["lease"] = str(self._lease)
        status, out = self._call("/v3/kv/put", body)
        if status == 404 and self.ttl > 0:  # "requested lease not found": it lapsed
            self._refresh({k: v for k, v in self._published.items() if k != key}, regrant=True)
            body["lease"] = str(self._lease)
            status, out = self._call("/v3/kv/put", body)
        self._check(status, out, f"writing {key!r}")

    def _get(self, key: str) -> bytes | None:
        out = self._check(*self._call("/v3/kv/range", {"key": _b64(key)}), f"reading {key!r}")
        kvs = out.get("kvs") or []
        if not kvs:
            return None
        return base64.b64decode(kvs[0].get("value", ""))

    def _delete(self, key: str) -> None:
        self._check(*self._call("/v3/kv/deleterange", {"key": _b64(key)}), f"deleting {key!r}")

    def _refresh(self, items: dict[str, bytes], regrant: bool = False) -> None:
        if self.ttl <= 0:
            return
        if regrant or not self._lease or not self._keepalive():
            self._grant()
            for k, v in items.items():
                body = {"key": _b64(k), "value": _b64(v), "lease": str(self._lease)}
                self._check(*self._call("/v3/kv/put", body), f"re-writing {k!r}")

    def _close(self) -> None:
        if self._lease and not self._published:
            try:  # revoking deletes whatever still hangs on the lease
                self._call("/v3/lease/revoke", {"ID": str(self._lease)})
            except (OSError, ConfigError):  # it expires anyway
                pass
            self._lease = 0
        with self._conns_lock:
            conns, self._all_conns = self._all_conns, []
        for c in conns:
            c.close()

    def list_keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (for tools and tests)."""
        end = bytearray(prefix.encode())
        end[-1] += 1
        out = self._check(*self._call("/v3/kv/range", {"key": _b64(prefix), "range_end":
                                                        _b64(bytes(end)), "keys_only": True}),
                          "a key listing")
        return sorted(base64.b64decode(kv["key"]).decode() for kv in out.get("kvs") or [])
