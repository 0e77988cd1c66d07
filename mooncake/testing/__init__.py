"""Test support that ships with mooncake, for this project's tests and for third parties.

* :mod:`mooncake.testing.peer` -- a real :class:`~mooncake.engine.TransferEngine` in a second
  process, driven over a pipe (allocate registered memory of several kinds, checksum it, fill
  it, unregister it, stop/continue/kill the process).
* :mod:`mooncake.testing.conformance` -- the conformance suite every transport runs (integrity,
  refusals, read-only memory, unregister/free/close under load, peer faults, timeouts), driven by
  a small :class:`~mooncake.testing.conformance.TransportSpec`.

Importing this package imports neither pytest nor any transport; the conformance module needs
pytest.
"""

from __future__ import annotations

__all__ = ["peer", "conformance"]
