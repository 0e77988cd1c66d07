"""``mooncake tune``: loopback and peer sweeps through the CLI, the winner by each objective, the
written TENT JSON / env block loading back through the config loader, the PNG, flag errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from png import png_size

from mooncake.config import load_config, parse_env_block
from mooncake.plot import SIZE

TINY = ["--duration", "0.2", "--progress", "off"]


def tune(*args: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mooncake", "tune", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def best(points: list[dict], key, among=None) -> int:
    """Index of the point ``key`` ranks first (smallest), over ``among`` (default all)."""
    idx = range(len(points)) if among is None else among
    return min(idx, key=lambda i: key(points[i]))


def by_throughput(p: dict) -> tuple:
    return (-p["gbps"], p["p99_us"])


def test_loopback_sweep_measures_every_point_and_writes_the_winner_as_env(tmp_path):
    env_file, png = tmp_path / "tuned.env", tmp_path / "curve.png"
    r = tune("--mode", "loopback", "--grid", "slice=64K,256K;workers=1,2", "--batch-sizes",
             "1,8", "--write-env", str(env_file), "--plot", str(png), "--json", *TINY)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["mode"] == "loopback" and d["protocol"] == "tcp" and d["block_size"] == 1 << 20
    assert d["grid"] == {"slice_size": [65536, 262144], "workers": [1, 2], "batch_size": [1, 8]}
    pts = d["points"]
    assert [(p["slice_size"], p["workers"], p["batch_size"]) for p in pts] == [
        (s, w, b) for s in (65536, 262144) for w in (1, 2) for b in (1, 8)]
    assert all(p["batches"] > 0 and p["gbps"] > 0 and p["p99_us"] >= p["p50_us"] > 0
               and not p["error"] for p in pts)
    # the winner is the highest throughput, and the config is its slice size and lanes
    assert d["winner"] == best(pts, by_throughput)
    w = pts[d["winner"]]
    assert d["config"] == {"MC_TCP_SLICE_SIZE": w["slice_size"],
                           "MC_TCP_LANES_PER_PEER": w["workers"]}
    assert d["batch_size"] == w["batch_size"]
    # the env block loads back through the config loader with the chosen values
    text = env_file.read_text()
    cfg = load_config(env=parse_env_block(text))
    assert (cfg["MC_TCP_SLICE_SIZE"], cfg["MC_TCP_LANES_PER_PEER"]) == (w["slice_size"],
                                                                         w["workers"])
    assert cfg.source("MC_TCP_SLICE_SIZE") == "env:MC_TCP_SLICE_SIZE"
    assert f"# batch size {w['batch_size']} (requests per batch)" in text
    assert d["wrote"] == {"env": str(env_file), "plot": str(png)}
    assert png_size(png) == SIZE


def test_shm_winner_reported_in_the_table_is_what_the_tent_json_loads(tmp_path):
    tent, env_file = tmp_path / "tent.json", tmp_path / "tuned.env"
    r = tune("--protocol", "shm", "--slice-sizes", "64K,256K", "--workers", "2",
             "--batch-sizes", "4", "--write-json", str(tent), "--write-env", str(env_file),
             *TINY)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^chosen \(throughput\): slice (\d+) KiB, (\d+) workers, batch (\d+): "
                  r"[\d.]+ GB/s", r.stdout, re.M)
    assert m, r.stdout
    slice_size, workers = int(m[1]) * 1024, int(m[2])
    assert int(m[3]) == 4 and workers == 2
    assert "<- chosen" in r.stdout and f"wrote json: {tent}" in r.stdout
    doc = json.loads(tent.read_text())
    assert doc == {"transports": {"rdma": {"workers": {"block_size": slice_size,
                                                       "num_workers": workers}}}}
    cfg = load_config(env={"MC_TENT_CONF": str(tent)})
    assert (cfg["MC_SLICE_SIZE"], cfg["MC_WORKERS_PER_CTX"]) == (slice_size, workers)
    assert cfg.source("MC_SLICE_SIZE").startswith("tent:")
    cfg = load_config(env=parse_env_block(env_file.read_text()))
    assert (cfg["MC_SLICE_SIZE"], cfg["MC_WORKERS_PER_CTX"]) == (slice_size, workers)


def test_objective_decides_the_winner_over_the_same_points(tmp_path):
    """One sweep, then re-picks from its results: throughput, p99, and a latency bound that
    excludes the throughput winner (or every point) each follow their stated rule."""
    results = tmp_path / "sweep.json"
    # shm: batches of 32 move far more per second than single requests, and take longer each
    r = tune("--protocol", "shm", "--block-size", "256K", "--grid",
             "slice=64K,256K;workers=2;batch=1,32", "--json", *TINY)
    assert r.returncode == 0, r.stderr
    results.write_text(r.stdout)
    pts = json.loads(r.stdout)["points"]

    def repick(*args: str) -> subprocess.CompletedProcess:
        return tune("--from-results", str(results), "--json", *args)

    d = json.loads(repick().stdout)
    top = best(pts, by_throughput)
    assert d["winner"] == top and d["points"] == [{**p, "eligible": True} for p in pts]
    d = json.loads(repick("--objective", "p99").stdout)
    assert d["winner"] == best(pts, lambda p: (p["p99_us"], -p["gbps"]))
    assert d["objective"] == {"name": "p99", "latency_bound_us": None}

    faster = sorted(p["p99_us"] for p in pts if p["p99_us"] < pts[top]["p99_us"])
    if faster:  # a bound just below the throughput winner's p99 excludes it (else it also has
        # the lowest p99, and only a bound below every point changes the outcome: below)
        bound = faster[-1]
        r2 = repick("--latency-bound", repr(bound), "--write-env", str(tmp_path / "b.env"))
        assert r2.returncode == 0, r2.stderr
        d = json.loads(r2.stdout)
        inside = [i for i, p in enumerate(pts) if p["p99_us"] <= bound]
        assert d["winner"] == best(pts, by_throughput, inside) != top
        assert [p["eligible"] for p in d["points"]] == [p["p99_us"] <= bound for p in pts]
        w = pts[d["winner"]]
        cfg = load_config(env=parse_env_block((tmp_path / "b.env").read_text()))
        assert cfg["MC_SLICE_SIZE"] == w["slice_size"]
    r3 = repick("--latency-bound", repr(min(p["p99_us"] for p in pts) / 2),
                "--write-env", str(tmp_path / "none.env"))
    assert r3.returncode == 1
    assert json.loads(r3.stdout)["winner"] is None
    assert "no point has p99 <=" in r3.stderr and "nothing written" in r3.stderr
    assert not (tmp_path / "none.env").exists()


def test_sweep_against_a_running_target_marks_points_its_buffer_cannot_hold():
    target = subprocess.Popen([sys.executable, "-m", "mooncake", "bench", "--mode", "target",
                               "--buffer_size", "4M", "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(target.stdout.readline())
        r = tune("--segment_id", info["segment"], "--grid", "slice=64K;workers=2;batch=2,8",
                 "--operation", "write", "--json", *TINY)
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert d["mode"] == "initiator" and d["segment"] == info["segment"]
        fits, too_big = d["points"]
        assert fits["batches"] > 0 and fits["eligible"] and not fits["error"]
        # batch 8 x 1 MiB needs 8 MiB; the peer registered 4 MiB
        assert "has 4194304 bytes" in too_big["error"] and not too_big["eligible"]
        assert d["winner"] == 0
        assert target.poll() is None  # the peer keeps serving
    finally:
        target.terminate()
        target.wait(20)


def test_unreachable_peer_is_an_error_naming_it():
    r = tune("--segment_id", "127.0.0.1:1", "--grid", "slice=64K,256K;workers=2;batch=1,2",
             *TINY, timeout=60)
    assert r.returncode == 1
    assert "SegmentNotFound" in r.stderr and "127.0.0.1:1" in r.stderr


def test_without_rich_the_table_and_progress_are_plain(tmp_path):
    hide = tmp_path / "hide" / "rich"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('rich hidden by the test')\n")
    r = tune("--grid", "slice=64K;workers=2;batch=1", "--duration", "0.2", "--progress", "on",
             env={"PYTHONPATH": str(hide.parent)})
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\* 64 KiB +2 +1 +[\d.]+ .*<- chosen$", r.stdout, re.M), r.stdout
    assert re.search(r"^tune 1/1 +slice 64 KiB, 2 workers, batch 1: [\d.]+ GB/s", r.stderr,
                     re.M), r.stderr


def test_plot_without_matplotlib_names_the_extra(tmp_path):
    hide = tmp_path / "hide" / "matplotlib"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    r = tune("--plot", str(tmp_path / "x.png"), env={"PYTHONPATH": str(hide.parent)})
    assert r.returncode == 2
    assert "pip install 'mooncake[plot]'" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--grid", "slice"], "is not AXIS=V[,V...]; allowed axes: slice, workers, batch"),
    (["--grid", "lanes=2"], "unknown axis 'lanes'; allowed: slice, workers, batch"),
    (["--grid", "workers="], "no values"),
    (["--grid", "workers=two"], "'two' is not an integer"),
    (["--grid", "batch=0"], "batch_size 0 must be >= 1"),
    (["--slice-sizes", "12Q"], "'12Q' is not a size"),
    (["--slice-sizes", "0"], "slice_size 0 must be >= 1"),
    (["--grid", "workers=2", "--workers", "4"], "axis workers is given twice"),
    (["--workers", "32"], "MC_TCP_LANES_PER_PEER"),
    (["--slice-sizes", "1K"], "MC_TCP_SLICE_SIZE"),
    (["--batch-sizes", ",".join(map(str, range(1, 60)))], "allowed: at most 1000"),
    (["--objective", "fastest"], "invalid choice: 'fastest'"),
    (["--objective", "p99", "--latency-bound", "100"], "allowed: --latency-bound alone"),
    (["--latency-bound", "-5"], "must be a positive number of µs"),
    (["--protocol", "auto"], "cannot be tuned"),
    (["--protocol", "nosuch"], "'nosuch' is not an installed transport"),
    (["--write-json", "t.json"], "MC_TCP_SLICE_SIZE has no TENT JSON key; allowed: --write-env"),
    (["--write-env", "/nonexistent/dir/t.env"], "does not exist or is not writable"),
    (["--plot", "curve.jpg"], "allowed: a path ending in .png"),
    (["--mode", "initiator"], "needs --segment_id"),
    (["--from-results", "/nonexistent.json"], "--from-results /nonexistent.json"),
])
def test_bad_flags_exit_2_naming_the_problem(args, message):
    r = tune(*args)
    assert r.returncode == 2, r.stdout
    assert message in r.stderr, r.stderr


def test_from_results_refuses_measuring_flags_and_non_results(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"points": []}))
    r = tune("--from-results", str(bad))
    assert r.returncode == 2 and "no mode, segment, protocol" in r.stderr
    r = tune("--from-results", str(bad), "--duration", "3", "--grid", "batch=1")
    assert r.returncode == 2
    assert "--duration, --grid cannot change it" in r.stderr


def test_seed_grid_is_the_default():
    from mooncake.tune import parse_args

    a = parse_args([])
    assert a.grid == {"slice_size": (16384, 32768, 65536, 131072, 262144, 1 << 20),
                      "workers": (2, 4, 6, 8), "batch_size": (1, 4, 8, 32, 128)}
    assert (a.mode, a.protocol, a.objective, a.block_size, a.threads, a.duration) == (
        "loopback", "tcp", "throughput", 1 << 20, 1, 1.0)
    assert a.buffer_size == 128 << 20  # the largest batch of 1 MiB requests
    b = parse_args(["--protocol", "rdma", "--grid", "workers=4"])
    assert b.grid["workers"] == (4,) and b.grid["batch_size"] == (1, 4, 8, 32, 128)


def test_rdma_points_keep_tents_lane_rule(tmp_path):
    """rdma's worker count sets num_workers = num_cq_list = qp_mul_factor (TENT's rule), and the
    JSON carries all three under their TENT paths."""
    from mooncake.tune import config_for, tent_json

    cfg = config_for("rdma", 131072, 8)
    assert cfg == {"MC_SLICE_SIZE": 131072, "MC_WORKERS_PER_CTX": 8, "MC_NUM_CQ_PER_CTX": 8,
                   "MC_NUM_QP_PER_EP": 8}
    path = tmp_path / "rdma.json"
    path.write_text(json.dumps(tent_json(cfg)))
    loaded = load_config(env={"MC_TENT_CONF": str(path)})
    assert {k: loaded[k] for k in cfg} == cfg
    assert json.loads(path.read_text())["transports"]["rdma"] == {
        "workers": {"block_size": 131072, "num_workers": 8}, "device": {"num_cq_list": 8},
        "endpoint": {"qp_mul_factor": 8}}


def test_help_names_the_seed_tables():
    r = tune("--help")
    assert r.returncode == 0
    assert "12.5.2" in r.stdout and "12.7.2" in r.stdout and "--latency-bound" in r.stdout
