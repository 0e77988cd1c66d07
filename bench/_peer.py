"""Raw-socket peer for the TCP baselines (run as a separate process: ``python bench/_peer.py``).

Prints its port on stdout, then serves one connection at a time on 127.0.0.1, single-threaded,
until stdin closes or SIGTERM.  A connection starts with a 24-byte command:

* ``STRW`` block count: the client streams ``count`` blocks; we ``recv_into`` a working-set buffer
  (block ``i`` at offset ``i * block % WSET``), then answer an 8-byte ack.  Repeats per command.
* ``STRR`` block count: we ``sendall`` ``count`` blocks from the working set (the read baseline).
* ``PING`` req resp: ping-pong; each round reads ``req`` bytes and answers ``resp`` bytes.

The client side is ``RawClient`` in ``bench/conftest.py``; both sides use the same buffer sizes
as the engine benchmarks.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading

CMD = struct.Struct("<4sQQ4x")  # 24 bytes
ACK = b"ACK\0\0\0\0\0"
WSET = int(os.environ.get("MC_BENCH_WSET", str(32 << 20)))


def recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` completely; False when the peer closed first."""
    n, got = len(view), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            return False
        got += k
    return True


def serve(conn: socket.socket, buf: memoryview) -> None:
    cmd = bytearray(CMD.size)
    cv = memoryview(cmd)
    while recv_exact(conn, cv):
        op, a, b = CMD.unpack(cmd)
        if op == b"STRW":
            block, count = a, b
            for i in range(count):
                off = (i * block) % WSET
                if not recv_exact(conn, buf[off:off + block]):
                    return
            conn.sendall(ACK)
        elif op == b"STRR":
            block, count = a, b
            for i in range(count):
                off = (i * block) % WSET
                conn.sendall(buf[off:off + block])
        elif op == b"PING":
            req, resp = buf[:a], buf[WSET - b:WSET] if b else b""
            while recv_exact(conn, req):
                conn.sendall(resp)
            return
        else:
            return


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    buf = memoryview(bytearray(WSET))
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    # stdin closing (the benchmark process died) ends us too
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    print(ls.getsockname()[1], flush=True)
    while True:
        conn, _ = ls.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            serve(conn, buf)
        except OSError:
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
