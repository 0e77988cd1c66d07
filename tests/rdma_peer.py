"""A peer process for the RDMA tests: one engine (``protocol="rdma"``) and one registered buffer.

    python tests/rdma_peer.py SIZE [LOCAL_HOSTNAME] [CONFIG_JSON]

Prints ``{"segment", "addr", "size"}`` as one JSON line, then answers JSON-line commands on
stdin: ``{"cmd": "fill", "seed": s}`` (fill the buffer with ``pattern(s, size)``),
``{"cmd": "sha", "off": o, "len": n}`` (SHA-256 of a range), ``{"cmd": "ro", "seed": s,
"len": n}`` (register ``pattern(s, n)`` as a read-only ``bytes`` buffer; answers its ``addr``),
``{"cmd": "sha_ro"}`` (SHA-256 of that buffer), ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np


def pattern(seed: int, n: int) -> np.ndarray:
    """The bytes both sides derive from a seed."""
    return np.frombuffer(np.random.default_rng(seed).bytes(n), np.uint8)


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


def main() -> None:
    from mooncake.engine import TransferEngine

    size = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    e = TransferEngine(host, metadata="p2p", protocol="rdma",
                       device_name=os.environ.get("RXE_DEV", ""), **overrides)
    buf = np.zeros(size, np.uint8)
    e.register(buf)
    print(json.dumps({"segment": e.segment_name, "addr": buf.ctypes.data, "size": size}),
          flush=True)
    ro = b""
    for line in sys.stdin:
        m = json.loads(line)
        if m["cmd"] == "fill":
            buf[:] = pattern(m["seed"], size)
            out: dict = {}
        elif m["cmd"] == "sha":
            out = {"sha": sha(buf[m["off"]:m["off"] + m["len"]])}
        elif m["cmd"] == "ro":
            ro = pattern(m["seed"], m["len"]).tobytes()
            r = e.register(ro)
            out = {"addr": r.addr, "flags": r.flags}
        elif m["cmd"] == "sha_ro":
            out = {"sha": hashlib.sha256(ro).hexdigest()}
        else:
            break
        print(json.dumps(out), flush=True)
    e.close()


if __name__ == "__main__":
    main()
