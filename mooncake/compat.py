"""The Mooncake-compatible face of :class:`mooncake.engine.TransferEngine`.

Same method names, argument order and return codes as Mooncake's ``mooncake.engine`` binding.
Every method keeps to its documented return value for *any* argument: a failure (a typed
:class:`MooncakeError`, a registration ``OSError`` such as the memlock limit, or an argument of
the wrong type or size) is logged with its reason at ERROR and turned into that method's
failure value (``-1``, ``0``, ``b""``...); nothing raises through this face.

One mechanism does it: :func:`_compat`.  It checks each argument against the method's
annotation (``int``: an integer in ``0..2**64-1``, never a bool or a float; ``list[int]``: a
list, tuple or 1-D integer NumPy array of such; ``str``; ``str | None``...) before the method
runs, and maps what the method raises to its failure value.  Unexpected exception types (a bug,
not a bad argument) are logged with their traceback.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mooncake._core.batch import E_DENIED, E_REFUSED
from mooncake.errors import InvalidAddress, InvalidBatch, MooncakeError, to_return_code

__all__ = ["MooncakeAPI", "TransferNotify", "TransferOpcode"]

log = logging.getLogger("mooncake.engine")

_U64_MAX = (1 << 64) - 1


class TransferOpcode(enum.IntEnum):
    """Mooncake's ``TransferOpcode`` (``Read`` = 0, ``Write`` = 1)."""

    Read = 0
    Write = 1
    READ = 0
    WRITE = 1


class TransferNotify:
    """A notification: ``name`` and ``msg`` (read/write attributes, as in Mooncake)."""

    def __init__(self, name: str = "", msg: str = "") -> None:
        self.name = name
        self.msg = msg

    def __repr__(self) -> str:
        return f"TransferNotify(name={self.name!r}, msg={self.msg!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransferNotify) and (self.name, self.msg) == (other.name,
                                                                                 other.msg)


# -- argument checks (one per annotation) ----------------------------------------------------


def _show(v: Any) -> str:
    """A short, never-raising description of a bad argument."""
    try:
        if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 80:
            return f"an int of {v.bit_length()} bits"
        import reprlib

        return f"{reprlib.repr(v)} ({type(v).__name__})"
    except Exception:
        return f"a {type(v).__name__}"


def _bad(name: str, want: str, v: Any) -> InvalidAddress:
    return InvalidAddress(f"argument {name!r} must be {want}, got {_show(v)}")


def _u64(name: str, v: Any) -> int:
    if type(v) is int:
        if 0 <= v <= _U64_MAX:
            return v
    elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        iv = int(v)  # IntEnum members, NumPy integers
        if 0 <= iv <= _U64_MAX:
            return iv
    raise _bad(name, "an int in 0..2**64-1", v)


def _u64_list(name: str, v: Any) -> Any:
    if isinstance(v, np.ndarray):
        if v.ndim == 1 and v.dtype.kind in "iu" and not (v.dtype.kind == "i" and v.size and
                                                         int(v.min()) < 0):
            return v
        raise _bad(name, "a list of ints in 0..2**64-1", v)
    if not isinstance(v, (list, tuple)):
        if not isinstance(v, Sequence) or isinstance(v, (str, bytes, bytearray, memoryview)):
            raise _bad(name, "a list of ints", v)
        v = list(v)
    if set(map(type, v)) - {int} or (v and (min(v) < 0 or max(v) > _U64_MAX)):
        return [_u64(f"{name}[{i}]", x) for i, x in enumerate(v)]  # raises naming the culprit
    return v


def _str(name: str, v: Any) -> str:
    if isinstance(v, str):
        return v
    raise _bad(name, "a str", v)


def _opt_str(name: str, v: Any) -> str:
    return "" if v is None else _str(name, v)


def _bytes(name: str, v: Any) -> memoryview:
    if isinstance(v, (bytes, bytearray, memoryview)):
        try:
            return memoryview(v).cast("B")
        except (TypeError, ValueError):
            pass
    raise _bad(name, "bytes (or a contiguous buffer)", v)


def _notify(name: str, v: Any) -> TransferNotify | None:
    if v is None or (isinstance(v, TransferNotify) and isinstance(v.name, str) and
                     isinstance(v.msg, str)):
        return v
    raise _bad(name, "a TransferNotify (str name and msg) or None", v)


#: annotation (as written in the signatures below) -> its check
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "int": _u64,
    "list[int]": _u64_list,
    "str": _str,
    "str | None": _opt_str,
    "bytes": _bytes,
    "TransferNotify | None": _notify,
}


#: annotation -> a test (on ``a[i]``) that the argument already is what its check returns
_FAST = {"int": "type(a[{i}]) is int and 0 <= a[{i}] <= M", "str": "type(a[{i}]) is str",
         "str | None": "type(a[{i}]) is str", "TransferNotify | None": "a[{i}] is None"}


def _fast_checks(kinds: list[str], required: int) -> dict[int, Callable[[tuple], bool]]:
    """Per count of positional arguments, one expression that is true when each argument
    passes its check unchanged (the common call): the checks then need not run one by one.
    Built from the annotations alone (no caller text reaches the code)."""
    out: dict[int, Callable[[tuple], bool]] = {}
    for n in range(required, len(kinds) + 1):
        if n == 0 or any(k not in _FAST for k in kinds[:n]):
            continue
        expr = " and ".join(f"({_FAST[k].format(i=i)})" for i, k in enumerate(kinds[:n]))
        out[n] = eval(f"lambda a: {expr}", {"M": _U64_MAX})  # noqa: S307
    return out


def _log_failure(what: str, e: BaseException) -> None:
    log.error("%s failed: %s: %s", what, type(e).__name__, e)


def _compat(failure: Any) -> Callable:
    """Make a method keep to its documented return value: check the arguments against its
    annotations, and turn every exception into ``failure`` (``-1``: the exception's
    Mooncake code), logged at ERROR with its reason."""

    def deco(fn: Callable) -> Callable:
        what = fn.__name__
        params = list(inspect.signature(fn).parameters.values())[1:]  # after self
        names = [p.name for p in params]
        checks = [_CHECKS[fn.__annotations__[n]] for n in names]  # KeyError: unknown kind
        by_name = dict(zip(names, checks, strict=True))
        required = sum(p.default is inspect.Parameter.empty for p in params)
        fast = _fast_checks([fn.__annotations__[n] for n in names], required)

        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            try:
                if not kwargs:  # plain ints and strs, as a hot loop passes them: one test
                    ok = fast.get(len(args))
                    if ok is not None and ok(args):
                        return fn(self, *args)
                if len(args) > len(names):
                    raise InvalidAddress(f"{what}() takes {len(names)} arguments, "
                                         f"got {len(args)}")
                args = tuple([chk(n, a) for n, chk, a in zip(names, checks, args, strict=False)])
                if kwargs:
                    for k in kwargs:
                        if k not in by_name or k in names[:len(args)]:
                            raise InvalidAddress(f"{what}() got an unexpected or repeated "
                                                 f"argument {k!r}")
                        kwargs[k] = by_name[k](k, kwargs[k])
                if len(args) < required:
                    missing = [n for n in names[len(args):required] if n not in kwargs]
                    if missing:
                        raise InvalidAddress(f"{what}() is missing {', '.join(missing)}")
                return fn(self, *args, **kwargs)
            except MooncakeError as e:
                _log_failure(what, e)
                return to_return_code(e) if failure == -1 else failure
            except (OSError, MemoryError, BufferError) as e:  # memlock, ENOMEM, pinned buffers
                _log_failure(what, e)
                return failure
            except Exception as e:  # a bug, not a bad argument: keep the traceback
                log.error("%s failed unexpectedly: %s: %s", what, type(e).__name__, e,
                          exc_info=True)
                return failure

        return method

    return deco


class MooncakeAPI:
    """Mixin: the integer-returning methods, implemented over the Pythonic ones."""

    # -- setup --------------------------------------------------------------------------------

    @_compat(-1)
    def initialize(self, local_hostname: str, metadata_server: str = "P2PHANDSHAKE",
                   protocol: str = "tcp", device_name: str | None = "") -> int:
        """0 on success, -1 (with the reason logged) on failure."""
        self.start(local_hostname, metadata_server, protocol, device_name)
        return 0

    @_compat(-1)
    def initialize_ext(self, local_hostname: str, metadata_server: str, protocol: str,
                       device_name: str | None, metadata_type: str | None = "") -> int:
        """Like :meth:`initialize`; ``metadata_type`` (p2p/http/etcd/redis) prefixes a bare
        ``metadata_server`` address.  0 / -1."""
        if metadata_type and "://" not in metadata_server and metadata_type.lower() != "p2p":
            metadata_server = f"{metadata_type.lower()}://{metadata_server}"
        self.start(local_hostname, metadata_server, protocol, device_name)
        return 0

    @_compat(-1)
    def get_rpc_port(self) -> int:
        """The RPC port, or -1 before :meth:`initialize`."""
        return self._rpc.port if self._started else -1

    # -- memory -------------------------------------------------------------------------------

    @_compat(-1)
    def register_memory(self, buffer_addr: int, capacity: int, location: str = "*") -> int:
        """0, or -1 (bad range, overlap, registration refused by a device, memlock...)."""
        self._register(buffer_addr, capacity, _location(location))
        return 0

    @_compat(-1)
    def unregister_memory(self, buffer_addr: int) -> int:
        """0, or -1 when ``buffer_addr`` is not the start of a registered region."""
        self.unregister(buffer_addr)
        return 0

    @_compat(-1)
    def batch_register_memory(self, buffer_addresses: list[int], capacities: list[int],
                              location: str = "*") -> int:
        """All or nothing: 0, or -1 with none of them registered."""
        if len(buffer_addresses) != len(capacities):
            raise InvalidAddress(f"{len(buffer_addresses)} addresses but {len(capacities)} "
                                 "capacities")
        loc = _location(location)
        done = []
        try:
            for a, n in zip(buffer_addresses, capacities, strict=True):
                done.append(self._register(int(a), int(n), loc, publish=False))
        except BaseException:
            for r in done:
                try:
                    self.unregister(r, publish=False)
                except Exception as e:  # the registration error is the one reported
                    log.warning("batch_register_memory rollback of 0x%x: %s", r.addr, e)
            raise
        self._publish()
        return 0

    @_compat(-1)
    def batch_unregister_memory(self, buffer_addresses: list[int]) -> int:
        """Unregister each; 0, or -1 if any was not registered (the others still are
        unregistered)."""
        rc = 0
        for a in buffer_addresses:
            try:
                self.unregister(int(a), publish=False)
            except MooncakeError as e:
                _log_failure("batch_unregister_memory", e)
                rc = to_return_code(e)
        self._publish()
        return rc

    @_compat(0)
    def allocate_managed_buffer(self, length: int) -> int:
        """Address of a new registered, shm-backed buffer, or 0 on failure."""
        return self.allocate(length).addr

    @_compat(-1)
    def free_managed_buffer(self, buffer_addr: int, length: int) -> int:
        """0, or -1 when ``buffer_addr`` is not a managed buffer of this engine."""
        self.free(buffer_addr)
        return 0

    @_compat(-1)
    def write_bytes_to_buffer(self, dest_address: int, src_bytes: bytes, length: int) -> int:
        """Copy ``src_bytes[:length]`` into registered, writable local memory at
        ``dest_address``; 0 / -1."""
        self._check_started()
        if length > src_bytes.nbytes:
            raise InvalidAddress(f"length {length} exceeds the {src_bytes.nbytes} source bytes")
        self._local_result(dest_address, length, self.regions.copy_in(
            dest_address, memoryview(src_bytes).cast("B")[:length]))
        return 0

    @_compat(b"")
    def read_bytes_from_buffer(self, source_address: int, length: int) -> bytes:
        """``length`` bytes of registered local memory at ``source_address`` (b"" on error)."""
        self._check_started()
        out = self.regions.copy_out(source_address, length) if length > 0 else E_REFUSED
        return self._local_result(source_address, length, out)

    @staticmethod
    def _local_result(addr: int, length: int, out: Any) -> Any:
        """The kernel's pinned copy result, or InvalidAddress for its refusal code."""
        if out == E_DENIED:
            raise InvalidAddress(f"0x{addr:x}+{length} is read-only (registered from a "
                                 "read-only buffer)")
        if isinstance(out, int) and out:
            raise InvalidAddress(f"0x{addr:x}+{length} is not inside registered memory")
        return out

    # -- transfers ----------------------------------------------------------------------------

    @_compat(-1)
    def transfer_sync_write(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                            length: int, transport_hint: str | None = "") -> int:
        """0 when every byte arrived, -1 otherwise."""
        self.transfer(target_hostname, 1, (buffer,), (peer_buffer_address,), (length,))
        return 0

    @_compat(-1)
    def transfer_sync_read(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                           length: int, transport_hint: str | None = "") -> int:
        """0 when every byte arrived, -1 otherwise."""
        self.transfer(target_hostname, 0, (buffer,), (peer_buffer_address,), (length,))
        return 0

    @_compat(-1)
    def transfer_sync(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                      length: int, opcode: int, notify: TransferNotify | None = None,
                      transport_hint: str | None = "") -> int:
        """One READ (0) / WRITE (1), then ``notify`` the peer; 0 / -1."""
        return self._sync(target_hostname, (buffer,), (peer_buffer_address,), (length,),
                          opcode, notify)

    @_compat(-1)
    def batch_transfer_sync_write(self, target_hostname: str, buffers: list[int],
                                  peer_buffer_addresses: list[int], lengths: list[int],
                                  transport_hint: str | None = "") -> int:
        """0 when every request completed, -1 otherwise."""
        return self._sync(target_hostname, buffers, peer_buffer_addresses, lengths, 1)

    @_compat(-1)
    def batch_transfer_sync_read(self, target_hostname: str, buffers: list[int],
                                 peer_buffer_addresses: list[int], lengths: list[int],
                                 transport_hint: str | None = "") -> int:
        """0 when every request completed, -1 otherwise."""
        return self._sync(target_hostname, buffers, peer_buffer_addresses, lengths, 0)

    @_compat(-1)
    def batch_transfer_sync(self, target_hostname: str, buffers: list[int],
                            peer_buffer_addresses: list[int], lengths: list[int], opcode: int,
                            notify: TransferNotify | None = None,
                            transport_hint: str | None = "") -> int:
        """0 when every request completed (and ``notify`` was delivered), -1 otherwise."""
        return self._sync(target_hostname, buffers, peer_buffer_addresses, lengths, opcode,
                          notify)

    def _sync(self, target, buffers, peers, lengths, opcode, notify=None) -> int:
        self.transfer(target, opcode, buffers, peers, lengths)
        if notify is not None:
            self.notify(target, notify.name, notify.msg)
        return 0

    @_compat(0)
    def batch_transfer_async_write(self, target_hostname: str, buffers: list[int],
                                   peer_buffer_addresses: list[int], lengths: list[int],
                                   transport_hint: str | None = "") -> int:
        """A batch id (> 0), or 0 on failure."""
        return self.submit(target_hostname, 1, buffers, peer_buffer_addresses, lengths).id

    @_compat(0)
    def batch_transfer_async_read(self, target_hostname: str, buffers: list[int],
                                  peer_buffer_addresses: list[int], lengths: list[int],
                                  transport_hint: str | None = "") -> int:
        """A batch id (> 0), or 0 on failure."""
        return self.submit(target_hostname, 0, buffers, peer_buffer_addresses, lengths).id

    @_compat(0)
    def batch_transfer_async(self, target_hostname: str, buffers: list[int],
                             peer_buffer_addresses: list[int], lengths: list[int], opcode: int,
                             transport_hint: str | None = "") -> int:
        """A batch id (> 0), or 0 on failure (as Mooncake after #2433)."""
        return self.submit(target_hostname, opcode, buffers, peer_buffer_addresses,
                           lengths).id

    @_compat(0)
    def transfer_submit_write(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                              length: int, transport_hint: str | None = "") -> int:
        """A batch id (> 0) for :meth:`transfer_check_status`, or 0 on failure."""
        return self.submit(target_hostname, 1, (buffer,), (peer_buffer_address,), (length,)).id

    @_compat(-1)
    def get_batch_transfer_status(self, batch_ids: list[int]) -> int:
        """Wait for every batch; 0 if all completed, -1 if any failed, timed out or is unknown.
        The ids are freed."""
        rc = 0
        for bid in batch_ids:
            try:
                b = self.batch(bid)
            except InvalidBatch as e:
                _log_failure("get_batch_transfer_status", e)
                rc = -1
                continue
            try:
                b.wait()
            except MooncakeError as e:
                _log_failure(f"batch {bid}", e)
                rc = -1
            finally:
                b.close()
        return rc

    @_compat(-1)
    def transfer_check_status(self, batch_id: int) -> int:
        """1 completed (freed), 0 pending, -1 failed or unknown (freed), -2 timed out
        (freed)."""
        from mooncake.batch import Status

        b = self.batch(batch_id)
        if not b.done:
            return 0
        b.close()
        if b.core.first_not_completed() < 0:
            return 1
        return -2 if any(s.status == Status.TIMEOUT for s in b.statuses()) else -1

    # -- peers --------------------------------------------------------------------------------

    @_compat(0)
    def get_first_buffer_address(self, segment_name: str) -> int:
        """Address of the peer's first registered buffer (lowest address), or 0."""
        bufs = self.segment(segment_name, refresh=True).buffers
        return min(b.addr for b in bufs) if bufs else 0

    @_compat([])
    def get_notifies(self) -> list[TransferNotify]:
        """Notifications received since the last call ([] on error)."""
        return self.take_notifies()

    @_compat(-1)
    def send_probe(self, peer_server_name: str) -> int:
        """0 when the peer answers on its RPC port, -1 otherwise."""
        self.probe(peer_server_name)
        return 0

    @_compat("{}")
    def get_local_topology(self, device_name: str | None = None) -> str:
        """The local topology as JSON ("{}" on error)."""
        return json.dumps(self.topology())

    def get_engine(self) -> Any:
        return self


def _location(location: str) -> str:
    return "cpu:0" if location in ("*", "") else location
