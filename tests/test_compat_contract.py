"""The Mooncake-compatible face keeps to its documented return values for any argument.

Table-driven: every compat method, every parameter, every kind of bad value (ints of any size,
None, str, float, bool, wrong element types, hostile objects) against a real engine and a TCP
target in a second process.  A bad call returns the method's failure value, raises nothing and
logs an ERROR naming the method; the good call still succeeds afterwards.
"""

from __future__ import annotations

import errno
import inspect
import logging
from collections.abc import Sequence

import numpy as np
import pytest

from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode

KiB = 1024


class Hostile(Sequence):
    """A sequence that blows up when read."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i):
        raise RuntimeError("hostile sequence")


def _recursive() -> list:
    a: list = [1]
    a.append(a)
    return a


def _deep() -> list:
    a: list = [1]
    for _ in range(100000):
        a = [a]
    return a


BAD_INT = [2**64, 2**64 + 1, -1, -2**70, 10**5000, None, "4096", b"1", 1.5, float("nan"),
           True, False, [1], (1,), object(), np.float64(1.0)]
BAD_STR = [None, 5, 2**70, 1.5, True, b"127.0.0.1", ["x"], object()]
BAD_OPT_STR = [s for s in BAD_STR if s is not None]
BAD_LIST = [None, 5, 2**70, "abc", b"ab", 1.5, True, [None], ["x"], [1.5], [True], [2**64],
            [-1], [-2**70], [[1]], _recursive(), _deep(), Hostile(), {1: 2},
            np.array([1.5]), np.array([-1]), np.zeros((1, 1), np.uint64), object()]
BAD_BYTES = [None, "text", 5, 2**70, [1, 2], object()]
BAD_NOTIFY = ["x", 5, object(), TransferNotify(5, None)]  # type: ignore[arg-type]
BAD = {"int": BAD_INT, "str": BAD_STR, "str | None": BAD_OPT_STR, "list[int]": BAD_LIST,
       "bytes": BAD_BYTES, "TransferNotify | None": BAD_NOTIFY}


class Ctx:
    """Good arguments for every method: a started engine, a registered local buffer, the
    peer's buffer, a spare unregistered buffer, a managed buffer and a live batch id."""

    def __init__(self, engine: TransferEngine, peer, raddr: int) -> None:
        self.e, self.seg, self.raddr = engine, peer.segment, raddr
        self.buf = np.zeros(64 * KiB, np.uint8)
        engine.register(self.buf)
        self.addr = self.buf.ctypes.data
        self.spare = np.zeros(8 * KiB, np.uint8)
        self.spare2 = np.zeros(8 * KiB, np.uint8)

    def managed(self) -> int:
        p = self.e.allocate_managed_buffer(8 * KiB)
        assert p
        return p

    def batch(self) -> int:
        bid = self.e.batch_transfer_async_write(self.seg, [self.addr], [self.raddr], [64])
        assert bid > 0
        return bid

    def registered_spare(self) -> int:
        if self.spare.ctypes.data not in self.e._regions:
            self.e.register(self.spare)
        return self.spare.ctypes.data


def _args(c: Ctx, m: str) -> tuple:
    """Good arguments of method ``m`` (fresh state each time it is called)."""
    a, r, s = c.addr, c.raddr, c.seg
    return {
        "get_rpc_port": lambda: (),
        "register_memory": lambda: (c.spare.ctypes.data, 8 * KiB, "cpu:0"),
        "unregister_memory": lambda: (c.registered_spare(),),
        "batch_register_memory": lambda: ([c.spare.ctypes.data, c.spare2.ctypes.data],
                                          [8 * KiB, 8 * KiB], "*"),
        "batch_unregister_memory": lambda: ([c.registered_spare()],),
        "allocate_managed_buffer": lambda: (4 * KiB,),
        "free_managed_buffer": lambda: (c.managed(), 8 * KiB),
        "write_bytes_to_buffer": lambda: (a, b"hello", 5),
        "read_bytes_from_buffer": lambda: (a, 5),
        "transfer_sync_write": lambda: (s, a, r, 4 * KiB, ""),
        "transfer_sync_read": lambda: (s, a, r, 4 * KiB, ""),
        "transfer_sync": lambda: (s, a, r, 4 * KiB, TransferOpcode.Write,
                                  TransferNotify("n", "m"), ""),
        "batch_transfer_sync_write": lambda: (s, [a, a + 8 * KiB], [r, r + 8 * KiB],
                                              [KiB, KiB], ""),
        "batch_transfer_sync_read": lambda: (s, [a], [r], [KiB], ""),
        "batch_transfer_sync": lambda: (s, [a], [r], [KiB], 0, None, ""),
        "batch_transfer_async_write": lambda: (s, [a], [r], [KiB], ""),
        "batch_transfer_async_read": lambda: (s, [a], [r], [KiB], ""),
        "batch_transfer_async": lambda: (s, [a], [r], [KiB], 1, ""),
        "transfer_submit_write": lambda: (s, a, r, KiB, ""),
        "get_batch_transfer_status": lambda: ([c.batch()],),
        "transfer_check_status": lambda: (c.batch(),),
        "get_first_buffer_address": lambda: (s,),
        "get_notifies": lambda: (),
        "send_probe": lambda: (s,),
        "get_local_topology": lambda: (None,),
    }[m]()


#: method -> (failure value, check of a good call's result)
TABLE = {
    "get_rpc_port": (-1, lambda v: 0 < v < 65536),
    "register_memory": (-1, lambda v: v == 0),
    "unregister_memory": (-1, lambda v: v == 0),
    "batch_register_memory": (-1, lambda v: v == 0),
    "batch_unregister_memory": (-1, lambda v: v == 0),
    "allocate_managed_buffer": (0, lambda v: v > 0),
    "free_managed_buffer": (-1, lambda v: v == 0),
    "write_bytes_to_buffer": (-1, lambda v: v == 0),
    "read_bytes_from_buffer": (b"", lambda v: v == bytes(5)),
    "transfer_sync_write": (-1, lambda v: v == 0),
    "transfer_sync_read": (-1, lambda v: v == 0),
    "transfer_sync": (-1, lambda v: v == 0),
    "batch_transfer_sync_write": (-1, lambda v: v == 0),
    "batch_transfer_sync_read": (-1, lambda v: v == 0),
    "batch_transfer_sync": (-1, lambda v: v == 0),
    "batch_transfer_async_write": (0, lambda v: v > 0),
    "batch_transfer_async_read": (0, lambda v: v > 0),
    "batch_transfer_async": (0, lambda v: v > 0),
    "transfer_submit_write": (0, lambda v: v > 0),
    "get_batch_transfer_status": (-1, lambda v: v == 0),
    "transfer_check_status": (-1, lambda v: v in (0, 1)),
    "get_first_buffer_address": (0, lambda v: v > 0),
    "get_notifies": ([], lambda v: isinstance(v, list)),
    "send_probe": (-1, lambda v: v == 0),
    "get_local_topology": ("{}", lambda v: '"transports"' in v),
}


def _cleanup(c: Ctx, m: str, result) -> None:
    """Undo what a call that (wrongly) succeeded registered or started."""
    e = c.e
    if m in ("register_memory", "batch_register_memory") and result == 0:
        for b in (c.spare, c.spare2):
            if b.ctypes.data in e._regions:
                e.unregister(b.ctypes.data)
    elif m == "allocate_managed_buffer" and result:
        e.free(result)
    elif m.startswith("batch_transfer_async") or m == "transfer_submit_write":
        if result:
            assert e.get_batch_transfer_status([result]) == 0


@pytest.fixture(scope="module")
def raddr(peer):
    return peer.alloc(64 * KiB, seed=5)


@pytest.fixture
def ctx(engine, peer, raddr):
    return Ctx(engine, peer, raddr)


def test_table_covers_every_compat_method():
    from mooncake.compat import MooncakeAPI

    public = {n for n, f in vars(MooncakeAPI).items()
              if callable(f) and not n.startswith("_") and n != "get_engine"}
    assert public - {"initialize", "initialize_ext"} == set(TABLE)


def _bad_calls(m: str, good: tuple):
    """(description, args, kwargs) for every bad value at every parameter of ``m``, plus wrong
    arity and unknown keywords."""
    fn = getattr(TransferEngine, m)
    params = list(inspect.signature(fn).parameters.values())[1:]
    for i, p in enumerate(params):
        kind = fn.__annotations__[p.name]
        assert kind in BAD, f"{m}.{p.name}: no bad values for {kind!r}"
        for v in BAD[kind]:
            args = list(good)
            args[i] = v
            yield f"{p.name}={_short(v)}", tuple(args), {}
            kw = {q.name: good[j] for j, q in enumerate(params) if j > i and j < len(good)}
            yield f"{p.name}={_short(v)} (keyword)", tuple(good[:i]), {p.name: v, **kw}
    yield "one argument too many", good + (0,), {}
    yield "unknown keyword", good, {"bogus": 1}
    required = sum(p.default is inspect.Parameter.empty for p in params)
    if required:
        yield "missing arguments", good[:required - 1], {}


def _short(v) -> str:
    r = f"{type(v).__name__}"
    return r if isinstance(v, (list, Sequence)) and not isinstance(v, str) else (
        r if isinstance(v, int) and abs(v) > 2**80 else f"{v!r}"[:30])


@pytest.mark.parametrize("method", sorted(TABLE))
def test_bad_arguments_return_the_documented_code(ctx, method, caplog):
    failure, ok = TABLE[method]
    meth = getattr(ctx.e, method)
    wrong = []
    for what, args, kwargs in _bad_calls(method, _args(ctx, method)):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="mooncake"):
            try:
                got = meth(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - the contract is: nothing escapes
                wrong.append(f"{what}: raised {type(e).__name__}: {e}")
                _cleanup(ctx, method, None)
                continue
        if got != failure or type(got) is not type(failure):
            wrong.append(f"{what}: returned {got!r}, expected {failure!r}")
        elif not any(r.levelno >= logging.ERROR and method in r.getMessage()
                     for r in caplog.records):
            wrong.append(f"{what}: returned {failure!r} but logged no error naming {method}")
        _cleanup(ctx, method, got)
    assert not wrong, f"{len(wrong)} bad calls broke the contract:\n" + "\n".join(wrong)
    # the good call still works after all that
    got = meth(*_args(ctx, method))
    assert ok(got), f"good call returned {got!r}"
    _cleanup(ctx, method, got)


@pytest.mark.parametrize("method", ["initialize", "initialize_ext"])
def test_initialize_bad_arguments(method, caplog):
    good = ("127.0.0.1", "P2PHANDSHAKE", "tcp", "") + (("p2p",) if method == "initialize_ext"
                                                       else ())
    wrong = []
    for what, args, kwargs in _bad_calls(method, good):
        e = TransferEngine()
        caplog.clear()
        try:
            with caplog.at_level(logging.ERROR, logger="mooncake"):
                got = getattr(e, method)(*args, **kwargs)
        except BaseException as ex:  # noqa: BLE001
            wrong.append(f"{what}: raised {type(ex).__name__}: {ex}")
            continue
        finally:
            e.close()
        if got != -1:
            wrong.append(f"{what}: returned {got!r}")
        elif not any(method in r.getMessage() for r in caplog.records):
            wrong.append(f"{what}: no error logged")
    assert not wrong, "\n".join(wrong)
    e = TransferEngine()
    try:
        assert getattr(e, method)(*good) == 0
        assert getattr(e, method)(*good) == -1  # already initialized
        assert e.get_rpc_port() > 0
    finally:
        e.close()


def test_none_device_name_is_allowed_like_mooncake():
    """Mooncake's binding takes ``const char *`` for device names: None is accepted."""
    e = TransferEngine()
    try:
        assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", None) == 0
    finally:
        e.close()


@pytest.mark.parametrize("err", [errno.ENOMEM, errno.EPERM, errno.EAGAIN])
def test_registration_oserror_is_minus_one(ctx, monkeypatch, caplog, err):
    """ibv_reg_mr past the memlock limit (or out of memory) surfaces as OSError from a
    transport's register: -1 / 0 on the compat face, logged, nothing left registered."""
    t = next(iter(ctx.e.transports.values()))

    def boom(region):
        raise OSError(err, f"ibv_reg_mr: {errno.errorcode[err]} (RLIMIT_MEMLOCK?)")

    monkeypatch.setattr(t, "register", boom)
    n_before = len(ctx.e.regions)
    with caplog.at_level(logging.ERROR, logger="mooncake"):
        assert ctx.e.register_memory(ctx.spare.ctypes.data, 8 * KiB) == -1
        assert ctx.e.batch_register_memory([ctx.spare.ctypes.data, ctx.spare2.ctypes.data],
                                           [8 * KiB, 8 * KiB]) == -1
        assert ctx.e.allocate_managed_buffer(8 * KiB) == 0
    assert len(ctx.e.regions) == n_before
    text = caplog.text
    for m in ("register_memory", "batch_register_memory", "allocate_managed_buffer"):
        assert f"{m} failed: " in text
    assert f"[Errno {err}] ibv_reg_mr: {errno.errorcode[err]}" in text
    monkeypatch.undo()
    assert ctx.e.register_memory(ctx.spare.ctypes.data, 8 * KiB) == 0
    assert ctx.e.unregister_memory(ctx.spare.ctypes.data) == 0


def test_unexpected_errors_are_logged_with_a_traceback(ctx, monkeypatch, caplog):
    monkeypatch.setattr(ctx.e, "take_notifies", lambda: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="mooncake"):
        assert ctx.e.get_notifies() == []
    rec = [r for r in caplog.records if "get_notifies" in r.getMessage()]
    assert rec and rec[0].exc_info is not None


def test_wrong_list_lengths(ctx):
    e, a, r, s = ctx.e, ctx.addr, ctx.raddr, ctx.seg
    for m in ("batch_transfer_sync_write", "batch_transfer_sync_read"):
        assert getattr(e, m)(s, [a, a], [r], [8, 8]) == -1
        assert getattr(e, m)(s, [a], [r], [8, 8]) == -1
        assert getattr(e, m)(s, [], [], []) == -1
    for m in ("batch_transfer_async_write", "batch_transfer_async_read"):
        assert getattr(e, m)(s, [a], [r, r], [8]) == 0
        assert getattr(e, m)(s, [], [], []) == 0
    assert e.batch_register_memory([ctx.spare.ctypes.data], [1, 2]) == -1
    assert e.batch_register_memory([], [1]) == -1


def test_write_bytes_refuses_read_only_regions(engine):
    """A region registered from read-only memory is never written by write_bytes_to_buffer."""
    ro = np.zeros(4096, np.uint8)
    ro.flags.writeable = False
    try:
        engine.register(ro)
    except Exception:
        pytest.skip("this engine does not register read-only buffers yet")
    if engine.regions.flags(ro.ctypes.data, 1) & 1:
        pytest.skip("this engine registers read-only buffers as writable (no flags yet)")
    assert engine.write_bytes_to_buffer(ro.ctypes.data, b"x", 1) == -1
    assert ro[0] == 0
    assert engine.read_bytes_from_buffer(ro.ctypes.data, 4) == b"\0" * 4


def test_numpy_and_enum_arguments_are_ints(ctx):
    """What Mooncake's binding accepts as integers (IntEnum, NumPy integers, int arrays) works."""
    e, a, r, s = ctx.e, ctx.addr, ctx.raddr, ctx.seg
    assert e.transfer_sync_write(s, np.uint64(a), np.int64(r), np.int32(64)) == 0
    assert e.transfer_sync(s, a, r, 64, TransferOpcode.Read) == 0
    assert e.batch_transfer_sync_write(s, np.array([a], np.uint64), (r,), [np.uint32(64)]) == 0
