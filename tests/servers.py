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
    #: clients reach it over TLS (etcd://https://..., rediss://...)
    tls: bool = False
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.datadir / f"{self.kind}.log"

    @property
    def address(self) -> str:
        """The connection string engines use for this server."""
        if self.kind == "etcd":
            return f"etcd://{'https://' if self.tls else ''}{self.host}:{self.port}"
        if self.kind == "redis":
            return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}"
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


@dataclass
class TlsFiles:
    """A throw-away CA and the PEM files it signed (server and client certificates name
    127.0.0.1 and localhost)."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def make_tls(d: Path) -> TlsFiles:
    """Generate a self-signed CA, a server and a client certificate under ``d`` (python
    ``cryptography`` when installed, else the ``openssl`` CLI; ``pytest.skip`` without both)."""
    d.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
                     d / "client.key")
    try:
        _make_tls_cryptography(files)
    except ImportError:
        _make_tls_openssl(files)
    return files


def _make_tls_cryptography(f: TlsFiles) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        # the client certificate carries no CommonName: etcd's JSON gateway refuses those
        # under auth (a CN would be ignored there instead of naming the user)
        if cn == "mooncake-client":
            return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, cn)])
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("mooncake test CA"))
          .issuer_name(name("mooncake test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    f.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for cn, cert_path, key_path, usage in (
            # etcd's JSON gateway dials its own gRPC port with the server certificate, so
            # under --client-cert-auth that one must be a client certificate as well
            ("127.0.0.1", f.cert, f.key, [ExtendedKeyUsageOID.SERVER_AUTH,
                                          ExtendedKeyUsageOID.CLIENT_AUTH]),
            ("mooncake-client", f.client_cert, f.client_key, [ExtendedKeyUsageOID.CLIENT_AUTH])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                    critical=False)
                .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key_path, key)


def _make_tls_openssl(f: TlsFiles) -> None:
    import pytest

    exe = shutil.which("openssl")
    if exe is None:
        pytest.skip("neither python cryptography nor the openssl CLI is installed "
                    "(pip install cryptography, or apt-get install openssl)")

    def run(*args: str) -> None:
        subprocess.run([exe, *args], check=True, capture_output=True, timeout=60)

    d = f.ca.parent
    ca_key = d / "ca.key"
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(ca_key), "-out", str(f.ca), "-days", "1", "-subj", "/CN=mooncake test CA")
    for cn, cert, key, usage in (("127.0.0.1", f.cert, f.key, "serverAuth,clientAuth"),
                                 ("mooncake-client", f.client_cert, f.client_key, "clientAuth")):
        csr, ext = d / f"{cn}.csr", d / f"{cn}.ext"
        ext.write_text(f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr),
            "-subj", f"/O={cn}" if cn == "mooncake-client" else f"/CN={cn}")
        run("x509", "-req", "-in", str(csr), "-CA", str(f.ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext))


def etcd_server(datadir: Path, host: str = "127.0.0.1", port: int | None = None,
                netns: str | None = None, tls: TlsFiles | None = None,
                client_cert_auth: bool = False, auth_token_ttl: int | None = None) -> Server:
    """An etcd member (not yet started) with its data under ``datadir/etcd-data``.

    ``tls``: serve clients over https with those files (``client_cert_auth``: require a
    client certificate signed by the CA); ``auth_token_ttl``: seconds a simple auth token
    lives (see :func:`etcd_enable_auth`)."""
    exe = _need("etcd", "etcd-server")
    port = port or free_port(host if not netns else "127.0.0.1")
    peer = free_port("127.0.0.1")
    scheme = "https" if tls else "http"
    argv = [exe, "--name", "mc-test", "--data-dir", str(datadir / "etcd-data"),
            "--listen-client-urls", f"{scheme}://{host}:{port}",
            "--advertise-client-urls", f"{scheme}://{host}:{port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"mc-test=http://127.0.0.1:{peer}",
            "--log-level", "warn"]
    if tls:
        argv += ["--cert-file", str(tls.cert), "--key-file", str(tls.key)]
        if client_cert_auth:
            argv += ["--client-cert-auth", "--trusted-ca-file", str(tls.ca)]
    if auth_token_ttl is not None:
        argv += ["--auth-token-ttl", str(auth_token_ttl)]
    return Server("etcd", argv, host, port, datadir, netns,
                  env={**os.environ, "ETCD_UNSUPPORTED_ARCH": os.uname().machine},
                  tls=tls is not None)


def etcd_gateway(srv: Server, path: str, body: dict, token: str | None = None,
                 tls: TlsFiles | None = None) -> tuple[int, dict]:
    """POST ``body`` to etcd's JSON gateway; (HTTP status, decoded reply)."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    scheme = "https" if srv.tls else "http"
    req = urllib.request.Request(f"{scheme}://{srv.host}:{srv.port}{path}",
                                 json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": token} if token else {})
    ctx = None
    if srv.tls:
        ctx = ssl.create_default_context(cafile=str(tls.ca) if tls else None)
        if tls:
            ctx.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def etcd_enable_auth(srv: Server, root_password: str,
                     user: tuple[str, str] | None = None, prefix: str = "mooncake/",
                     tls: TlsFiles | None = None) -> None:
    """Turn on etcd authentication (as ``etcdctl user add root; auth enable`` does), with
    ``user`` = (name, password) granted read-write on keys under ``prefix`` only."""
    import base64

    def call(path: str, body: dict) -> None:
        status, out = etcd_gateway(srv, path, body, tls=tls)
        if status != 200:
            raise RuntimeError(f"etcd {path}: HTTP {status} {out}")

    call("/v3/auth/user/add", {"name": "root", "password": root_password})
    call("/v3/auth/role/add", {"name": "root"})
    call("/v3/auth/user/grant", {"user": "root", "role": "root"})
    if user:
        end = bytearray(prefix.encode())
        end[-1] += 1
        call("/v3/auth/user/add", {"name": user[0], "password": user[1]})
        call("/v3/auth/role/add", {"name": f"{user[0]}-rw"})
        call("/v3/auth/role/grant", {"name": f"{user[0]}-rw", "perm": {
            "permType": "READWRITE", "key": base64.b64encode(prefix.encode()).decode(),
            "range_end": base64.b64encode(bytes(end)).decode()}})
        call("/v3/auth/user/grant", {"user": user[0], "role": f"{user[0]}-rw"})
    call("/v3/auth/enable", {})


def redis_server(datadir: Path, host: str = "127.0.0.1", port: int | None = None,
                 netns: str | None = None, password: str | None = None,
                 user: tuple[str, str] | None = None, tls: TlsFiles | None = None,
                 tls_auth_clients: bool = False) -> Server:
    """A redis-server without persistence (a restart comes back empty), not yet started.

    ``tls``: serve TLS only, on ``port`` (``tls_auth_clients``: require a client certificate)."""
    exe = _need("redis-server", "redis-server")
    port = port or free_port(host if not netns else "127.0.0.1")
    ports = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    argv = [exe, "--bind", host, *ports, "--save", "", "--appendonly", "no",
            "--dir", str(datadir), "--protected-mode", "no", "--daemonize", "no"]
    if password:
        argv += ["--requirepass", password]
    if user:
        argv += ["--user", user[0], "on", f">{user[1]}", "~*", "&*", "+@all"]
    if tls:
        argv += ["--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
                 "--tls-ca-cert-file", str(tls.ca),
                 "--tls-auth-clients", "yes" if tls_auth_clients else "no"]
    return Server("redis", argv, host, port, datadir, netns, tls=tls is not None)


def http_server(datadir: Path, host: str = "127.0.0.1", port: int | None = None,
                netns: str | None = None, ttl: float = 0.0, args: tuple[str, ...] = (),
                env: dict[str, str] | None = None) -> Server:
    """Our HTTP metadata server as a child process, not yet started (``args``: more flags,
    ``env``: more environment variables)."""
    port = port or free_port(host if not netns else "127.0.0.1")
    argv = [sys.executable, "-m", "mooncake.metadata.http_server", "--host", host,
            "--port", str(port), "--ttl", str(ttl), "--log-level", "INFO", *args]
    full = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **(env or {})}
    return Server("http", argv, host, port, datadir, netns, env=full)


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
