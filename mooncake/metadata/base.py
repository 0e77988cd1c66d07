"""The metadata-store contract and Mooncake's connection-string syntax."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mooncake.errors import ConfigError

if TYPE_CHECKING:
    from mooncake.config import Config

__all__ = ["MetadataContext", "MetadataStore", "parse_metadata_server", "KNOWN_SCHEMES"]

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

    def key(self, segment_name: str) -> str:
        """The store key of a segment: ``mooncake/[<MC_METADATA_CLUSTER_ID>/]ram/<name>``."""
        cluster = self.ctx.config["MC_METADATA_CLUSTER_ID"]
        return f"mooncake/{cluster}/ram/{segment_name}" if cluster else f"mooncake/ram/{segment_name}"

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
