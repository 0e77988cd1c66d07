"""Real metadata servers for the tests: etcd, redis-server and ours, on loopback or in a netns.

Every server is a child process of the test, started with its own temporary data directory and
stopped (by its pid) at teardown.  Helpers that need a missing binary call ``pytest.skip`` with
the package to install.  Run as a script, this module is a publisher that a test can SIGKILL:
``python tests/servers.py publish <plugin> <address> <segment> <ttl> [cluster]``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (in this network namespace)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def wait_port(host: str, port: int, timeout: float = 30.0, netns: str | None = None,
              proc: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts a TCP connection (inside ``netns`` if given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        if netns:
            code = ("import socket,sys\ntry:\n socket.create_connection"
                    f"(({host!r},{port}),1).close()\nexcept OSError: sys.exit(1)")
            ok = subprocess.run([*netns_prefix(netns), sys.executable, "-c", code],
                                capture_output=True).returncode == 0
        else:
            try:
                socket.create_connection((host, port), 1).close()
                ok = True
            except OSError:
                ok = False
        if ok:
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class Server:
    """A server child process; ``stop()`` (SIGTERM), ``kill()`` (SIGKILL), ``restart()``."""

    kind: str
    argv: list[str]
    host: str
    port: int
    datadir: Path
    netns: str | None = None
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.datadir / f"{self.kind}.log"

    @property
    def address(self) -> str:
        """The connection string engines use for this server."""
        if self.kind == "etcd":
            return f"etcd://{self.host}:{self.port}"
        if self.kind == "redis":
            return f"redis://{self.host}:{self.port}"
        return f"http://{self.host}:{self.port}/metadata"

    def start(self) -> Server:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*netns_prefix(self.netns), *self.argv],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.datadir,
                                         env=self.env, start_new_session=True)
        try:
            wait_port(self.host, self.port, netns=self.netns, proc=self.proc)
        except BaseException:
            self.kill()
            raise RuntimeError(f"{self.kind} did not start: {self.log_tail()}") from None
        return self

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _signal(self, sig: int, timeout: float) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._signal(signal.SIGKILL, 10.0)

    def restart(self, wipe: bool = True) -> Server:
        """Stop, optionally wipe the state, start again on the same port."""
        self.kill()
        if wipe and self.kind == "etcd":
            shutil.rmtree(self.datadir / "etcd-data", ignore_errors=True)
        return self.start()


def _need(binary: str, package: str) -> str:
    import pytest

    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (apt-get install {package})")
    return path


def etcd_server(datadir: Path, host: str = "127.0.0.1", port: int | None = None,
                netns: str | None = None) -> Server:
    """An etcd member (not yet started) with its data under ``datadir/etcd-data``."""
    exe = _need("etcd", "etcd-server")
    port = port or free_port(host if not netns else "127.0.0.1")
    peer = free_port("127.0.0.1")
    argv = [exe, "--name", "mc-test", "--data-dir", str(datadir / "etcd-data"),
            "--listen-client-urls", f"http://{host}:{port}",
            "--advertise-client-urls", f"http://{host}:{port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"mc-test=http://127.0.0.1:{peer}",
            "--log-level", "warn"]
    return Server("etcd", argv, host, port, datadir, netns,
                  env={**os.environ, "ETCD_UNSUPPORTED_ARCH": os.uname().machine})


def redis_server(datadir: Path, host: str = "127.0.0.1", port: int | None = None,
                 netns: str | None = None, password: str | None = None,
                 user: tuple[str, str] | None = None) -> Server:
    """A redis-server without persistence (a restart comes back empty), not yet started."""
    exe = _need("redis-server", "redis-server")
    port = port or free_port(host if not netns else "127.0.0.1")
    argv = [exe, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", str(datadir), "--protected-mode", "no", "--daemonize", "no"]
    if password:
        argv += ["--requirepass", password]
    if user:
        argv += ["--user", user[0], "on", f">{user[1]}", "~*", "&*", "+@all"]
    return Server("redis", argv, host, port, datadir, netns)


def http_server(datadir: Path, host: str = "127.0.0.1", port: int | None = None,
                netns: str | None = None, ttl: float = 0.0) -> Server:
    """Our HTTP metadata server as a child process, not yet started."""
    port = port or free_port(host if not netns else "127.0.0.1")
    argv = [sys.executable, "-m", "mooncake.metadata.http_server", "--host", host,
            "--port", str(port), "--ttl", str(ttl), "--log-level", "INFO"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return Server("http", argv, host, port, datadir, netns, env=env)


SERVERS = {"etcd": etcd_server, "redis": redis_server, "http": http_server}


@contextlib.contextmanager
def running(kind: str, **kw: object) -> Iterator[Server]:
    """Start a server in a fresh temp dir; stop it and remove the dir afterwards."""
    d = Path(tempfile.mkdtemp(prefix=f"mc-{kind}-"))
    s = SERVERS[kind](d, **kw)  # type: ignore[operator]
    try:
        yield s.start()
    finally:
        s.kill()
        shutil.rmtree(d, ignore_errors=True)


def make_store(plugin: str, address: str, **config: object):  # noqa: ANN201
    """A metadata store client with a plain-dict config (``MC_*`` keys)."""
    from mooncake.metadata.base import MetadataContext
    from mooncake.metadata.etcd import EtcdMetadata
    from mooncake.metadata.http import HttpMetadata
    from mooncake.metadata.redis import RedisMetadata

    cls = {"http": HttpMetadata, "etcd": EtcdMetadata, "redis": RedisMetadata}[plugin]
    return cls(address, MetadataContext(config=dict(config), rpc_call=None))


def descriptor(name: str, n: int = 2) -> dict:
    """A well-formed segment descriptor with ``n`` buffers."""
    return {"name": name, "host_id": "test-host", "pid": os.getpid(), "timestamp": time.time(),
            "transports": {"tcp": {"port": 1234}},
            "buffers": [{"addr": 0x10000 * (i + 1), "length": 4096, "location": "cpu:0"}
                        for i in range(n)]}


def _publisher(plugin: str, address: str, segment: str, ttl: str, cluster: str = "") -> None:
    store = make_store(plugin, address, MC_METADATA_TTL=float(ttl),
                       MC_METADATA_CLUSTER_ID=cluster)
    store.publish(segment, descriptor(segment))
    print("published", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:2] == ["publish"]:
        _publisher(*sys.argv[2:])
