"""The embedded default: no server, descriptors are fetched from the peer's RPC listener."""

from __future__ import annotations

from mooncake.errors import PeerUnreachable, SegmentNotFound
from mooncake.metadata.base import MetadataStore

__all__ = ["P2PMetadata"]


class P2PMetadata(MetadataStore):
    """``P2PHANDSHAKE``: a segment named ``host:port`` serves its own descriptor."""

    name = "p2p"

    def publish(self, segment_name: str, desc: dict) -> None:
        """Nothing to store: the engine's RPC handler serves the live descriptor."""

    def fetch(self, segment_name: str) -> dict:
        try:
            desc = self.ctx.rpc_call(segment_name, "segment.describe", {}, timeout=10.0)
        except PeerUnreachable as e:
            raise SegmentNotFound(f"segment {segment_name!r}: {e}") from None
        if not isinstance(desc, dict):
            raise SegmentNotFound(f"segment {segment_name!r} answered without a descriptor")
        # the address we reached is its identity here (it may call itself 127.0.0.1:P when we
        # asked for localhost:P)
        return {**desc, "name": segment_name}

    def remove(self, segment_name: str) -> None:
        """Nothing stored, nothing to remove."""
