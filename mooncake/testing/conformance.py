"""The conformance suite every transport runs (pytest).

Every check runs between this process (the initiator, a :class:`~mooncake.engine.TransferEngine`)
and a real target engine in a second process (:class:`mooncake.testing.peer.Peer`), both with
``protocol=spec.protocol``.  The checks assert behaviour, never timings (the only time bounds are
generous hang bounds, :attr:`TransportSpec.hang_bound`):

==========================  =====================================================================
``integrity``               WRITE then READ back 1 B .. 64 MiB (powers and odd sizes, aligned and
                            unaligned local/remote offsets); the bytes next to each range stay
``batches``                 40-request batches: sync ``transfer``; a READ and a WRITE batch in
                            flight at once (``submit``/``wait``); ``await``; per-task statuses
``outside_refused``         remote ranges outside the registration: ``InvalidAddress`` from the
                            initiator's validator, the peer's memory (and guard bytes) untouched
``outside_lie_refused``     the same when the initiator's cached descriptor lies: the transport
                            or the target refuses, FAILED with ``E_REFUSED``, memory untouched,
                            the honest requests of the batch complete
``read_only``               a peer's read-only buffer: READ works, WRITE is ``InvalidAddress``
``read_only_lie_refused``   ... and with a lying cache the WRITE ends FAILED (``E_DENIED`` or
                            ``E_REFUSED``), the peer's bytes unchanged
``local_read_only``         a local read-only buffer (``bytes``, read-only array) is a WRITE
                            source, never a READ destination (``InvalidAddress``)
``unregister_in_flight``    ``unregister`` while a READ batch lands in the memory: when it
                            returns the batch has ended (COMPLETED / FAILED ``E_UNREGISTERED``)
                            and no byte lands afterwards; the next transfer works
``free_in_flight``          ``free`` of a managed buffer under a READ batch, in a child process
                            (a worker touching freed memory kills it); the reused range stays
``close_in_flight``         ``close`` with a batch and a sync transfer in another thread in
                            flight: both end (COMPLETED / FAILED ``E_CLOSED``), nothing lands
``target_unregister``       the target unregisters a buffer while the initiator WRITEs into it:
                            after its ``unregister`` returns, no byte lands there
``peer_killed``             the peer killed mid-batch: a typed failure, not a hang (and not a
                            timeout); the engine still works with another peer
``restart``                 the peer restarted on the same RPC port (its buffer at the same
                            address where the memory kind allows it) is reached on the next call
``stale_address``           ... and the old process's address, not registered by the new one, is
                            refused rather than "completed" into the dead process's memory
``reused_address``          the peer frees a buffer and allocates a new one at the same address
                            (a managed buffer: the same fd number too): with the cached
                            descriptor the right bytes or a typed failure, with a fresh one the
                            new buffer -- never the freed memory
``timeout_isolation``       a ``timeout=1e-4`` on one thread's transfers does not fail another
                            thread's transfers to the same peer
``timeout_silence``         after a ``TransferTimeout`` (peer SIGSTOPped, or a tiny timeout when
                            the peer's process does not serve transfers) no byte lands
==========================  =====================================================================

How to run it for a transport (a third party's ``test_mytransport.py``; then ``pytest``)::

    from mooncake.testing.conformance import Conformance, TransportSpec

    class TestMyTransport(Conformance):
        spec = TransportSpec(
            protocol="mine",                       # installed in the mooncake.transports group
            env={"MY_DEVICE": "/dev/mine0"},       # for both processes
            refused_by="target",                   # who refuses a range the descriptor lacks
            unsupported={"timeout_silence": "submit() copies synchronously"})

When the spec needs set-up (a window file, a device), override the ``transport_spec`` fixture
instead of setting ``spec`` (this is how tests/test_conformance.py runs cxl)::

    class TestMyCxl(Conformance):
        @pytest.fixture(scope="class")
        def transport_spec(self):
            path = f"/dev/shm/cxl_window_{os.getpid()}"
            with open(path, "wb") as f:
                f.truncate(512 << 20)  # sparse
            yield TransportSpec("cxl", env={"MC_CXL_DEV_PATH": path}, remote_memory="cxl",
                                refused_by="initiator", peer_serves=False,
                                unsupported={"peer_killed": "no target process", ...})
            os.unlink(path)

Several specs for one transport (memory kinds, configurations) are several subclasses.  A check
the spec lists in ``unsupported`` is reported as skipped with the spec's reason, one listed in
``known_failures`` runs as ``xfail(strict=False)`` with it; the other fields change *how* a
check provokes a situation (a stopped peer or a race, which side's cache lies), never what it
accepts.  Each subclass shares one initiator engine and one target process among its tests;
checks that kill, restart or stop a peer start their own.  Memory kinds
(:data:`MEMORY_KINDS`): ``numpy``, ``managed`` (``engine.allocate()``), ``cxl`` (ranges of the
window both processes map).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from mooncake._core import batch as _codes
from mooncake._core import regions as _regions
from mooncake.batch import Status
from mooncake.engine import TransferEngine
from mooncake.errors import (
    InvalidAddress,
    MooncakeError,
    PeerUnreachable,
    SegmentNotFound,
    TransferFailed,
    TransferTimeout,
)
from mooncake.testing.peer import Peer, sha

__all__ = ["Conformance", "TransportSpec", "CHECKS", "MEMORY_KINDS"]

KiB, MiB = 1 << 10, 1 << 20

#: every check of the suite (the names :attr:`TransportSpec.unsupported` may list)
CHECKS: dict[str, str] = {
    "integrity": "WRITE/READ 1 B..64 MiB, unaligned offsets, neighbours untouched",
    "batches": "sync, concurrent READ+WRITE submit/wait and await batches",
    "outside_refused": "remote ranges outside the registration: InvalidAddress, untouched",
    "outside_lie_refused": "the same through a lying cache: FAILED E_REFUSED, untouched",
    "read_only": "a peer's read-only buffer: READ ok, WRITE InvalidAddress",
    "read_only_lie_refused": "a WRITE into it through a lying cache: FAILED, untouched",
    "local_read_only": "a local read-only buffer is no READ destination",
    "unregister_in_flight": "unregister under a READ batch: ended, silent afterwards",
    "free_in_flight": "free a managed buffer under a READ batch (child process)",
    "close_in_flight": "close with work in flight: ended, silent afterwards",
    "target_unregister": "the target unregisters under the initiator's WRITEs: silent after",
    "peer_killed": "peer killed mid-batch: a typed failure, not a hang",
    "restart": "peer restarted on the same port (same address) is reached on the next call",
    "stale_address": "a restarted peer's old address is refused, not completed",
    "reused_address": "a buffer freed and allocated again at the same address: the new memory",
    "timeout_isolation": "one thread's tiny timeouts do not fail another thread's transfers",
    "timeout_silence": "after TransferTimeout no byte lands",
}

#: how memory is provided on each side
MEMORY_KINDS = {
    "numpy": "NumPy arrays (plain process memory; the peer's can sit at a fixed address)",
    "managed": "managed buffers from engine.allocate() (shm-backed, mappable by same-host peers)",
    "cxl": "ranges of the CXL window (MC_CXL_DEV_PATH, the same file in both processes)",
}

#: where the restart checks put the peer's buffer when the memory kind allows a fixed address
FIXED_ADDRESS = 0x7D0000000000


@dataclass(frozen=True)
class TransportSpec:
    """What the suite needs to know about the transport under test."""

    #: the ``protocol`` both engines are started with
    protocol: str
    #: environment of both processes (set here for the duration of the test class)
    env: Mapping[str, str] = field(default_factory=dict)
    #: configuration keywords of both engines (``device_name=...``, ``MC_SLICE_SIZE=...``)
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: memory on the initiator's side and on the target's side (:data:`MEMORY_KINDS`)
    local_memory: str = "numpy"
    remote_memory: str = "numpy"
    #: who refuses a request for a remote range that the peer did not register, when the
    #: initiator's cached descriptor is made to lie: ``"target"`` (a target process or NIC
    #: checks every range itself: the whole descriptor lies), or ``"initiator"`` (there is no
    #: target to ask, e.g. a CXL window, or the initiator copies into mapped/attached memory:
    #: only the validator's table lies, the transport must refuse from the real descriptor)
    refused_by: str = "target"
    #: True when the peer's process serves transfers, so a SIGSTOPped peer stalls them (tcp,
    #: an RPC transport): the checks that need work in flight stop the peer.  False when they
    #: go on without it (one-sided: rdma's NIC, shm's copies in the initiator, the cxl window):
    #: those checks race the work instead, and the timeout checks use tiny timeouts
    peer_serves: bool = True
    #: checks that do not apply, each with the reason (reported as the skip reason)
    unsupported: Mapping[str, str] = field(default_factory=dict)
    #: checks known to fail today (run as ``xfail(strict=False)``), each with the reason: the
    #: bug, and where it is tracked
    known_failures: Mapping[str, str] = field(default_factory=dict)
    #: the largest transfer of the integrity check
    max_size: int = 64 * MiB
    #: the most any single step may take before the suite calls it a hang
    hang_bound: float = 60.0
    #: how long a peer process may take to start (slow under emulation)
    peer_start_timeout: float = 60.0
    #: shown in skip reasons and failures; default: protocol and memory kinds
    name: str = ""

    def __post_init__(self) -> None:
        for side in (self.local_memory, self.remote_memory):
            if side not in MEMORY_KINDS:
                raise ValueError(f"memory kind {side!r}: allowed {', '.join(MEMORY_KINDS)}")
        if self.refused_by not in ("target", "initiator"):
            raise ValueError(f"refused_by={self.refused_by!r}: allowed 'target', 'initiator'")
        bad = (set(self.unsupported) | set(self.known_failures)) - set(CHECKS)
        if bad:
            raise ValueError(f"unknown checks {sorted(bad)} in unsupported/known_failures; "
                             f"the checks are {', '.join(CHECKS)}")
        if not self.name:
            object.__setattr__(self, "name",
                               f"{self.protocol}[{self.local_memory}->{self.remote_memory}]")


def _check(name: str) -> Callable:
    """Mark a test method as the suite's check ``name`` (for ``unsupported``)."""
    assert name in CHECKS, name

    def deco(fn):
        fn._mc_check = name
        return fn

    return deco


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _u8(addr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))


def _rand(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def settled(view: np.ndarray, value: int, wait: float = 0.3) -> bool:
    """Fill ``view`` with ``value``, give stray writers time, and say whether it stayed."""
    view[:] = value
    time.sleep(wait)
    return bool((view == value).all())


@dataclass(eq=False)
class Buf:
    """A registered local buffer: ``addr``, ``n`` bytes, a uint8 ``view`` of them."""

    addr: int
    n: int
    view: np.ndarray
    kind: str
    owner: Any = None
    registered: bool = True


@dataclass(eq=False)
class Remote:
    """A registered buffer in a peer: ``addr``, ``n`` bytes, ``guard`` unregistered bytes on
    each side (0 when the memory kind has none)."""

    peer: Peer
    addr: int
    n: int
    guard: int = 0
    off: int | None = None  # window offset (cxl)
    freed: bool = False

    @property
    def lo(self) -> int:
        return self.addr - self.guard

    @property
    def span(self) -> int:
        return self.n + 2 * self.guard

    def sha_all(self) -> str:
        """SHA-256 of the buffer and its guards."""
        return self.peer.sha(self.lo, self.span)


class _Window:
    """First-fit allocator of aligned CXL window offsets, shared by both processes' ranges."""

    def __init__(self, size: int, align: int) -> None:
        self.size, self.align = size, align
        self.free: list[tuple[int, int]] = [(0, size)]
        self.lock = threading.Lock()

    def round(self, n: int) -> int:
        return -(-n // self.align) * self.align

    def take(self, n: int) -> int:
        n = self.round(n)
        with self.lock:
            for i, (a, b) in enumerate(self.free):
                if b - a >= n:
                    self.free[i] = (a + n, b)
                    return a
        raise MemoryError(f"the CXL window ({self.size >> 20} MiB) has no {n >> 20} MiB left; "
                          "make MC_CXL_DEV_PATH larger")

    def take_at(self, off: int, n: int) -> int:
        """Take exactly ``[off, off + n)``; MemoryError when part of it is in use."""
        n = self.round(n)
        with self.lock:
            for i, (a, b) in enumerate(self.free):
                if a <= off and off + n <= b:
                    self.free[i:i + 1] = [x for x in ((a, off), (off + n, b)) if x[0] < x[1]]
                    return off
        raise MemoryError(f"window range {off}+{n} is in use")

    def give(self, off: int, n: int) -> None:
        n = self.round(n)
        with self.lock:
            self.free.append((off, off + n))
            self.free.sort()
            merged: list[tuple[int, int]] = []
            for a, b in self.free:
                if merged and merged[-1][1] == a:
                    merged[-1] = (merged[-1][0], b)
                else:
                    merged.append((a, b))
            self.free = merged


class World:
    """One initiator engine and one target process per test class, and what tests allocate."""

    def __init__(self, spec: TransportSpec) -> None:
        self.spec = spec
        self._cleanup: list[Callable[[], None]] = []  # per test, undone in reverse
        self._class_cleanup: list[Callable[[], None]] = []
        self._big: tuple[Buf, Buf, Remote] | None = None
        self.window: _Window | None = None

    def start(self) -> None:
        spec = self.spec
        self.eng = self.new_engine(scope="class")
        if "cxl" in (spec.local_memory, spec.remote_memory):
            t = self.eng.transports.get("cxl")
            w = getattr(t, "window", None)
            if w is None:
                raise RuntimeError(f"{spec.name}: CXL memory needs the cxl transport started "
                                   "(MC_CXL_DEV_PATH in the spec's env)")
            self._cxl = w
            self.window = _Window(w.size, w.align)
        self.peer = self.new_peer(scope="class")

    # -- lifetimes -------------------------------------------------------------------------------

    def _later(self, fn: Callable[[], None], scope: str) -> None:
        (self._class_cleanup if scope == "class" else self._cleanup).append(fn)

    @staticmethod
    def _run(fns: list[Callable[[], None]]) -> None:
        while fns:
            fn = fns.pop()
            try:
                fn()
            except Exception:  # noqa: BLE001 - best-effort teardown; the test already reported
                pass

    def end_test(self) -> None:
        self._run(self._cleanup)
        with contextlib.suppress(Exception):
            self.eng._segments.drop(self.peer.segment)  # undo any lie

    def close(self) -> None:
        self.end_test()
        self._run(self._class_cleanup)

    # -- engines and peers -----------------------------------------------------------------------

    def new_engine(self, scope: str = "test") -> TransferEngine:
        e = TransferEngine("127.0.0.1", protocol=self.spec.protocol, **self.spec.engine_kwargs)
        self._later(e.close, scope)
        return e

    def new_peer(self, scope: str = "test", **kw: Any) -> Peer:
        p = Peer(protocol=self.spec.protocol, _env=dict(self.spec.env),
                 _start_timeout=self.spec.peer_start_timeout,
                 **{**self.spec.engine_kwargs, **kw})
        self._later(p.close, scope)
        return p

    # -- memory ----------------------------------------------------------------------------------

    def local(self, n: int, fill: int | None = None, scope: str = "test",
              eng: TransferEngine | None = None) -> Buf:
        """A registered local buffer of the spec's local memory kind (zeros or ``fill`` seed)."""
        eng = eng or self.eng
        kind = self.spec.local_memory
        if kind == "numpy":
            a = np.zeros(n, np.uint8)
            eng.register(a)
            b = Buf(a.ctypes.data, n, a, kind, a)
        elif kind == "managed":
            mb = eng.allocate(n)
            b = Buf(mb.addr, n, _u8(mb.addr, n), kind, mb)
        else:
            off = self.window.take(n)
            addr = self._cxl.address(off)
            eng.register(addr, self.window.round(n), "cxl")
            b = Buf(addr, n, _u8(addr, n), kind, off)
            b.view[:] = 0
        if fill is not None:
            b.view[:] = _rand(fill, n)

        def release() -> None:
            if kind == "managed":
                if b.registered:
                    eng.free(b.addr)  # else the engine frees it when it closes
                return
            if b.registered:
                b.registered = False
                eng.unregister(b.addr)
            if kind == "cxl":
                self.window.give(b.owner, n)

        self._later(release, scope)
        return b

    def unregister(self, b: Buf, eng: TransferEngine | None = None) -> None:
        b.registered = False
        (eng or self.eng).unregister(b.addr)

    def remote(self, peer: Peer, n: int, seed: int = 0, *, guard: bool = False,
               ro: bool = False, at: int | None = None, like: Remote | None = None,
               scope: str = "test") -> Remote:
        """A registered buffer of random bytes in ``peer`` (the spec's remote memory kind).
        ``guard``: unregistered random bytes around it (where the kind allows); ``ro``: read-only;
        ``at``: at that address (NumPy memory only; other kinds ignore it); ``like``: where a
        freed buffer was (its address for NumPy memory, its window offset for CXL; a managed
        buffer goes wherever the peer's allocator puts it)."""
        if like is not None:
            at = like.addr if self.spec.remote_memory == "numpy" else at
        kind = self.spec.remote_memory
        access = "ro" if ro else "rw"
        if kind == "numpy":
            g = 0 if ro else (64 * KiB if guard else 0)
            addr = peer.alloc(n, seed, at if not ro else None, kind="numpy", guard=g,
                              access=access)
            r = Remote(peer, addr, n, g)
        elif kind == "managed":
            r = Remote(peer, peer.alloc(n, seed, kind="managed", access=access), n)
        else:
            w = self.window
            g = w.align if guard else 0
            span = w.round(n) + 2 * g
            off = w.take(span) if like is None or like.off is None else w.take_at(like.off, span)
            try:
                addr = peer.alloc(w.round(n), seed, kind="cxl", off=off, guard=g, access=access)
            except BaseException:
                w.give(off, span)
                raise
            r = Remote(peer, addr, w.round(n), g, off)

        def release() -> None:
            # unregistered but not freed: no later buffer of this peer reuses the address (or a
            # managed buffer's fd number) -- that case is the ``reused_address`` check alone
            if r.freed:
                return
            try:
                if peer.alive:
                    with contextlib.suppress(RuntimeError):  # e.g. the test unregistered it
                        peer.call("unregister", r.addr)
            finally:
                if r.off is not None:
                    self.window.give(r.off, r.span)

        self._later(release, scope)
        return r

    def free_remote(self, r: Remote) -> None:
        """Free ``r`` in its peer now (its address may be reused)."""
        r.freed = True
        try:
            r.peer.free(r.addr)
        finally:
            if r.off is not None:
                self.window.give(r.off, r.span)

    def big(self) -> tuple[Buf, Buf, Remote]:
        """Class-wide buffers for the integrity checks: a random local source, a local
        destination and a random remote buffer, each ``max_size`` + 16 KiB."""
        if self._big is None:
            n = self.spec.max_size + 16 * KiB
            self._big = (self.local(n, fill=1, scope="class"), self.local(n, scope="class"),
                         self.remote(self.peer, n, seed=2, scope="class"))
        return self._big

    # -- a lying cache ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lie(self, segment: str, addr: int, extend: int = 0, writable: bool = False,
            eng: TransferEngine | None = None) -> Iterator[None]:
        """Make the initiator's cached descriptor of ``segment`` lie about the buffer at
        ``addr``: ``extend`` bytes longer, or ``writable`` when it is read-only.  With
        ``refused_by="initiator"`` only the validator's region table lies (the transport sees
        the real descriptor); with ``"target"`` the descriptor lies as well, so only the target
        can refuse.  The cache entry is dropped afterwards."""
        eng = eng or self.eng
        entry = eng._segments.get(segment, refresh=True)
        buf = entry.desc.find_buffer(addr, 1)
        assert buf is not None and buf.addr == addr, "lie about a buffer the peer published"
        length = buf.length + extend
        flags = _regions.ALL if (writable or buf.writable) else _regions.READ_ONLY
        entry.table.remove(addr)
        entry.table.add(addr, length, flags)
        if writable:
            entry.read_only = any(not b.writable for b in entry.desc.buffers if b is not buf)
        if self.spec.refused_by == "target":
            desc = copy.deepcopy(entry.desc)
            b = desc.find_buffer(addr, 1)
            b.length, b.writable = length, b.writable or writable
            entry.desc = desc
        try:
            yield
        finally:
            eng._segments.drop(segment)


def _batch(eng: TransferEngine, seg: str, op: str, local, remote, length, timeout) -> None:
    """Run one batch and wait for it.  A batch, not ``transfer``: after a refusal the synchronous
    call refetches the descriptor and retries once, which would hide the transport's answer to
    the lying cache these checks set up."""
    eng.submit(seg, op, local, remote, length, timeout=timeout).wait()


def _statuses_end(sts: list, allowed: set[int], what: str) -> None:
    """Each task COMPLETED (code 0) or FAILED with one of ``allowed`` codes."""
    for i, s in enumerate(sts):
        ok = (s.status == Status.COMPLETED and s.code == 0) or (
            s.status == Status.FAILED and s.code in allowed)
        names = ", ".join(_codes.CODE_NAMES.get(c, str(c)) for c in sorted(allowed))
        assert ok, f"{what}: task {i} ended {s.status.name} {s.code_name} ({s.error}); " \
                   f"allowed COMPLETED or FAILED with {names}"


def _free_during_read(protocol: str, env: dict, kwargs: dict, segment: str, raddr: int, n: int,
                      rounds: int, q) -> None:
    """Child process of ``free_in_flight``: a worker touching freed memory would kill it."""
    os.environ.update(env)
    e = TransferEngine("127.0.0.1", protocol=protocol, **kwargs)
    out: list = []
    piece = n // 16
    for _ in range(rounds):
        mb = e.allocate(n)
        b = e.submit(segment, "read", [mb.addr + i * piece for i in range(16)],
                     [raddr + i * piece for i in range(16)], [piece] * 16)
        e.free(mb.addr)
        out.append(b.done)
        out.append([(int(s.status), s.code) for s in b.statuses()])
        b.close()
        again = np.zeros(n, np.uint8)  # the freed range is likely reused at once
        e.register(again)
        out.append(settled(again, 0x5A, 0.2))
        e.unregister(again)
    e.close()
    q.put(out)


class Conformance:
    """The suite: subclass it as ``Test...`` with ``spec = TransportSpec(...)`` (or override the
    ``transport_spec`` fixture).  See the module docstring."""

    spec: TransportSpec | None = None

    # -- fixtures --------------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    def transport_spec(self, request) -> TransportSpec:
        s = getattr(request.cls, "spec", None)
        if not isinstance(s, TransportSpec):
            raise TypeError(f"{request.cls.__name__}: set `spec = TransportSpec(...)` or "
                            "override the `transport_spec` fixture")
        return s

    @pytest.fixture(scope="class")
    def conformance_world(self, transport_spec: TransportSpec) -> Iterator[World]:
        with _environ(transport_spec.env):
            w = World(transport_spec)
            try:
                w.start()
                yield w
            finally:
                w.close()

    @pytest.fixture
    def cw(self, request, transport_spec: TransportSpec) -> Iterator[World]:
        check = getattr(request.function, "_mc_check", None)
        why = transport_spec.unsupported.get(check) if check else None
        if why:
            pytest.skip(f"{transport_spec.name}: {check} does not apply: {why}")
        bug = transport_spec.known_failures.get(check) if check else None
        if bug:
            request.applymarker(pytest.mark.xfail(reason=f"{transport_spec.name}: {bug}",
                                                  strict=False))
        w = request.getfixturevalue("conformance_world")
        try:
            yield w
        finally:
            w.end_test()

    # -- integrity -------------------------------------------------------------------------------

    @_check("integrity")
    @pytest.mark.parametrize("size", [1, 7, 4096, 65536 + 1, MiB + 3, 3 * MiB + 1, 16 * MiB,
                                      64 * MiB])
    @pytest.mark.parametrize("lo,ro", [(0, 0), (3, 4093)], ids=["aligned", "unaligned"])
    def test_integrity(self, cw: World, size: int, lo: int, ro: int) -> None:
        if size > cw.spec.max_size:
            pytest.skip(f"{cw.spec.name}: {size} B is above the spec's max_size "
                        f"{cw.spec.max_size}")
        src, dst, remote = cw.big()
        p, seg, r = cw.peer, cw.peer.segment, remote.addr + ro
        edge = 64
        after = p.sha(r + size, edge)
        before = p.sha(r - min(ro, edge), min(ro, edge)) if ro else None
        cw.eng.write(seg, src.addr + lo, r, size)
        assert p.sha(r, size) == sha(src.view[lo:lo + size]), "WRITE: the peer got other bytes"
        assert p.sha(r + size, edge) == after, "WRITE: bytes after the range changed"
        if ro:
            assert p.sha(r - min(ro, edge), min(ro, edge)) == before, \
                "WRITE: bytes before the range changed"
        p.fill(r, size, seed=size + lo)
        dst.view[max(0, lo - edge): lo + size + edge] = 0
        cw.eng.read(seg, dst.addr + lo, r, size)
        assert sha(dst.view[lo:lo + size]) == p.sha(r, size), "READ: other bytes arrived"
        assert not dst.view[lo + size: lo + size + edge].any(), "READ: wrote past the range"
        assert not dst.view[max(0, lo - edge): lo].any(), "READ: wrote before the range"

    @_check("batches")
    def test_batches_sync_async_await(self, cw: World) -> None:
        src, dst, remote = cw.big()
        p, seg, eng = cw.peer, cw.peer.segment, cw.eng
        rng = np.random.default_rng(5)
        half = min(cw.spec.max_size, 32 * MiB) // 2
        sizes = [int(s) for s in rng.integers(1, half // 48, 40)]
        offs, o = [], 0
        for s in sizes:
            offs.append(o)
            o += s + int(rng.integers(0, 64))
        assert o <= half
        r = remote.addr
        A = [r + x for x in offs]  # noqa: N806 - region A of the remote buffer
        B = [r + half + x for x in offs]  # noqa: N806 - region B

        def check_remote(base: int, local: np.ndarray) -> None:
            got = np.frombuffer(p.call("bytes", base, o), np.uint8)
            for x, s in zip(offs, sizes, strict=True):
                assert np.array_equal(got[x:x + s], local[x:x + s]), f"range at +{x} ({s} B)"

        # a synchronous WRITE batch
        eng.transfer(seg, "write", [src.addr + x for x in offs], A, sizes)
        check_remote(r, src.view)
        # a READ batch (from B) and a WRITE batch (into A) in flight at once
        p.fill(r + half, o, seed=51)
        want = np.frombuffer(p.call("bytes", r + half, o), np.uint8)
        dst.view[:o] = 0
        rd = eng.submit(seg, "read", [dst.addr + x for x in offs], B, sizes)
        wr = eng.submit(seg, "write", [src.addr + half + x for x in offs], A, sizes)
        for b in (rd, wr):
            b.wait(cw.spec.hang_bound)
            sts = b.statuses()
            assert [s.status for s in sts] == [Status.COMPLETED] * len(sizes)
            assert [s.transferred_bytes for s in sts] == sizes
            assert all(s.code == 0 for s in sts)
            b.close()
        for x, s in zip(offs, sizes, strict=True):
            assert np.array_equal(dst.view[x:x + s], want[x:x + s]), f"READ range +{x}"
        check_remote(r, src.view[half:])

        # awaited batches: READ A back while WRITing B
        async def both():
            with eng.submit(seg, "read", [dst.addr + x for x in offs], A, sizes) as b1, \
                    eng.submit(seg, "write", [src.addr + x for x in offs], B, sizes) as b2:
                return await asyncio.wait_for(asyncio.gather(b1, b2), cw.spec.hang_bound)

        dst.view[:o] = 0
        s1, s2 = asyncio.run(both())
        assert all(s.status == Status.COMPLETED for s in s1 + s2)
        for x, s in zip(offs, sizes, strict=True):
            assert np.array_equal(dst.view[x:x + s], src.view[half + x:half + x + s])
        check_remote(r + half, src.view)

    # -- refusals --------------------------------------------------------------------------------

    @_check("outside_refused")
    def test_remote_outside_refused_by_the_validator(self, cw: World) -> None:
        p, seg, eng = cw.peer, cw.peer.segment, cw.eng
        rem = cw.remote(p, 256 * KiB, seed=11, guard=True)
        before = rem.sha_all()
        loc = cw.local(rem.n + 8192, fill=12)
        keep = loc.view.copy()
        r, n = rem.addr, rem.n
        cases = [(r + n - 100, 200), (r + n, 1), (r - 1, 2), (r - 4096, 4096),
                 (r + n + (1 << 30), 4096), (r, n + 1)]
        for ra, ln in cases:
            for op in ("write", "read"):
                with pytest.raises(InvalidAddress):
                    eng.transfer(seg, op, [loc.addr], [ra], [ln], timeout=cw.spec.hang_bound)
                with pytest.raises(InvalidAddress):  # one bad request refuses the whole batch
                    eng.submit(seg, op, [loc.addr, loc.addr], [r, ra], [16, ln])
                assert np.array_equal(loc.view, keep), f"{op} {ra - r:+#x}: local memory changed"
        assert rem.sha_all() == before, "the peer's memory changed"

    @_check("outside_lie_refused")
    def test_remote_outside_refused_when_the_cache_lies(self, cw: World) -> None:
        p, seg, eng = cw.peer, cw.peer.segment, cw.eng
        rem = cw.remote(p, 256 * KiB, seed=13, guard=True)
        expect = _rand(13, rem.span)  # what the peer filled the buffer and its guards with
        assert rem.sha_all() == sha(expect)
        loc = cw.local(64 * KiB, fill=14)
        r, n = rem.addr, rem.n
        with cw.lie(seg, r, extend=64 * KiB):
            with pytest.raises(TransferFailed) as ei:
                _batch(eng, seg, "write", [loc.addr] * 2, [r + n - 4096, r + n + 4096],
                             [8192, 4096], timeout=cw.spec.hang_bound)
            assert not isinstance(ei.value, TransferTimeout), ei.value
            for s in ei.value.statuses:
                assert (s.status, s.code) == (Status.FAILED, _codes.E_REFUSED), s
        assert rem.sha_all() == sha(expect), "a refused WRITE changed the peer's memory"
        with cw.lie(seg, r, extend=64 * KiB):
            loc.view[:] = 0x66
            with pytest.raises(TransferFailed) as ei:
                _batch(eng, seg, "read", [loc.addr, loc.addr + 32 * KiB],
                             [r + n - 100, r], [200, 4096], timeout=cw.spec.hang_bound)
            sts = ei.value.statuses
            assert (sts[0].status, sts[0].code) == (Status.FAILED, _codes.E_REFUSED), sts[0]
            assert sts[1].status == Status.COMPLETED, sts[1]
            assert (loc.view[:32 * KiB] == 0x66).all(), "a refused READ wrote local memory"
            assert sha(loc.view[32 * KiB:36 * KiB]) == p.sha(r, 4096), "the honest READ"
        loc.view[:] = _rand(15, loc.n)
        with cw.lie(seg, r, extend=64 * KiB):  # one batch: the honest WRITE lands, the lie not
            with pytest.raises(TransferFailed) as ei:
                _batch(eng, seg, "write", [loc.addr] * 2, [r + n, r], [4096, 4096],
                             timeout=cw.spec.hang_bound)
            sts = ei.value.statuses
            assert (sts[0].status, sts[0].code) == (Status.FAILED, _codes.E_REFUSED), sts[0]
            assert sts[1].status == Status.COMPLETED, sts[1]
        g = rem.guard
        expect[g:g + 4096] = loc.view[:4096]
        assert rem.sha_all() == sha(expect), "only the honest WRITE may change the peer's memory"
        eng.write(seg, loc.addr, r, 4096)  # and the engine still moves data to this peer

    # -- read-only memory ------------------------------------------------------------------------

    @_check("read_only")
    def test_read_only_peer_buffer_is_a_read_source_only(self, cw: World) -> None:
        p, seg, eng = cw.peer, cw.peer.segment, cw.eng
        ro = cw.remote(p, 256 * KiB, seed=21, ro=True)
        before = p.sha(ro.addr, ro.n)
        loc = cw.local(ro.n, fill=22)
        with pytest.raises(InvalidAddress, match="read-only"):
            eng.write(seg, loc.addr, ro.addr, ro.n)
        with pytest.raises(InvalidAddress, match="read-only"):
            eng.submit(seg, "write", [loc.addr], [ro.addr + 5], [100])
        assert p.sha(ro.addr, ro.n) == before, "a refused WRITE changed the read-only buffer"
        eng.read(seg, loc.addr, ro.addr, ro.n)
        assert sha(loc.view) == before, "READ from the read-only buffer"

    @_check("read_only_lie_refused")
    def test_read_only_refused_when_the_cache_lies(self, cw: World) -> None:
        p, seg, eng = cw.peer, cw.peer.segment, cw.eng
        ro = cw.remote(p, 256 * KiB, seed=23, ro=True)
        before = p.sha(ro.addr, ro.n)
        loc = cw.local(ro.n, fill=24)
        with cw.lie(seg, ro.addr, writable=True):
            with pytest.raises(TransferFailed) as ei:
                _batch(eng, seg, "write", [loc.addr], [ro.addr], [ro.n],
                       timeout=cw.spec.hang_bound)
            assert not isinstance(ei.value, TransferTimeout), ei.value
            st = ei.value.statuses[0]
            assert st.status == Status.FAILED and st.code in (_codes.E_DENIED,
                                                              _codes.E_REFUSED), st
        assert p.sha(ro.addr, ro.n) == before, "a WRITE landed in the read-only buffer"
        eng.read(seg, loc.addr, ro.addr, ro.n)
        assert sha(loc.view) == before

    @_check("local_read_only")
    def test_local_read_only_buffer_is_no_read_destination(self, cw: World) -> None:
        p, seg, eng = cw.peer, cw.peer.segment, cw.eng
        rem = cw.remote(p, 64 * KiB, seed=25)
        ro_np = _rand(26, 64 * KiB)
        ro_np.flags.writeable = False
        for obj in (bytes(_rand(27, 64 * KiB)), ro_np):
            reg = eng.register(obj)
            try:
                assert not reg.writable
                with pytest.raises(InvalidAddress, match="read-only"):
                    eng.read(seg, reg.addr, rem.addr, 4096)
                with pytest.raises(InvalidAddress, match="read-only"):
                    eng.submit(seg, "read", [reg.addr], [rem.addr], [64 * KiB])
                eng.write(seg, reg.addr, rem.addr, 64 * KiB)  # a source is fine
                assert p.sha(rem.addr, 64 * KiB) == sha(obj)
            finally:
                eng.unregister(reg)
        with pytest.raises(InvalidAddress, match="read-only"):
            eng.register(bytes(4096), access="rw")

    # -- unregister / free / close with work in flight -------------------------------------------

    @_check("unregister_in_flight")
    def test_unregister_with_reads_in_flight(self, cw: World) -> None:
        p, seg, eng, spec = cw.peer, cw.peer.segment, cw.eng, cw.spec
        n = min(spec.max_size, 32 * MiB)
        rem = cw.remote(p, n, seed=31)
        buf = cw.local(n)
        eng.read(seg, buf.addr, rem.addr, MiB)  # connections up
        piece = n // 32
        stopped = spec.peer_serves
        if stopped:
            p.stop()  # nothing is answered: the work is certainly in flight
        try:
            b = eng.submit(seg, "read", [buf.addr + i * piece for i in range(32)],
                           [rem.addr + i * piece for i in range(32)], [piece] * 32)
            done = _bounded(lambda: cw.unregister(buf), spec.hang_bound, "unregister")
            assert done, f"unregister did not return within {spec.hang_bound}s"
            assert b.core.done, "unregister returned while tasks of the batch were in flight"
            _statuses_end(b.statuses(), {_codes.E_UNREGISTERED}, "READ batch under unregister")
        finally:
            if stopped:
                p.cont()
        assert settled(buf.view, 0xAB), "bytes landed after unregister returned"
        b.close()
        again = cw.local(n)  # the connections it discarded on still serve
        eng.read(seg, again.addr, rem.addr, n)
        assert sha(again.view) == p.sha(rem.addr, n)

    @_check("free_in_flight")
    def test_free_managed_buffer_with_reads_in_flight(self, cw: World) -> None:
        spec = cw.spec
        n = min(spec.max_size, 32 * MiB)
        rem = cw.remote(cw.peer, n, seed=33)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        child = ctx.Process(target=_free_during_read,
                            args=(spec.protocol, dict(spec.env), dict(spec.engine_kwargs),
                                  cw.peer.segment, rem.addr, n, 3, q))
        child.start()
        child.join(3 * spec.hang_bound)
        if child.is_alive():
            child.kill()
            child.join(10)
            pytest.fail(f"the child did not finish within {3 * spec.hang_bound}s (a hang)")
        assert child.exitcode == 0, f"the child died with {child.exitcode} (a worker touched " \
                                    "freed memory?)"
        out = q.get(timeout=10)
        for k in range(0, len(out), 3):
            done, sts, quiet = out[k:k + 3]
            assert done, "free returned while tasks of the batch were in flight"
            for st, code in sts:
                assert (st, code) == (Status.COMPLETED, 0) or (
                    st == Status.FAILED and code == _codes.E_UNREGISTERED), (st, code)
            assert quiet, "bytes of the batch landed in the freed (and reused) range"

    @_check("close_in_flight")
    def test_close_with_work_in_flight(self, cw: World) -> None:
        p, seg, spec = cw.peer, cw.peer.segment, cw.spec
        n = min(spec.max_size, 32 * MiB)
        rem = cw.remote(p, n, seed=35)
        e = cw.new_engine()
        sync_buf = np.zeros(n, np.uint8)
        e.register(sync_buf)
        batch_buf = np.zeros(n, np.uint8)
        e.register(batch_buf)
        e.read(seg, sync_buf.ctypes.data, rem.addr, MiB)
        errors: list[BaseException] = []
        started = threading.Event()

        def reader() -> None:
            try:
                for _ in range(1000):
                    started.set()
                    e.read(seg, sync_buf.ctypes.data, rem.addr, n)
            except Exception as ex:  # closed under it: a typed error
                errors.append(ex)
            finally:
                started.set()

        t = threading.Thread(target=reader, daemon=True)
        piece = n // 32
        stopped = spec.peer_serves
        if stopped:
            p.stop()  # nothing is answered: the work is certainly in flight
        try:
            b = e.submit(seg, "read", [batch_buf.ctypes.data + i * piece for i in range(32)],
                         [rem.addr + i * piece for i in range(32)], [piece] * 32)
            t.start()
            started.wait(10)
            time.sleep(0.02)
            assert _bounded(e.close, spec.hang_bound, "close"), \
                f"close did not return within {spec.hang_bound}s"
            assert b.core.done, "close returned while tasks of the batch were in flight"
            _statuses_end(b.statuses(), {_codes.E_CLOSED, _codes.E_UNREGISTERED},
                          "batch under close")
        finally:
            if stopped:
                p.cont()
        assert settled(batch_buf, 0x11) and settled(sync_buf, 0x12), \
            "bytes landed after close returned"
        t.join(spec.hang_bound)
        assert not t.is_alive(), "a sync transfer hangs after close"
        assert all(isinstance(x, MooncakeError) for x in errors), errors

    @_check("target_unregister")
    def test_target_unregisters_while_the_initiator_writes(self, cw: World) -> None:
        p, seg, eng, spec = cw.peer, cw.peer.segment, cw.eng, cw.spec
        n = min(spec.max_size, 32 * MiB)
        rem = cw.remote(p, n, seed=37)
        src = cw.local(n)
        src.view[:] = 0x01
        b = eng.submit(seg, "write", [src.addr] * 8, [rem.addr] * 8, [n] * 8)
        p.call("unregister_fill", rem.addr, n, 0xAB, timeout=spec.hang_bound)
        with contextlib.suppress(MooncakeError):  # failing is allowed, hanging is not
            b.wait(spec.hang_bound)
        assert b.core.done, f"the WRITE batch did not end within {spec.hang_bound}s"
        for i, s in enumerate(b.statuses()):
            assert s.status in (Status.COMPLETED, Status.FAILED), (i, s)
        time.sleep(0.3)
        assert p.sha(rem.addr, n) == sha(b"\xab" * n), \
            "bytes landed in the target's memory after its unregister returned"
        b.close()

    # -- peer faults -----------------------------------------------------------------------------

    @_check("peer_killed")
    def test_peer_killed_mid_batch(self, cw: World) -> None:
        spec, eng = cw.spec, cw.eng
        victim = cw.new_peer()
        n = min(spec.max_size, 64 * MiB)
        rem = cw.remote(victim, n, seed=41)
        buf = cw.local(n)
        piece = n // 64
        eng.read(victim.segment, buf.addr, rem.addr, piece)
        b = eng.submit(victim.segment, "read", [buf.addr + i * piece for i in range(64)],
                       [rem.addr + i * piece for i in range(64)], [piece] * 64)
        victim.kill()
        t0 = time.monotonic()
        with pytest.raises((TransferFailed, PeerUnreachable, SegmentNotFound)) as ei:
            for _ in range(50):  # the batch may finish before the kill lands: submit again
                b.wait(spec.hang_bound)
                b.close()
                b = eng.submit(victim.segment, "read", [buf.addr], [rem.addr], [piece])
        took = time.monotonic() - t0
        assert not isinstance(ei.value, TransferTimeout), \
            f"a killed peer was noticed only by the timeout: {ei.value}"
        assert took < spec.hang_bound, f"noticing the killed peer took {took:.0f}s"
        if isinstance(ei.value, TransferFailed):
            _statuses_end(ei.value.statuses, set(range(1, 1 << 16)) - {_codes.E_TIMEOUT},
                          "batch to a killed peer")
        # the engine still works with another peer
        rem2 = cw.remote(cw.peer, MiB, seed=42)
        eng.read(cw.peer.segment, buf.addr, rem2.addr, MiB)
        assert sha(buf.view[:MiB]) == cw.peer.sha(rem2.addr, MiB)

    @_check("restart")
    def test_peer_restarted_on_the_same_port_is_reached(self, cw: World) -> None:
        eng = cw.eng
        p = cw.new_peer()
        seg = p.segment
        at = FIXED_ADDRESS if cw.spec.remote_memory == "numpy" else None
        r1 = cw.remote(p, MiB, seed=43, at=at)
        buf = cw.local(MiB)
        buf.view[:] = 4
        eng.write(seg, buf.addr, r1.addr, MiB)
        assert p.sha(r1.addr, MiB) == sha(buf.view)
        p.kill()
        p2 = cw.new_peer(_hostname=seg)  # the same RPC port, new data ports, keys, pages
        assert p2.segment == seg
        r2 = cw.remote(p2, MiB, seed=44, at=at)
        if at is not None:
            assert r2.addr == r1.addr
        buf.view[:] = 5
        eng.write(seg, buf.addr, r2.addr, MiB, timeout=cw.spec.hang_bound)  # the next call
        assert p2.sha(r2.addr, MiB) == sha(buf.view), "the restarted peer got other bytes"
        p2.fill(r2.addr, MiB, seed=45)
        eng.read(seg, buf.addr, r2.addr, MiB, timeout=cw.spec.hang_bound)
        assert sha(buf.view) == p2.sha(r2.addr, MiB)

    @_check("stale_address")
    def test_restarted_peers_old_address_is_refused(self, cw: World) -> None:
        eng = cw.eng
        p = cw.new_peer()
        seg = p.segment
        r1 = cw.remote(p, MiB, seed=46)
        buf = cw.local(MiB)
        buf.view[:] = 6
        eng.write(seg, buf.addr, r1.addr, MiB)
        p.kill()
        p2 = cw.new_peer(_hostname=seg)
        at = FIXED_ADDRESS + 64 * MiB if cw.spec.remote_memory == "numpy" else None
        r2 = cw.remote(p2, MiB, seed=47, at=at)
        if r2.addr <= r1.addr < r2.addr + r2.n or r1.addr <= r2.addr < r1.addr + r1.n:
            pytest.skip("the restarted peer's buffer overlaps the old address (by chance)")
        before = p2.sha(r2.addr, MiB)
        with pytest.raises(MooncakeError):
            eng.write(seg, buf.addr, r1.addr, MiB, timeout=cw.spec.hang_bound)
        with pytest.raises(MooncakeError):
            eng.read(seg, buf.addr, r1.addr, MiB, timeout=cw.spec.hang_bound)
        assert p2.sha(r2.addr, MiB) == before
        eng.write(seg, buf.addr, r2.addr, MiB, timeout=cw.spec.hang_bound)
        assert p2.sha(r2.addr, MiB) == sha(buf.view)

    @_check("reused_address")
    def test_reallocated_address_reaches_the_new_memory(self, cw: World) -> None:
        p, seg, eng = cw.peer, cw.peer.segment, cw.eng
        r1 = cw.remote(p, MiB, seed=61, at=FIXED_ADDRESS + 128 * MiB)
        buf = cw.local(MiB)
        eng.read(seg, buf.addr, r1.addr, MiB)
        assert sha(buf.view) == p.sha(r1.addr, MiB)
        eng.write(seg, buf.addr, r1.addr, MiB)  # whatever the transport caches, it has it now
        cw.free_remote(r1)
        r2 = cw.remote(p, MiB, seed=62, like=r1)
        if r2.addr != r1.addr:
            pytest.skip(f"{cw.spec.name}: the peer put the new buffer elsewhere")
        want = p.sha(r2.addr, MiB)
        buf.view[:] = 0
        try:  # the cached descriptor names the freed registration
            eng.read(seg, buf.addr, r2.addr, MiB, timeout=cw.spec.hang_bound)
            assert sha(buf.view) == want, "READ with the cached descriptor: the freed " \
                                          "buffer's bytes"
        except TransferFailed as e:
            assert not isinstance(e, TransferTimeout), e
        eng.segment(seg, refresh=True)
        buf.view[:] = 0
        eng.read(seg, buf.addr, r2.addr, MiB, timeout=cw.spec.hang_bound)
        assert sha(buf.view) == want, "READ returned the freed buffer's bytes, not the new one's"
        buf.view[:] = 0x3C
        eng.write(seg, buf.addr, r2.addr, MiB, timeout=cw.spec.hang_bound)
        assert p.sha(r2.addr, MiB) == sha(buf.view), "the WRITE did not land in the new buffer"

    # -- timeouts --------------------------------------------------------------------------------

    @_check("timeout_isolation")
    def test_a_tiny_timeout_fails_only_that_transfer(self, cw: World) -> None:
        p, seg, eng, spec = cw.peer, cw.peer.segment, cw.eng, cw.spec
        n = min(spec.max_size, 32 * MiB)
        rem = cw.remote(p, n, seed=51)
        mine, theirs = cw.local(n), cw.local(MiB)
        eng.read(seg, theirs.addr, rem.addr, MiB)
        failures: list[BaseException] = []
        rounds = [0]
        stop = threading.Event()

        def other_caller() -> None:
            while not stop.is_set():
                try:
                    eng.read(seg, theirs.addr, rem.addr, MiB, timeout=spec.hang_bound)
                    rounds[0] += 1
                except Exception as ex:
                    failures.append(ex)
                    return

        t = threading.Thread(target=other_caller, daemon=True)
        t.start()
        timeouts = 0
        try:
            for _ in range(20):
                try:
                    eng.read(seg, mine.addr, rem.addr, n, timeout=1e-4)
                except TransferTimeout:
                    timeouts += 1
        finally:
            stop.set()
            t.join(spec.hang_bound)
        assert not t.is_alive(), "the other thread's transfer hangs"
        assert failures == [], f"another thread's transfer failed: {failures[0]!r}"
        assert timeouts > 0, f"no {n} B transfer timed out after 1e-4 s (list " \
                             "'timeout_isolation' in unsupported if it cannot)"
        assert sha(theirs.view) == p.sha(rem.addr, MiB)
        eng.read(seg, mine.addr, rem.addr, n)
        assert sha(mine.view) == p.sha(rem.addr, n)

    @_check("timeout_silence")
    def test_no_byte_lands_after_a_timeout(self, cw: World) -> None:
        p, seg, eng, spec = cw.peer, cw.peer.segment, cw.eng, cw.spec
        n = min(spec.max_size, 32 * MiB)
        rem = cw.remote(p, n, seed=53)
        buf = cw.local(n)
        eng.read(seg, buf.addr, rem.addr, MiB)
        if spec.peer_serves:
            p.stop()
            try:
                with pytest.raises(TransferTimeout):
                    eng.read(seg, buf.addr, rem.addr, n, timeout=0.5)
                b = eng.submit(seg, "read", [buf.addr], [rem.addr], [n], timeout=0.5)
                with pytest.raises(TransferTimeout):
                    b.wait()
            finally:
                p.cont()
            assert settled(buf.view, 0xC3), "bytes landed after the TransferTimeout"
            b.close()
        else:
            seen = 0
            for i in range(40):
                try:
                    if i % 2:
                        eng.read(seg, buf.addr, rem.addr, n, timeout=1e-4)
                    else:
                        with eng.submit(seg, "read", [buf.addr], [rem.addr], [n],
                                        timeout=1e-4) as b:
                            b.wait()
                except TransferTimeout:
                    seen += 1
                    assert settled(buf.view, 0xC3, 0.2), \
                        "bytes landed after the TransferTimeout"
                    if seen >= 4:
                        break
            assert seen, f"no {n} B transfer timed out after 1e-4 s (list 'timeout_silence' " \
                         "in unsupported if it cannot)"
        eng.read(seg, buf.addr, rem.addr, n)
        assert sha(buf.view) == p.sha(rem.addr, n)


def _bounded(fn: Callable[[], Any], bound: float, what: str) -> bool:
    """Run ``fn`` in a thread; True when it returned (re-raising its exception) within
    ``bound`` seconds."""
    out: list = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out.append(e)

    t = threading.Thread(target=run, daemon=True, name=f"mc-conformance-{what}")
    t.start()
    t.join(bound)
    if t.is_alive():
        return False
    if out and out[0] is not None:
        raise out[0]
    return True
