"""Transfer batches as Python objects: status, ``wait(timeout)``, ``await``, ``with``."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mooncake._core import batch as _core
from mooncake.errors import AuthError, TransferFailed, TransferTimeout

if TYPE_CHECKING:
    from mooncake.transport import SegmentDesc, Transport

__all__ = ["Status", "TaskStatus", "TransferBatch", "error_text", "settle"]

E_TIMEOUT = _core.E_TIMEOUT
#: how long slices a worker already holds may take to end after their batch was cancelled,
#: before the transport's connections to the peer are cut (a peer that stopped answering)
CANCEL_GRACE = 3.0
ABORT_GRACE = 10.0


class Status(enum.IntEnum):
    """Mooncake's TransferStatusEnum."""

    WAITING = 0
    PENDING = 1
    INVALID = 2
    CANCELED = 3
    COMPLETED = 4
    TIMEOUT = 5
    FAILED = 6


def error_text(code: int) -> str:
    import os

    if code in _core.ERROR_NAMES:
        return _core.ERROR_NAMES[code]
    return os.strerror(code) if code > 0 else "ok"


@dataclass(frozen=True)
class TaskStatus:
    """The state of one request of a batch: ``code`` is the kernel's integer error code (0 =
    ok, ``mooncake._core.batch.E_*`` or an errno), ``error`` its text, ``code_name`` its name."""

    status: Status
    transferred_bytes: int
    error: str = ""
    code: int = 0

    @property
    def code_name(self) -> str:
        if self.code in _core.CODE_NAMES:
            return _core.CODE_NAMES[self.code]
        import errno

        return errno.errorcode.get(self.code, str(self.code)) if self.code else "OK"


def settle(core: _core.Batch, transport: Transport, peer: SegmentDesc,
           err: int = E_TIMEOUT) -> bool:
    """End a batch that ran out of time: cancel it (``err``), wait for the slices workers hold
    to stop, and if the peer does not let them (it stopped answering) cut the transport's
    connections to it.  True once every slice was reported: from then on no byte of the batch
    touches local memory."""
    core.cancel(err)
    if core.wait(CANCEL_GRACE):
        return True
    transport.abort(peer)
    if core.wait(ABORT_GRACE):
        return True
    import logging

    logging.getLogger("mooncake.engine").critical(
        "batch to %s: %d tasks still in a worker's hands after cancel and abort", peer.name,
        sum(1 for st in core.statuses() if st[0] == Status.PENDING))
    return False


class TransferBatch:
    """A submitted batch.  ``wait()`` raises :class:`TransferFailed`/``TransferTimeout``."""

    def __init__(self, core: _core.Batch, peer: SegmentDesc, transport: Transport,
                 timeout: float, on_close=None) -> None:
        self.core = core
        self.peer = peer
        self.transport = transport
        self.deadline = time.monotonic() + timeout
        self._timed_out = False
        self._on_close = on_close

    def __len__(self) -> int:
        return self.core.ntasks

    @property
    def done(self) -> bool:
        return self.core.done or self._expire()

    def _expire(self) -> bool:
        """Past the deadline: cancel the batch and let workers drop it (see :func:`settle`)."""
        if self._timed_out or time.monotonic() < self.deadline:
            return self._timed_out
        self._timed_out = True
        settle(self.core, self.transport, self.peer)
        return True

    def cancel(self) -> None:
        """Stop the batch now: tasks not finished end CANCELED (FAILED, code E_CANCELED) once
        workers let go of them; returns when they did."""
        settle(self.core, self.transport, self.peer, _core.E_CANCELED)

    def statuses(self) -> list[TaskStatus]:
        out = []
        for st, nbytes, err in self.core.statuses():
            out.append(TaskStatus(Status(st), nbytes, error_text(err) if err else "", err))
        return out

    def wait(self, timeout: float | None = None) -> None:
        """Block until every task ends (at most ``timeout`` s, default: the batch deadline);
        raise :class:`TransferFailed` (with every task's status) if any did not complete."""
        left = self.deadline - time.monotonic()
        limit = left if timeout is None else min(timeout, left)
        if not self.core.wait(max(limit, 0.0)):
            if timeout is not None and timeout < left:
                raise TransferTimeout(f"batch to {self.peer.name} still running after {timeout}s")
            self._expire()
        if self.core.first_not_completed() < 0:
            return
        sts = self.statuses()
        bad = [(i, s) for i, s in enumerate(sts) if s.status != Status.COMPLETED]
        i, s = bad[0]
        if s.code == _core.E_AUTH:
            raise AuthError(f"{self.peer.name}: {s.error}")
        cls = TransferTimeout if s.status == Status.TIMEOUT else TransferFailed
        raise cls(f"{len(bad)} of {len(sts)} tasks to {self.peer.name} failed; "
                  f"task {i}: {s.status.name}: {s.error}", sts)

    def __await__(self):
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self._wait_statuses).__await__()

    def _wait_statuses(self) -> list[TaskStatus]:
        self.wait()
        return self.statuses()

    def close(self) -> None:
        """Forget the batch.  Waits (until its deadline) for in-flight slices, so no memory is
        touched afterwards; past the deadline the peer's in-flight work is aborted."""
        if not self.core.wait(max(self.deadline - time.monotonic(), 0.0)):
            self._expire()
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None

    def __enter__(self) -> TransferBatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
