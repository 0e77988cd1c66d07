"""``etcd://host:port`` (or a bare ``host:port``): segment descriptors in etcd v3.

Speaks etcd's JSON gRPC-gateway (``/v3/kv/put``, ``/v3/kv/range``, ``/v3/kv/deleterange``,
``/v3/lease/grant``, ``/v3/lease/keepalive``, ``/v3/lease/revoke``; keys and values base64) with
the standard library, so no etcd client package is needed.  All our keys hang on one lease of
``MC_METADATA_TTL`` seconds, kept alive every TTL/3; when etcd reports the lease gone (it expired
during an outage, or etcd came back empty) a new lease is granted and every key written again.
Several endpoints may be given, comma-separated: ``etcd://h1:2379,h2:2379``.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from typing import Any

from mooncake.errors import ConfigError, PeerUnreachable
from mooncake.metadata.base import LeasedStore, MetadataContext
from mooncake.metadata.http import exchange

__all__ = ["EtcdMetadata"]


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


class EtcdMetadata(LeasedStore):
    """Client of etcd ≥ 3.4 through its HTTP/JSON gateway."""

    name = "etcd"

    def __init__(self, address: str, ctx: MetadataContext) -> None:
        super().__init__(address, ctx)
        self.endpoints: list[tuple[str, int]] = []
        for ep in address.replace(";", ",").split(","):
            ep = ep.strip().removeprefix("etcd://").removeprefix("http://").rstrip("/")
            if not ep:
                continue
            host, _, port = ep.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"metadata_server etcd endpoint {ep!r} is not host:port")
            self.endpoints.append((host.strip("[]"), int(port)))
        if not self.endpoints:
            raise ConfigError(f"metadata_server {address!r}: no etcd endpoint (host:port)")
        self.where = "etcd at " + ",".join(f"{h}:{p}" for h, p in self.endpoints)
        self.timeout = max(1.0, min(10.0, self.ttl / 3 if self.ttl > 0 else 10.0))
        self._lease: int = 0
        self._current = 0  # index of the endpoint that answered last
        self._local = threading.local()
        self._all_conns: list[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()
        self.connect()

    # -- transport -----------------------------------------------------------------------
    def _call_one(self, idx: int, path: str, body: dict) -> tuple[int, dict]:
        host, port = self.endpoints[idx]
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        data = json.dumps(body).encode()
        for attempt in (0, 1):
            c = conns.get(idx)
            reused = c is not None
            if c is None:
                c = conns[idx] = http.client.HTTPConnection(host, port, timeout=self.timeout)
                with self._conns_lock:
                    self._all_conns.append(c)
            try:
                r, raw = exchange(c, "POST", path, data, {"Content-Type": "application/json"},
                                  self.timeout)  # a whole-call deadline
                if r.will_close:
                    self._forget(conns, idx)
            except (OSError, http.client.HTTPException) as e:
                self._forget(conns, idx)
                if attempt == 0 and reused and not isinstance(e, TimeoutError):
                    continue
                if isinstance(e, OSError):
                    raise
                raise ConnectionError(f"bad HTTP exchange with etcd: {e!r}") from None
            try:
                out = json.loads(raw) if raw else {}
            except ValueError:
                raise ConnectionError(f"{host}:{port} is not an etcd JSON gateway "
                                      f"(answered {raw[:80]!r})") from None
            return r.status, out if isinstance(out, dict) else {}
        raise AssertionError("unreachable")

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
            raise PeerUnreachable(f"{self.where} refused {doing}: HTTP {status} "
                                  f"{out.get('message') or out.get('error') or ''}")
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
            except OSError:
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
