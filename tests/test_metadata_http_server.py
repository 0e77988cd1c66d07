"""The built-in HTTP metadata server: Mooncake's wire protocol, leases, limits, robustness."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import servers

from mooncake.metadata.http_server import TTL_HEADER, MetadataServer, add_cli, main


@pytest.fixture
def srv() -> Iterator[MetadataServer]:
    with MetadataServer("127.0.0.1", 0, max_body=4096, max_keys=50) as s:
        yield s


def call(s: MetadataServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_mooncake_wire_protocol(srv: MetadataServer) -> None:
    """What Mooncake's C++ client does: PUT, GET, DELETE on /metadata?key=K."""
    key = "mooncake%2Fram%2F10.0.0.1%3A1234"  # curl_easy_escape'd
    assert call(srv, "GET", f"/metadata?key={key}") == (404, b"metadata not found")
    assert call(srv, "PUT", f"/metadata?key={key}", b'{"a":1}')[0] == 200
    status, body = call(srv, "GET", f"/metadata?key={key}")
    assert (status, body) == (200, b'{"a":1}')
    assert srv.table.get("mooncake/ram/10.0.0.1:1234") == b'{"a":1}'
    assert call(srv, "PUT", f"/metadata?key={key}", b'{"a":2}')[0] == 200  # overwrite
    assert call(srv, "GET", f"/metadata?key={key}")[1] == b'{"a":2}'
    assert call(srv, "DELETE", f"/metadata?key={key}")[0] == 200
    assert call(srv, "DELETE", f"/metadata?key={key}")[0] == 404
    assert call(srv, "GET", f"/metadata?key={key}")[0] == 404


def test_bad_requests(srv: MetadataServer) -> None:
    assert call(srv, "GET", "/metadata")[0] == 400
    assert call(srv, "GET", "/metadata?key=")[0] == 400
    assert call(srv, "PUT", "/metadata", b"x")[0] == 400
    assert call(srv, "GET", "/elsewhere?key=a")[0] == 404
    assert call(srv, "PUT", "/elsewhere?key=a", b"x")[0] == 404
    assert call(srv, "PATCH", "/metadata?key=a", b"x")[0] in (405, 501)
    status, body = call(srv, "PUT", "/metadata?key=a", b"x", {TTL_HEADER: "soon"})
    assert status == 400 and TTL_HEADER.encode() in body
    assert call(srv, "PUT", "/metadata?key=a", b"x", {TTL_HEADER: "-1"})[0] == 400
    assert call(srv, "GET", "/metadata?key=a")[0] == 404  # nothing stored by bad requests


def test_body_size_is_bounded(srv: MetadataServer) -> None:
    status, body = call(srv, "PUT", "/metadata?key=big", b"x" * 5000)
    assert status == 413 and b"4096" in body
    assert call(srv, "PUT", "/metadata?key=ok", b"x" * 4096)[0] == 200
    # a Content-Length that lies about a huge body is refused before reading it
    with socket.create_connection(("127.0.0.1", srv.port), 10) as s:
        s.sendall(b"PUT /metadata?key=liar HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 99999999999\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 413")
    assert call(srv, "GET", "/metadata?key=liar")[0] == 404


def test_put_without_length_is_refused(srv: MetadataServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), 10) as s:
        s.sendall(b"PUT /metadata?key=k HTTP/1.1\r\nHost: x\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 411")


def test_key_limit(srv: MetadataServer) -> None:
    for i in range(50):
        assert call(srv, "PUT", f"/metadata?key=k{i}", b"v")[0] == 200
    assert call(srv, "PUT", "/metadata?key=one-too-many", b"v")[0] == 507
    assert call(srv, "PUT", "/metadata?key=k3", b"again")[0] == 200  # replacing is fine


def test_keys_listing_and_health(srv: MetadataServer) -> None:
    for k in ("mooncake/ram/a", "mooncake/ram/b", "mooncake/c1/ram/a"):
        call(srv, "PUT", f"/metadata?key={k}", b"{}")
    status, body = call(srv, "GET", "/keys?prefix=mooncake/ram/")
    assert status == 200 and json.loads(body) == ["mooncake/ram/a", "mooncake/ram/b"]
    assert call(srv, "GET", "/health") == (200, b"ok")


def test_leases(srv: MetadataServer) -> None:
    """A PUT with X-Mooncake-TTL expires unless POSTed; a plain PUT never expires."""
    call(srv, "PUT", "/metadata?key=plain", b"p")
    call(srv, "PUT", "/metadata?key=leased", b"l", {TTL_HEADER: "0.6"})
    call(srv, "PUT", "/metadata?key=kept", b"k", {TTL_HEADER: "0.6"})
    for _ in range(8):  # 2 s: three times the TTL
        assert call(srv, "POST", "/metadata?key=kept", b"", {TTL_HEADER: "0.6"})[0] == 200
        time.sleep(0.25)
    assert call(srv, "GET", "/metadata?key=leased")[0] == 404
    assert call(srv, "GET", "/metadata?key=kept") == (200, b"k")
    assert call(srv, "GET", "/metadata?key=plain") == (200, b"p")
    # heartbeat of an unknown key: 404 tells the client to PUT again
    assert call(srv, "POST", "/metadata?key=leased", b"")[0] == 404
    # each PUT sets the lease afresh: a plain PUT (Mooncake's client) makes the key permanent
    call(srv, "PUT", "/metadata?key=kept", b"k2")
    time.sleep(1.5)
    assert call(srv, "GET", "/metadata?key=kept") == (200, b"k2")
    assert srv.table.keys("") == ["kept", "plain"]


def test_server_ttl_flag_expires_plain_puts() -> None:
    with MetadataServer("127.0.0.1", 0, ttl=0.5) as s:
        call(s, "PUT", "/metadata?key=plain", b"p")
        call(s, "PUT", "/metadata?key=long", b"l", {TTL_HEADER: "60"})
        time.sleep(1.5)
        assert call(s, "GET", "/metadata?key=plain")[0] == 404
        assert call(s, "GET", "/metadata?key=long")[0] == 200


def test_stalled_client_does_not_block_others(srv: MetadataServer) -> None:
    stalled = [socket.create_connection(("127.0.0.1", srv.port), 10) for _ in range(20)]
    try:
        for s in stalled:
            s.sendall(b"PUT /metadata?key=slow HTTP/1.1\r\nContent-Le")  # never finished
        assert call(srv, "PUT", "/metadata?key=fast", b"f")[0] == 200
        assert call(srv, "GET", "/metadata?key=fast") == (200, b"f")
    finally:
        for s in stalled:
            s.close()


def test_garbage_request_gets_an_error_not_a_crash(srv: MetadataServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), 10) as s:
        s.sendall(b"\x00\xff garbage \r\n\r\n")
        assert b"400" in s.recv(1000)
    assert call(srv, "GET", "/health")[0] == 200


def test_keep_alive_connection_serves_many_requests(srv: MetadataServer) -> None:
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        for i in range(100):
            c.request("PUT", f"/metadata?key=k{i % 10}", body=b"v%d" % i)
            r = c.getresponse()
            assert r.status == 200
            r.read()
    finally:
        c.close()


def test_invalid_server_arguments() -> None:
    with pytest.raises(ValueError, match="ttl"):
        MetadataServer("127.0.0.1", 0, ttl=-1)
    with pytest.raises(SystemExit):
        main(["--port", "nope"])
    with pytest.raises(SystemExit):
        main(["--ttl", "-3"])


def test_cli_subcommand_registration() -> None:
    import argparse

    p = argparse.ArgumentParser(prog="mooncake")
    sub = p.add_subparsers(dest="cmd")
    add_cli(sub)
    args = p.parse_args(["metadata-server", "--port", "8080", "--ttl", "30"])
    assert (args.port, args.ttl, args.host) == (8080, 30.0, "0.0.0.0")
    assert callable(args.func)


def test_server_process_runs_and_stops_on_sigterm(tmp_path) -> None:  # noqa: ANN001
    """``python -m mooncake.metadata.http_server`` (the console script's ``main``)."""
    port = servers.free_port()
    env = {**os.environ, "PYTHONPATH": str(servers.REPO)}
    p = subprocess.Popen([sys.executable, "-m", "mooncake.metadata.http_server", "--host",
                          "127.0.0.1", "--port", str(port)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=env)
    try:
        assert p.stdout is not None
        assert f"http://127.0.0.1:{port}/metadata".encode() in p.stdout.readline()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("PUT", "/metadata?key=k", body=b"v")
        assert c.getresponse().status == 200
        c.close()
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
    finally:
        p.kill()
        p.wait(10)


def test_port_in_use_is_a_clear_error() -> None:
    with MetadataServer("127.0.0.1", 0) as s:
        r = subprocess.run([sys.executable, "-m", "mooncake.metadata.http_server", "--host",
                            "127.0.0.1", "--port", str(s.port)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(servers.REPO)}, timeout=60)
        assert r.returncode == 1
        assert "cannot listen" in r.stderr


@pytest.mark.parametrize("argv", [["mooncake_http_metadata_server", "--help"],
                                  ["mooncake", "metadata-server", "--help"]])
def test_console_scripts(argv: list[str]) -> None:
    import shutil

    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not on PATH (pip install -e . installs it)")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--ttl" in r.stdout and "--port" in r.stdout
