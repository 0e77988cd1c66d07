"""A real engine in a second process, driven over a pipe (tests only).

The implementation lives in :mod:`mooncake.testing.peer` (third parties use it too); this module
keeps ``from peer import Peer, sha`` working for the tests here.
"""

from __future__ import annotations

from mooncake.testing.peer import Peer, _ctx, _fixed, _serve, raw_connect, sha

__all__ = ["Peer", "sha", "raw_connect", "_ctx", "_fixed", "_serve"]
