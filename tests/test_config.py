"""mooncake.config: the option table, precedence, parsing, warnings and ``show()``."""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path

import pytest

from mooncake.config import OPTIONS, Config, ConfigWarning, load_config, show
from mooncake.errors import ConfigError
from mooncake.options import OWNERS, GiB, MiB
from mooncake.registry import transport_names

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "000_34b6f3e8dd72c2ae.txt"


def quiet(overrides=None, env=None) -> Config:
    """load_config that fails the test on any ConfigWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        return load_config(overrides, env={} if env is None else env)


def bad(env=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(overrides, env={} if env is None else env)
    return str(exc.value)


# ---- the table -----------------------------------------------------------------------------------


def test_table_is_consistent():
    names = [o.name for o in OPTIONS]
    envs = [e for o in OPTIONS for e in o.env]
    tents = [o.tent for o in OPTIONS if o.tent]
    assert len(set(names)) == len(names)
    assert len(set(envs)) == len(envs)
    assert len(set(tents)) == len(tents)
    for o in OPTIONS:
        # the framework's rows name their layer, a transport's rows the transport
        assert o.owner in OWNERS or o.owner in transport_names(), o.name
        assert o.doc, o.name
        if "/" in o.name:  # TENT-only row: keyed by its JSON path
            assert o.tent == o.name and o.env == ()
        else:
            assert o.env[0] == o.name
        assert set(o.deprecated) <= set(o.env)


@pytest.mark.parametrize("opt", [o for o in OPTIONS if o.default is not None], ids=lambda o: o.name)
def test_every_default_is_allowed(opt):
    """A default passed back in as an argument parses to itself."""
    cfg = load_config({opt.name: opt.default}, env={})
    assert cfg[opt.name] == opt.default and cfg.source(opt.name) == "argument"


def test_defaults():
    cfg = quiet()
    assert len(cfg) == len(OPTIONS) and list(cfg) == [o.name for o in OPTIONS]
    for o in OPTIONS:
        assert cfg[o.name] == o.default and cfg.source(o.name) == "default", o.name
    assert cfg["MC_SLICE_SIZE"] == 65536
    assert cfg["MC_FRAGMENT_RATIO"] == 4
    assert cfg["MC_WORKERS_PER_CTX"] == 2
    assert cfg["MC_RETRY_CNT"] == 9
    assert cfg["MC_TRANSFER_TIMEOUT"] == 30.0
    assert (cfg["MC_MIN_RPC_PORT"], cfg["MC_MAX_RPC_PORT"]) == (15000, 17000)
    assert cfg["MC_TCP_SLICE_SIZE"] == MiB and cfg["MC_TCP_LANES_PER_PEER"] == 4
    assert cfg["MC_HANDSHAKE_MAX_LENGTH"] == MiB
    assert cfg["MC_GID_INDEX"] == -1 and cfg["MC_MTU"] == 4096
    assert cfg["MC_ENDPOINT_STORE_TYPE"] == "SIEVE" and cfg["MC_LOG_LEVEL"] == "INFO"
    assert cfg["MC_FORCE_TCP"] is False and cfg["MC_DISABLE_METACACHE"] is False
    assert cfg["MC_METADATA_CLUSTER_ID"] == "" and cfg["MC_CXL_DEV_SIZE"] is None
    assert cfg["MC_STORE_HUGEPAGE_SIZE"] == 2 * MiB
    assert cfg["transports/shm/enable"] is True
    assert cfg["transports/shm/async_memcpy_threshold"] == 64  # KiB, TENT's unit
    for t in ("tcp", "shm", "rdma", "cxl"):
        assert cfg[f"transports/{t}/enable"] is True
    assert cfg.notes == []


# ---- layers and precedence -----------------------------------------------------------------------


def test_env_overrides_default():
    cfg = quiet(env={"MC_SLICE_SIZE": "131072", "MC_TRANSFER_TIMEOUT": "2.5",
                     "MC_TE_FILTERS": "mlx5_0, mlx5_1", "MC_LOG_LEVEL": "warning",
                     "MC_ENDPOINT_STORE_TYPE": "fifo", "MC_METADATA_CLUSTER_ID": "c1"})
    assert cfg["MC_SLICE_SIZE"] == 131072 and cfg.source("MC_SLICE_SIZE") == "env:MC_SLICE_SIZE"
    assert cfg["MC_TRANSFER_TIMEOUT"] == 2.5  # as given: no max(5, v)
    assert cfg["MC_TE_FILTERS"] == ("mlx5_0", "mlx5_1")
    assert cfg["MC_LOG_LEVEL"] == "WARNING" and cfg["MC_ENDPOINT_STORE_TYPE"] == "FIFO"
    assert cfg["MC_METADATA_CLUSTER_ID"] == "c1"
    assert cfg.source("MC_MTU") == "default"


def test_empty_env_value_counts_as_unset():
    cfg = quiet(env={"MC_SLICE_SIZE": "", "MC_FORCE_TCP": "  "})
    assert cfg["MC_SLICE_SIZE"] == 65536 and cfg.source("MC_SLICE_SIZE") == "default"
    assert cfg["MC_FORCE_TCP"] is False


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("MC_SLICE_SIZE", "32768")
    cfg = load_config()
    assert cfg["MC_SLICE_SIZE"] == 32768 and cfg.source("MC_SLICE_SIZE") == "env:MC_SLICE_SIZE"


TENT = {
    "log_level": "warning",
    "transports": {
        "rdma": {"workers": {"block_size": 262144, "grace_period_ns": 1000},
                 "endpoint": {"max_qp_wr": 512}},
        "shm": {"enable": False, "async_memcpy_threshold": 4},  # KiB
    },
    "topology/cluster_topology_path": "/opt/cluster-topology.json",  # flat keys work too
}


def _check_tent(cfg: Config, source: str) -> None:
    assert cfg["MC_SLICE_SIZE"] == 262144 and cfg.source("MC_SLICE_SIZE") == source
    assert cfg["transports/rdma/workers/block_size"] == 262144
    assert cfg["MC_MAX_WR"] == 512 and cfg.source("transports/rdma/endpoint/max_qp_wr") == source
    assert cfg["MC_LOG_LEVEL"] == "WARNING"
    assert cfg["transports/rdma/workers/grace_period_ns"] == 1000
    assert cfg["transports/shm/enable"] is False
    assert cfg["transports/shm/async_memcpy_threshold"] == 4
    assert cfg["topology/cluster_topology_path"] == "/opt/cluster-topology.json"
    assert cfg.source("MC_MTU") == "default"


def test_tent_file(tmp_path):
    path = tmp_path / "tent.json"
    path.write_text(json.dumps(TENT))
    _check_tent(quiet(env={"MC_TENT_CONF": str(path)}), f"tent:{path}")


def test_tent_inline():
    cfg = quiet(env={"MC_TENT_CONF": json.dumps(TENT)})
    _check_tent(cfg, "tent:inline")
    assert cfg.source("MC_TENT_CONF") == "env:MC_TENT_CONF"


def test_tent_conf_as_argument(tmp_path):
    path = tmp_path / "tent.json"
    path.write_text(json.dumps(TENT))
    cfg = quiet({"tent_conf": path})  # os.PathLike accepted
    _check_tent(cfg, f"tent:{path}")
    assert cfg.source("MC_TENT_CONF") == "argument"


@pytest.mark.parametrize("tent", [False, True])
@pytest.mark.parametrize("env", [False, True])
@pytest.mark.parametrize("arg", [False, True])
def test_precedence(tent, env, arg):
    e = {"MC_TENT_CONF": '{"transports/rdma/workers/block_size": 1024}'} if tent else {}
    if env:
        e["MC_SLICE_SIZE"] = "2048"
    cfg = quiet({"slice_size": 4096} if arg else None, env=e)
    want = (4096, "argument") if arg else (2048, "env:MC_SLICE_SIZE") if env else \
        (1024, "tent:inline") if tent else (65536, "default")
    assert (cfg["MC_SLICE_SIZE"], cfg.source("MC_SLICE_SIZE")) == want


# ---- aliases and override keys -------------------------------------------------------------------


def test_rpc_port_aliases():
    cfg = quiet(env={"MC_MIN_PRC_PORT": "16000", "MC_MAX_PRC_PORT": "16100"})
    assert (cfg["MC_MIN_RPC_PORT"], cfg["MC_MAX_RPC_PORT"]) == (16000, 16100)
    assert cfg.source("MC_MIN_RPC_PORT") == "env:MC_MIN_PRC_PORT"
    assert cfg["MC_MIN_PRC_PORT"] == 16000
    assert cfg.option("MC_MIN_PRC_PORT").name == "MC_MIN_RPC_PORT"
    assert cfg.option("MC_MIN_RPC_PORT").env == ("MC_MIN_RPC_PORT", "MC_MIN_PRC_PORT")


def test_primary_name_beats_alias():
    with pytest.warns(ConfigWarning, match="MC_MIN_PRC_PORT"):
        cfg = load_config(env={"MC_MIN_RPC_PORT": "15500", "MC_MIN_PRC_PORT": "16000"})
    assert cfg["MC_MIN_RPC_PORT"] == 15500
    assert cfg.source("MC_MIN_RPC_PORT") == "env:MC_MIN_RPC_PORT"


def test_deprecated_lanes_alias():
    with pytest.warns(ConfigWarning, match="deprecated; use MC_TCP_LANES_PER_PEER"):
        cfg = load_config(env={"MC_TCP_MAX_CONNECTIONS_PER_PEER": "8"})
    assert cfg["MC_TCP_LANES_PER_PEER"] == 8
    assert cfg.source("MC_TCP_LANES_PER_PEER") == "env:MC_TCP_MAX_CONNECTIONS_PER_PEER"


def test_gid_index_nccl_fallback():
    assert quiet(env={"NCCL_IB_GID_INDEX": "3"})["MC_GID_INDEX"] == 3
    with pytest.warns(ConfigWarning, match="NCCL_IB_GID_INDEX"):
        assert load_config(env={"NCCL_IB_GID_INDEX": "3", "MC_GID_INDEX": "1"})["MC_GID_INDEX"] == 1


@pytest.mark.parametrize("key", ["MC_SLICE_SIZE", "slice_size", "SLICE_SIZE", "mc_slice_size",
                                 "transports/rdma/workers/block_size"])
def test_override_key_spellings(key):
    cfg = quiet({key: 131072})
    assert cfg["MC_SLICE_SIZE"] == 131072 and cfg.source("slice_size") == "argument"


def test_override_short_names_and_tent_only_rows():
    cfg = quiet({"min_prc_port": 16000, "grace_period_ns": 2000, "transports/shm/enable": "off",
                 "log_level": "debug", "force_tcp": True})
    assert cfg["MC_MIN_RPC_PORT"] == 16000
    assert cfg["transports/rdma/workers/grace_period_ns"] == 2000
    assert cfg["transports/shm/enable"] is False
    assert cfg["MC_LOG_LEVEL"] == "DEBUG" and cfg["MC_FORCE_TCP"] is True


def test_override_none_means_not_given():
    cfg = quiet({"slice_size": None}, env={"MC_SLICE_SIZE": "8192"})
    assert cfg["MC_SLICE_SIZE"] == 8192 and cfg.source("MC_SLICE_SIZE") == "env:MC_SLICE_SIZE"


def test_unknown_override_key_lists_close_matches():
    msg = bad(overrides={"slice_sise": 1})
    assert "slice_sise" in msg and "slice_size" in msg


def test_conflicting_override_keys():
    msg = bad(overrides={"slice_size": 4096, "MC_SLICE_SIZE": 8192})
    assert "MC_SLICE_SIZE" in msg and "4096" in msg and "8192" in msg


def test_mapping_lookups():
    cfg = quiet()
    assert "MC_SLICE_SIZE" in cfg and "MC_MAX_PRC_PORT" in cfg and "transports/shm/enable" in cfg
    assert "MC_NOPE" not in cfg and cfg.get("MC_NOPE", 7) == 7
    with pytest.raises(KeyError, match="MC_SLICE_SIZE"):
        cfg["MC_SLICE_SIZ"]
    assert cfg.option("transports/rdma/endpoint/qp_mul_factor").name == "MC_NUM_QP_PER_EP"
    assert dict(cfg)["MC_SLICE_SIZE"] == 65536


# ---- parsing -------------------------------------------------------------------------------------

TRUE = ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " on "]
FALSE = ["0", "false", "FALSE", "no", "No", "off", "OFF"]


@pytest.mark.parametrize("text", TRUE + FALSE)
def test_booleans(text):
    cfg = quiet(env={"MC_FORCE_TCP": text, "MC_DISABLE_METACACHE": text})
    assert cfg["MC_FORCE_TCP"] is (text in TRUE)
    assert cfg["MC_DISABLE_METACACHE"] is (text in TRUE)


def test_zero_is_false_not_presence():
    cfg = quiet(env={"MC_FORCE_TCP": "0", "MC_TE_METRIC": "0", "MC_PATH_ROUNDROBIN": "0"})
    assert cfg["MC_FORCE_TCP"] is False and cfg["MC_TE_METRIC"] is False
    assert cfg["MC_PATH_ROUNDROBIN"] is False


@pytest.mark.parametrize("text", ["2", "enabled", "y", "nope", "-1"])
def test_boolean_garbage(text):
    msg = bad({"MC_FORCE_TCP": text})
    assert "MC_FORCE_TCP" in msg and repr(text) in msg and "true/false/yes/no/on/off" in msg


def test_tent_json_booleans_and_numbers():
    cfg = quiet(env={"MC_TENT_CONF": '{"transports": {"tcp": {"enable": 0}, '
                                     '"rdma": {"workers": {"block_size": 131072.0}}}}'})
    assert cfg["transports/tcp/enable"] is False and cfg["MC_SLICE_SIZE"] == 131072
    assert "block_size" in bad({"MC_TENT_CONF": '{"transports/rdma/workers/block_size": true}'})


@pytest.mark.parametrize("text,want", [
    ("131072", 131072), ("128K", 131072), ("128k", 131072), ("128KB", 131072),
    ("128KiB", 131072), ("1M", MiB), ("1.5M", 3 * MiB // 2), ("0x20000", 131072), ("1G", GiB),
])
def test_sizes(text, want):
    cfg = quiet(env={"MC_SLICE_SIZE": text})
    assert cfg["MC_SLICE_SIZE"] == want


def test_store_hugepage_size_normalised_to_bytes():
    assert quiet(env={"MC_STORE_HUGEPAGE_SIZE": "2MB"})["MC_STORE_HUGEPAGE_SIZE"] == 2 * MiB
    assert quiet(env={"MC_STORE_HUGEPAGE_SIZE": "1GB"})["MC_STORE_HUGEPAGE_SIZE"] == GiB
    assert quiet(env={"MC_STORE_HUGEPAGE_SIZE": "2097152"})["MC_STORE_HUGEPAGE_SIZE"] == 2 * MiB


def test_cxl_dev_size_suffix():
    cfg = quiet(env={"MC_CXL_DEV_PATH": "/dev/dax0.0", "MC_CXL_DEV_SIZE": "64G"})
    assert cfg["MC_CXL_DEV_SIZE"] == 64 * GiB and cfg["MC_CXL_DEV_PATH"] == "/dev/dax0.0"


def test_store_memcpy_tristate():
    assert quiet()["MC_STORE_MEMCPY"] == "auto"
    assert quiet(env={"MC_STORE_MEMCPY": "0"})["MC_STORE_MEMCPY"] is False
    assert quiet(env={"MC_STORE_MEMCPY": "AUTO"})["MC_STORE_MEMCPY"] == "auto"


def test_special_values():
    assert quiet(env={"MC_GID_INDEX": "-1"})["MC_GID_INDEX"] == -1
    assert quiet(env={"MC_GID_INDEX": "255"})["MC_GID_INDEX"] == 255
    assert quiet(env={"MC_SLICE_TIMEOUT": "-1"})["MC_SLICE_TIMEOUT"] == -1
    assert quiet(env={"MC_SLICE_TIMEOUT": "0.25"})["MC_SLICE_TIMEOUT"] == 0.25
    assert quiet(env={"MC_IB_PCI_RELAXED_ORDERING": "2"})["MC_IB_PCI_RELAXED_ORDERING"] == 2


# (variable, bad value, a piece of the allowed range that the message must show)
BAD = [
    ("MC_SLICE_SIZE", "0", "1073741824"),
    ("MC_SLICE_SIZE", "2G", "1073741824"),
    ("MC_SLICE_SIZE", "64 kilobytes", "1073741824"),
    ("MC_TCP_SLICE_SIZE", "1024", "4096 (4 KiB)..268435456 (256 MiB)"),
    ("MC_FRAGMENT_RATIO", "0", ">= 1"),
    ("MC_WORKERS_PER_CTX", "1.5", "1..64"),
    ("MC_WORKERS_PER_CTX", "0", "1..64"),
    ("MC_RETRY_CNT", "128", "1..127"),
    ("MC_TRANSFER_TIMEOUT", "0", "> 0"),
    ("MC_TRANSFER_TIMEOUT", "-3", "> 0"),
    ("MC_TRANSFER_TIMEOUT", "nan", "> 0"),
    ("MC_TRANSFER_TIMEOUT", "soon", "> 0"),
    ("MC_SLICE_TIMEOUT", "0", "-1 (off)"),
    ("MC_MIN_RPC_PORT", "80", "1024..65535"),
    ("MC_MAX_PRC_PORT", "70000", "1024..65535"),
    ("MC_TCP_LANES_PER_PEER", "17", "1..16"),
    ("MC_TCP_LANES_PER_PEER", "0", "1..16"),
    ("MC_HANDSHAKE_MAX_LENGTH", "200M", "134217728"),
    ("MC_HANDSHAKE_CONNECT_TIMEOUT", "0", "> 0"),
    ("MC_REDIS_DB_INDEX", "256", "0..255"),
    ("MC_NUM_QP_PER_EP", "0", "1..255"),
    ("MC_MAX_WR", "65536", "1..65535"),
    ("MC_MTU", "1000", "512, 1024, 2048, 4096"),
    ("MC_GID_INDEX", "256", "0..255"),
    ("MC_GID_INDEX", "-2", "-1 (auto)"),
    ("MC_IB_TC", "300", "0..255"),
    ("MC_IB_PCI_RELAXED_ORDERING", "3", "0, 1, 2"),
    ("MC_ENABLE_PARALLEL_REG_MR", "2", "-1, 0, 1"),
    ("MC_ENDPOINT_STORE_TYPE", "LRU", "SIEVE, FIFO"),
    ("MC_LOG_LEVEL", "VERBOSE", "TRACE, DEBUG, INFO, WARNING, ERROR"),
    ("MC_STORE_HUGEPAGE_SIZE", "4MB", "2097152"),
    ("MC_STORE_USE_HUGEPAGE", "sometimes", "true/false"),
    ("MC_STORE_MEMCPY", "maybe", "auto"),
    ("MC_CXL_DEV_SIZE", "1.3K", "K/M/G/T"),
    ("MC_CXL_DEV_SIZE", "0", ">= 1"),
    ("MC_TE_METRIC_INTERVAL_SECONDS", "0", "> 0"),
    ("MC_METADATA_TTL", "-1", ">= 0"),
]


@pytest.mark.parametrize("var,value,allowed", BAD, ids=[f"{v}={x}" for v, x, _ in BAD])
def test_bad_env_value(var, value, allowed):
    msg = bad({var: value})
    assert var in msg and value in msg and allowed in msg


def test_bad_tent_value_names_the_key():
    msg = bad({"MC_TENT_CONF": '{"transports": {"rdma": {"endpoint": {"path_mtu": 9000}}}}'})
    assert "MC_TENT_CONF" in msg and "transports/rdma/endpoint/path_mtu" in msg
    assert "MC_MTU" in msg and "9000" in msg and "512, 1024, 2048, 4096" in msg


def test_bad_argument_names_the_key():
    msg = bad(overrides={"slice_size": -5})
    assert "slice_size" in msg and "MC_SLICE_SIZE" in msg and "-5" in msg and "1073741824" in msg
    assert "MC_SLICE_SIZE" in bad(overrides={"slice_size": True})  # a bool is not a number


def test_rpc_port_order():
    msg = bad({"MC_MIN_RPC_PORT": "17001", "MC_MAX_RPC_PORT": "17000"})
    assert "MC_MIN_RPC_PORT=17001" in msg and "MC_MAX_RPC_PORT=17000" in msg and "<=" in msg
    assert quiet(env={"MC_MIN_RPC_PORT": "17000", "MC_MAX_RPC_PORT": "17000"})


def test_fragment_ratio_below_slice_size():
    msg = bad({"MC_SLICE_SIZE": "4096", "MC_FRAGMENT_RATIO": "4096"})
    assert "MC_FRAGMENT_RATIO=4096" in msg and "MC_SLICE_SIZE=4096" in msg and "1..4095" in msg
    assert quiet(env={"MC_SLICE_SIZE": "4096", "MC_FRAGMENT_RATIO": "4095"})


# ---- TENT errors and warnings --------------------------------------------------------------------


def test_tent_malformed_json():
    msg = bad({"MC_TENT_CONF": '{"transports": '})
    assert "MC_TENT_CONF" in msg and "malformed JSON" in msg


def test_tent_malformed_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    msg = bad({"MC_TENT_CONF": str(path)})
    assert "MC_TENT_CONF" in msg and str(path) in msg and "malformed JSON" in msg


def test_tent_missing_file(tmp_path):
    path = tmp_path / "missing.json"
    msg = bad({"MC_TENT_CONF": str(path)})
    assert "MC_TENT_CONF" in msg and str(path) in msg and "No such file" in msg


def test_tent_top_level_must_be_object():
    assert "JSON object" in bad({"MC_TENT_CONF": "[1, 2]"})


def test_tent_unknown_key_warns_with_close_match():
    conf = '{"transports": {"rdma": {"workers": {"blok_size": 4096}}}}'
    with pytest.warns(ConfigWarning, match="transports/rdma/workers/block_size") as rec:
        cfg = load_config(env={"MC_TENT_CONF": conf})
    assert "blok_size" in str(rec[0].message)
    assert cfg["MC_SLICE_SIZE"] == 65536  # ignored, not an error
    assert any("blok_size" in n for n in cfg.notes)


# ---- typo warnings and notes ---------------------------------------------------------------------


def test_env_typo_warns_with_suggestion(caplog):
    with caplog.at_level(logging.WARNING, logger="mooncake.config"):
        with pytest.warns(ConfigWarning, match="MC_SLICE_SIZ.*did you mean MC_SLICE_SIZE"):
            cfg = load_config(env={"MC_SLICE_SIZ": "131072"})
    assert cfg["MC_SLICE_SIZE"] == 65536
    assert "MC_SLICE_SIZE" in caplog.text
    assert any("MC_SLICE_SIZ" in n for n in cfg.notes)


def test_unrelated_or_known_unused_variables_are_quiet():
    cfg = quiet(env={"MC_SOMETHING_ELSE_ENTIRELY": "1", "MC_TCP_ENABLE_CONNECTION_POOL": "1",
                     "MC_USE_TENT": "1", "PATH": "/bin"})
    assert cfg.notes == []


def test_lane_consistency_note():
    conf = {"transports": {"rdma": {"workers": {"num_workers": 8}, "device": {"num_cq_list": 8},
                                    "endpoint": {"qp_mul_factor": 6}}}}
    with pytest.warns(ConfigWarning, match="inconsistent RDMA lanes"):
        cfg = load_config(env={"MC_TENT_CONF": json.dumps(conf)})
    assert any("qp_mul_factor=6" in n for n in cfg.notes)
    conf["transports"]["rdma"]["endpoint"]["qp_mul_factor"] = 8
    assert quiet(env={"MC_TENT_CONF": json.dumps(conf)}).notes == []
    assert quiet({"transports/rdma/num_lanes": 6})["transports/rdma/num_lanes"] == 6
    # num_lanes with a legacy knob that disagrees: refused, as TENT refuses the install
    with pytest.raises(ConfigError, match=r"num_lanes=6 .*MC_WORKERS_PER_CTX|num_workers=4"):
        load_config({"num_lanes": 6, "workers_per_ctx": 4}, env={})
    assert quiet({"num_lanes": 6, "workers_per_ctx": 6})["MC_WORKERS_PER_CTX"] == 6


def test_cq_depth_note():
    with pytest.warns(ConfigWarning, match="MC_MAX_CQE_PER_CTX"):
        cfg = load_config(env={"MC_MAX_WR": "4096", "MC_NUM_QP_PER_EP": "2"})
    assert any("8192" in n for n in cfg.notes)
    assert quiet(env={"MC_MAX_WR": "4096", "MC_MAX_CQE_PER_CTX": "8192"}).notes == []


def test_clamp():
    cfg = quiet({"max_wr": 1024})
    with pytest.warns(ConfigWarning, match=re.escape("MC_MAX_WR=1024 clamped to 512")):
        assert cfg.clamp("MC_MAX_WR", 512, "device max_qp_wr") == 512
    assert cfg["MC_MAX_WR"] == 512
    assert "MC_MAX_WR=1024 clamped to 512 (device max_qp_wr)" in cfg.notes
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        assert cfg.clamp("MC_MAX_WR", 4096, "device max_qp_wr") == 512  # under the limit: no-op
    assert len(cfg.notes) == 1


def test_with_overrides_returns_a_new_config():
    base = quiet({"slice_size": 131072}, env={"MC_RETRY_CNT": "3"})
    with pytest.warns(ConfigWarning):
        base.clamp("MC_MAX_WR", 128, "device max_qp_wr")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # nothing new to say
        new = base.with_overrides({"MC_MTU": 1024})
    assert new is not base and isinstance(new, Config)
    assert new["MC_MTU"] == 1024 and new.source("MC_MTU") == "argument"
    assert base["MC_MTU"] == 4096 and base.source("MC_MTU") == "default"
    assert new["MC_SLICE_SIZE"] == 131072 and new.source("MC_SLICE_SIZE") == "argument"
    assert new["MC_RETRY_CNT"] == 3 and new.source("MC_RETRY_CNT") == "env:MC_RETRY_CNT"
    assert new["MC_MAX_WR"] == 128  # device clamps carry over
    assert base.with_overrides({"slice_size": 4096})["MC_SLICE_SIZE"] == 4096
    with pytest.raises(ConfigError):
        base.with_overrides({"mtu": 1000})


# ---- show ----------------------------------------------------------------------------------------


def test_show_text(monkeypatch):
    monkeypatch.setenv("MC_SLICE_SIZE", "128K")
    monkeypatch.setenv("MC_REDIS_PASSWORD", "hunter2")
    text = show(overrides={"mtu": 1024})
    lines = {line.split()[0]: line for line in text.splitlines() if line and line[0] != "#"}
    for o in OPTIONS:
        assert o.name in lines, o.name
        assert len(lines[o.name].split()) >= 3, lines[o.name]
    assert re.search(r"^MC_SLICE_SIZE\s+131072 \(128 KiB\)\s+env:MC_SLICE_SIZE$", text, re.M)
    assert re.search(r"^MC_MTU\s+1024\s+argument$", text, re.M)
    assert re.search(r"^MC_RETRY_CNT\s+9\s+default$", text, re.M)
    assert "hunter2" not in text and "***" in text


def test_show_json(monkeypatch):
    monkeypatch.setenv("MC_FORCE_TCP", "yes")
    monkeypatch.setenv("MC_REDIS_PASSWORD", "hunter2")
    monkeypatch.setenv("MC_SLICE_SIZ", "1")
    with pytest.warns(ConfigWarning):
        doc = json.loads(show(as_json=True, overrides={"slice_size": 4096}))
    assert list(doc["options"]) == [o.name for o in OPTIONS]
    for name, row in doc["options"].items():
        assert {"value", "source", "default", "allowed", "env", "tent", "unit"} <= set(row), name
    assert doc["options"]["MC_FORCE_TCP"]["value"] is True
    assert doc["options"]["MC_FORCE_TCP"]["source"] == "env:MC_FORCE_TCP"
    assert doc["options"]["MC_SLICE_SIZE"]["value"] == 4096
    assert doc["options"]["MC_SLICE_SIZE"]["source"] == "argument"
    assert doc["options"]["MC_SLICE_SIZE"]["tent"] == "transports/rdma/workers/block_size"
    assert doc["options"]["MC_TE_FILTERS"]["value"] == []
    assert doc["options"]["MC_REDIS_PASSWORD"]["value"] == "***"
    assert "hunter2" not in json.dumps(doc)
    assert any("MC_SLICE_SIZ" in n for n in doc["notes"])


def test_show_defaults_text_and_json_agree():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # whatever this machine's env holds
        doc = json.loads(show(as_json=True))
        text = show()
    assert len(doc["options"]) == len(OPTIONS)
    assert all(name in text for name in doc["options"])


def test_load_config_does_not_mutate_environ(monkeypatch, tmp_path):
    monkeypatch.setenv("MC_SLICE_SIZE", "8192")
    monkeypatch.setenv("MC_MIN_PRC_PORT", "16000")
    monkeypatch.setenv("MC_SLICE_SIZ", "1")
    path = tmp_path / "t.json"
    path.write_text('{"transports": {"shm": {"enable": false}}}')
    monkeypatch.setenv("MC_TENT_CONF", str(path))
    before = dict(os.environ)
    with pytest.warns(ConfigWarning):
        cfg = load_config({"slice_size": 4096, "mtu": 1024})
        cfg.with_overrides({"retry_cnt": 2})
        show(as_json=True, overrides={"max_wr": 128})
        show()
    assert dict(os.environ) == before
    with pytest.raises(ConfigError), pytest.warns(ConfigWarning):
        load_config({"mtu": 1000})
    assert dict(os.environ) == before


# ---- the seed's tuning surface -------------------------------------------------------------------

# every knob the seed's tuning chapter names (shared/seed/000_34b6f3e8dd72c2ae.txt)
SEED_ENV = [
    # 12.4.1 RDMA device
    "MC_NUM_CQ_PER_CTX", "MC_NUM_COMP_CHANNELS_PER_CTX", "MC_IB_PORT", "MC_GID_INDEX",
    "MC_MAX_CQE_PER_CTX", "MC_MAX_EP_PER_CTX", "MC_NUM_QP_PER_EP",
    # transfer
    "MC_SLICE_SIZE", "MC_WORKERS_PER_CTX", "MC_MAX_WR", "MC_MAX_SGE", "MC_MAX_INLINE", "MC_MTU",
    "MC_RETRY_CNT", "MC_FRAGMENT_RATIO",
    # advanced
    "MC_IB_TC", "MC_IB_PCI_RELAXED_ORDERING", "MC_ENDPOINT_STORE_TYPE",
    "MC_ENABLE_DEST_DEVICE_AFFINITY", "MC_PATH_ROUNDROBIN", "MC_ENABLE_PARALLEL_REG_MR",
    # 12.10.4 hugepages, 12.11 TCP / CXL, 12.12 templates and troubleshooting
    "MC_STORE_USE_HUGEPAGE", "MC_STORE_HUGEPAGE_SIZE", "MC_TCP_BIND_ADDRESS", "MC_MIN_PRC_PORT",
    "MC_MAX_PRC_PORT", "MC_FORCE_TCP", "MC_CXL_DEV_PATH", "MC_CXL_DEV_SIZE", "MC_LOG_LEVEL",
    "MC_STORE_MEMCPY", "MC_TE_METRIC", "MC_DISABLE_METACACHE",
]
SEED_TENT = [
    "transports/rdma/workers/num_workers", "transports/rdma/device/num_cq_list",
    "transports/rdma/endpoint/qp_mul_factor", "transports/rdma/workers/block_size",
    "transports/rdma/endpoint/endpoint_store_cap", "transports/rdma/endpoint/send_timeout",
    "transports/rdma/workers/max_retry_count", "transports/rdma/workers/grace_period_ns",
    "transports/rdma/shared_quota_shm_path", "transports/rdma/workers/rail_topo_path",
    "topology/cluster_topology_path", "transports/shm/enable",
    "transports/shm/async_memcpy_threshold", "log_level", "transports/rdma/enable",
    "transports/rdma/max_timeout_ns", "transports/rdma/device/port",
    "transports/rdma/device/gid_index", "transports/rdma/device/max_cqe",
    "transports/rdma/endpoint/max_sge", "transports/rdma/endpoint/max_qp_wr",
    "transports/rdma/endpoint/max_inline_bytes", "transports/rdma/endpoint/path_mtu",
    "rpc_server_threads",  # the seed's rpc_thread_num advice lives on this row
]
# knobs with tuning advice in the seed: their rows must carry it
SEED_HINTED = [k for k in SEED_ENV if k not in ("MC_MIN_PRC_PORT", "MC_MAX_PRC_PORT")] + [
    "transports/rdma/workers/grace_period_ns", "transports/rdma/shared_quota_shm_path",
    "transports/rdma/workers/rail_topo_path", "topology/cluster_topology_path",
    "transports/rdma/num_lanes", "rpc_server_threads",
]


@pytest.mark.parametrize("knob", SEED_ENV + SEED_TENT)
def test_seed_knob_is_a_row(knob):
    by_env = {e: o for o in OPTIONS for e in o.env}
    by_tent = {o.tent: o for o in OPTIONS if o.tent}
    assert knob in by_env or knob in by_tent


@pytest.mark.parametrize("knob", SEED_HINTED)
def test_seed_knob_has_hint(knob):
    assert quiet().option(knob).hint


def test_seed_file_names_nothing_else():
    if not SEED.exists():
        pytest.skip(f"{SEED} not present")
    named = set(re.findall(r"\bMC_[A-Z0-9_]+", SEED.read_text(encoding="utf-8")))
    assert named <= set(SEED_ENV), named - set(SEED_ENV)


def test_seed_tent_template_loads_cleanly():
    """The seed's 'TENT high-performance' JSON: every key known, no warnings."""
    conf = {
        "log_level": "warning",
        "transports": {"rdma": {
            "enable": True, "shared_quota_shm_path": "mooncake_quota_shm",
            "max_timeout_ns": 5000000000,
            "device": {"num_cq_list": 8, "port": 1, "gid_index": 0, "max_cqe": 8192},
            "endpoint": {"endpoint_store_cap": 65536, "qp_mul_factor": 8, "max_sge": 4,
                         "max_qp_wr": 512, "max_inline_bytes": 64, "path_mtu": 4096},
            "workers": {"num_workers": 8, "max_retry_count": 8, "block_size": 131072,
                        "grace_period_ns": 1000000,
                        "rail_topo_path": "/opt/mooncake/rail_topo.json"},
        }},
    }
    cfg = quiet(env={"MC_TENT_CONF": json.dumps(conf)})
    assert cfg.notes == []
    lanes = ("MC_WORKERS_PER_CTX", "MC_NUM_CQ_PER_CTX", "MC_NUM_QP_PER_EP")
    assert [cfg[n] for n in lanes] == [8, 8, 8]
    assert cfg["MC_GID_INDEX"] == 0 and cfg["MC_MAX_CQE_PER_CTX"] == 8192
    assert cfg["transports/rdma/max_timeout_ns"] == 5 * 10**9
    assert cfg["transports/rdma/shared_quota_shm_path"] == "mooncake_quota_shm"


def test_seed_env_templates_load_cleanly():
    high = {"MC_SLICE_SIZE": "131072", "MC_WORKERS_PER_CTX": "4", "MC_MAX_WR": "512",
            "MC_MAX_CQE_PER_CTX": "8192", "MC_IB_PCI_RELAXED_ORDERING": "1",
            "MC_ENABLE_DEST_DEVICE_AFFINITY": "1", "MC_PATH_ROUNDROBIN": "1",
            "MC_LOG_LEVEL": "WARNING", "MC_STORE_USE_HUGEPAGE": "1", "MC_STORE_MEMCPY": "0",
            "MC_TE_METRIC": "1"}
    cfg = quiet(env=high)
    assert cfg["MC_PATH_ROUNDROBIN"] is True and cfg["MC_STORE_MEMCPY"] is False
    tcp = {"MC_TCP_BIND_ADDRESS": "192.168.1.100", "MC_MIN_PRC_PORT": "15000",
           "MC_MAX_PRC_PORT": "17000", "MC_FORCE_TCP": "1"}
    cfg = quiet(env=tcp)
    assert cfg["MC_TCP_BIND_ADDRESS"] == "192.168.1.100" and cfg["MC_FORCE_TCP"] is True
    roce = {"MC_GID_INDEX": "3", "MC_MTU": "4096", "MC_IB_TC": "106", "MC_CXL_DEV_SIZE":
            "68719476736", "MC_STORE_HUGEPAGE_SIZE": "2097152", "MC_RETRY_CNT": "5"}
    cfg = quiet(env=roce)
    assert cfg["MC_IB_TC"] == 106 and cfg["MC_CXL_DEV_SIZE"] == 64 * GiB
