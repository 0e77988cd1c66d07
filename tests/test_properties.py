"""Property-based tests (hypothesis) of the code that reads untrusted input.

Four areas, each property named in its test's docstring:

1. RPC framing (:mod:`mooncake.rpc`): a live :class:`RpcServer` on 127.0.0.1 fed arbitrary byte
   streams behaves exactly as a reference model of the documented framing says, and stays
   healthy; frames round-trip; :class:`RpcClient` facing a hostile server only raises its
   typed errors.
2. Descriptors (:func:`validate_descriptor`, :func:`segments.decode`, :class:`SegmentCache`,
   :func:`check_fields` and the transports' field schemas): arbitrary JSON and mutations of a
   real engine's descriptor validate or raise :class:`DescriptorError` / :class:`FieldError`.
3. Configuration (:func:`load_config`, :func:`config.show`): arbitrary env values per option and
   arbitrary TENT JSON load (and round-trip through ``config show --json``) or raise
   :class:`ConfigError` naming the variable.
4. Slicing (``_core.batch.slice_requests``/``slice_one`` over a ``RegionTable``): slices match the
   exact arithmetic the kernel promises and requests outside registered memory raise
   ``SliceError`` naming the request.

The example counts come from the hypothesis profile (tests/conftest.py: ``ci`` by default,
``--hypothesis-profile=long`` to soak).  Tests named ``test_regression_*`` are minimal
reproducers of defects the properties found (fixed since), kept so they stay fixed.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import warnings

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from mooncake._core.batch import (
    E_DENIED,
    E_REFUSED,
    Batch,
    SliceError,
    slice_one,
    slice_requests,
)
from mooncake._core.regions import ALL, LOCAL_WRITE, READ_ONLY, RegionTable
from mooncake.config import all_options, load_config, show
from mooncake.errors import ConfigError, MooncakeError, PeerUnreachable, ProtocolError
from mooncake.fields import FieldError, check_fields
from mooncake.metadata.base import DescriptorError, decode_descriptor, validate_descriptor
from mooncake.rpc import (
    HEADER,
    MAGIC,
    REPLY,
    REQUEST,
    RemoteError,
    RpcClient,
    RpcServer,
    _check_header,
    encode_frame,
    recv_frame,
)
from mooncake.segments import SegmentCache, decode
from mooncake.transports.cxl import CxlTransport
from mooncake.transports.rdma import RdmaTransport
from mooncake.transports.shm import ShmTransport
from mooncake.transports.tcp import TcpTransport

try:  # the cluster-token handshake (mooncake/auth.py), where this tree has it
    from mooncake import auth as _auth
    from mooncake.errors import AuthError
except ImportError:  # pragma: no cover - an RPC port without a handshake
    _auth = None
    AuthError = PeerUnreachable

#: does an RPC connection start with the handshake here?
HANDSHAKE = _auth is not None and hasattr(RpcClient(1, 1.0), "auth")

HANG = 10.0  # seconds: only a hang (or a wedged server) takes this long
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def examples(factor: float) -> settings:
    """The active profile's ``max_examples`` scaled for a cheap (> 1) or costly (< 1) test."""
    return settings(max_examples=max(1, int(settings.default.max_examples * factor)))


def canon(value) -> str:
    """JSON text that compares equal for equal JSON values (NaN included)."""
    return json.dumps(value, sort_keys=True)


# ---- strategies: arbitrary JSON ----------------------------------------------------------------

#: integers where validators keep their edges (and beyond any float: 2**1024, 10**400)
BOUNDARY_INTS = (0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1,
                 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, -(2**63), -(2**64), 2**1023,
                 2**1024, 10**400, -(10**400))
#: characters that break naive parsers: case-folding lookalikes (KELVIN SIGN folds to "k",
#: LATIN SMALL LETTER DOTLESS I uppercases to "I"...), non-ASCII digits, NUL, BOM, separators,
#: lone surrogates (JSON can carry them)
TRICKY_CHARS = ("\u212a", "\u0130", "\u0131", "\u017f", "\ufb00", "\u00b5", "\uff11", "\u0663",
                "\u00a0", "\u2028", "\x00", "\ufeff", "\ud800", "\udfff", "\U0001f600")

ints = st.one_of(st.integers(), st.integers(-(10**400), 10**400), st.sampled_from(BOUNDARY_INTS))
floats = st.floats(allow_nan=True, allow_infinity=True)
chars = st.one_of(st.characters(exclude_categories=()), st.sampled_from(TRICKY_CHARS))
texts = st.text(chars, max_size=24)
json_scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(texts, kids, max_size=5),
    max_leaves=24)


# ======================================================================= 1. RPC framing

MAXLEN = 4096  # the server's MC_HANDSHAKE_MAX_LENGTH here: small, so oversize frames are cheap
FRAME_TIMEOUT = 0.25
#: nested deeper than any recursion limit: 4000 bytes, within MAXLEN
DEEP = b"[" * 2000 + b"]" * 2000


def _client_handshake(sock: socket.socket) -> None:
    """The client side of the open-mode cluster-token handshake (a no-op without one)."""
    if HANDSHAKE:
        _auth.ClusterAuth(None).client(sock, "rpc", "the RPC server under test", HANG)


def _server_handshake(sock: socket.socket) -> bool:
    if not HANDSHAKE:
        return True
    return _auth.ClusterAuth(None).serve(sock, "rpc", "the RpcClient under test", HANG)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise AssertionError(f"server wedged: {len(buf)} of {n} bytes in {HANG} s") from None
        if not chunk:
            raise AssertionError(f"server closed after {len(buf)} of {n} expected bytes")
        buf += chunk
    return buf


def _read_reply(sock: socket.socket):
    _, kind, length = HEADER.unpack(_recv_exact(sock, HEADER.size))
    assert kind == REPLY
    return json.loads(_recv_exact(sock, length))


def _assert_closed_by_peer(sock: socket.socket, what: str) -> None:
    """The peer closes (FIN or RST) within HANG and sends nothing more before it."""
    sock.settimeout(HANG)
    try:
        extra = sock.recv(65536)
    except ConnectionResetError:
        return
    except TimeoutError:
        raise AssertionError(f"server kept the connection open {HANG} s after {what}") from None
    assert extra == b"", f"unexpected bytes after {what}: {extra[:80]!r}"


def rpc_model(stream: bytes, max_len: int) -> tuple[list, str]:
    """What the module docstring promises for ``stream`` sent after the handshake: the replies
    (``echo`` is the only method) and how the connection ends: ``open`` (every byte consumed),
    ``partial`` (a frame never completes: dropped after frame_timeout) or ``drop`` (a malformed
    or oversized frame closes the connection)."""
    replies, i = [], 0
    while True:
        rest = len(stream) - i
        if rest == 0:
            return replies, "open"
        if rest < HEADER.size:
            return replies, "partial"
        magic, kind, length = HEADER.unpack_from(stream, i)
        if magic != MAGIC or kind != REQUEST or length > max_len:
            return replies, "drop"
        if rest - HEADER.size < length:
            return replies, "partial"
        body = stream[i + HEADER.size:i + HEADER.size + length]
        i += HEADER.size + length
        try:
            msg = json.loads(body)
        except (ValueError, RecursionError):
            return replies, "drop"
        if not isinstance(msg, dict) or not isinstance(msg.get("method"), str):
            return replies, "drop"
        if msg["method"] == "echo":
            replies.append({"ok": True, "result": msg.get("args") or {}})
        else:
            replies.append({"ok": False, "error": f"unknown RPC method {msg['method']!r}",
                            "type": "ProtocolError"})


methods = st.one_of(st.sampled_from(["echo", "nope", ""]), texts)
request_frames = st.builds(lambda m, a: encode_frame(REQUEST, {"method": m, "args": a}),
                           methods, json_values)
bodies = st.one_of(st.binary(max_size=48), json_values.map(lambda v: json.dumps(v).encode()),
                   st.sampled_from([b"", DEEP, b'{"method": "echo"', b"1" * 4000,
                                    b'{"args": {}}', b'{"method": 7}', b"\xef\xbb\xbf{}"]))
raw_frames = st.builds(lambda b: HEADER.pack(MAGIC, REQUEST, len(b)) + b, bodies)
headers = st.builds(
    HEADER.pack,
    st.one_of(st.just(MAGIC), st.sampled_from([b"MCRQ", b"mcrp", b"\0\0\0\0"]),
              st.binary(min_size=4, max_size=4)),
    st.one_of(st.sampled_from([REQUEST, REPLY, 0, 3, 255]), st.integers(0, 255)),
    st.one_of(st.sampled_from([0, 1, MAXLEN, MAXLEN + 1, 2**32 - 1]), st.integers(0, 2**32 - 1)))
pieces = st.one_of(request_frames, request_frames, raw_frames, headers, st.binary(max_size=40))
pieces = st.one_of(pieces, st.tuples(pieces, st.integers(0, 64)).map(lambda t: t[0][:t[1]]))
streams = st.lists(pieces, max_size=5).map(b"".join).filter(lambda s: len(s) < 60000)


@pytest.fixture(scope="module")
def rpc_server():
    srv = RpcServer("127.0.0.1", [0], MAXLEN, frame_timeout=FRAME_TIMEOUT, idle_timeout=60.0,
                    workers=2)
    srv.add_handler("echo", lambda args: args)
    yield srv
    srv.close()


def _server_is_healthy(srv: RpcServer) -> None:
    """A fresh client's well-formed call succeeds within HANG, the server leaks no connection
    and its selector thread is alive."""
    seg = f"127.0.0.1:{srv.port}"
    client = RpcClient(1 << 20, HANG)
    try:
        t0 = time.monotonic()
        assert client.call(seg, "echo", {"still": "here"}, timeout=HANG) == {"still": "here"}
        assert time.monotonic() - t0 < HANG
    finally:
        client.close()
    _wait_for(lambda: srv.open_connections == 0, "the server closing every connection")
    assert srv._thread.is_alive(), "the RPC selector thread died"


def _wait_for(pred, what: str) -> None:
    end = time.monotonic() + HANG
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {HANG} s")
        time.sleep(0.005)


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i = [], 0
    for n in sizes:
        if i >= len(data):
            break
        out.append(data[i:i + n])
        i += n
    return [*out, data[i:]] if i < len(data) else out


@examples(1.5)
@given(stream=streams, sizes=st.lists(st.integers(1, 64), max_size=4), drip=st.booleans())
@example(stream=encode_frame(REQUEST, {"method": "echo", "args": {"a": [1, 2.5, None]}}) * 3,
         sizes=[], drip=False)
@example(stream=HEADER.pack(MAGIC, REQUEST, 4000) + DEEP, sizes=[], drip=False)
@example(stream=HEADER.pack(MAGIC, REQUEST, MAXLEN + 1), sizes=[], drip=False)
@example(stream=HEADER.pack(MAGIC, REQUEST, 10) + b"{}", sizes=[3], drip=True)
def test_rpc_server_matches_framing_model_on_any_stream(rpc_server, stream, sizes, drip):
    """Any byte stream sent on a live RPC connection (after the handshake, in any chunking)
    gets exactly the replies the documented framing predicts, in order; then the connection is
    still usable (every byte consumed), or is closed by the server: at once after a malformed or
    oversized frame, within frame_timeout after an incomplete one (counted in ``dropped``).
    Afterwards a fresh client's call succeeds within a bound and no connection leaks."""
    replies, end = rpc_model(stream, MAXLEN)
    dropped = rpc_server.dropped
    with socket.create_connection(("127.0.0.1", rpc_server.port), timeout=HANG) as s:
        _client_handshake(s)
        s.settimeout(HANG)
        try:
            for part in _chunks(stream, sizes):
                s.sendall(part)
                if drip:
                    time.sleep(0.002)
        except OSError:  # the server may drop us while we still send: only after bad bytes
            assert end == "drop", f"send failed, but the stream ends {end!r}"
        got = [_read_reply(s) for _ in replies]
        assert [canon(g) for g in got] == [canon(r) for r in replies]
        if end == "open":  # the connection is still in step: one more call on it works
            s.sendall(encode_frame(REQUEST, {"method": "echo", "args": {"again": 1}}))
            assert _read_reply(s) == {"ok": True, "result": {"again": 1}}
        else:
            _assert_closed_by_peer(s, f"a stream ending {end!r}")
    _wait_for(lambda: rpc_server.open_connections == 0, "the server closing our connection")
    assert rpc_server.dropped - dropped == (0 if end == "open" else 1)
    _server_is_healthy(rpc_server)


@pytest.mark.skipif(not HANDSHAKE, reason="this RPC port has no cluster-token handshake")
@examples(0.5)
@given(garbage=st.one_of(st.binary(max_size=120), streams))
def test_rpc_server_survives_garbage_instead_of_handshake(rpc_server, garbage):
    """Bytes sent in place of the handshake answer never reach the RPC layer: the server sends
    its hello, at most a refusal, and closes the connection (at once, or within the handshake
    timeout for a short answer); afterwards a fresh client's call still succeeds."""
    answer = _auth.ANSWER
    assume(not (len(garbage) >= answer.size and garbage[:5] == _auth.MAGIC + b"\0"
                and garbage[21:answer.size] == bytes(32)))  # a valid open-mode answer
    with socket.create_connection(("127.0.0.1", rpc_server.port), timeout=HANG) as s:
        try:
            s.sendall(garbage)
        except OSError:
            pass
        got = b""
        s.settimeout(HANG)
        while True:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError("server kept a connection without a handshake") from None
            if not chunk:
                break
            got += chunk
        hello = _auth.HELLO.size
        assert got[:4] == _auth.MAGIC
        assert got[hello:] in (b"", _auth.REFUSED), f"more than a refusal: {got[hello:]!r}"
    _server_is_healthy(rpc_server)


class _HostileServer:
    """One connection on 127.0.0.1: (optionally) the handshake, read one request frame, send
    ``reply`` bytes, then close, or hold the connection open until :meth:`close`."""

    def __init__(self, reply: bytes, hold: bool, handshake: bool = True) -> None:
        self.reply, self.hold, self.handshake = reply, hold, handshake
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(1)
        self.segment = f"127.0.0.1:{self.ls.getsockname()[1]}"
        self.done = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        try:
            c, _ = self.ls.accept()
        except OSError:
            return
        with c:
            try:
                c.settimeout(HANG)
                if self.handshake:
                    if not _server_handshake(c):
                        return
                    _, _, n = HEADER.unpack(_recv_exact(c, HEADER.size))
                    _recv_exact(c, n)
                c.sendall(self.reply)
                if self.hold:
                    self.done.wait(HANG)
            except (OSError, AssertionError):
                pass

    def close(self) -> None:
        self.done.set()
        self.ls.close()
        self.t.join(HANG)


def client_model(reply: bytes, max_len: int) -> tuple:
    """What :meth:`RpcClient.call` makes of ``reply``: ``("ok", result)``, ``("remote",
    type)`` (a RemoteError) or ``("unreachable",)`` (PeerUnreachable)."""
    if len(reply) < HEADER.size:
        return ("unreachable",)
    magic, kind, length = HEADER.unpack_from(reply)
    if magic != MAGIC or kind not in (REQUEST, REPLY) or length > max_len:
        return ("unreachable",)
    if len(reply) - HEADER.size < length:
        return ("unreachable",)
    try:
        msg = json.loads(reply[HEADER.size:HEADER.size + length])
    except (ValueError, RecursionError):
        return ("unreachable",)
    if kind != REPLY or not isinstance(msg, dict):
        return ("unreachable",)
    if not msg.get("ok"):
        return ("remote", msg.get("type", ""))
    return ("ok", msg.get("result"))


reply_objects = st.one_of(
    st.fixed_dictionaries({"ok": st.just(True), "result": json_values}),
    st.fixed_dictionaries({"ok": st.just(False), "error": json_values},
                          optional={"type": json_values}),
    st.dictionaries(st.sampled_from(["ok", "result", "error", "type"]) | texts, json_values,
                    max_size=4),
    json_values)
reply_bytes = st.one_of(
    st.builds(encode_frame, st.sampled_from([REPLY, REPLY, REQUEST]), reply_objects),
    raw_frames, headers, st.binary(max_size=40),
    st.builds(lambda b: HEADER.pack(MAGIC, REPLY, len(b)) + b, bodies))
reply_bytes = st.one_of(reply_bytes,
                        st.tuples(reply_bytes, st.integers(0, 64)).map(lambda t: t[0][:t[1]]),
                        st.tuples(reply_bytes, st.binary(max_size=16)).map(b"".join))


@examples(1.5)
@given(reply=reply_bytes, hold=st.booleans())
@example(reply=encode_frame(REPLY, {"ok": False, "error": "no", "type": ["not", "a", "str"]}),
         hold=False)
@example(reply=HEADER.pack(MAGIC, REPLY, 4000) + DEEP, hold=False)
def test_rpc_client_against_hostile_server(reply, hold):
    """Whatever a server answers, ``RpcClient.call`` returns the result of a well-formed ok
    reply, raises RemoteError (with the reply's ``type``) for a well-formed error reply, and
    PeerUnreachable for anything else (malformed, oversized, truncated, a request frame, a
    reply that never completes), never another exception, and never past its timeout."""
    max_len = 2048
    timeout = 0.4 if hold else HANG
    want = client_model(reply, max_len)
    srv = _HostileServer(reply, hold)
    client = RpcClient(max_len, HANG)
    try:
        t0 = time.monotonic()
        try:
            got = ("ok", client.call(srv.segment, "m", {"x": 1}, timeout=timeout))
        except RemoteError as e:
            got = ("remote", e.type)
        except PeerUnreachable:
            got = ("unreachable",)
        assert time.monotonic() - t0 < timeout + 2.0
        assert canon(got) == canon(want)
    finally:
        client.close()
        srv.close()


@pytest.mark.skipif(not HANDSHAKE, reason="this RPC port has no cluster-token handshake")
@examples(0.5)
@given(hello=st.one_of(st.binary(max_size=80), reply_bytes), hold=st.booleans())
def test_rpc_client_against_garbage_handshake(hello, hold):
    """A server that sends arbitrary bytes instead of the handshake hello makes
    ``RpcClient.call`` raise AuthError or PeerUnreachable within its timeout, nothing else."""
    assume(not hello.startswith(_auth.MAGIC + b"\0"))  # an open-mode hello would continue
    timeout = 0.4 if hold else HANG
    srv = _HostileServer(hello, hold, handshake=False)
    client = RpcClient(1 << 20, HANG)
    try:
        t0 = time.monotonic()
        with pytest.raises((AuthError, PeerUnreachable)):
            client.call(srv.segment, "m", {}, timeout=timeout)
        assert time.monotonic() - t0 < timeout + 2.0
    finally:
        client.close()
        srv.close()


@examples(4)
@given(kind=st.sampled_from([REQUEST, REPLY]), obj=json_values,
       max_length=st.one_of(st.integers(0, 256), st.just(1 << 20)), blocking=st.booleans())
def test_frame_round_trip_within_the_size_bound(kind, obj, max_length, blocking):
    """``encode_frame`` then ``recv_frame`` gives back the kind and an equal JSON object when
    the body fits ``max_length``, and ProtocolError ("exceeds") when it does not; both with a
    whole-frame deadline and with a per-frame timeout."""
    frame = encode_frame(kind, obj)
    assume(len(frame) < 100_000)  # fits the socketpair's buffer: nobody reads while we write
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame)
        a.shutdown(socket.SHUT_WR)
        kw = {"frame_timeout": HANG} if blocking else {"deadline": time.monotonic() + HANG}
        if len(frame) - HEADER.size <= max_length:
            k, got = recv_frame(b, max_length, **kw)
            assert k == kind and canon(got) == canon(obj)
        else:
            with pytest.raises(ProtocolError, match="exceeds"):
                recv_frame(b, max_length, **kw)


def frame_model(data: bytes, max_len: int):
    """``recv_frame`` on ``data`` then EOF: ``("frame", kind, obj)``, ``("protocol",)`` or
    ``("closed",)`` (ConnectionError: the frame was cut short)."""
    if len(data) < HEADER.size:
        return ("closed",)
    magic, kind, length = HEADER.unpack_from(data)
    if magic != MAGIC or kind not in (REQUEST, REPLY) or length > max_len:
        return ("protocol",)
    if len(data) - HEADER.size < length:
        return ("closed",)
    try:
        return ("frame", kind, json.loads(data[HEADER.size:HEADER.size + length]))
    except (ValueError, RecursionError):
        return ("protocol",)


@examples(4)
@given(data=st.one_of(streams, reply_bytes), blocking=st.booleans())
@example(data=HEADER.pack(MAGIC, REPLY, 4000) + DEEP, blocking=False)
@example(data=HEADER.pack(MAGIC, REPLY, 3) + b"\xff\xfe\x00", blocking=True)
def test_recv_frame_on_arbitrary_bytes(data, blocking):
    """``recv_frame`` on any bytes followed by EOF either decodes the frame the header
    announces, or raises ProtocolError (bad magic/kind, oversized, not JSON) or ConnectionError
    (cut short), as the framing model says; never another exception."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        kw = {"frame_timeout": HANG} if blocking else {"deadline": time.monotonic() + HANG}
        try:
            k, obj = recv_frame(b, 2048, **kw)
            got = ("frame", k, obj)
        except ProtocolError:
            got = ("protocol",)
        except ConnectionError:
            got = ("closed",)
    assert canon(got) == canon(frame_model(data, 2048))


@examples(10)
@given(head=st.one_of(st.binary(min_size=9, max_size=9), headers),
       max_length=st.one_of(st.integers(0, 2**32), st.sampled_from([0, MAXLEN])))
def test_check_header_accepts_exactly_the_valid_headers(head, max_length):
    """``_check_header`` returns ``(kind, length)`` exactly for MAGIC, kind 1 or 2 and
    length <= max_length, and raises ProtocolError for every other 9 bytes."""
    magic, kind, length = HEADER.unpack(head)
    if magic == MAGIC and kind in (REQUEST, REPLY) and length <= max_length:
        assert _check_header(head, max_length) == (kind, length)
    else:
        with pytest.raises(ProtocolError):
            _check_header(head, max_length)


# ======================================================================= 2. descriptors

NAME = "127.0.0.1:12345"
#: every first-party transport's (segment_fields, buffer_fields): what an engine running all of
#: them checks in a peer's descriptor
SCHEMAS = {cls.name: (cls.segment_fields, cls.buffer_fields)
           for cls in (TcpTransport, ShmTransport, CxlTransport, RdmaTransport)}


def _field_value(f) -> st.SearchStrategy:
    if f.kind == "int":
        return st.integers(f.lo, f.hi)
    if f.kind == "bool":
        return st.booleans()
    if f.pattern is None:
        return st.text(chars, max_size=min(f.max_len, 40))
    return st.from_regex(f.pattern, fullmatch=True).filter(lambda s: len(s) <= f.max_len)


def valid_fields(spec: dict) -> st.SearchStrategy:
    """Field dicts that ``check_fields(..., spec, ...)`` must accept."""
    required = {n: _field_value(f) for n, f in spec.items() if f.required}
    optional = {n: _field_value(f) for n, f in spec.items() if not f.required}
    return st.fixed_dictionaries(required, optional=optional)


def invalid_value(f) -> st.SearchStrategy:
    """Values field ``f`` must refuse."""
    others = st.one_of(st.none(), floats, texts, st.lists(json_scalars, max_size=2),
                       st.dictionaries(texts, json_scalars, max_size=2))
    if f.kind == "int":
        return st.one_of(st.integers(max_value=f.lo - 1), st.integers(min_value=f.hi + 1),
                         st.booleans(), others)
    if f.kind == "bool":
        return st.one_of(ints, others.filter(lambda v: not isinstance(v, bool)))
    long = st.text(chars, max_size=3).map(lambda t: "x" * (f.max_len + 1) + t)
    bad = [st.none(), st.booleans(), ints, floats, long, st.lists(texts, max_size=2)]
    if f.pattern is not None:  # no schema's pattern allows a NUL
        bad.append(_field_value(f).map(lambda s: s + "\x00"))
    return st.one_of(*bad)


@pytest.fixture(scope="module")
def real_descriptors():
    """Descriptors of live engines: tcp (the brief's), and auto (shm too) where it starts;
    each with a read-write array, a read-only buffer and a managed (shm-backed) buffer."""
    from mooncake.engine import TransferEngine

    out, engines, keep = [], [], []
    for protocol in ("tcp", "auto"):
        try:
            eng = TransferEngine("127.0.0.1", protocol=protocol)
        except MooncakeError:
            if protocol == "tcp":
                raise
            continue
        engines.append(eng)
        rw = np.zeros(8 * KiB, np.uint8)
        ro = np.frombuffer(bytes(4 * KiB), np.uint8)
        keep += [rw, ro]
        eng.register(rw)
        eng.register(ro)
        eng.allocate(16 * KiB)
        d = eng.describe()
        validate_descriptor(d["name"], d, SCHEMAS)  # the property's premise: it is valid
        out.append({**d, "name": NAME})
    yield out
    for eng in engines:
        eng.close()


def _resolve(node, steps):
    """Follow ``steps`` (a str: that key; an int: the child of that index, modulo) from
    ``node``: ``(parent, key)`` pairs of the path taken."""
    trail = []
    for s in steps:
        if isinstance(node, dict) and node:
            if isinstance(s, str) and s not in node:
                break
            k = s if isinstance(s, str) else sorted(node)[s % len(node)]
        elif isinstance(node, list) and node:
            k = s % len(node) if isinstance(s, int) else 0
        else:
            break
        trail.append((node, k))
        node = node[k]
    return trail


def mutate(desc, ops):
    """Apply mutation ops to (a deep copy of) ``desc``: ``(op, steps, value, key)`` with op
    ``set`` (replace the node), ``del`` (remove it), ``add`` (a key or element in the node's
    container) or ``dup`` (append a copy of a list element: overlapping buffers)."""
    root = {"": json.loads(json.dumps(desc))}
    for op, steps, value, key in ops:
        trail = [(root, ""), *_resolve(root[""], steps)]
        parent, k = trail[-1]
        if op == "set":
            parent[k] = value
        elif op == "del" and len(trail) > 1:
            del parent[k]
        elif op == "add":
            node = parent[k]
            if isinstance(node, dict):
                node[key] = value
            elif isinstance(node, list):
                node.append(value)
            else:
                parent[k] = {key: value}
        elif op == "dup" and isinstance(parent, list):
            parent.append(json.loads(json.dumps(parent[k])))
    return root[""]


steps = st.lists(st.one_of(st.integers(0, 40), st.sampled_from(
    ["buffers", "transports", "timestamp", "pid", "name", "host_id", "addr", "length",
     "location", "access", "shm_name", "tcp", "shm", "data_port", "host", "slot", "gen"])),
    max_size=5)
mutations = st.lists(
    st.tuples(st.sampled_from(["set", "set", "del", "add", "dup"]), steps,
              json_values | st.sampled_from(BOUNDARY_INTS), texts),
    min_size=1, max_size=3)


def check_descriptor(name: str, obj) -> bool:
    """``validate_descriptor`` returns ``obj`` itself or raises DescriptorError naming the
    segment; a descriptor it accepts is fully usable: ``decode`` builds the SegmentDesc, the
    SegmentCache builds its region table holding every buffer, and its JSON text decodes to
    an equal descriptor.  True when it was accepted."""
    try:
        out = validate_descriptor(name, obj, SCHEMAS)
    except DescriptorError as e:
        assert f"segment {name!r}" in str(e)
        return False
    assert out is obj
    desc = decode(name, obj, SCHEMAS)
    assert [(b.addr, b.length, b.location) for b in desc.buffers] == \
        [(b["addr"], b["length"], b["location"]) for b in obj["buffers"]]
    entry = SegmentCache(lambda n: obj, schemas=SCHEMAS).get(name)
    for b in obj["buffers"]:
        assert entry.table.contains(b["addr"], b["length"])
    assert canon(decode_descriptor(name, json.dumps(obj))) == canon(obj)
    return True


buffer_like = st.fixed_dictionaries({}, optional={
    "addr": ints | json_values, "length": ints | json_values,
    "location": st.sampled_from(["cpu:0", "cuda:1", "*", "cxl"]) | texts | json_values,
    "shm_name": texts | json_values, "access": st.sampled_from(["ro", "rw"]) | json_values,
    "transports": st.dictionaries(st.sampled_from(sorted(SCHEMAS)) | texts, json_values,
                                  max_size=3) | json_values})
descriptor_like = st.fixed_dictionaries({}, optional={
    "name": st.just(NAME) | json_values, "host_id": texts | json_values,
    "pid": ints | json_values, "timestamp": floats | ints | json_values,
    "transports": st.dictionaries(
        st.sampled_from(sorted(SCHEMAS)) | texts,
        st.one_of(*(valid_fields(seg) for seg, _ in SCHEMAS.values()), json_values),
        max_size=3) | json_values,
    "buffers": st.lists(buffer_like, max_size=4) | json_values})


@examples(5)
@given(obj=st.one_of(json_values, descriptor_like))
def test_validate_descriptor_on_arbitrary_json(obj):
    """For any JSON value (nested dicts/lists, huge ints, nan/inf, any unicode), and for
    descriptor-shaped objects of arbitrary fields, the validator accepts (and then the
    descriptor is usable end to end) or raises DescriptorError; nothing else escapes."""
    check_descriptor(NAME, obj)


@examples(5)
@given(which=st.integers(0, 7), ops=mutations)
@example(which=0, ops=[("set", ["timestamp"], 10**400, "")])
@example(which=0, ops=[("add", ["buffers"], {"addr": 0, "length": 2**64, "location": "cpu:0"},
                        "")])
def test_validate_descriptor_on_mutated_real_descriptors(real_descriptors, which, ops):
    """Any one to three mutations (replace a node by arbitrary JSON, delete it, add a key or
    element, duplicate a buffer) of a live engine's own descriptor validate or raise
    DescriptorError; an accepted mutant is usable end to end (decode, region table, JSON)."""
    base = real_descriptors[which % len(real_descriptors)]
    check_descriptor(NAME, mutate(base, ops))


#: addresses and lengths around the top of the 64-bit space; "to_end": 2**64 - addr
EDGE_ADDRS = (0, 1, 4096, 2**47, 2**63 - 1, 2**63, 2**64 - 4096, 2**64 - 1, 2**64, -1)
EDGE_LENGTHS = (0, 1, 4096, 2**63, 2**64 - 1, 2**64, 2**64 + 1, -1, "to_end", "to_end")
edge_cases = st.one_of(
    st.tuples(st.just("top"), st.sampled_from(["pid", "timestamp"]),
              st.sampled_from(BOUNDARY_INTS) | st.sampled_from([0.0, -0.0, 1e308, -1e308,
                                                                float("inf"), float("nan")])),
    st.tuples(st.just("buffer"), st.sampled_from(EDGE_ADDRS), st.sampled_from(EDGE_LENGTHS)))


@examples(5)
@given(which=st.integers(0, 7), case=edge_cases, where=st.integers(0, 7))
def test_descriptor_numeric_fields_at_their_edges(real_descriptors, which, case, where):
    """A live engine's descriptor with ``pid``/``timestamp`` set to any edge value (ints past
    2**31, 2**64 and any float, floats at their limits, nan/inf), or one buffer moved to any
    address/length around the top of the 64-bit space (including ending exactly at 2**64),
    validates and is then usable end to end, or raises DescriptorError."""
    desc = mutate(real_descriptors[which % len(real_descriptors)], [])
    if case[0] == "top":
        desc[case[1]] = case[2]
    else:
        _, addr, length = case
        b = desc["buffers"][where % len(desc["buffers"])]
        b["addr"] = addr
        b["length"] = 2**64 - addr if length == "to_end" else length
        desc["buffers"] = [b]  # alone: no overlap with the others hides the case
    check_descriptor(NAME, desc)


@examples(5)
@given(data=st.data())
def test_descriptor_with_valid_transport_fields_then_one_bad_field(real_descriptors, data):
    """A real descriptor carrying valid fields of any transport's schema (segment and buffer
    level) is accepted; changing one published field to a value its Field row refuses makes
    validate_descriptor raise DescriptorError naming that transport and field."""
    base = mutate(data.draw(st.sampled_from(real_descriptors)), [])
    tname = data.draw(st.sampled_from(sorted(SCHEMAS)))
    seg_spec, buf_spec = SCHEMAS[tname]
    base["transports"][tname] = data.draw(valid_fields(seg_spec), label="segment fields")
    for b in base["buffers"]:
        b.setdefault("transports", {})[tname] = data.draw(valid_fields(buf_spec))
    assert check_descriptor(NAME, base)
    level = data.draw(st.sampled_from(["segment", "buffer"] if buf_spec and base["buffers"]
                                      else ["segment"]))
    spec = seg_spec if level == "segment" else buf_spec
    field = data.draw(st.sampled_from(sorted(spec)))
    bad = data.draw(invalid_value(spec[field]), label="bad value")
    if level == "segment":
        base["transports"][tname][field] = bad
        where = f"transports.{tname}.{field}"
    else:
        i = data.draw(st.integers(0, len(base["buffers"]) - 1))
        base["buffers"][i]["transports"][tname][field] = bad
        where = f"buffers[{i}].transports.{tname}.{field}"
    with pytest.raises(DescriptorError, match=re.escape(where)):
        validate_descriptor(NAME, base, SCHEMAS)


FIELD_SPECS = [(f"transports.{t}", s) for t, (s, _) in SCHEMAS.items()] + \
    [(f"buffers[0].transports.{t}", b) for t, (_, b) in SCHEMAS.items() if b]


@examples(5)
@given(data=st.data())
def test_check_fields_valid_and_single_mutations(data):
    """For every transport schema: generated valid fields pass ``check_fields``; replacing one
    field by a value outside its row (wrong type, out of range, too long, not matching) raises
    FieldError naming ``where.field``; removing a required field raises FieldError naming it;
    unknown extra fields are ignored."""
    where, spec = data.draw(st.sampled_from(FIELD_SPECS))
    fields = data.draw(valid_fields(spec))
    extra = data.draw(st.dictionaries(texts.filter(lambda k: k not in spec), json_values,
                                      max_size=2))
    check_fields({**fields, **extra}, spec, where)
    name = data.draw(st.sampled_from(sorted(spec)))
    if spec[name].required and data.draw(st.booleans()):
        del fields[name]
        with pytest.raises(FieldError, match=re.escape(f"{where} lacks the field {name!r}")):
            check_fields(fields, spec, where)
    else:
        fields[name] = data.draw(invalid_value(spec[name]))
        with pytest.raises(FieldError, match=re.escape(f"{where}.{name} ")):
            check_fields(fields, spec, where)


@examples(5)
@given(where_spec=st.sampled_from(FIELD_SPECS), fields=json_values)
def test_check_fields_on_arbitrary_json(where_spec, fields):
    """``check_fields`` on any JSON value returns None or raises FieldError, nothing else."""
    where, spec = where_spec
    try:
        check_fields(fields, spec, where)
    except FieldError as e:
        assert where in str(e)


@examples(5)
@given(raw=st.one_of(st.binary(max_size=200), texts, json_values.map(json.dumps),
                     descriptor_like.map(json.dumps),
                     st.sampled_from([b"[" * 100000, '{"a":' * 5000, "1" * 5000, "NaN"])))
def test_decode_descriptor_on_arbitrary_text(raw):
    """``decode_descriptor`` on any bytes or text (not JSON, deeply nested, a 5000-digit
    number, bad UTF-8) returns a validated dict or raises DescriptorError."""
    try:
        out = decode_descriptor(NAME, raw)
    except DescriptorError:
        return
    assert isinstance(out, dict)


def _good_descriptor(**changes) -> dict:
    d = {"name": NAME, "host_id": "h", "pid": 1, "timestamp": 1.0, "transports": {},
         "buffers": [{"addr": 4096, "length": 4096, "location": "cpu:0"}]}
    return {**d, **changes}


def test_regression_descriptor_timestamp_beyond_float_leaks_overflowerror():
    """Regression (found by these properties): a descriptor whose ``timestamp`` is an integer beyond
    any float (JSON carries it: ``"timestamp": 1000...0`` with 400 digits) makes
    ``validate_descriptor`` raise OverflowError from ``math.isfinite`` instead of
    DescriptorError."""
    text = json.dumps(_good_descriptor(timestamp=10**400))  # as a metadata store holds it
    with pytest.raises(DescriptorError, match="timestamp"):
        decode_descriptor(NAME, text)


def test_regression_descriptor_timestamp_overflow_reaches_the_engine(engine):
    """Regression (found by these properties), end to end: a p2p peer whose ``segment.describe``
    answers a descriptor with a 400-digit ``timestamp`` makes ``engine.segment()`` raise
    OverflowError (not SegmentNotFound)."""
    from mooncake.errors import SegmentNotFound

    srv = RpcServer("127.0.0.1", [0], 1 << 20)
    try:
        name = f"127.0.0.1:{srv.port}"
        srv.add_handler("segment.describe",
                        lambda args: _good_descriptor(name=name, timestamp=10**400))
        with pytest.raises(SegmentNotFound):
            engine.segment(name)
    finally:
        srv.close()


@pytest.mark.parametrize("addr,length", [(0, 2**64), (2**63, 2**63), (2**64 - 4096, 4096)])
def test_regression_buffer_ending_at_the_top_of_the_address_space(addr, length):
    """Regression (found by these properties): a buffer whose end is 2**64 passed the
    validator, then broke the SegmentCache (OverflowError, or a wrong "buffers overlap").  Now
    the validator refuses it with a DescriptorError naming the reason, and a buffer that ends
    one byte lower is accepted and usable."""
    obj = _good_descriptor(buffers=[{"addr": addr, "length": length, "location": "cpu:0"}])
    with pytest.raises(DescriptorError, match="end of the 64-bit address space"):
        validate_descriptor(NAME, obj)
    ok = _good_descriptor(buffers=[{"addr": addr, "length": length - 1, "location": "cpu:0"}])
    assert validate_descriptor(NAME, ok) is ok
    entry = SegmentCache(lambda n: ok).get(NAME)
    assert entry.table.contains(addr, length - 1)


# ======================================================================= 3. configuration

ENV_OPTIONS = [o for o in all_options() if o.env and o.name != "MC_TENT_CONF"]
TENT_OPTIONS = [o for o in all_options() if o.tent]


def _load(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(**kw)


def _show_json(env: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return json.loads(show(as_json=True, env=env))


number_texts = st.one_of(
    ints.map(str), floats.map(repr), ints.map(hex),
    st.sampled_from(["", " ", "0", "-0", "1_000", "0x10", "0o17", "0b11", "1e3", "1e999", "-1",
                     "nan", "inf", "\u0663", "\uff11\uff12", " 7 ", "007", "1.0", "+5"]))
size_texts = st.builds(
    lambda n, frac, sp, unit, b: f"{n}{frac}{sp}{unit}{b}",
    st.integers(0, 2**40).map(str) | st.sampled_from(["\u0663", "9" * 30]),
    st.sampled_from(["", ".5", ".25", ".0", ".3"]), st.sampled_from(["", " "]),
    st.sampled_from(["", "K", "M", "G", "T", "k", "m", "g", "t", "P"]) | chars,
    st.sampled_from(["", "B", "iB", "b", "ib", "IB"]) | chars)
word_texts = st.sampled_from(["true", "FALSE", "yes", "No", "on", "OFF", "1", "0", "2", "auto",
                              "AUTO", "tru", "SIEVE", "fifo", "info", "TRACE", "warning",
                              "a,b", " a , ,b ", ","])
env_texts = st.one_of(number_texts, size_texts, word_texts, texts)


def _option_constraints_hold(opt, value) -> None:
    """A loaded value is of the option's type and inside its declared range/choices."""
    if value is None:
        assert opt.default is None
        return
    if opt.type is bool:
        assert isinstance(value, bool)
    elif opt.type in (int, "size"):
        assert type(value) is int
    elif opt.type is float:
        assert type(value) is float and value == value and abs(value) != float("inf")
    elif opt.type in (str,):
        assert isinstance(value, str)
    elif opt.type == "enum":
        assert value in opt.choices
    elif opt.type == "list":
        assert isinstance(value, tuple) and all(isinstance(p, str) for p in value)
    elif opt.type == "auto":
        assert value == "auto" or isinstance(value, bool)
    if any(value == v for v, _ in opt.special) or opt.type in ("enum", "list", "auto", str):
        return
    if opt.choices is not None:
        assert value in opt.choices
    if opt.range is not None:
        lo, hi = opt.range
        assert lo is None or (value > lo if opt.min_exclusive else value >= lo)
        assert hi is None or value <= hi


def _round_trips(opt, cfg, env: dict) -> None:
    """``config show --json`` reports the loaded value and its source; that shown value given
    back as an argument (and as TENT JSON, for an option with a TENT path) loads the same."""
    entry = _show_json(env)["options"][opt.name]
    value = cfg[opt.name]
    assert entry["source"] == cfg.source(opt.name)
    if opt.secret or value is None:
        return
    shown = entry["value"]
    assert canon(shown) == canon(list(value) if isinstance(value, tuple) else value)
    assert _load(overrides={opt.name: shown}, env={})[opt.name] == value
    if opt.tent:
        tent = {"MC_TENT_CONF": json.dumps({opt.tent: shown})}
        again = _load(env=tent)
        assert again[opt.name] == value and again.source(opt.name) == "tent:inline"


@examples(5)
@given(opt=st.sampled_from(ENV_OPTIONS), alias=st.integers(0, 3), raw=env_texts)
@example(opt=all_options()[0], alias=0, raw="1\u212a")
def test_env_value_loads_or_raises_configerror_naming_it(opt, alias, raw):
    """Any string in any option's environment variable (its primary name or an alias) either
    loads, giving a value of the option's type inside its declared range that round-trips
    through ``config show --json``, or raises ConfigError naming the variable."""
    var = opt.env[alias % len(opt.env)]
    env = {var: raw}
    try:
        cfg = _load(env=env)
    except ConfigError as e:
        assert var in str(e) or opt.name in str(e)
        return
    _option_constraints_hold(opt, cfg[opt.name])
    assert cfg.source(opt.name) == (f"env:{var}" if raw.strip() else "default")
    _round_trips(opt, cfg, env)


SIZE_OPTIONS = [o for o in all_options() if o.type == "size"]
size_units = st.one_of(st.sampled_from(["", "K", "M", "G", "T", "k", "m", "g", "t", "P", "E",
                                        *TRICKY_CHARS]), chars)
size_shaped = st.builds(
    lambda n, frac, sp, unit, b: f"{n}{frac}{sp}{unit}{b}",
    st.integers(0, 2**40).map(str) | st.sampled_from(["\u0663", "9" * 30, "", "0x1"]),
    st.sampled_from(["", ".5", ".25", ".0", ".3", "."]), st.sampled_from(["", " ", "\t"]),
    size_units, st.sampled_from(["", "B", "iB", "b", "ib", "IB", "\u0131B"]) | chars)


@examples(5)
@given(opt=st.sampled_from(SIZE_OPTIONS), raw=size_shaped, tent=st.booleans())
@example(opt=all_options()[0], raw="1\u212a", tent=False)
def test_size_text_loads_or_raises_configerror(opt, raw, tent):
    """Any size-shaped text (a number, a fraction, any unicode letter as the suffix, any
    "B"/"iB" ending) for a size option, in its env variable or its TENT key, loads as a whole
    number of bytes inside the option's range, or raises ConfigError naming it."""
    if tent and not opt.tent:
        tent = False
    env = {"MC_TENT_CONF": json.dumps({opt.tent: raw})} if tent else {opt.env[0]: raw}
    try:
        cfg = _load(env=env)
    except ConfigError as e:
        assert (opt.tent if tent else opt.env[0]) in str(e) or opt.name in str(e)
        return
    _option_constraints_hold(opt, cfg[opt.name])


def test_regression_size_suffix_kelvin_sign_leaks_keyerror():
    """Regression (found by these properties): ``MC_SLICE_SIZE=1\\u212a`` (KELVIN SIGN, which
    ``re.IGNORECASE`` matches against ``K``) passes the size regex, then ``_MULT[suffix.upper()]``
    raises KeyError (``"\\u212a".upper()`` is itself): load_config leaks KeyError instead of
    ConfigError. The same text in a TENT size key does the same."""
    with pytest.raises(ConfigError, match="MC_SLICE_SIZE"):
        _load(env={"MC_SLICE_SIZE": "1\u212a"})


def test_regression_size_suffix_kelvin_sign_in_tent_json():
    """Regression (found by these properties; TENT): ``{"transports/rdma/workers/block_size":
    "64\\u212a"}``."""
    tent = json.dumps({"transports/rdma/workers/block_size": "64\u212a"})
    with pytest.raises(ConfigError, match="block_size"):
        _load(env={"MC_TENT_CONF": tent})


tent_paths = st.sampled_from(sorted(o.tent for o in TENT_OPTIONS))
tent_parts = st.sampled_from(sorted({p for o in TENT_OPTIONS for p in o.tent.split("/")}))
tent_keys = st.one_of(tent_paths, tent_parts, texts)
tent_scalars = st.one_of(json_values, env_texts, st.integers(-2, 300),
                         st.lists(st.sampled_from(["mlx5_0", "a,b", ""]) | texts, max_size=3))
tent_docs = st.recursive(
    st.dictionaries(tent_keys, tent_scalars, max_size=5),
    lambda kids: st.dictionaries(tent_keys, kids | tent_scalars, max_size=5),
    max_leaves=20)


@examples(5)
@given(doc=st.one_of(tent_docs, st.dictionaries(tent_paths, tent_scalars, max_size=6)))
@example(doc={"transports": {"rdma": {"workers": {"block_size": "64\u212a"}}}})
def test_tent_json_document_loads_or_raises_configerror(doc):
    """Any TENT JSON object (nested and/or ``/``-flat keys, unknown keys, values of any type)
    inline in MC_TENT_CONF either loads, every option it set holding a value of its type in
    range that round-trips through ``config show --json``, or raises ConfigError naming
    MC_TENT_CONF (the key) or, for a cross-field check, an option set there."""
    env = {"MC_TENT_CONF": json.dumps(doc)}
    try:
        cfg = _load(env=env)
    except ConfigError as e:
        assert "MC_TENT_CONF" in str(e) or "tent:inline" in str(e)
        return
    for opt in TENT_OPTIONS:
        if cfg.source(opt.name) == "tent:inline":
            _option_constraints_hold(opt, cfg[opt.name])
            _round_trips(opt, cfg, env)


@examples(3)
@given(text=st.one_of(st.text(chars, max_size=60).map(lambda t: "{" + t),
                      st.text(chars, max_size=60).map(lambda t: "[" + t),
                      st.integers(30, 40).map(lambda n: '{"a":' * n + "1" + "}" * n),
                      st.sampled_from(['{"a": 1' + "0" * 5000 + "}", "{" * 100000, "{}",
                                       '{"log_level": NaN}', '{"log_level": "debug"}'])))
def test_tent_inline_text_loads_or_raises_configerror(text):
    """Any inline MC_TENT_CONF text starting with ``{`` or ``[`` (malformed JSON, nested
    deeper than the limit, a 5000-digit number, NaN) loads or raises ConfigError naming
    MC_TENT_CONF."""
    try:
        _load(env={"MC_TENT_CONF": text})
    except ConfigError as e:
        assert "MC_TENT_CONF" in str(e) or "tent:inline" in str(e)


@examples(3)
@given(opt=st.sampled_from([o for o in all_options() if o.name != "MC_TENT_CONF"]),
       value=st.one_of(json_values, env_texts))
def test_argument_value_loads_or_raises_configerror(opt, value):
    """An explicit argument (``TransferEngine(**config)``) of any JSON-like Python value for
    any option loads or raises ConfigError naming ``argument '<name>'``.  (Integers beyond
    Python's 4300-digit str limit: see test_regression_huge_int_argument_leaks_valueerror.)"""
    try:
        cfg = _load(overrides={opt.name: value}, env={})
    except ConfigError as e:
        assert f"argument {opt.name!r}" in str(e) or opt.name in str(e)
        return
    if value is not None:
        _option_constraints_hold(opt, cfg[opt.name])


def test_regression_huge_int_argument_leaks_valueerror():
    """Regression (found by these properties): ``load_config({"MC_SLICE_SIZE": 10**5000})`` is
    refused as too large, but building the error message calls ``repr()`` on the value, which raises
    ValueError (Python's 4300-digit int-to-str limit) from inside the handler: a bare ValueError
    escapes instead of ConfigError naming the option."""
    with pytest.raises(ConfigError, match="MC_SLICE_SIZE"):
        _load(overrides={"MC_SLICE_SIZE": 10**5000}, env={})


# ======================================================================= 4. slicing

#: registered regions of one 8 MiB array: (offset, length, flags).  The read-only one is
#: adjacent to the first (a request may not span two regions even when every byte is
#: registered); a 64 KiB gap follows it.
LAYOUT = ((0, 3 * MiB, ALL), (3 * MiB, 64 * KiB, READ_ONLY),
          (3 * MiB + 128 * KiB, 4 * MiB, ALL), (7 * MiB + 256 * KiB, 1, ALL))
ARENA = 8 * MiB
MAX_SLICES = 512  # per request: keeps every example's slice list small
OP_READ, OP_WRITE = 0, 1


@pytest.fixture(scope="module")
def regions():
    arena = np.zeros(ARENA, np.uint8)
    base = arena.ctypes.data
    table = RegionTable()
    regs = [table.register(base + off, n, flags, owner=arena) for off, n, flags in LAYOUT]
    yield base, table, regs
    for r in regs:
        assert r.release(5.0)


def model_slices(length: int, slice_size: int, ratio: int) -> list[int]:
    """The slice lengths the kernel promises: ``frag = slice_size // ratio`` (0 when ratio is
    0); a request of at most ``slice_size + frag`` bytes is one slice; otherwise every slice
    but the last is ``slice_size`` bytes and a tail remainder of at most ``frag`` bytes merges
    into the last full slice (so only the last slice may exceed slice_size, by at most frag)."""
    frag = slice_size // ratio if ratio else 0
    if length <= slice_size + frag:
        return [length]
    q, r = divmod(length, slice_size)
    if r == 0:
        return [slice_size] * q
    if r <= frag:
        return [slice_size] * (q - 1) + [slice_size + r]
    return [slice_size] * q + [r]


def region_of(base: int, addr: int, length: int):
    """The LAYOUT row holding ``[addr, addr + length)``, or None."""
    for off, n, flags in LAYOUT:
        if base + off <= addr and addr + length <= base + off + n:
            return off, n, flags
    return None


def expected_refusal(base: int, op: int, addr: int, length: int) -> int:
    """0, or the code the kernel must refuse this local range with."""
    row = region_of(base, addr, length)
    if length == 0 or row is None:
        return E_REFUSED
    if op == OP_READ and not row[2] & LOCAL_WRITE:
        return E_DENIED
    return 0


slice_sizes = st.one_of(st.integers(1, 64), st.integers(2, 1 * MiB), st.integers(2, GiB),
                        st.sampled_from([4 * KiB, 16 * KiB, 64 * KiB, MiB, GiB]))


def ratios(slice_size: int) -> st.SearchStrategy:
    """MC_FRAGMENT_RATIO's allowed values (1 <= ratio < slice size, config.py's cross-check),
    plus what the kernel also accepts: 0 and ratios at or above the slice size (frag 0)."""
    allowed = st.integers(1, slice_size - 1) if slice_size > 1 else st.nothing()
    extra = st.sampled_from([0, slice_size, slice_size + 1, 2**64 - 1])
    return st.one_of(allowed, allowed, allowed, extra)


@st.composite
def requests(draw, slice_size: int, valid_only: bool):
    """``(kind, offset or address, length, op)``: inside a region (lengths up to several MiB,
    often near a multiple of the slice size), or, unless ``valid_only``, spanning two
    regions, in the gap, zero-length, or anywhere in the 64-bit space."""
    kinds = ["in"] if valid_only else ["in", "in", "span", "gap", "zero", "wild", "edge"]
    kind = draw(st.sampled_from(kinds))
    cap = slice_size * (MAX_SLICES - 1)
    if kind == "in":
        off, n, flags = draw(st.sampled_from(LAYOUT))
        start = draw(st.integers(0, n - 1))
        room = min(n - start, cap)
        near = [k * slice_size + d for k in range(1, 4) for d in (-1, 0, 1, 2)]
        near += [slice_size + slice_size // r for r in (1, 2, 4, 8)]
        length = draw(st.one_of(st.integers(1, room),
                                st.sampled_from([x for x in near if 1 <= x <= room] or [1])))
        ops = [OP_WRITE] if valid_only and not flags & LOCAL_WRITE else [OP_READ, OP_WRITE]
        return ("rel", off + start, length, draw(st.sampled_from(ops)))
    op = draw(st.sampled_from([OP_READ, OP_WRITE]))
    if kind == "span":  # across the end of the first (rw) region into the read-only one
        start = draw(st.integers(3 * MiB - 4 * KiB, 3 * MiB - 1))
        return ("rel", start, draw(st.integers(3 * MiB - start + 1, 3 * MiB - start + 8 * KiB)),
                op)
    if kind == "gap":
        start = draw(st.integers(3 * MiB + 64 * KiB, 3 * MiB + 128 * KiB - 1))
        return ("rel", start, draw(st.integers(1, 4 * KiB)), op)
    if kind == "zero":
        return ("rel", draw(st.integers(0, 3 * MiB - 1)), 0, op)
    if kind == "edge":  # the arena's ends and the one-byte region's neighbours
        start = draw(st.sampled_from([-1, -4096, ARENA - 1, ARENA, 7 * MiB + 256 * KiB - 1,
                                      7 * MiB + 256 * KiB, 7 * MiB + 256 * KiB + 1]))
        return ("rel", start, draw(st.integers(1, 2)), op)
    addr = draw(st.integers(0, 2**64 - 1))
    return ("abs", addr, draw(st.integers(0, 2**64 - 1 - addr)), op)


def _resolve_requests(base: int, reqs, remote_base: int):
    local, remote, length, ops = [], [], [], []
    for kind, where, n, op in reqs:
        local.append(where if kind == "abs" else base + where)
        remote.append(remote_base + len(remote) * 8 * MiB)
        length.append(n)
        ops.append(op)
    return local, remote, length, ops


def _check_slices(s, batch, table_regs, base, local, remote, length, ops, slice_size, ratio,
                  first_task) -> None:
    """Each task's slices are exactly the model's, in task order, with local and remote
    offsets advancing together from the request's start (contiguous: no gap, no overlap, the
    sum is the length); each task pins its region once; finishing every slice completes each
    task with exactly its length and drops every pin."""
    got = list(s)
    assert len(s) == len(got)
    want = []
    for i, (la, ra, n, op) in enumerate(zip(local, remote, length, ops, strict=True)):
        off = 0
        for ln in model_slices(n, slice_size, ratio):
            want.append((first_task + i, op, la + off, ra + off, ln))
            off += ln
        assert off == n
    assert got == want
    frag = slice_size // ratio if ratio else 0
    for *_, ln in got:  # the promise in words: only a merged tail exceeds slice_size
        assert 0 < ln <= slice_size + frag
    if table_regs is not None:
        for (off, n, _), reg in zip(LAYOUT, table_regs, strict=True):
            inside = sum(1 for la, ln in zip(local, length, strict=True)
                         if base + off <= la and la + ln <= base + off + n)
            assert reg.pins == inside
    for t, _, _, _, ln in got:
        batch.slice_done(t, ln)
    for i, n in enumerate(length):
        assert batch.status(first_task + i) == (4, n, 0)  # COMPLETED, all bytes, no error
    assert batch.done
    if table_regs is not None:
        assert all(reg.pins == 0 for reg in table_regs)


@examples(5)
@given(data=st.data())
def test_slices_cover_valid_requests_exactly(regions, data):
    """For requests inside registered regions (1 B to several MiB, any slice size in
    1..1 GiB, any fragment ratio), ``slice_requests`` (one opcode or one per request, any
    first_task) returns exactly the promised slices and pins each task's region."""
    base, table, regs = regions
    slice_size = data.draw(slice_sizes, label="slice_size")
    ratio = data.draw(ratios(slice_size), label="fragment_ratio")
    reqs = data.draw(st.lists(requests(slice_size, True), min_size=1, max_size=6))
    first = data.draw(st.integers(0, 3))
    batch = Batch(first + len(reqs) + data.draw(st.integers(0, 2)))
    local, remote, length, ops = _resolve_requests(base, reqs, 1 << 40)
    one_op = len(set(ops)) == 1 and data.draw(st.booleans())
    s = slice_requests(batch, ops[0] if one_op else ops, local, remote, length, slice_size,
                       ratio, table, first)
    _check_slices(s, batch, regs, base, local, remote, length, ops, slice_size, ratio, first)


@examples(5)
@given(data=st.data())
def test_requests_outside_registered_memory_raise_sliceerror(regions, data):
    """For any mix of requests (inside, spanning two adjacent regions, in a gap, zero-length,
    anywhere in the 64-bit space, READ into a read-only region), ``slice_requests`` raises
    SliceError for the first bad request, naming its index, code (E_REFUSED, or E_DENIED for a
    READ into read-only memory), address and length, and leaves no pin and no armed task
    behind; when every request is good it slices them as promised."""
    base, table, regs = regions
    slice_size = data.draw(slice_sizes, label="slice_size")
    ratio = data.draw(ratios(slice_size), label="fragment_ratio")
    reqs = data.draw(st.lists(requests(slice_size, False), min_size=1, max_size=6))
    local, remote, length, ops = _resolve_requests(base, reqs, 1 << 40)
    codes = [expected_refusal(base, op, la, n)
             for op, la, n in zip(ops, local, length, strict=True)]
    batch = Batch(len(reqs))
    bad = next((i for i, c in enumerate(codes) if c), None)
    if bad is None:
        s = slice_requests(batch, ops, local, remote, length, slice_size, ratio, table)
        _check_slices(s, batch, regs, base, local, remote, length, ops, slice_size, ratio, 0)
        return
    with pytest.raises(SliceError) as ei:
        slice_requests(batch, ops, local, remote, length, slice_size, ratio, table)
    e = ei.value
    assert (e.index, e.code, e.addr, e.length) == (bad, codes[bad], local[bad], length[bad])
    assert str(e).startswith(f"request {bad}: local range {local[bad]:#x}+{length[bad]} ")
    assert isinstance(e, ValueError)
    assert all(reg.pins == 0 for reg in regs)
    assert batch.done


@examples(5)
@given(data=st.data())
def test_slice_one_equals_slice_requests_of_one(regions, data):
    """``slice_one`` gives the same slices, pins and refusals as ``slice_requests`` with the
    same single request."""
    base, table, regs = regions
    slice_size = data.draw(slice_sizes, label="slice_size")
    ratio = data.draw(ratios(slice_size), label="fragment_ratio")
    req = data.draw(requests(slice_size, False))
    local, remote, length, ops = _resolve_requests(base, [req], 1 << 40)
    outcomes = []
    for fn in ("one", "requests"):
        batch = Batch(1)
        try:
            if fn == "one":
                s = slice_one(batch, ops[0], local[0], remote[0], length[0], slice_size, ratio,
                              table)
            else:
                s = slice_requests(batch, ops, local, remote, length, slice_size, ratio, table)
        except SliceError as e:
            outcomes.append(("refused", e.index, e.code, str(e)))
            assert all(reg.pins == 0 for reg in regs)
            continue
        outcomes.append(("sliced", list(s), [reg.pins for reg in regs]))
        s.fail_all(E_REFUSED)
        assert batch.done and batch.status(0)[0] == 6  # FAILED
        assert all(reg.pins == 0 for reg in regs)
    assert outcomes[0] == outcomes[1]


@examples(5)
@given(data=st.data())
def test_slicing_arithmetic_without_regions(data):
    """Without a region table (no pinning) the slicing is pure arithmetic: any lengths,
    zero included (one empty slice), match the model for every slice size and ratio."""
    slice_size = data.draw(slice_sizes, label="slice_size")
    ratio = data.draw(ratios(slice_size), label="fragment_ratio")
    n = data.draw(st.integers(1, 6))
    cap = slice_size * (MAX_SLICES - 1)
    length = data.draw(st.lists(st.integers(0, cap), min_size=n, max_size=n))
    local = [data.draw(st.integers(0, 2**64 - 1 - x)) for x in length]
    remote = [data.draw(st.integers(0, 2**64 - 1 - x)) for x in length]
    s = slice_requests(Batch(n), OP_WRITE, local, remote, length, slice_size, ratio)
    want = []
    for i, (la, ra, ln) in enumerate(zip(local, remote, length, strict=True)):
        off = 0
        for part in model_slices(ln, slice_size, ratio):
            want.append((i, OP_WRITE, la + off, ra + off, part))
            off += part
    assert list(s) == want
