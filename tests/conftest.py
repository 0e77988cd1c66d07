"""Shared fixtures: a target engine in a second process, and a local initiator engine."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from peer import Peer  # noqa: E402


@pytest.fixture(scope="module")
def peer():
    """A target engine (TCP) in another process, shared by a module's tests."""
    p = Peer(protocol="tcp")
    yield p
    p.close()


@pytest.fixture
def engine():
    """A local initiator engine (TCP), closed after the test."""
    from mooncake.engine import TransferEngine

    eng = TransferEngine("127.0.0.1", protocol="tcp")
    yield eng
    eng.close()
