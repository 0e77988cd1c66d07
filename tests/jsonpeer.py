"""A Python script in a child process, driven by JSON lines on stdin/stdout (tests only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class JsonPeer:
    """``JsonPeer(script, *argv)``: each call writes ``{"op": op, **kw}`` and reads one reply."""

    def __init__(self, script: str, *argv: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", script, *argv], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})

    def read(self) -> Any:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"peer died (rc={self.p.wait()})")
        return json.loads(line)

    def __call__(self, op: str, **kw: Any) -> Any:
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self, timeout: float = 15) -> None:
        if self.p.poll() is None:
            try:
                self("exit")
            except (RuntimeError, BrokenPipeError, ValueError):
                pass
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
