"""Shared pieces of the RDMA tests: the skip rule and peer processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RXE_DEV = os.environ.get("RXE_DEV", "")
RXE_GID_INDEX = int(os.environ.get("RXE_GID_INDEX", "1"))

needs_rxe = [
    pytest.mark.rdma,
    pytest.mark.skipif(not (os.environ.get("IN_RXE_VM") or RXE_DEV),
                       reason="needs a verbs device: run inside tools/rxe-vm.sh "
                              "(IN_RXE_VM / RXE_DEV not set)"),
]


class Peer:
    """A child process speaking JSON lines (``rdma_peer.py`` or ``rdma_pyverbs_peer.py``)."""

    def __init__(self, script: str, *args: str, timeout: float = 180.0) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / script), *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=HERE.parent,
            env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        self._info: dict | None = None

    @property
    def info(self) -> dict:
        """The peer's first line (read on first use: peers start in the background)."""
        if self._info is None:
            self._info = self.recv()
        return self._info

    def recv(self) -> dict:
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not r:
            self.kill()
            raise TimeoutError(f"peer gave no answer within {self.timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer exited with {self.proc.wait(10)}")
        return json.loads(line)

    def send(self, **msg) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def ask(self, **msg) -> dict:
        self.send(**msg)
        return self.recv()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="quit")
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
