"""Verbs fixtures for tests and benches that run on a real device (the Soft-RoCE VM)."""

from __future__ import annotations

from typing import Any


def loopback_qps(dev: Any, cq: Any, gid_index: int, depth: int, mtu: int = 1024,
                 max_inline: int = 0) -> tuple[Any, Any]:
    """Two RC QPs of ``dev`` on ``cq`` connected to each other (port 1, the GID at
    ``gid_index``), both in RTS: the device talking to itself, as perftest's loopback runs."""
    from mooncake._core import verbs as V

    qa, qb = V.QP(dev, cq, depth, 1, max_inline), V.QP(dev, cq, depth, 1, max_inline)
    gid = dev.query_gid(1, gid_index)
    for q in (qa, qb):
        q.to_init(1)
    for me, other in ((qa, qb), (qb, qa)):
        me.to_rtr(other.qp_num, gid, 0, 0, mtu, 1, gid_index)
        me.to_rts(0)
    return qa, qb
