"""A real engine in a second process, driven over a pipe (tests only).

``Peer(**engine_kwargs)`` spawns a process that runs a :class:`~mooncake.engine.TransferEngine` on
127.0.0.1 and answers commands: allocate registered buffers (NumPy arrays, managed buffers from
``engine.allocate()``, ranges of the CXL window; read-write or read-only; at a fixed address; with
unregistered guard bytes around them), fill them, checksum them, unregister or free them, exit.
``_env`` (a dict) is put into the child's environment before its engine starts, ``_hostname``
is its ``local_hostname`` (``"127.0.0.1:PORT"`` restarts a peer on a known RPC port).
``stop``/``cont``/``kill`` signal the process.

Every allocation answers the address of the registered range; the bytes of its guards (when
asked for) can be checksummed like the buffer itself, so a test can show that nothing landed
next to a buffer either.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import time
from typing import Any

__all__ = ["Peer", "sha", "raw_connect"]

_ctx = mp.get_context("spawn")


def _serve(conn, kwargs: dict) -> None:
    import ctypes

    import numpy as np

    from mooncake._core import regions as _regions
    from mooncake.engine import TransferEngine

    env = kwargs.pop("_env", {})
    os.environ.update({k: str(v) for k, v in env.items()})
    eng = TransferEngine(kwargs.pop("_hostname", "127.0.0.1"), **kwargs)
    views: dict[int, Any] = {}  # start of a test buffer (guards included) -> uint8 view
    managed: dict[int, Any] = {}  # registered address -> ManagedBuffer
    registered: set[int] = set()
    fixed: dict[int, int] = {}  # start -> size of mappings made at a fixed address

    def view(addr: int, n: int):
        for a, b in views.items():
            if a <= addr and addr + n <= a + b.nbytes:
                return b[addr - a: addr - a + n]
        raise ValueError(f"0x{addr:x}+{n} not in a test buffer")

    def raw(addr: int, n: int):
        return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))

    def rand(seed: int, n: int):
        return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)

    def alloc(size: int, seed: int, at: int | None, kind: str = "numpy", guard: int = 0,
              access: str = "rw", off: int | None = None) -> int:
        ro = access == "ro"
        if kind == "numpy":
            if ro:
                if guard or at:
                    raise ValueError("a read-only NumPy buffer takes no guard and no address")
                b = np.frombuffer(rand(seed, size).tobytes(), np.uint8)  # bytes: read-only
                eng.register(b)
                views[b.ctypes.data] = b
                registered.add(b.ctypes.data)
                return b.ctypes.data
            full = size + 2 * guard
            b = _fixed(at - guard, full) if at else np.empty(full, np.uint8)
            if at:
                fixed[at - guard] = full
            b[:] = rand(seed, full)
            addr = b.ctypes.data + guard
            eng.register(addr if guard else b, size if guard else None, access="rw")
            views[b.ctypes.data] = b
            registered.add(addr)
            return addr
        if kind == "managed":
            if guard or at:
                raise ValueError("a managed buffer takes no guard and no address")
            mb = eng.allocate(size)
            v = raw(mb.addr, size)
            v[:] = rand(seed, size)
            if ro:  # the engine has no read-only allocate(): register the same memfd again
                eng.unregister(mb.addr)
                eng._register(mb.addr, mb.length, "cpu:0", mb.mm, mb.shm_name,
                              flags=_regions.READ_ONLY)
            managed[mb.addr] = mb
            views[mb.addr] = v
            registered.add(mb.addr)
            return mb.addr
        if kind == "cxl":
            if off is None or at:
                raise ValueError("a CXL window range needs its window offset `off`, no address")
            w = eng.transports["cxl"].window
            base = w.address(off)
            v = raw(base, size + 2 * guard)
            v[:] = rand(seed, size + 2 * guard)
            eng.register(base + guard, size, "cxl", access=access)
            views[base] = v
            registered.add(base + guard)
            return base + guard
        raise ValueError(f"unknown memory kind {kind!r} (numpy, managed, cxl)")

    def forget(addr: int) -> None:
        if addr in registered:
            registered.discard(addr)
            if addr in managed:
                views.pop(addr, None)
                eng.free(addr)
                managed.pop(addr).close()
                return
            eng.unregister(addr)
        for a in [a for a, v in views.items() if a <= addr < a + v.nbytes]:
            del views[a]
            if a in fixed:  # give the address back: a later alloc(at=...) may take it again
                _unmap(a, fixed.pop(a))

    conn.send(("ready", eng.segment_name, os.getpid()))
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            break
        try:
            out: Any = None
            if cmd == "alloc":
                size, seed, at, opts = (*args, 0, None, None)[:4]
                out = alloc(size, seed, at, **(opts or {}))
            elif cmd == "alloc_ro":  # read-only memory: registers as a READ source only
                size, seed = args
                out = alloc(size, seed, None, access="ro")
            elif cmd == "register_timed":  # how long registering a fresh buffer takes
                b = np.zeros(args[0], np.uint8)
                t0 = time.monotonic()
                eng.register(b)
                out = time.monotonic() - t0
                views[b.ctypes.data] = b
                registered.add(b.ctypes.data)
            elif cmd == "sha":
                out = hashlib.sha256(view(*args).tobytes()).hexdigest()
            elif cmd == "bytes":
                out = view(*args).tobytes()
            elif cmd == "fill":
                addr, n, seed = args
                view(addr, n)[:] = rand(seed, n)
            elif cmd == "memset":
                addr, n, byte = args
                view(addr, n)[:] = byte
            elif cmd == "unregister":  # the memory stays (a test may look at it afterwards)
                eng.unregister(args[0])
                registered.discard(args[0])
            elif cmd == "unregister_fill":  # unregister, then overwrite what it covered
                addr, n, byte = args
                eng.unregister(addr)
                registered.discard(addr)
                view(addr, n)[:] = byte
            elif cmd == "free":
                forget(args[0])
            elif cmd == "describe":
                out = eng.describe()
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


def _unmap(addr: int, size: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap(addr, size)


class Peer:
    """A target engine in its own process.

    ``Peer(protocol="tcp", _env={...}, _hostname="127.0.0.1:PORT", _start_timeout=60)``: the
    keyword arguments without a leading underscore go to ``TransferEngine``."""

    def __init__(self, **engine_kwargs: Any) -> None:
        start_timeout = engine_kwargs.pop("_start_timeout", 60)
        self.conn, child = _ctx.Pipe()
        self.proc = _ctx.Process(target=_serve, args=(child, engine_kwargs), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(start_timeout):
            self.kill()
            raise RuntimeError(f"peer engine did not start within {start_timeout} s")
        try:
            _, self.segment, self.pid = self.conn.recv()
        except EOFError:
            self.kill()
            raise RuntimeError(f"peer engine failed to start (exit code {self.proc.exitcode}; "
                               "its stderr says why)") from None

    def call(self, cmd: str, *args: Any, timeout: float = 60) -> Any:
        self.conn.send((cmd, args))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer did not answer {cmd} in {timeout}s")
        st, out = self.conn.recv()
        if st != "ok":
            raise RuntimeError(out)
        return out

    def alloc(self, size: int, seed: int = 0, at: int | None = None, *, kind: str = "numpy",
              guard: int = 0, access: str = "rw", off: int | None = None) -> int:
        """A registered buffer of random bytes; its address.

        ``kind``: ``"numpy"`` (an array; at address ``at`` when given), ``"managed"``
        (``engine.allocate``), ``"cxl"`` (window offset ``off``, aligned like the device).
        ``guard``: that many random, unregistered bytes on each side (numpy, cxl).
        ``access="ro"``: registered read-only."""
        opts = {"kind": kind, "guard": guard, "access": access, "off": off}
        return self.call("alloc", size, seed, at, opts)

    def sha(self, addr: int, n: int) -> str:
        return self.call("sha", addr, n)

    def fill(self, addr: int, n: int, seed: int) -> None:
        self.call("fill", addr, n, seed)

    def memset(self, addr: int, n: int, byte: int) -> None:
        self.call("memset", addr, n, byte)

    def free(self, addr: int) -> None:
        """Unregister (if still registered) and free a buffer from :meth:`alloc` (its address,
        and a managed buffer's fd number, may be reused by the next allocation)."""
        self.call("free", addr)

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def stop(self) -> None:
        """SIGSTOP the peer and wait until every thread of it is stopped."""
        os.kill(self.proc.pid, signal.SIGSTOP)
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
        self.conn.close()


def sha(data) -> str:
    """SHA-256 of a buffer (bytes, bytearray, NumPy array...)."""
    return hashlib.sha256(bytes(data)).hexdigest()


def raw_connect(address: tuple[str, int], channel: str = "tcp-data", token: str | None = None,
                timeout: float = 10.0):
    """A raw socket to an engine's port (``channel`` ``"tcp-data"`` or ``"rpc"``), past the
    cluster-token handshake (open mode without ``token``): for tests that speak the wire
    protocol themselves, as a hostile client would."""
    import socket

    from mooncake.auth import ClusterAuth

    s = socket.create_connection(address, timeout=timeout)
    try:
        ClusterAuth(token.encode() if token else None).client(s, channel, f"{address}", timeout)
    except BaseException:
        s.close()
        raise
    s.settimeout(timeout)
    return s
