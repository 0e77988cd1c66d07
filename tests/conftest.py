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


# ---- hypothesis profiles (tests/test_properties.py, tests/test_stateful_target.py) ------------
# "ci" is loaded by default: few examples, derandomized.  `pytest --hypothesis-profile=long`
# soaks with thousands of examples.  No example database, and hypothesis' own files (the
# patches it writes for failing examples) go to the temp dir, never into the working tree.
try:
    from hypothesis import HealthCheck, settings
    from hypothesis.configuration import set_hypothesis_home_dir
except ImportError:  # hypothesis is in the test extra; without it those modules fail to import
    pass
else:
    import tempfile

    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "mooncake-hypothesis"))
    settings.register_profile(
        "ci", max_examples=20, deadline=None, derandomize=True, database=None,
        stateful_step_count=12, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile(
        "long", max_examples=2000, deadline=None, database=None, stateful_step_count=40,
        print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile("ci")
