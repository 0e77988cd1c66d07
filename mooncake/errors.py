"""The exception hierarchy, and how it maps onto Mooncake's integer return codes."""

from __future__ import annotations

__all__ = [
    "MooncakeError",
    "ConfigError",
    "TransportUnavailable",
    "SegmentNotFound",
    "InvalidAddress",
    "TransferFailed",
    "TransferTimeout",
    "InvalidBatch",
    "PeerUnreachable",
    "ProtocolError",
    "to_return_code",
]


class MooncakeError(Exception):
    """Base class of every error mooncake raises."""

    code: int = -1  # what the Mooncake-compatible face returns for this error


class ConfigError(MooncakeError, ValueError):
    """A configuration value (env var, TENT JSON key or argument) is not allowed."""


class TransportUnavailable(MooncakeError):
    """A transport was asked for by name but cannot run here or cannot reach the peer."""


class SegmentNotFound(MooncakeError):
    """No descriptor could be found for a segment name."""


class InvalidAddress(MooncakeError, ValueError):
    """A local or remote range is not inside registered memory, or a length is invalid."""


class InvalidBatch(MooncakeError, KeyError):
    """A batch id that this engine never issued, or already freed."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class PeerUnreachable(MooncakeError, ConnectionError):
    """The peer's RPC or data port cannot be reached, or it went away."""


class ProtocolError(MooncakeError):
    """A peer sent a malformed frame."""


class AuthError(MooncakeError):
    """A peer did not prove the cluster token (``MC_CLUSTER_TOKEN``), or refused ours."""


class TransferFailed(MooncakeError):
    """One or more tasks of a transfer ended FAILED.

    ``statuses`` holds one :class:`mooncake.batch.TaskStatus` per task of the batch.
    """

    def __init__(self, message: str, statuses: list | None = None) -> None:
        super().__init__(message)
        self.statuses = statuses or []


class TransferTimeout(TransferFailed, TimeoutError):
    """A transfer did not finish within its timeout (``MC_TRANSFER_TIMEOUT``)."""


def to_return_code(exc: BaseException) -> int:
    """The integer a Mooncake-compatible method returns instead of raising ``exc``."""
    return getattr(exc, "code", -1)
