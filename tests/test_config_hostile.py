"""Configuration against hostile input (issue 8, item 7): MC_TENT_CONF naming things that are not
config files, oversized or deeply nested JSON, and timeouts outside any sane range.

Whatever could hang or eat memory on a broken implementation (a FIFO, /dev/zero) is loaded in a
child process with a memory limit and a timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest

from mooncake.config import TENT_MAX_BYTES, TENT_MAX_DEPTH, ConfigWarning, all_options, load_config
from mooncake.errors import ConfigError
from mooncake.options import DAY

LOADER = r'''
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from mooncake.config import load_config
try:
    load_config(env=json.loads(sys.argv[1]))
    out = {"type": None, "msg": ""}
except BaseException as e:
    out = {"type": type(e).__name__, "msg": str(e)}
print(json.dumps(out), flush=True)
'''


def load_in_child(env: dict[str, str]) -> tuple[str | None, str]:
    """(exception class name or None, message) of ``load_config(env=env)`` in a child."""
    try:
        r = subprocess.run([sys.executable, "-c", LOADER, json.dumps(env)], capture_output=True,
                           text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"load_config({env}) hung") from None
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    return out["type"], out["msg"]


def bad(env: dict[str, str] | None = None, overrides: dict | None = None) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        with pytest.raises(ConfigError) as ei:
            load_config(overrides, env=env or {})
    return str(ei.value)


def quiet(env: dict[str, str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_config(env=env)


# ---- MC_TENT_CONF: only a regular file of bounded size ------------------------------------------


def test_tent_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "conf.fifo"
    os.mkfifo(fifo)
    kind, msg = load_in_child({"MC_TENT_CONF": str(fifo)})
    assert kind == "ConfigError"
    assert "MC_TENT_CONF" in msg and str(fifo) in msg and "FIFO" in msg and "regular file" in msg


def test_tent_dev_zero_is_refused():
    kind, msg = load_in_child({"MC_TENT_CONF": "/dev/zero"})
    assert kind == "ConfigError"  # not MemoryError
    assert "/dev/zero" in msg and "regular file" in msg


def test_tent_directory_is_refused(tmp_path):
    msg = bad({"MC_TENT_CONF": str(tmp_path)})
    assert str(tmp_path) in msg and "directory" in msg and "regular file" in msg


def test_tent_oversized_file_is_refused(tmp_path):
    path = tmp_path / "big.json"
    path.write_text('{"transports": {}}' + " " * TENT_MAX_BYTES)
    kind, msg = load_in_child({"MC_TENT_CONF": str(path)})
    assert kind == "ConfigError"
    assert str(path) in msg and str(TENT_MAX_BYTES) in msg and "1 MiB" in msg


def test_tent_file_at_the_size_limit_is_read(tmp_path):
    path = tmp_path / "full.json"
    head = '{"transports": {"rdma": {"workers": {"block_size": 131072}}}}'
    path.write_text(head + " " * (TENT_MAX_BYTES - len(head)))
    assert os.path.getsize(path) == TENT_MAX_BYTES
    assert quiet({"MC_TENT_CONF": str(path)})["MC_SLICE_SIZE"] == 131072


def test_tent_symlink_to_a_regular_file_is_read(tmp_path):
    real = tmp_path / "real.json"
    real.write_text('{"transports": {"rdma": {"workers": {"block_size": 32768}}}}')
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert quiet({"MC_TENT_CONF": str(link)})["MC_SLICE_SIZE"] == 32768


def test_tent_symlink_to_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "conf.json"
    link.symlink_to(fifo)
    kind, msg = load_in_child({"MC_TENT_CONF": str(link)})
    assert kind == "ConfigError" and "FIFO" in msg


def test_tent_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'{"log_level": "\xff\xfe"}')
    msg = bad({"MC_TENT_CONF": str(path)})
    assert str(path) in msg and "UTF-8" in msg


def test_tent_oversized_inline_is_refused():
    msg = bad({"MC_TENT_CONF": '{"x": "' + "y" * TENT_MAX_BYTES + '"}'})
    assert "MC_TENT_CONF" in msg and str(TENT_MAX_BYTES) in msg


# ---- nesting ---------------------------------------------------------------------------------


def _nested(depth: int, leaf: str = "1") -> str:
    return '{"a": ' * depth + leaf + "}" * depth


@pytest.mark.parametrize("text", [
    "[" * 100000 + "]" * 100000,
    '{"a": ' + "[" * 100000 + "]" * 100000 + "}",
    _nested(TENT_MAX_DEPTH + 1),
    "{" * 100000,  # unbalanced as well
], ids=["arrays", "arrays-in-object", "objects-33", "unbalanced"])
def test_tent_deep_nesting_inline_is_a_config_error(text):
    msg = bad({"MC_TENT_CONF": text})  # never RecursionError
    assert "MC_TENT_CONF" in msg and str(TENT_MAX_DEPTH) in msg and "deep" in msg


def test_tent_deep_nesting_in_a_file_is_a_config_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(_nested(5000))
    msg = bad({"MC_TENT_CONF": str(path)})
    assert str(TENT_MAX_DEPTH) in msg and "deep" in msg


def test_tent_nesting_at_the_limit_is_allowed():
    cfg = quiet({"MC_TENT_CONF": _nested(TENT_MAX_DEPTH)})  # unknown keys: warnings only
    assert cfg.source("MC_SLICE_SIZE") == "default"


def test_tent_brackets_inside_strings_do_not_count():
    text = json.dumps({"log_level": "DEBUG", "comment": "[" * 1000 + "{\\\"" * 100})
    cfg = quiet({"MC_TENT_CONF": text})
    assert cfg["MC_LOG_LEVEL"] == "DEBUG"


def test_tent_unknown_key_flood_warns_a_bounded_number_of_times():
    text = json.dumps({f"key{i}": i for i in range(10000)})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", ConfigWarning)
        cfg = load_config(env={"MC_TENT_CONF": text})
    assert 1 <= len(rec) <= 25 and len(cfg.notes) <= 25
    assert any("more keys" in n for n in cfg.notes)


def test_tent_huge_number_is_a_config_error():
    msg = bad({"MC_TENT_CONF": '{"transports": {"rdma": {"max_timeout_ns": ' + "9" * 5000 + "}}}"})
    assert "MC_TENT_CONF" in msg


# ---- every duration is bounded -------------------------------------------------------------

_PER_SECOND = {"s": 1, "ms": 10**3, "µs": 10**6, "ns": 10**9}
OPTIONS = all_options()
TIMED = [o for o in OPTIONS if o.unit in _PER_SECOND]
FLOATS = [o for o in OPTIONS if o.type is float]


def test_the_timed_options_are_all_found():
    names = {o.name for o in TIMED}
    assert {"MC_TRANSFER_TIMEOUT", "MC_SLICE_TIMEOUT", "MC_HANDSHAKE_CONNECT_TIMEOUT",
            "MC_METADATA_TTL", "MC_TE_METADATA_REFRESH_INTERVAL_SECONDS",
            "MC_TE_METRIC_INTERVAL_SECONDS", "MC_CONN_PAUSE_TTL_MS", "MC_TCP_SPIN_US",
            "MC_RDMA_RAIL_PAUSE_SECONDS", "transports/rdma/workers/grace_period_ns",
            "transports/rdma/max_timeout_ns"} <= names
    assert {o.name for o in FLOATS} <= names  # every float knob is a duration


@pytest.mark.parametrize("opt", TIMED, ids=[o.name for o in TIMED])
def test_every_duration_has_a_sane_range(opt):
    assert opt.range is not None, opt.name
    lo, hi = opt.range
    assert lo is not None and lo >= 0, opt.name
    assert hi is not None and hi <= DAY * _PER_SECOND[opt.unit], opt.name


def _key(opt) -> tuple[str, bool]:
    """How to set ``opt``: (env name, True) or (TENT path, False)."""
    return (opt.env[0], True) if opt.env else (opt.tent, False)


def _set(opt, raw):
    key, is_env = _key(opt)
    if is_env:
        return {key: raw}
    node: object = raw
    for part in reversed(key.split("/")):
        node = {part: node}
    return {"MC_TENT_CONF": json.dumps(node)}


@pytest.mark.parametrize("opt", TIMED, ids=[o.name for o in TIMED])
def test_every_duration_refuses_more_than_a_day(opt):
    too_long = DAY * _PER_SECOND[opt.unit] + 1
    msg = bad(_set(opt, str(too_long) if opt.env else too_long))
    assert opt.name in msg and str(too_long) in msg and "too large" in msg


def test_transfer_timeout_1e12_is_a_config_error():
    msg = bad({"MC_TRANSFER_TIMEOUT": "1e12"})
    assert "MC_TRANSFER_TIMEOUT" in msg and "1e12" in msg and "86400" in msg and "> 0" in msg


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
@pytest.mark.parametrize("opt", FLOATS, ids=[o.name for o in FLOATS])
def test_float_options_refuse_non_finite(opt, value):
    msg = bad({opt.env[0]: value})
    assert opt.env[0] in msg and value in msg and "finite" in msg
    assert f"<= {opt.range[1]}" in msg  # the allowed range


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400, 1e300])
def test_non_finite_and_huge_arguments_are_config_errors(value):
    msg = bad(overrides={"transfer_timeout": value})
    assert "MC_TRANSFER_TIMEOUT" in msg and "86400" in msg


def test_float_bounds_are_inclusive_and_shown():
    assert quiet({"MC_TRANSFER_TIMEOUT": "86400"})["MC_TRANSFER_TIMEOUT"] == 86400.0
    assert quiet({"MC_METADATA_TTL": "0"})["MC_METADATA_TTL"] == 0.0
    msg = bad({"MC_METADATA_TTL": "86400.5"})
    assert ">= 0 and <= 86400 s" in msg
