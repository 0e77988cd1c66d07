"""Connection strings, key layout and descriptor validation (no server needed)."""

from __future__ import annotations

import copy

import pytest
from servers import descriptor

from mooncake.errors import ConfigError, SegmentNotFound
from mooncake.metadata.base import (
    DescriptorError,
    MetadataContext,
    MetadataStore,
    decode_descriptor,
    parse_metadata_server,
    validate_descriptor,
)


@pytest.mark.parametrize("conn, expect", [
    ("P2PHANDSHAKE", ("p2p", "")),
    ("p2p", ("p2p", "")),
    ("", ("p2p", "")),
    ("http://10.0.0.1:8080/metadata", ("http", "http://10.0.0.1:8080/metadata")),
    ("https://meta.example:443/metadata", ("http", "https://meta.example:443/metadata")),
    ("etcd://10.0.0.1:2379", ("etcd", "10.0.0.1:2379")),
    ("10.0.0.1:2379", ("etcd", "10.0.0.1:2379")),
    ("redis://10.0.0.1:6379", ("redis", "redis://10.0.0.1:6379")),
    ("rediss://u:p@h:6380/3", ("redis", "rediss://u:p@h:6380/3")),
])
def test_parse_connection_strings(conn: str, expect: tuple[str, str]) -> None:
    assert parse_metadata_server(conn) == expect


@pytest.mark.parametrize("conn", ["zookeeper://h:1", "ftp://x", "justahost", "h:port"])
def test_unknown_scheme_is_config_error(conn: str) -> None:
    with pytest.raises(ConfigError, match="metadata_server") as ei:
        parse_metadata_server(conn)
    assert "allowed" in str(ei.value) or "neither" in str(ei.value)


def _store(**cfg: object) -> MetadataStore:
    return MetadataStore("", MetadataContext(config=dict(cfg), rpc_call=None))


def test_key_layout() -> None:
    assert _store().key("10.0.0.1:1234") == "mooncake/ram/10.0.0.1:1234"
    assert _store(MC_METADATA_CLUSTER_ID="c7").key("h:1") == "mooncake/c7/ram/h:1"


def test_option_falls_back_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MC_METADATA_CLUSTER_ID", "fromenv")
    assert _store().key("h:1") == "mooncake/fromenv/ram/h:1"
    assert _store(MC_METADATA_CLUSTER_ID="cfg").key("h:1") == "mooncake/cfg/ram/h:1"


def test_valid_descriptor_passes_unchanged() -> None:
    d = descriptor("h:1", n=5)
    d["extra"] = {"future": True}  # unknown fields are allowed
    d["buffers"][0]["shm_name"] = "/mc-1"
    d["buffers"][1]["transports"] = {"tcp": {}}
    assert validate_descriptor("h:1", copy.deepcopy(d)) == d
    assert validate_descriptor("h:1", {**d, "buffers": []})["buffers"] == []


def _mut(path: str, value: object):  # noqa: ANN202
    def f(d: dict) -> None:
        *head, last = path.split(".")
        obj = d
        for p in head:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        if value is KeyError:
            del obj[int(last) if last.isdigit() else last]
        else:
            obj[int(last) if last.isdigit() else last] = value
    return f


@pytest.mark.parametrize("mutate, match", [
    (_mut("name", KeyError), "missing field 'name'"),
    (_mut("host_id", KeyError), "missing field 'host_id'"),
    (_mut("pid", KeyError), "missing field 'pid'"),
    (_mut("timestamp", KeyError), "missing field 'timestamp'"),
    (_mut("transports", KeyError), "missing field 'transports'"),
    (_mut("buffers", KeyError), "missing field 'buffers'"),
    (_mut("name", "other:2"), "describes segment 'other:2'"),
    (_mut("pid", "12"), "'pid' must be an integer"),
    (_mut("pid", True), "'pid' must be an integer"),
    (_mut("pid", -4), "negative"),
    (_mut("buffers", {}), "'buffers' must be a list"),
    (_mut("transports", []), "'transports' must be an object"),
    (_mut("transports.tcp", 5), r"transports\['tcp'\] must be an object"),
    (_mut("buffers.0", 7), r"buffers\[0\] must be an object"),
    (_mut("buffers.1.addr", KeyError), r"buffers\[1\] missing field 'addr'"),
    (_mut("buffers.0.length", KeyError), r"buffers\[0\] missing field 'length'"),
    (_mut("buffers.0.location", KeyError), r"missing field 'location'"),
    (_mut("buffers.0.addr", -1), r"buffers\[0\].addr -1 is not an address"),
    (_mut("buffers.0.addr", 1 << 64), "not an address"),
    (_mut("buffers.0.addr", 1.5), "not an address"),
    (_mut("buffers.0.addr", "0x1000"), "not an address"),
    (_mut("buffers.0.length", 0), "positive integer"),
    (_mut("buffers.0.length", -8), "positive integer"),
    (_mut("buffers.0.addr", (1 << 64) - 16), "end of the 64-bit address space"),
    (_mut("buffers.0.location", 0), "location must be a string"),
    (_mut("buffers.0.shm_name", 3), "shm_name must be a string"),
    (_mut("buffers.0.transports", "tcp"), r"buffers\[0\].transports must be an object"),
    (_mut("buffers.1.addr", 0x10000 + 100), r"buffers\[0\] and buffers\[1\] overlap"),
])
def test_malformed_descriptor(mutate, match: str) -> None:  # noqa: ANN001
    d = descriptor("seg-7:99", n=2)
    mutate(d)
    with pytest.raises(DescriptorError, match=match) as ei:
        validate_descriptor("seg-7:99", d)
    assert "segment 'seg-7:99'" in str(ei.value)
    assert isinstance(ei.value, SegmentNotFound)


@pytest.mark.parametrize("obj", [None, [], "x", 3])
def test_non_object_descriptor(obj: object) -> None:
    with pytest.raises(DescriptorError, match="expected a JSON object"):
        validate_descriptor("s:1", obj)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", "nul\x00l"])
def test_decode_rejects_bad_json(raw: bytes | str) -> None:
    with pytest.raises(DescriptorError, match="segment 's:1'.*not JSON"):
        decode_descriptor("s:1", raw)
