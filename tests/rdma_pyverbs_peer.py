"""A plain pyverbs peer (rdma-core's own Python binding, not our kernel) for interop tests.

    python tests/rdma_pyverbs_peer.py DEVICE GID_INDEX SIZE

It allocates and registers a SIZE-byte MR, creates one RC QP and prints
``{"qpn", "psn", "gid", "addr", "rkey", "size"}``.  It then reads the other side's
``{"qpn", "psn", "gid"}`` from stdin, brings its QP to RTS, and answers ``{"cmd": "fill",
"seed": s}`` / ``{"cmd": "sha"}`` / ``{"cmd": "quit"}`` lines like ``rdma_peer.py``.
"""

from __future__ import annotations

import hashlib
import json
import sys

sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-pyverbs

import numpy as np  # noqa: E402
from pyverbs.addr import GID, AHAttr, GlobalRoute  # noqa: E402
from pyverbs.cq import CQ  # noqa: E402
from pyverbs.device import Context  # noqa: E402
from pyverbs.mr import MR  # noqa: E402
from pyverbs.pd import PD  # noqa: E402
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr  # noqa: E402

try:
    from pyverbs import libibverbs_enums as E  # noqa: N812
except ImportError:  # pyverbs <= v49
    from pyverbs import enums as E  # noqa: N812


def main() -> None:
    dev, gidx, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ctx = Context(name=dev)
    pd = PD(ctx)
    cq = CQ(ctx, 16)
    acc = (E.ibv_access_flags.IBV_ACCESS_LOCAL_WRITE | E.ibv_access_flags.IBV_ACCESS_REMOTE_WRITE
           | E.ibv_access_flags.IBV_ACCESS_REMOTE_READ)
    mr = MR(pd, size, acc)
    qp = QP(pd, QPInitAttr(qp_type=E.ibv_qp_type.IBV_QPT_RC, scq=cq, rcq=cq,
                           cap=QPCap(max_send_wr=4, max_recv_wr=4)))
    gid = ctx.query_gid(1, gidx)
    print(json.dumps({"qpn": qp.qp_num, "psn": 0, "gid": str(gid), "addr": mr.buf,
                      "rkey": mr.rkey, "size": size}), flush=True)
    peer = json.loads(sys.stdin.readline())
    a = QPAttr(port_num=1)
    a.qp_access_flags = acc
    a.path_mtu = E.ibv_mtu.IBV_MTU_1024
    a.dest_qp_num = peer["qpn"]
    a.rq_psn = peer["psn"]
    a.sq_psn = 0
    a.max_dest_rd_atomic = a.max_rd_atomic = 1
    a.min_rnr_timer, a.timeout, a.retry_cnt, a.rnr_retry = 12, 14, 7, 7
    a.ah_attr = AHAttr(port_num=1, is_global=1,
                       gr=GlobalRoute(dgid=GID(peer["gid"]), sgid_index=gidx))
    qp.to_rts(a)
    print(json.dumps({"state": "rts"}), flush=True)
    for line in sys.stdin:
        m = json.loads(line)
        if m["cmd"] == "fill":
            mr.write(np.random.default_rng(m["seed"]).bytes(size), size)
            out: dict = {}
        elif m["cmd"] == "sha":
            out = {"sha": hashlib.sha256(mr.read(size, 0)).hexdigest()}
        else:
            break
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
