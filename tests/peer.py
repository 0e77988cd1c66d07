"""A real engine in a second process, driven over a pipe (tests only).

``Peer(**engine_kwargs)`` spawns a process that runs a :class:`TransferEngine` on 127.0.0.1 and
answers commands: allocate registered buffers, fill them, checksum them, unregister, exit.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
from typing import Any

_ctx = mp.get_context("spawn")


def _serve(conn, kwargs: dict) -> None:
    import numpy as np

    from mooncake.engine import TransferEngine

    env = kwargs.pop("_env", {})
    os.environ.update(env)
    eng = TransferEngine(kwargs.pop("_hostname", "127.0.0.1"), **kwargs)
    bufs: dict[int, Any] = {}

    def view(addr: int, n: int):
        for a, b in bufs.items():
            if a <= addr and addr + n <= a + b.nbytes:
                return b[addr - a: addr - a + n]
        raise ValueError(f"0x{addr:x}+{n} not in a test buffer")

    conn.send(("ready", eng.segment_name, os.getpid()))
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            break
        try:
            if cmd == "alloc":
                size, seed, at = (*args, None)[:3]
                data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
                b = _fixed(at, size) if at else data
                b[:] = data
                eng.register(b)
                bufs[b.ctypes.data] = b
                out: Any = b.ctypes.data
            elif cmd == "alloc_ro":  # read-only memory: registers as a READ source only
                size, seed = args
                data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
                b = np.frombuffer(data.tobytes(), np.uint8)
                eng.register(b)
                bufs[b.ctypes.data] = b
                out = b.ctypes.data
            elif cmd == "register_timed":  # how long registering a fresh buffer takes
                import time

                b = np.zeros(args[0], np.uint8)
                t0 = time.monotonic()
                eng.register(b)
                out = time.monotonic() - t0
                bufs[b.ctypes.data] = b
            elif cmd == "sha":
                out = hashlib.sha256(view(*args).tobytes()).hexdigest()
            elif cmd == "bytes":
                out = view(*args).tobytes()
            elif cmd == "fill":
                addr, n, seed = args
                view(addr, n)[:] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
                out = None
            elif cmd == "unregister":
                eng.unregister(args[0])
                out = None
            elif cmd == "notifies":
                out = [(x.name, x.msg) for x in eng.get_notifies()]
            elif cmd == "exit":
                eng.close()
                conn.send(("ok", None))
                break
            else:
                raise ValueError(f"unknown command {cmd}")
            conn.send(("ok", out))
        except Exception as e:  # report to the test, keep serving
            conn.send(("err", f"{type(e).__name__}: {e}"))


def _fixed(addr: int, size: int):
    """A NumPy view of an anonymous mapping at exactly ``addr`` (MAP_FIXED_NOREPLACE)."""
    import ctypes
    import mmap

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    got = libc.mmap(addr, size, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x100000, -1, 0)
    if got != addr:
        raise OSError(ctypes.get_errno(), f"cannot map 0x{addr:x}")
    return np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(addr))


class Peer:
    """A target engine in its own process."""

    def __init__(self, **engine_kwargs: Any) -> None:
        self.conn, child = _ctx.Pipe()
        self.proc = _ctx.Process(target=_serve, args=(child, engine_kwargs), daemon=True)
        self.proc.start()
        if not self.conn.poll(60):
            self.kill()
            raise RuntimeError("peer engine did not start within 60 s")
        _, self.segment, self.pid = self.conn.recv()

    def call(self, cmd: str, *args: Any, timeout: float = 60) -> Any:
        self.conn.send((cmd, args))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer did not answer {cmd} in {timeout}s")
        st, out = self.conn.recv()
        if st != "ok":
            raise RuntimeError(out)
        return out

    def alloc(self, size: int, seed: int = 0, at: int | None = None) -> int:
        """A registered buffer of random bytes (at address ``at`` when given)."""
        return self.call("alloc", size, seed, at)

    def sha(self, addr: int, n: int) -> str:
        return self.call("sha", addr, n)

    def stop(self) -> None:
        """SIGSTOP the peer and wait until every thread of it is stopped."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        import time

        for _ in range(1000):
            states = []
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                try:
                    with open(f"/proc/{self.proc.pid}/task/{tid}/stat") as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
                except OSError:
                    pass
            if states and all(s in "tT" for s in states):
                return
            time.sleep(0.005)

    def cont(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=15)
            except Exception:
                pass
        self.kill()


def sha(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()
