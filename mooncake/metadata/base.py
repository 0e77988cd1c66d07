"""The metadata-store contract and Mooncake's connection-string syntax."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mooncake.errors import AuthError, ConfigError, PeerUnreachable, SegmentNotFound

if TYPE_CHECKING:
    from mooncake.config import Config

__all__ = [
    "MetadataContext",
    "MetadataStore",
    "LeasedStore",
    "DescriptorError",
    "MetadataAuthError",
    "tls_context",
    "tls_refusal",
    "parse_metadata_server",
    "validate_descriptor",
    "decode_descriptor",
    "KNOWN_SCHEMES",
]

log = logging.getLogger(__name__)

KNOWN_SCHEMES = ("p2p", "http", "https", "etcd", "redis", "rediss")


def parse_metadata_server(conn: str) -> tuple[str, str]:
    """Split a Mooncake metadata connection string into ``(plugin name, address)``.

    ``P2PHANDSHAKE``/``p2p``/empty → ``("p2p", "")``; ``http://h:p/metadata`` → ``("http", url)``;
    ``etcd://h:p`` → ``("etcd", "h:p")``; ``redis://...`` → ``("redis", url)``; a bare ``host:port``
    means etcd (as in Mooncake).  Any other scheme is a :class:`ConfigError`.
    """
    s = (conn or "").strip()
    if s.upper() in ("", "P2PHANDSHAKE", "P2P"):
        return "p2p", ""
    if "://" in s:
        scheme, rest = s.split("://", 1)
        scheme = scheme.lower()
        if scheme in ("http", "https"):
            return "http", s
        if scheme in ("redis", "rediss"):
            return "redis", s
        if scheme == "etcd":
            return "etcd", rest
        from mooncake.registry import metadata_names

        if scheme in metadata_names():  # an out-of-tree store registered under its scheme
            return scheme, rest
        raise ConfigError(
            f"metadata_server {conn!r}: unknown scheme {scheme!r}; allowed: P2PHANDSHAKE, "
            "http://host:port/metadata, etcd://host:port, host:port (etcd), redis://host:port"
        )
    if ":" in s and s.rsplit(":", 1)[1].isdigit():
        return "etcd", s
    raise ConfigError(
        f"metadata_server {conn!r} is neither P2PHANDSHAKE nor a URL nor host:port"
    )


class MetadataAuthError(AuthError, ConfigError):
    """The metadata store refused us: wrong or missing credentials (HTTP 401, etcd/redis
    logins, a TLS certificate it or we could not verify), or a key that another client owns
    (HTTP 403).  The message names the store, the key when there is one, and the option to set.
    An :class:`~mooncake.errors.AuthError` and a :class:`~mooncake.errors.ConfigError`: fixing
    it takes configuration, not a retry."""


def tls_context(store: MetadataStore, ca_opt: str, cert_opt: str, key_opt: str
                ) -> ssl.SSLContext:
    """A verifying client TLS context: the CA file named by option ``ca_opt`` (else the
    system's CAs), and the client certificate/key of ``cert_opt``/``key_opt`` when set.  An
    unreadable file is a :class:`ConfigError` naming the option."""
    ca = str(store.option(ca_opt, "") or "")
    cert = str(store.option(cert_opt, "") or "")
    key = str(store.option(key_opt, "") or "")
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{ca_opt}={ca!r}: cannot load the CA file: {e}") from None
    if key and not cert:
        raise ConfigError(f"{key_opt} is set without {cert_opt}")
    if cert:
        try:
            ctx.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{cert_opt}={cert!r} / {key_opt}={key!r}: cannot load the client "
                              f"certificate: {e}") from None
    return ctx


def tls_refusal(where: str, e: BaseException, ca_opt: str, cert_opt: str,
                have_cert: bool = True) -> MetadataAuthError | None:
    """The typed error for a TLS handshake that failed on trust (theirs or ours), else None
    (a plain network error: the caller treats the store as unreachable).  ``have_cert``: we
    presented a client certificate (without one, a server that hangs up mid-handshake most
    likely wants one)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return MetadataAuthError(f"{where}: its TLS certificate did not verify "
                                 f"({e.verify_message or e}); set {ca_opt} to the CA that "
                                 "signed it (and use the host name or IP the certificate names)")
    if isinstance(e, ssl.SSLEOFError) and not have_cert:
        return MetadataAuthError(f"{where} closed the TLS handshake: it probably verifies "
                                 f"clients; set {cert_opt} (and its key) to a certificate it "
                                 "trusts")
    if isinstance(e, ssl.SSLError):
        reason = (getattr(e, "reason", "") or str(e)).upper()
        if any(r in reason for r in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA",
                                     "CERTIFICATE_UNKNOWN", "HANDSHAKE_FAILURE")):
            return MetadataAuthError(f"{where} refused our TLS client certificate ({reason}); "
                                     f"set {cert_opt} (and its key) to a certificate it trusts")
    return None


@dataclass
class MetadataContext:
    """What the engine lends a metadata store."""

    config: Config
    #: ``rpc_call(segment_name, method, args, timeout) -> Any`` (used by p2p)
    rpc_call: Callable[..., Any]


class MetadataStore:
    """Base class of metadata plugins: publish, fetch and remove segment descriptors (dicts)."""

    name: ClassVar[str] = ""

    def __init__(self, address: str, ctx: MetadataContext) -> None:
        self.address = address
        self.ctx = ctx

    def option(self, name: str, default: Any = None) -> Any:
        """A config value: ``ctx.config[name]``, else the environment variable, else ``default``."""
        try:
            return self.ctx.config[name]
        except KeyError:
            return os.environ.get(name, default)

    def key(self, segment_name: str) -> str:
        """The store key of a segment: ``mooncake/[<MC_METADATA_CLUSTER_ID>/]ram/<name>``."""
        cluster = self.option("MC_METADATA_CLUSTER_ID", "") or ""
        prefix = f"mooncake/{cluster}" if cluster else "mooncake"
        return f"{prefix}/ram/{segment_name}"

    def publish(self, segment_name: str, desc: dict) -> None:
        """Store (or replace) our descriptor."""
        raise NotImplementedError

    def fetch(self, segment_name: str) -> dict:
        """Return a peer's descriptor; raise ``SegmentNotFound`` when there is none."""
        raise NotImplementedError

    def remove(self, segment_name: str) -> None:
        """Delete our descriptor (clean shutdown)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop background work (heartbeats, leases) and close connections."""


# --------------------------------------------------------------------------- descriptors

_U64 = 1 << 64


class DescriptorError(SegmentNotFound):
    """A stored descriptor is malformed: bad JSON, a missing field, an address out of range."""


def _bad(name: str, what: str) -> DescriptorError:
    return DescriptorError(f"segment {name!r}: malformed descriptor: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode_descriptor(name: str, raw: bytes | str) -> dict:
    """Parse a stored descriptor (JSON text) and :func:`validate_descriptor` it."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _bad(name, f"not JSON ({type(e).__name__}: {str(e)[:120]})") from None
    return validate_descriptor(name, obj)


MAX_BUFFERS = 1 << 20
_LOCATION = re.compile(r"[A-Za-z0-9_*][A-Za-z0-9_:.*/,@-]{0,127}")


def _short(v: Any, limit: int = 40) -> str:
    """``repr`` for messages about a stranger's value: bounded, and safe for ints too long to
    print (Python refuses ints of more than 4300 digits)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        return f"<an integer of {v.bit_length()} bits>"
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_descriptor(name: str, obj: Any, schemas: dict | None = None) -> dict:
    """Check a peer's descriptor before the engine trusts it; return it unchanged.

    Required: ``name`` (str, equal to the segment name), ``host_id`` (str), ``pid`` (int in
    0..2**31-1), ``timestamp`` (finite number), ``transports`` (object of objects) and
    ``buffers``: a list of ``{"addr": int, "length": int > 0, "location": str}`` (optional
    ``shm_name``: str, ``access``: ``"ro"``/``"rw"``, ``transports``: object) with ``addr + length
    ≤ 2**64`` and no two buffers overlapping.  ``schemas`` maps a transport name to its
    ``(segment_fields, buffer_fields)`` (:class:`mooncake.fields.Field` rows): the fields that
    transport publishes are checked too, whenever the peer publishes them.  Unknown fields are
    allowed.  Raises :class:`DescriptorError` naming the segment and the field.
    """
    if not isinstance(obj, dict):
        raise _bad(name, f"expected a JSON object, got {type(obj).__name__}")
    for field, types, tname in (
        ("name", (str,), "a string"),
        ("host_id", (str,), "a string"),
        ("pid", (int,), "an integer"),
        ("timestamp", (int, float), "a number"),
        ("transports", (dict,), "an object"),
        ("buffers", (list,), "a list"),
    ):
        if field not in obj:
            raise _bad(name, f"missing field {field!r}")
        v = obj[field]
        if not isinstance(v, types) or isinstance(v, bool):
            raise _bad(name, f"field {field!r} must be {tname}, got {v!r:.80}")
    if obj["name"] != name:
        raise _bad(name, f"it describes segment {obj['name']!r:.80}")
    if not 0 <= obj["pid"] < 2**31:
        what = "is negative" if obj["pid"] < 0 else "is too large"
        raise _bad(name, f"pid {_short(obj['pid'])} {what} (allowed 0..2**31-1)")
    if len(obj["host_id"]) > 256:
        raise _bad(name, "host_id is longer than 256 characters")
    ts = obj["timestamp"]
    if not (-2**63 < ts < 2**63 if isinstance(ts, int) else math.isfinite(ts)):
        raise _bad(name, f"timestamp {_short(ts)} is not a finite number of seconds")
    if len(obj["buffers"]) > MAX_BUFFERS:
        raise _bad(name, f"{len(obj['buffers'])} buffers (at most {MAX_BUFFERS})")
    schemas = schemas or {}
    for tname, fields in obj["transports"].items():
        if not isinstance(fields, dict):
            raise _bad(name, f"transports[{tname!r:.40}] must be an object")
        if tname in schemas:
            _fields(name, fields, schemas[tname][0], f"transports.{tname}")
    spans = []
    for i, b in enumerate(obj["buffers"]):
        where = f"buffers[{i}]"
        if not isinstance(b, dict):
            raise _bad(name, f"{where} must be an object")
        for field in ("addr", "length", "location"):
            if field not in b:
                raise _bad(name, f"{where} missing field {field!r}")
        addr, length = b["addr"], b["length"]
        if not _is_int(addr) or not 0 <= addr < _U64:
            raise _bad(name, f"{where}.addr {_short(addr)} is not an address in [0, 2**64)")
        if not _is_int(length) or length <= 0:
            raise _bad(name, f"{where}.length {_short(length)} must be a positive integer")
        if addr + length >= _U64:  # the end must be an address too (no range wraps to 0)
            raise _bad(name, f"{where} [{addr:#x}, +{_short(length)}) reaches the end of the "
                             "64-bit address space")
        if not isinstance(b["location"], str) or not _LOCATION.fullmatch(b["location"]):
            raise _bad(name, f"{where}.location must be a string like 'cpu:0', got "
                             f"{b['location']!r:.40}")
        if "shm_name" in b and b["shm_name"] is not None and (
                not isinstance(b["shm_name"], str) or len(b["shm_name"]) > 256):
            raise _bad(name, f"{where}.shm_name must be a string of at most 256 characters")
        if b.get("access", "rw") not in ("ro", "rw"):
            raise _bad(name, f"{where}.access must be 'ro' or 'rw', got {b['access']!r:.40}")
        if "transports" in b:
            if not isinstance(b["transports"], dict):
                raise _bad(name, f"{where}.transports must be an object")
            for tname, fields in b["transports"].items():
                if tname in schemas:
                    _fields(name, fields, schemas[tname][1], f"{where}.transports.{tname}")
        spans.append((addr, addr + length, i))
    spans.sort()
    for (_, end_a, ia), (start_b, _, ib) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise _bad(name, f"buffers[{ia}] and buffers[{ib}] overlap")
    return obj


def _fields(name: str, fields: Any, spec: dict, where: str) -> None:
    from mooncake.fields import FieldError, check_fields

    try:
        check_fields(fields, spec, where)
    except FieldError as e:
        raise _bad(name, str(e)) from None


# --------------------------------------------------------------------------- leased stores


class LeasedStore(MetadataStore):
    """A key-value store whose keys live only while a heartbeat keeps them alive.

    Subclasses implement ``_ping``, ``_put``, ``_get``, ``_delete`` and ``_refresh`` (keep the
    given keys alive, re-writing any the store lost).  ``publish`` keeps the descriptor here, so
    when the store restarts empty or a lease lapses the heartbeat writes it again.  The TTL is
    ``MC_METADATA_TTL`` seconds (default 10; 0 = no expiry, no heartbeat); the heartbeat runs
    every TTL/3 in a daemon thread that :meth:`close` stops.
    """

    #: what users call this store in messages, e.g. "etcd at 127.0.0.1:2379"
    where: str = ""

    def __init__(self, address: str, ctx: MetadataContext) -> None:
        super().__init__(address, ctx)
        try:
            self.ttl = float(self.option("MC_METADATA_TTL", 10.0))
        except (TypeError, ValueError):
            raise ConfigError(f"MC_METADATA_TTL={self.option('MC_METADATA_TTL')!r} is not a "
                              "number of seconds (allowed: 0 = never expire, or > 0)") from None
        if self.ttl < 0:
            raise ConfigError(f"MC_METADATA_TTL={self.ttl} must be ≥ 0 (0 = never expire)")
        self._published: dict[str, bytes] = {}  # key -> encoded descriptor
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._healthy = True

    # -- hooks ---------------------------------------------------------------------------
    def _ping(self) -> None:
        """Raise (an ``OSError`` or ``PeerUnreachable``) when the store cannot be reached."""
        raise NotImplementedError

    def _put(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def _get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def _delete(self, key: str) -> None:
        raise NotImplementedError

    def _refresh(self, items: dict[str, bytes]) -> None:
        """Extend the lease of ``items``; re-``_put`` those the store no longer holds."""
        for k, v in items.items():
            self._put(k, v)

    def _close(self) -> None:
        """Release connections (and leases) after the heartbeat stopped."""

    # -- helpers -------------------------------------------------------------------------
    def _unreachable(self, e: BaseException, doing: str) -> PeerUnreachable:
        return PeerUnreachable(f"metadata store {self.where or self.address} unreachable "
                               f"while {doing}: {e}")

    def connect(self) -> None:
        """Check the store answers; raise :class:`PeerUnreachable` naming it otherwise."""
        try:
            self._ping()
        except PeerUnreachable:
            raise
        except OSError as e:
            raise self._unreachable(e, "connecting") from None

    # -- MetadataStore API ---------------------------------------------------------------
    def publish(self, segment_name: str, desc: dict) -> None:
        """Write our descriptor; during a store outage keep it and let the heartbeat retry."""
        key = self.key(segment_name)
        value = json.dumps(desc, separators=(",", ":")).encode()
        with self._lock:
            self._published[key] = value
            try:
                self._put(key, value)
            except (OSError, PeerUnreachable) as e:
                log.warning("metadata: publishing %s to %s failed (%s); the heartbeat retries",
                            segment_name, self.where or self.address, e)
                self._healthy = False
        self._start_heartbeat()

    def fetch(self, segment_name: str) -> dict:
        key = self.key(segment_name)
        try:
            raw = self._get(key)
        except PeerUnreachable:
            raise
        except OSError as e:
            raise self._unreachable(e, f"fetching segment {segment_name!r}") from None
        if raw is None:
            raise SegmentNotFound(f"segment {segment_name!r} not found in metadata store "
                                  f"{self.where or self.address} (key {key!r})")
        limit = int(self.option("MC_HANDSHAKE_MAX_LENGTH", 1 << 20))
        if len(raw) > limit:  # a descriptor is kilobytes: a stranger's blob is refused unparsed
            raise _bad(segment_name, f"{len(raw)} bytes (at most MC_HANDSHAKE_MAX_LENGTH = "
                                     f"{limit})")
        return decode_descriptor(segment_name, raw)

    def remove(self, segment_name: str) -> None:
        key = self.key(segment_name)
        with self._lock:
            self._published.pop(key, None)
            try:
                self._delete(key)
            except (OSError, PeerUnreachable, MetadataAuthError) as e:  # it expires anyway
                log.warning("metadata: removing %s from %s failed: %s", segment_name,
                            self.where or self.address, e)

    def close(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=30)
        with self._lock:
            self._close()

    # -- heartbeat -----------------------------------------------------------------------
    @property
    def heartbeat_interval(self) -> float:
        return self.ttl / 3.0

    def _start_heartbeat(self) -> None:
        if self.ttl <= 0 or self._thread is not None or self._stop.is_set():
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                                name=f"mc-metadata-{self.name}-heartbeat")
                self._thread.start()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            self.heartbeat()

    def heartbeat(self) -> bool:
        """One round: keep our keys alive (re-writing lost ones); True when the store answered."""
        with self._lock:
            if not self._published or self._stop.is_set():
                return True
            try:
                self._refresh(dict(self._published))
            except MetadataAuthError as e:  # another client holds a key, or creds expired
                if self._healthy:
                    log.error("metadata: %s refused our heartbeat (%s); retrying every %.1fs",
                              self.where or self.address, e, self.heartbeat_interval)
                self._healthy = False
                return False
            except (OSError, PeerUnreachable) as e:
                if self._healthy:
                    log.warning("metadata: %s unreachable (%s); retrying every %.1fs",
                                self.where or self.address, e, self.heartbeat_interval)
                self._healthy = False
                return False
            if not self._healthy:
                log.warning("metadata: %s reachable again; descriptors re-published",
                            self.where or self.address)
            self._healthy = True
            return True
