"""Stateful property test (hypothesis ``RuleBasedStateMachine``): a local engine against a live
target engine in another process.

The machine allocates, registers, unregisters and frees buffers on both sides, writes and reads
between them, and closes and reopens the local engine, keeping a byte-exact model of every
buffer.  Invariants after every step: the bytes of every local buffer and (by checksum) every
remote buffer equal the model's; a transfer touching unregistered or freed memory (or a
read-only target, or a closed engine) fails with a typed error and changes no byte anywhere;
no step takes longer than its bound.  Example and step counts come from the hypothesis profile
(tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mooncake.engine import TransferEngine
from mooncake.errors import InvalidAddress, MooncakeError, TransferFailed
from mooncake.testing.peer import Peer

KiB = 1024
STEP = 20.0  # seconds: the bound on any one step (only a hang takes this long)
XFER = 10.0  # seconds: each transfer's own timeout
CALL = 15.0  # seconds: each command to the peer process
#: what a refused transfer may raise: the range is refused before posting (InvalidAddress) or
#: by the target (TransferFailed)
REFUSED = (InvalidAddress, TransferFailed)


def sha(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


class Remote:
    def __init__(self, addr: int, data: bytes, ro: bool) -> None:
        self.addr, self.model, self.ro = addr, bytearray(data), ro
        self.registered = True

    @property
    def size(self) -> int:
        return len(self.model)


class Local:
    def __init__(self, arr: np.ndarray) -> None:
        self.arr, self.model = arr, bytearray(arr.tobytes())
        self.registered = False

    @property
    def addr(self) -> int:
        return self.arr.ctypes.data

    @property
    def size(self) -> int:
        return self.arr.nbytes


sizes = st.one_of(st.integers(1, 64 * KiB), st.sampled_from([1, 4095, 4096, 4097, 64 * KiB]))


class TargetMachine(RuleBasedStateMachine):
    """A local TransferEngine and a Peer (set on the class by the test), with a model."""

    peer: Peer | None = None

    remotes = Bundle("remotes")
    locals_ = Bundle("locals")

    def __init__(self) -> None:
        super().__init__()
        self.eng = TransferEngine("127.0.0.1", protocol="tcp")
        self.remote: dict[int, Remote] = {}  # addr -> live remote buffer (registered or not)
        self.freed: list[tuple[int, int]] = []  # (addr, size) of freed remote buffers
        self.local: list[Local] = []
        self.t0 = time.monotonic()

    # -- helpers --------------------------------------------------------------------------
    def _step(self) -> None:
        took = time.monotonic() - self.t0
        assert took < STEP, f"a step took {took:.1f} s (bound {STEP} s): something hung"
        self.t0 = time.monotonic()

    def _call(self, cmd: str, *args):
        return self.peer.call(cmd, *args, timeout=CALL)

    def _refused(self, fn, *args) -> None:
        """``fn`` must fail with a typed error (the invariants then show no byte moved)."""
        try:
            fn(*args, timeout=XFER)
        except REFUSED as e:
            event(f"refused: {type(e).__name__}")
            return
        except MooncakeError as e:  # typed, but not what a refused range gives
            raise AssertionError(f"refused transfer raised {type(e).__name__}: {e}") from e
        raise AssertionError("a transfer into unusable memory succeeded")

    def _overlaps_live(self, addr: int, size: int) -> bool:
        return any(r.addr < addr + size and addr < r.addr + r.size for r in self.remote.values())

    # -- remote memory --------------------------------------------------------------------
    @initialize(target=remotes, size=sizes, seed=st.integers(0, 2**16), ro=st.just(False))
    def first_remote(self, size, seed, ro):
        return self.alloc_remote(size, seed, ro)

    @initialize(target=locals_, size=sizes, seed=st.integers(0, 2**16))
    def first_local(self, size, seed):
        return self.alloc_local(size, seed)

    @rule(target=remotes, size=sizes, seed=st.integers(0, 2**16),
          ro=st.sampled_from([False, False, False, True]))
    def alloc_remote(self, size, seed, ro):
        addr = self._call("alloc", size, seed, None, {"access": "ro" if ro else "rw"})
        r = Remote(addr, self._call("bytes", addr, size), ro)
        self.remote[addr] = r
        return r

    @rule(r=remotes)
    def unregister_remote(self, r):
        if r.addr in self.remote and r.registered:
            self._call("unregister", r.addr)
            r.registered = False

    @rule(r=consumes(remotes))
    def free_remote(self, r):
        if self.remote.pop(r.addr, None) is not None:
            self._call("free", r.addr)
            self.freed.append((r.addr, r.size))

    # -- local memory ---------------------------------------------------------------------
    @rule(target=locals_, size=sizes, seed=st.integers(0, 2**16))
    def alloc_local(self, size, seed):
        arr = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
        loc = Local(arr)
        self.eng.register(arr)
        loc.registered = True
        self.local.append(loc)
        return loc

    @rule(loc=locals_)
    def unregister_local(self, loc):
        if loc.registered:
            self.eng.unregister(loc.arr)
            loc.registered = False

    @rule(loc=locals_)
    def register_local(self, loc):
        if not loc.registered:
            self.eng.register(loc.arr)
            loc.registered = True

    @rule()
    def close_and_reopen(self):
        """Closing the local engine drops its registrations; a closed engine refuses work
        with a typed error; a new engine on a new port works against the same peer."""
        self.eng.close()
        for loc in self.local:
            loc.registered = False
        if self.local and self.remote:
            loc, r = self.local[0], next(iter(self.remote.values()))
            with pytest.raises(MooncakeError):
                self.eng.write(self.peer.segment, loc.addr, r.addr, 1, timeout=XFER)
        self.eng = TransferEngine("127.0.0.1", protocol="tcp")

    # -- transfers ------------------------------------------------------------------------
    @rule(loc=locals_, r=remotes, data=st.data())
    def write(self, loc, r, data):
        live = self.remote.get(r.addr) is r
        n = data.draw(st.integers(1, min(loc.size, r.size)), label="length")
        lo = data.draw(st.integers(0, loc.size - n), label="local offset")
        ro = data.draw(st.integers(0, r.size - n), label="remote offset")
        if live and r.registered and not r.ro and loc.registered:
            self.eng.write(self.peer.segment, loc.addr + lo, r.addr + ro, n, timeout=XFER)
            event("write: done")
            r.model[ro:ro + n] = loc.model[lo:lo + n]
            assert self._call("sha", r.addr + ro, n) == sha(r.model[ro:ro + n])
        elif live or not self._overlaps_live(r.addr + ro, n):  # freed memory may be reused
            self._refused(lambda **kw: self.eng.write(self.peer.segment, loc.addr + lo,
                                                      r.addr + ro, n, **kw))

    @rule(loc=locals_, r=remotes, data=st.data())
    def read(self, loc, r, data):
        live = self.remote.get(r.addr) is r
        n = data.draw(st.integers(1, min(loc.size, r.size)), label="length")
        lo = data.draw(st.integers(0, loc.size - n), label="local offset")
        ro = data.draw(st.integers(0, r.size - n), label="remote offset")
        if live and r.registered and loc.registered:
            self.eng.read(self.peer.segment, loc.addr + lo, r.addr + ro, n, timeout=XFER)
            event("read: done")
            loc.model[lo:lo + n] = r.model[ro:ro + n]
        elif live or not self._overlaps_live(r.addr + ro, n):
            self._refused(lambda **kw: self.eng.read(self.peer.segment, loc.addr + lo,
                                                     r.addr + ro, n, **kw))

    @precondition(lambda self: self.freed and self.local)
    @rule(data=st.data())
    def write_to_freed(self, data):
        """A range the peer freed (and no live buffer reuses) is refused."""
        addr, size = data.draw(st.sampled_from(self.freed), label="freed buffer")
        loc = data.draw(st.sampled_from(self.local), label="local buffer")
        n = min(size, loc.size)
        if not self._overlaps_live(addr, n):
            self._refused(lambda **kw: self.eng.write(self.peer.segment, loc.addr, addr, n,
                                                      **kw))

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def bytes_match_the_model(self):
        for loc in self.local:
            assert loc.arr.tobytes() == bytes(loc.model), "a local buffer differs from the model"
        for r in self.remote.values():  # unregistered ones too: refused writes left them alone
            assert self._call("sha", r.addr, r.size) == sha(r.model), \
                f"remote buffer 0x{r.addr:x} differs from the model"
        self._step()

    def teardown(self):
        try:
            for addr in list(self.remote):
                self._call("free", addr)
        finally:
            self.eng.close()


def test_target_engine_state_machine(peer):
    """Register/unregister/free/write/read/close-and-reopen sequences against a live target
    keep every byte equal to the model; refused transfers fail typed and move nothing."""
    assert peer.alive
    TargetMachine.peer = peer
    try:
        base = settings.default
        run_state_machine_as_test(TargetMachine, settings=settings(
            max_examples=base.max_examples, stateful_step_count=2 * base.stateful_step_count))
    finally:
        TargetMachine.peer = None
    assert peer.alive, "the target engine died"
