"""The Mooncake-compatible face of :class:`mooncake.engine.TransferEngine`.

Same method names, argument order and return codes as Mooncake's ``mooncake.engine`` binding.
Every failure is logged with its reason (instead of Mooncake's bare ``-1``) and never crashes:
an unknown batch id returns an error code, an unknown protocol fails ``initialize``.
"""

from __future__ import annotations

import enum
import json
import logging
from typing import Any

from mooncake.errors import InvalidBatch, MooncakeError, to_return_code

__all__ = ["MooncakeAPI", "TransferNotify", "TransferOpcode"]

log = logging.getLogger("mooncake.engine")


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


def _code(what: str, e: BaseException) -> int:
    log.error("%s failed: %s: %s", what, type(e).__name__, e)
    return to_return_code(e)


class MooncakeAPI:
    """Mixin: the integer-returning methods, implemented over the Pythonic ones."""

    # -- setup --------------------------------------------------------------------------------

    def initialize(self, local_hostname: str, metadata_server: str = "P2PHANDSHAKE",
                   protocol: str = "tcp", device_name: str = "") -> int:
        """0 on success, -1 (with the reason logged) on failure."""
        try:
            self.start(local_hostname, metadata_server, protocol, device_name)
            return 0
        except MooncakeError as e:
            return _code("initialize", e)

    def initialize_ext(self, local_hostname: str, metadata_server: str, protocol: str,
                       device_name: str, metadata_type: str = "") -> int:
        """Like :meth:`initialize`; ``metadata_type`` (p2p/http/etcd/redis) prefixes a bare
        ``metadata_server`` address."""
        if metadata_type and "://" not in metadata_server and metadata_type.lower() != "p2p":
            metadata_server = f"{metadata_type.lower()}://{metadata_server}"
        return self.initialize(local_hostname, metadata_server, protocol, device_name)

    def get_rpc_port(self) -> int:
        return self._rpc.port if self._started else -1

    # -- memory -------------------------------------------------------------------------------

    def register_memory(self, buffer_addr: int, capacity: int, location: str = "*") -> int:
        try:
            self._register(buffer_addr, capacity, "cpu:0" if location in ("*", "") else location)
            return 0
        except MooncakeError as e:
            return _code("register_memory", e)

    def unregister_memory(self, buffer_addr: int) -> int:
        try:
            self.unregister(buffer_addr)
            return 0
        except MooncakeError as e:
            return _code("unregister_memory", e)

    def batch_register_memory(self, buffer_addresses: list[int], capacities: list[int],
                              location: str = "*") -> int:
        try:
            if len(buffer_addresses) != len(capacities):
                raise MooncakeError(f"{len(buffer_addresses)} addresses but "
                                    f"{len(capacities)} capacities")
            done = []
            try:
                for a, n in zip(buffer_addresses, capacities, strict=True):
                    loc = "cpu:0" if location in ("*", "") else location
                    done.append(self._register(a, n, loc, publish=False))
            except BaseException:
                for r in done:
                    self.unregister(r, publish=False)
                raise
            self._publish()
            return 0
        except MooncakeError as e:
            return _code("batch_register_memory", e)

    def batch_unregister_memory(self, buffer_addresses: list[int]) -> int:
        rc = 0
        for a in buffer_addresses:
            try:
                self.unregister(a, publish=False)
            except MooncakeError as e:
                rc = _code("batch_unregister_memory", e)
        self._publish()
        return rc

    def allocate_managed_buffer(self, length: int) -> int:
        """Address of a new registered, shm-backed buffer, or 0 on failure."""
        try:
            return self.allocate(length).addr
        except (MooncakeError, OSError) as e:
            _code("allocate_managed_buffer", e)
            return 0

    def free_managed_buffer(self, buffer_addr: int, length: int) -> int:
        try:
            self.free(buffer_addr)
            return 0
        except MooncakeError as e:
            return _code("free_managed_buffer", e)

    def write_bytes_to_buffer(self, dest_address: int, src_bytes: bytes, length: int) -> int:
        """Copy ``src_bytes[:length]`` into registered local memory at ``dest_address``."""
        import ctypes

        try:
            self._check_local(dest_address, length)
            if length > len(src_bytes):
                raise MooncakeError(f"length {length} exceeds the {len(src_bytes)} source bytes")
            ctypes.memmove(dest_address, bytes(src_bytes[:length]), length)
            return 0
        except MooncakeError as e:
            return _code("write_bytes_to_buffer", e)

    def read_bytes_from_buffer(self, source_address: int, length: int) -> bytes:
        """``length`` bytes of registered local memory at ``source_address`` (b"" on error)."""
        import ctypes

        try:
            self._check_local(source_address, length)
            return ctypes.string_at(source_address, length)
        except MooncakeError as e:
            _code("read_bytes_from_buffer", e)
            return b""

    def _check_local(self, addr: int, length: int) -> None:
        from mooncake.errors import InvalidAddress

        self._check_started()
        if not isinstance(length, int) or length <= 0 or not self.regions.contains(addr, length):
            raise InvalidAddress(f"0x{addr:x}+{length} is not inside registered memory")

    # -- transfers ----------------------------------------------------------------------------

    def transfer_sync_write(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                            length: int, transport_hint: str = "") -> int:
        try:
            self.transfer(target_hostname, 1, (buffer,), (peer_buffer_address,), (length,))
            return 0
        except MooncakeError as e:
            return _code("transfer_sync_write", e)

    def transfer_sync_read(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                           length: int, transport_hint: str = "") -> int:
        try:
            self.transfer(target_hostname, 0, (buffer,), (peer_buffer_address,), (length,))
            return 0
        except MooncakeError as e:
            return _code("transfer_sync_read", e)

    def transfer_sync(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                      length: int, opcode: int, notify: TransferNotify | None = None,
                      transport_hint: str = "") -> int:
        return self.batch_transfer_sync(target_hostname, (buffer,), (peer_buffer_address,),
                                        (length,), opcode, notify)

    def batch_transfer_sync_write(self, target_hostname: str, buffers: list[int],
                                  peer_buffer_addresses: list[int], lengths: list[int],
                                  transport_hint: str = "") -> int:
        return self.batch_transfer_sync(target_hostname, buffers, peer_buffer_addresses, lengths,
                                        TransferOpcode.Write)

    def batch_transfer_sync_read(self, target_hostname: str, buffers: list[int],
                                 peer_buffer_addresses: list[int], lengths: list[int],
                                 transport_hint: str = "") -> int:
        return self.batch_transfer_sync(target_hostname, buffers, peer_buffer_addresses, lengths,
                                        TransferOpcode.Read)

    def batch_transfer_sync(self, target_hostname: str, buffers: list[int],
                            peer_buffer_addresses: list[int], lengths: list[int], opcode: int,
                            notify: TransferNotify | None = None, transport_hint: str = "") -> int:
        try:
            self.transfer(target_hostname, int(opcode), buffers, peer_buffer_addresses, lengths)
            if notify is not None:
                self.notify(target_hostname, notify.name, notify.msg)
            return 0
        except MooncakeError as e:
            return _code("transfer", e)

    def batch_transfer_async_write(self, target_hostname: str, buffers: list[int],
                                   peer_buffer_addresses: list[int], lengths: list[int],
                                   transport_hint: str = "") -> int:
        return self.batch_transfer_async(target_hostname, buffers, peer_buffer_addresses,
                                         lengths, TransferOpcode.Write)

    def batch_transfer_async_read(self, target_hostname: str, buffers: list[int],
                                  peer_buffer_addresses: list[int], lengths: list[int],
                                  transport_hint: str = "") -> int:
        return self.batch_transfer_async(target_hostname, buffers, peer_buffer_addresses,
                                         lengths, TransferOpcode.Read)

    def batch_transfer_async(self, target_hostname: str, buffers: list[int],
                             peer_buffer_addresses: list[int], lengths: list[int], opcode: int,
                             transport_hint: str = "") -> int:
        """A batch id (> 0), or 0 on failure (as Mooncake after #2433)."""
        try:
            return self.submit(target_hostname, int(opcode), buffers, peer_buffer_addresses,
                               lengths).id
        except MooncakeError as e:
            _code("batch_transfer_async", e)
            return 0

    def transfer_submit_write(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                              length: int, transport_hint: str = "") -> int:
        return self.batch_transfer_async(target_hostname, [buffer], [peer_buffer_address],
                                         [length], TransferOpcode.Write)

    def get_batch_transfer_status(self, batch_ids: list[int]) -> int:
        """Wait for every batch; 0 if all completed, -1 if any failed, timed out or is unknown.
        The ids are freed."""
        rc = 0
        for bid in batch_ids:
            try:
                b = self.batch(bid)
            except InvalidBatch as e:
                rc = _code("get_batch_transfer_status", e)
                continue
            try:
                b.wait()
            except MooncakeError as e:
                rc = _code(f"batch {bid}", e)
            finally:
                b.close()
        return rc

    def transfer_check_status(self, batch_id: int) -> int:
        """1 completed (freed), 0 pending, -1 failed (freed), -2 timed out (freed)."""
        from mooncake.batch import Status

        try:
            b = self.batch(batch_id)
        except InvalidBatch as e:
            return _code("transfer_check_status", e)
        if not b.done:
            return 0
        b.close()
        if b.core.first_not_completed() < 0:
            return 1
        return -2 if any(s.status == Status.TIMEOUT for s in b.statuses()) else -1

    # -- peers --------------------------------------------------------------------------------

    def get_first_buffer_address(self, segment_name: str) -> int:
        """Address of the peer's first registered buffer (lowest address), or 0."""
        try:
            bufs = self.segment(segment_name, refresh=True).buffers
            return min(b.addr for b in bufs) if bufs else 0
        except MooncakeError as e:
            _code("get_first_buffer_address", e)
            return 0

    def get_notifies(self) -> list[TransferNotify]:
        return self.take_notifies()

    def send_probe(self, peer_server_name: str) -> int:
        try:
            self.probe(peer_server_name)
            return 0
        except MooncakeError as e:
            return _code("send_probe", e)

    def get_local_topology(self, device_name: str | None = None) -> str:
        return json.dumps(self.topology())

    def get_engine(self) -> Any:
        return self
