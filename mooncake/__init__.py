"""mooncake: one-sided READ/WRITE between registered memory, over pluggable transports."""

from mooncake.errors import (
    ConfigError,
    InvalidAddress,
    InvalidBatch,
    MooncakeError,
    PeerUnreachable,
    SegmentNotFound,
    TransferFailed,
    TransferTimeout,
    TransportUnavailable,
)

__all__ = [
    "TransferEngine",
    "MooncakeError",
    "ConfigError",
    "TransportUnavailable",
    "SegmentNotFound",
    "InvalidAddress",
    "TransferFailed",
    "TransferTimeout",
    "InvalidBatch",
    "PeerUnreachable",
    "__version__",
]


def __getattr__(name: str):
    if name == "TransferEngine":  # lazy: `import mooncake` stays cheap
        from mooncake.engine import TransferEngine

        return TransferEngine
    if name == "__version__":
        from importlib.metadata import version

        return version("mooncake")
    raise AttributeError(f"module 'mooncake' has no attribute {name!r}")
