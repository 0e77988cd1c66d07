"""The cluster token: who may talk to an engine at all.

Every RPC connection and every tcp data connection starts with a handshake before any other
frame is read (the shm attach proof and the RDMA QP exchange run over RPC, so they inherit it):

1. server → client, at once on accept: ``b"MCA1"``, u8 mode (0: no token, 1: token), 16 B nonce
   ``sn``;
2. client → server: ``b"MCA1"``, u8 mode, 16 B nonce ``cn``, 32 B ``HMAC(key, "client" ‖ channel
   ‖ sn ‖ cn)`` (zeros without a token);
3. server → client: u8 verdict (1 accepted, 0 refused), 32 B ``HMAC(key, "server" ‖ channel ‖ sn
   ‖ cn)`` (zeros without a token).

``key = HMAC-SHA256("mooncake cluster token v1", token)``; ``channel`` names what the
connection is for (``rpc``, ``tcp-data``), so a proof for one cannot be replayed on the other;
fresh nonces on both sides make every proof single-use; MACs are compared in constant time.  A
peer that does not prove the token is refused before anything else is read: the server answers
"refused" and closes (counted in :attr:`ClusterAuth.refused`, logged at most once per 10 s), the
client raises :class:`~mooncake.errors.AuthError`.  Mode mismatches are refused on both sides
with a message saying what to set: an engine with a token never talks to one without.

The token comes from ``MC_CLUSTER_TOKEN`` or the file named by ``MC_CLUSTER_TOKEN_FILE``; it is
never logged, published or put in metrics (``config show`` masks it).  It also signs descriptors
(:meth:`ClusterAuth.sign`), so a reader rejects an entry a stranger wrote into a metadata store.
Without a token (the default, as in Mooncake) any process that reaches the ports may read and
write registered memory: bind to trusted networks, or set a token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import time
from typing import Any

from mooncake.errors import AuthError, ConfigError

__all__ = ["ClusterAuth", "open_auth", "is_loopback", "SIG_FIELD"]

log = logging.getLogger(__name__)

MAGIC = b"MCA1"
NONCE = 16
MAC = 32
HELLO = struct.Struct("<4sB16s")          # server hello
ANSWER = struct.Struct("<4sB16s32s")      # client answer
VERDICT = struct.Struct("<B32s")          # server verdict
OPEN, TOKEN = 0, 1
#: the descriptor field that carries the signature
SIG_FIELD = "sig"
_ZERO = bytes(MAC)
#: the longest token file read (a token is a secret string, not a document)
MAX_TOKEN_FILE = 4096


class ClusterAuth:
    """The handshake and descriptor signatures for one engine (``token`` None: open mode)."""

    def __init__(self, token: bytes | None) -> None:
        if token is not None and not token:
            raise ConfigError("MC_CLUSTER_TOKEN is empty: give a secret, or unset it")
        self._key = hmac.new(b"mooncake cluster token v1", token, hashlib.sha256).digest() \
            if token is not None else None
        self.mode = TOKEN if token is not None else OPEN
        #: connections refused because they did not prove the token (or proved one in open mode)
        self.refused = 0
        self._lock = threading.Lock()
        self._next_log = 0.0
        self._quiet = 0

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:  # never the key
        return f"ClusterAuth({'token' if self.enabled else 'open'})"

    def _mac(self, side: bytes, channel: bytes, sn: bytes, cn: bytes) -> bytes:
        if self._key is None:
            return _ZERO
        return hmac.new(self._key, side + b"\0" + channel + b"\0" + sn + cn,
                        hashlib.sha256).digest()

    # -- server side ---------------------------------------------------------------------------

    def hello(self) -> tuple[bytes, bytes]:
        """``(bytes to send, server nonce)`` for a new connection."""
        sn = secrets.token_bytes(NONCE)
        return HELLO.pack(MAGIC, self.mode, sn), sn

    def check_answer(self, channel: str, sn: bytes, answer: bytes, peer: str) -> bytes | None:
        """The verdict to send for a client's ``answer`` (``ANSWER.size`` bytes); None means
        refused (the verdict bytes for that are :data:`REFUSED`)."""
        magic, mode, cn, mac = ANSWER.unpack(answer)
        why = None
        if magic != MAGIC:
            why = "no handshake (an old or foreign client)"
        elif mode != self.mode:
            why = ("it has no cluster token and we require one" if self.mode == TOKEN else
                   "it sends a cluster token and we have none (set MC_CLUSTER_TOKEN here)")
        elif not hmac.compare_digest(mac, self._mac(b"client", channel.encode(), sn, cn)):
            why = "wrong cluster token"
        if why is not None:
            self._refuse(channel, peer, why)
            return None
        return VERDICT.pack(1, self._mac(b"server", channel.encode(), sn, cn))

    def _refuse(self, channel: str, peer: str, why: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.refused += 1
            if now < self._next_log:
                self._quiet += 1
                return
            quiet, self._quiet, self._next_log = self._quiet, 0, now + 10.0
        log.warning("refused a %s connection from %s: %s (%d refused in all%s)", channel, peer,
                    why, self.refused, f", {quiet} not logged" if quiet else "")

    def serve(self, sock: socket.socket, channel: str, peer: str, timeout: float) -> bool:
        """Blocking server side of the handshake on ``sock`` within ``timeout`` s; False (and
        the connection should be closed) when the client is refused or too slow."""
        data, sn = self.hello()
        deadline = time.monotonic() + timeout
        try:
            sock.settimeout(timeout)
            sock.sendall(data)
            answer = _recv_exact(sock, ANSWER.size, deadline)
        except (OSError, EOFError):
            self._refuse(channel, peer, "no complete handshake within "
                         f"{timeout:g}s (or the connection closed)")
            return False
        verdict = self.check_answer(channel, sn, answer, peer)
        try:
            sock.sendall(verdict if verdict is not None else REFUSED)
        except OSError:
            return False
        finally:
            sock.settimeout(None)
        return verdict is not None

    # -- client side ---------------------------------------------------------------------------

    def client(self, sock: socket.socket, channel: str, peer: str, timeout: float) -> None:
        """Blocking client side on a connected ``sock``; raises :class:`AuthError` when the
        peer is refused or refuses us, ``OSError`` (``TimeoutError``, ``ConnectionError``) when
        the connection fails or closes before the handshake completed."""
        deadline = time.monotonic() + timeout
        old = sock.gettimeout()
        try:
            sock.settimeout(timeout)
            try:
                hello = _recv_exact(sock, HELLO.size, deadline)
            except EOFError:  # gone, or not accepting: a connection failure, not a refusal
                raise ConnectionResetError(f"{peer} closed the connection before its "
                                           "handshake") from None
            magic, mode, sn = HELLO.unpack(hello)
            if magic != MAGIC:
                raise AuthError(f"{peer} does not speak mooncake's handshake (not an engine, "
                                "or an incompatible version)")
            if mode != self.mode:
                raise AuthError(
                    f"{peer} requires a cluster token: set MC_CLUSTER_TOKEN (or "
                    "MC_CLUSTER_TOKEN_FILE) to the cluster's token" if mode == TOKEN else
                    f"{peer} runs without a cluster token; refusing to talk to it with ours "
                    "(set the same MC_CLUSTER_TOKEN there)")
            cn = secrets.token_bytes(NONCE)
            sock.sendall(ANSWER.pack(MAGIC, self.mode, cn,
                                     self._mac(b"client", channel.encode(), sn, cn)))
            try:
                ok, mac = VERDICT.unpack(_recv_exact(sock, VERDICT.size, deadline))
            except EOFError:  # a refusal always comes with its verdict
                raise ConnectionResetError(f"{peer} closed the connection during the "
                                           "handshake") from None
            if not ok:
                raise AuthError(f"{peer} refused our cluster token: the tokens differ")
            if not hmac.compare_digest(mac, self._mac(b"server", channel.encode(), sn, cn)):
                raise AuthError(f"{peer} could not prove the cluster token: not one of ours")
        finally:
            try:
                sock.settimeout(old)
            except OSError:
                pass

    # -- descriptors -----------------------------------------------------------------------------

    def sign(self, desc: dict) -> dict:
        """``desc`` with its signature field set (unchanged in open mode)."""
        if self._key is None:
            return desc
        out = {k: v for k, v in desc.items() if k != SIG_FIELD}
        out[SIG_FIELD] = hmac.new(self._key, b"descriptor\0" + _canonical(out),
                                  hashlib.sha256).hexdigest()
        return out

    def verify(self, name: str, desc: Any) -> None:
        """Raise :class:`AuthError` unless ``desc`` carries a valid signature (no-op in open
        mode)."""
        if self._key is None:
            return
        sig = desc.get(SIG_FIELD) if isinstance(desc, dict) else None
        if not isinstance(sig, str):
            raise AuthError(f"descriptor of {name!r} is not signed with the cluster token "
                            "(written by an engine without MC_CLUSTER_TOKEN, or by a stranger)")
        body = {k: v for k, v in desc.items() if k != SIG_FIELD}
        want = hmac.new(self._key, b"descriptor\0" + _canonical(body), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(sig.encode(), want.encode()):
            raise AuthError(f"descriptor of {name!r} has a bad signature: forged or altered "
                            "(a poisoned metadata entry?)")


#: what a server sends a refused client
REFUSED = VERDICT.pack(0, _ZERO)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("handshake timed out")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address, ``[v6]``, ``v6%zone`` or a name) is a loopback address:
    only processes of this host reach what listens there, so an open engine is safe there."""
    h = host.strip("[]").split("%")[0]
    if h == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(h)).is_loopback
        except OSError:
            return False


def open_auth(cfg: Any) -> ClusterAuth:
    """The engine's :class:`ClusterAuth` from ``MC_CLUSTER_TOKEN`` / ``MC_CLUSTER_TOKEN_FILE``
    (both set: :class:`ConfigError`)."""
    token = cfg["MC_CLUSTER_TOKEN"]
    path = cfg["MC_CLUSTER_TOKEN_FILE"]
    if token and path:
        raise ConfigError("MC_CLUSTER_TOKEN and MC_CLUSTER_TOKEN_FILE are both set: give one")
    if path:
        return ClusterAuth(_read_token_file(path))
    return ClusterAuth(token.encode() if token else None)


def _read_token_file(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(f"MC_CLUSTER_TOKEN_FILE={path!r}: cannot open it: "
                          f"{e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"MC_CLUSTER_TOKEN_FILE={path!r} is not a regular file")
        if st.st_mode & 0o077:
            log.warning("MC_CLUSTER_TOKEN_FILE %s is readable by group or others (mode %o); "
                        "chmod 600 it", path, st.st_mode & 0o777)
        data = os.read(fd, MAX_TOKEN_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE:
        raise ConfigError(f"MC_CLUSTER_TOKEN_FILE={path!r} is larger than {MAX_TOKEN_FILE} "
                          "bytes: a token file holds one secret")
    token = data.strip()
    if not token:
        raise ConfigError(f"MC_CLUSTER_TOKEN_FILE={path!r} is empty")
    return token
