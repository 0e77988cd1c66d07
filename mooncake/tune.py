"""``mooncake tune``: sweep slice size × workers × batch size against a target engine, pick the
winner by a stated objective, write it as TENT JSON and/or an ``MC_*`` env block, draw the
curves.

Each point of the grid is one ``mooncake bench`` initiator run
(:func:`mooncake.bench.run_initiator`) on a fresh engine started with that point's slice size
and worker count; the batch size is the run's requests per batch.  ``--mode loopback`` starts
its own target as a child process, as ``mooncake bench --mode loopback`` does
(:func:`mooncake.bench.start_target`); otherwise ``--segment_id`` names a running target
(``mooncake bench --mode target`` prints its name).

What "slice size" and "workers" set depends on the transport (:data:`KNOBS`): ``MC_SLICE_SIZE``
and ``MC_WORKERS_PER_CTX`` for rdma, shm and cxl (rdma also sets ``num_cq_list`` and
``qp_mul_factor`` to the worker count, TENT's rule), ``MC_TCP_SLICE_SIZE`` and
``MC_TCP_LANES_PER_PEER`` for tcp.  Only the initiator's engine is configured: it is the side
that slices requests and drives the workers.  The batch size is the application's choice (the
``batch_size`` of ``allocateBatch``), not an engine option: it is reported, and written into the
env block as a comment.

Objectives: ``throughput`` (highest GB/s, ties to the lower p99), ``p99`` (lowest p99 batch
latency, ties to the higher GB/s), or ``--latency-bound US`` (highest GB/s among the points whose
p99 batch latency is at most US microseconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mooncake.bench import KiB, MiB, parse_size
from mooncake.errors import ConfigError, MooncakeError

__all__ = ["main", "parse_grid", "pick", "knobs_for", "config_for", "tent_json", "env_block",
           "Point", "SEED_GRID", "KNOBS"]

# ---- the starting grid: the seed's tables (shared/seed, the performance-tuning chapter) ----------
#: §12.5.2 推荐配置 (slice size by scenario): 16-32 KiB small tensors, 64 KiB KV cache (the
#: default), 64-128 KiB mixed load, 256 KiB-1 MiB weight loading: every size the table names.
SEED_SLICES = (16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, MiB)
#: §12.6.1 (worker threads: TE default 2, TENT default 6) and §12.9.2 (4-6 for one 200G NIC, 6-8
#: for one 400G NIC or a 2x200G bond).  The 8x200G row's 8-16 is left to ``--workers``.
SEED_WORKERS = (2, 4, 6, 8)
#: §12.7.2 推荐配置 (batch size by scenario): 1-4 online inference, 8-32 prefill-decode KV
#: cache, 32-128 offline batch.
SEED_BATCHES = (1, 4, 8, 32, 128)
SEED_GRID: dict[str, tuple[int, ...]] = {"slice_size": SEED_SLICES, "workers": SEED_WORKERS,
                                         "batch_size": SEED_BATCHES}
#: the most points one sweep may have
MAX_POINTS = 1000

_AXES = {"slice": "slice_size", "slice_size": "slice_size", "slices": "slice_size",
         "workers": "workers", "worker": "workers",
         "batch": "batch_size", "batch_size": "batch_size", "batches": "batch_size"}
_ALLOWED_AXES = "slice, workers, batch"


@dataclass(frozen=True)
class Knobs:
    """The options a grid point sets: each name in ``slice`` to its slice size, each name in
    ``workers`` to its worker count."""

    slice: tuple[str, ...]
    workers: tuple[str, ...]


#: per transport; any other (shm, cxl, a plugin) slices at MC_SLICE_SIZE in the engine and
#: takes MC_WORKERS_PER_CTX (:data:`DEFAULT_KNOBS`)
KNOBS: dict[str, Knobs] = {
    "tcp": Knobs(("MC_TCP_SLICE_SIZE",), ("MC_TCP_LANES_PER_PEER",)),
    # §12.9.2: num_workers = num_cq_list = qp_mul_factor
    "rdma": Knobs(("MC_SLICE_SIZE",), ("MC_WORKERS_PER_CTX", "MC_NUM_CQ_PER_CTX",
                                       "MC_NUM_QP_PER_EP")),
}
DEFAULT_KNOBS = Knobs(("MC_SLICE_SIZE",), ("MC_WORKERS_PER_CTX",))


def knobs_for(protocol: str) -> Knobs:
    """The options ``protocol``'s grid points set."""
    return KNOBS.get(protocol, DEFAULT_KNOBS)


def config_for(protocol: str, slice_size: int, workers: int) -> dict[str, int]:
    """``{option name: value}`` of one grid point."""
    k = knobs_for(protocol)
    return {**{n: slice_size for n in k.slice}, **{n: workers for n in k.workers}}


# ---- grid ------------------------------------------------------------------------------------


def _value(axis: str, text: str, spec: str) -> int:
    from mooncake.config import parse_size as config_size

    text = text.strip()
    try:
        v = config_size(text) if axis == "slice_size" else int(text)
    except ValueError:
        what = "a size (16K, 64KiB, 1M, 65536)" if axis == "slice_size" else "an integer"
        raise ConfigError(f"grid {spec!r}: {text!r} is not {what}") from None
    if v < 1:
        raise ConfigError(f"grid {spec!r}: {axis} {v} must be >= 1")
    return v


def parse_grid(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``{axis: sorted values}`` from ``AXIS=V[,V...]`` specs (several per spec, separated by
    ``;``); axes not named keep the seed's values (:data:`SEED_GRID`).  Raises ConfigError
    naming the bad part and what is allowed."""
    given: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        for part in spec.split(";"):
            part = part.strip()
            if not part:
                continue
            name, eq, values = part.partition("=")
            if not eq:
                raise ConfigError(f"grid {part!r} is not AXIS=V[,V...]; allowed axes: "
                                  f"{_ALLOWED_AXES} (e.g. slice=16K,64K;workers=2,4;batch=1,32)")
            axis = _AXES.get(name.strip().lower())
            if axis is None:
                raise ConfigError(f"grid {part!r}: unknown axis {name.strip()!r}; allowed: "
                                  f"{_ALLOWED_AXES}")
            if axis in given:
                raise ConfigError(f"grid: axis {axis} is given twice ({part!r}); allowed: each "
                                  "axis once (in --grid or its own option)")
            vals = [v for v in values.split(",") if v.strip()]
            if not vals:
                raise ConfigError(f"grid {part!r}: no values; allowed: {name.strip()}=V[,V...]")
            given[axis] = tuple(sorted({_value(axis, v, part) for v in vals}))
    grid = {**SEED_GRID, **given}
    n = len(grid["slice_size"]) * len(grid["workers"]) * len(grid["batch_size"])
    if n > MAX_POINTS:
        raise ConfigError(f"grid has {n} points; allowed: at most {MAX_POINTS} (name fewer "
                          "values per axis)")
    return grid


def check_grid(grid: Mapping[str, Sequence[int]], protocol: str) -> None:
    """Raise ConfigError when a grid value is outside what the option it sets allows."""
    from mooncake.config import load_config

    for s in grid["slice_size"]:
        for w in grid["workers"]:
            try:
                load_config(config_for(protocol, s, w), env={})
            except ConfigError as e:
                raise ConfigError(f"grid point slice={s} workers={w} for {protocol}: "
                                  f"{e}") from None


# ---- results -----------------------------------------------------------------------------------


@dataclass
class Point:
    """One measured grid point."""

    slice_size: int
    workers: int
    batch_size: int
    gbps: float = 0.0
    req_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    batches: int = 0
    error: str = ""
    eligible: bool = False

    @property
    def ok(self) -> bool:
        return not self.error and self.batches > 0


def pick(points: Sequence[Point], objective: str, bound_us: float | None = None) -> int | None:
    """Index of the winner of ``points`` by ``objective`` (``throughput`` or ``p99``; with
    ``bound_us``, throughput among the points whose p99 is at most the bound); marks each
    point's ``eligible``.  None when no point qualifies."""
    for p in points:
        p.eligible = p.ok and (bound_us is None or p.p99_us <= bound_us)
    ok = [i for i, p in enumerate(points) if p.eligible]
    if not ok:
        return None
    if objective == "p99":
        return min(ok, key=lambda i: (points[i].p99_us, -points[i].gbps))
    return min(ok, key=lambda i: (-points[i].gbps, points[i].p99_us))


# ---- output files ------------------------------------------------------------------------------


def _options(names: Sequence[str]) -> dict[str, Any]:
    from mooncake.config import load_config

    cfg = load_config(env={})
    return {n: cfg.option(n) for n in names}


def tent_json(config: Mapping[str, int]) -> dict[str, Any]:
    """``config`` as a nested TENT JSON document (each option under its TENT path).  Raises
    ConfigError for an option that has no TENT key."""
    doc: dict[str, Any] = {}
    for name, opt in _options(list(config)).items():
        if not opt.tent:
            raise ConfigError(f"{name} has no TENT JSON key; allowed: --write-env (an MC_* "
                              "block), or a protocol whose knobs all have TENT keys (rdma, "
                              "shm, cxl)")
        node = doc
        *parents, leaf = opt.tent.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = config[name]
    return doc


def env_block(config: Mapping[str, int], header: Sequence[str] = ()) -> str:
    """``export NAME=value`` lines of ``config`` (each option's primary env name), after
    ``header`` comment lines.  Raises ConfigError for an option with no env name."""
    lines = [f"# {h}" for h in header]
    for name, opt in _options(list(config)).items():
        if not opt.env:
            raise ConfigError(f"{name} has no MC_* variable; allowed: --write-json")
        lines.append(f"export {opt.env[0]}={config[name]}")
    return "\n".join(lines) + "\n"


def _verify(path: str, env: dict[str, str], config: Mapping[str, int]) -> None:
    """Load what was written back through the config loader; it must give ``config``."""
    from mooncake.config import load_config

    cfg = load_config(env=env)
    wrong = {n: cfg[n] for n, v in config.items() if cfg[n] != v}
    if wrong:
        raise RuntimeError(f"{path} loads back as {wrong}, not {dict(config)}")


# ---- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from mooncake.bench import _bounded, _positive_int, _seconds

    p = argparse.ArgumentParser(
        prog="mooncake tune",
        description="Sweep slice size x workers x batch size (the seed's tables of 12.5-12.7 "
                    "by default), pick the best by an objective, write it as TENT JSON or an "
                    "MC_* env block, draw the curves. A flag may also be spelled with dashes.",
        epilog="examples:\n"
               "  mooncake tune --mode loopback --grid 'slice=64K,256K;workers=2,4;batch=8,32'\n"
               "  mooncake tune --segment_id 10.0.0.2:15123 --protocol rdma --latency-bound 500 "
               "--write-json tent.json --plot tune.png\n"
               "  mooncake tune --protocol shm --objective p99 --write-env tuned.env",
        formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(*names: str, **kw: Any) -> None:
        spelled = [f"--{n}" for n in names]
        spelled += [f"--{n.replace('_', '-')}" for n in names if "_" in n]
        p.add_argument(*spelled, dest=names[0], **kw)

    add("mode", choices=("initiator", "loopback"), default=None,
        help="initiator (against --segment_id) or loopback (its own target in a child "
             "process); default: initiator when --segment_id is given, else loopback")
    add("segment_id", "peer", default=None,
        help="the target's segment name (host:port with P2PHANDSHAKE), e.g. as printed by "
             "`mooncake bench --mode target`")
    add("protocol", default=None, help="transport to tune: tcp, shm, cxl, rdma or an "
                                        "installed plugin (default: tcp)")
    add("operation", choices=("read", "write"), default=None, help="default: read")
    add("metadata_server", default=None, help="default: P2PHANDSHAKE")
    add("local_server_name", default=None, help="this engine's host (default: 127.0.0.1)")
    add("device_name", default=None, help="NIC list for RDMA")
    add("block_size", type=parse_size, default=None,
        help="bytes per request (default: 1MiB, at least the largest slice so every slice "
             "size matters)")
    add("threads", type=_positive_int, default=None, help="submitting threads (default: 1)")
    add("duration", type=_seconds, default=None, help="seconds per point (default: 1)")
    add("grid", action="append", default=[], metavar="AXIS=V[,V...][;...]",
        help="the grid: axes slice, workers, batch (e.g. 'slice=16K,64K;workers=2,4;batch=1,32'"
             "); an axis not named keeps the seed's values; repeatable")
    add("slice_sizes", default=None, metavar="S,S,...",
        help="slice-size axis (default: the seed's 12.5.2: 16K,32K,64K,128K,256K,1M)")
    add("workers", default=None, metavar="N,N,...",
        help="worker axis (default: the seed's 12.6.1 / 12.9.2: 2,4,6,8)")
    add("batch_sizes", default=None, metavar="N,N,...",
        help="batch-size axis (default: the seed's 12.7.2: 1,4,8,32,128)")
    add("objective", choices=("throughput", "p99"), default=None,
        help="throughput: the highest GB/s (default); p99: the lowest p99 batch latency")
    add("latency_bound", type=_bounded(float, 1e-3, 1e12, "must be a positive number of µs"),
        default=None, metavar="US",
        help="the highest throughput whose p99 batch latency is at most US microseconds")
    add("write_json", default=None, metavar="PATH",
        help="write the winner as TENT JSON (load it with MC_TENT_CONF=PATH)")
    add("write_env", default=None, metavar="PATH",
        help="write the winner as an env block (export MC_...=...; source it, or "
             "`mooncake config show --env-file PATH`)")
    add("plot", default=None, metavar="PATH.png",
        help="draw throughput and p99 against slice size, and throughput against batch size, "
             "a line per worker count (needs matplotlib: pip install 'mooncake[plot]')")
    add("from_results", default=None, metavar="RESULTS.json",
        help="measure nothing: pick (and write, plot) from the points of an earlier "
             "`mooncake tune --json` run, e.g. under another objective")
    add("json", action="store_true", help="print every point and the winner as JSON on stdout")
    add("progress", choices=("auto", "on", "off"), default="auto",
        help="progress bar on stderr (auto: on unless --json)")
    return p


def _writable(path: str, flag: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path!r}: directory {parent} does not exist or is not "
                          "writable")


#: the flags that say what to measure, and their defaults (``None``: derived)
_MEASURING: dict[str, Any] = {
    "mode": None, "segment_id": None, "protocol": "tcp", "operation": "read",
    "metadata_server": "P2PHANDSHAKE", "local_server_name": "127.0.0.1", "device_name": "",
    "block_size": MiB, "threads": 1, "duration": 1.0, "slice_sizes": None, "workers": None,
    "batch_sizes": None,
}


def load_results(path: str) -> tuple[dict[str, Any], list[Point]]:
    """The run description and points of a ``mooncake tune --json`` document; ConfigError when
    it is not one."""
    what = "allowed: the output of `mooncake tune --json`"
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.loads(f.read(64 << 20))
    except OSError as e:
        raise ConfigError(f"--from-results {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"--from-results {path}: not JSON ({str(e)[:120]}); {what}") from None
    keys = ("mode", "segment", "protocol", "operation", "block_size", "threads", "duration_s",
            "grid", "points")
    missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise ConfigError(f"--from-results {path}: no {', '.join(missing)}; {what}")
    fields = ("slice_size", "workers", "batch_size", "gbps", "req_per_s", "p50_us", "p99_us",
              "batches", "error")
    points = []
    for n, p in enumerate(doc["points"] if isinstance(doc["points"], list) else [None]):
        try:
            points.append(Point(**{k: p[k] for k in fields}))
            ok = all(isinstance(getattr(points[-1], k), (int, float)) for k in fields[:-1])
        except (TypeError, KeyError):
            ok = False
        if not ok or not isinstance(points[-1].error, str):
            raise ConfigError(f"--from-results {path}: point {n} is not a measured point "
                              f"(needs {', '.join(fields)}); {what}")
    if not points:
        raise ConfigError(f"--from-results {path}: no points; {what}")
    return doc, points


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The flags, checked: grid, objective, protocol, output paths (errors exit 2)."""
    p = build_parser()
    a = p.parse_args(list(argv))
    from mooncake.registry import transport_names

    a.points = None
    if a.from_results is not None:
        given = [k for k in _MEASURING if getattr(a, k) is not None] + (["grid"] if a.grid
                                                                          else [])
        if given:
            p.error(f"--from-results takes what was measured from its file; "
                    f"{', '.join('--' + k.replace('_', '-') for k in given)} cannot change it "
                    "(allowed with it: --objective, --latency-bound, --write-json, --write-env, "
                    "--plot, --json)")
        try:
            doc, a.points = load_results(a.from_results)
        except ConfigError as e:
            p.error(str(e))
        a.mode, a.segment_id, a.protocol = doc["mode"], doc["segment"], doc["protocol"]
        a.operation, a.block_size, a.threads = doc["operation"], doc["block_size"], doc["threads"]
        a.duration = doc["duration_s"]
        specs = [f"{axis}={','.join(str(v) for v in vals)}"
                 for axis, vals in doc["grid"].items()] if isinstance(doc["grid"], dict) else []
    else:
        for k, v in _MEASURING.items():
            if getattr(a, k) is None:
                setattr(a, k, v)
        specs = list(a.grid)
        for axis, opt in (("slice", a.slice_sizes), ("workers", a.workers),
                          ("batch", a.batch_sizes)):
            if opt is not None:
                specs.append(f"{axis}={opt}")
    a.protocol = (a.protocol or "").lower()
    known = transport_names()
    if a.protocol == "auto":
        p.error("--protocol auto cannot be tuned: each transport has its own knobs; allowed: "
                f"one transport ({', '.join(known)})")
    if a.protocol not in known:
        p.error(f"--protocol {a.protocol!r} is not an installed transport (allowed: "
                f"{', '.join(known)}; see `mooncake transports`)")
    if a.mode is None:
        a.mode = "initiator" if a.segment_id else "loopback"
    if a.points is None and a.mode == "initiator" and not a.segment_id:
        p.error("--mode initiator needs --segment_id (the target's segment name, as printed by "
                "`mooncake bench --mode target`)")
    if a.points is None and a.mode == "loopback" and a.segment_id:
        p.error("--segment_id is only for --mode initiator (loopback starts its own target)")
    if a.latency_bound is not None and a.objective == "p99":
        p.error("--latency-bound picks the highest throughput whose p99 is within the bound; "
                "allowed: --latency-bound alone (or with --objective throughput), or "
                "--objective p99 alone")
    a.objective = a.objective or "throughput"
    try:
        a.grid = parse_grid(specs)
        check_grid(a.grid, a.protocol)
        config = config_for(a.protocol, a.grid["slice_size"][0], a.grid["workers"][0])
        for flag, path, render in (("--write-json", a.write_json, tent_json),
                                   ("--write-env", a.write_env, env_block)):
            if path:
                _writable(path, flag)
                try:
                    render(config)
                except ConfigError as e:
                    raise ConfigError(f"{flag} with --protocol {a.protocol}: {e}") from None
        if a.plot is not None:
            from mooncake import plot

            plot.require()
            plot.check_path(a.plot)
    except ConfigError as e:
        p.error(str(e))
    a.buffer_size = a.block_size * max(a.grid["batch_size"]) * a.threads
    return a


# ---- the sweep ----------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit, per in (("MiB", MiB), ("KiB", KiB)):
        if n >= per and n % per == 0:
            return f"{n // per} {unit}"
    return f"{n} B"


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _objective_text(a: argparse.Namespace) -> str:
    if a.latency_bound is not None:
        return f"throughput with p99 <= {a.latency_bound:g} µs"
    return "lowest p99 batch latency" if a.objective == "p99" else "throughput"


def sweep(a: argparse.Namespace, segment: str, progress: bool) -> list[Point]:
    """Measure every grid point against ``segment`` (a bench initiator run each)."""
    from mooncake.bench import run_initiator
    from mooncake.console import Progress
    from mooncake.errors import AuthError, PeerUnreachable, SegmentNotFound

    grid = [(s, w, b) for s in a.grid["slice_size"] for w in a.grid["workers"]
            for b in a.grid["batch_size"]]
    points: list[Point] = []
    with Progress(len(grid), "tune", progress) as bar:
        for n, (s, w, b) in enumerate(grid):
            run = argparse.Namespace(**vars(a))
            run.batch_size, run.buffer_size = b, a.block_size * b * a.threads
            run.report_unit, run.report_precision = "GB", 2
            pt = Point(s, w, b)
            try:
                r = run_initiator(run, segment, False, config_for(a.protocol, s, w))
            except (SegmentNotFound, PeerUnreachable, AuthError):
                raise  # the peer, not the point: no other point can do better
            except MooncakeError as e:
                pt.error = f"{type(e).__name__}: {e}"
            else:
                pt.gbps, pt.batches, pt.error = r.gbps, r.batches, r.error
                pt.req_per_s = r.requests / r.elapsed_s if r.elapsed_s > 0 else 0.0
                pt.p50_us, pt.p99_us = r.percentile(0.5) * 1e6, r.percentile(0.99) * 1e6
            points.append(pt)
            bar.update(n + 1, f"slice {_size(s)}, {w} workers, batch {b}: " +
                       (f"{pt.gbps:.2f} GB/s, p99 {pt.p99_us:,.0f} µs" if pt.ok else "failed"))
    return points


def _table(a: argparse.Namespace, points: Sequence[Point], win: int | None) -> None:
    from mooncake.console import print_table

    rows = []
    for i, p in enumerate(points):
        if i == win:
            note = "<- chosen"
        elif p.error:
            note = p.error[:80]
        elif not p.eligible:
            note = "p99 > bound"
        else:
            note = ""
        rows.append([_size(p.slice_size), str(p.workers), str(p.batch_size), f"{p.gbps:.3f}",
                     f"{p.req_per_s:,.0f}", f"{p.p50_us:,.0f}", f"{p.p99_us:,.0f}",
                     str(p.batches), note])
    print_table(["slice", "workers", "batch", "GB/s", "req/s", "p50 µs", "p99 µs", "batches",
                 ""], rows, title=f"mooncake tune: {a.protocol} {a.operation}, "
                                  f"{_size(a.block_size)} requests, {_threads(a.threads)}, "
                                  f"{a.duration:g} s per point; objective: {_objective_text(a)}",
                highlight=win)


def _write(a: argparse.Namespace, points: Sequence[Point], w: Point, segment: str) -> dict:
    """Write the winner's files; return ``{kind: absolute path}``."""
    config = config_for(a.protocol, w.slice_size, w.workers)
    wrote: dict[str, str] = {}
    if a.write_json:
        with open(a.write_json, "w", encoding="utf-8") as f:
            json.dump(tent_json(config), f, indent=4)
            f.write("\n")
        _verify(a.write_json, {"MC_TENT_CONF": os.path.abspath(a.write_json)}, config)
        wrote["json"] = os.path.abspath(a.write_json)
    if a.write_env:
        from mooncake.config import parse_env_block

        text = env_block(config, header=(
            f"mooncake tune: {a.protocol} {a.operation} against {segment} ({a.mode}), "
            f"{_size(a.block_size)} requests, submitted by {_threads(a.threads)}",
            f"objective: {_objective_text(a)}; chosen of {len(points)} points: "
            f"{w.gbps:.3f} GB/s, p99 batch latency {w.p99_us:,.0f} µs",
            f"batch size {w.batch_size} (requests per batch) is the application's choice, "
            "not an engine option",
        ))
        with open(a.write_env, "w", encoding="utf-8") as f:
            f.write(text)
        _verify(a.write_env, parse_env_block(text, a.write_env), config)
        wrote["env"] = os.path.abspath(a.write_env)
    if a.plot is not None:
        from mooncake import plot

        plot.tune_curves([asdict(p) for p in points], asdict(w),
                         f"mooncake tune: {a.protocol} {a.operation}, {_size(a.block_size)} "
                         f"requests, {_threads(a.threads)}, {a.duration:g} s per point; "
                         f"chosen by {_objective_text(a)}", a.plot, a.latency_bound)
        wrote["plot"] = os.path.abspath(a.plot)
    return wrote


def main(argv: Sequence[str]) -> int:
    """``mooncake tune [flags]``; returns the exit status (0 chosen, 1 nothing qualified or a
    setup failure, 2 bad flags)."""
    from mooncake.bench import start_target, stop_target

    a = parse_args(argv)
    progress = a.progress == "on" or (a.progress == "auto" and not a.json)
    n = len(a.grid["slice_size"]) * len(a.grid["workers"]) * len(a.grid["batch_size"])
    if not a.json and a.points is None:
        print(f"sweeping {n} points x {a.duration:g} s ({a.protocol} {a.operation}, knobs: "
              f"{', '.join(knobs_for(a.protocol).slice + knobs_for(a.protocol).workers)})",
              file=sys.stderr)
    proc = None
    try:
        segment = a.segment_id
        if a.points is not None:
            points = a.points
        else:
            if a.mode == "loopback":
                proc, info = start_target(a)
                segment = info["segment"]
            points = sweep(a, segment, progress)
    except (MooncakeError, RuntimeError, OSError) as e:
        print(f"mooncake tune: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if proc is not None:
            stop_target(proc)
    win = pick(points, a.objective, a.latency_bound)
    w = points[win] if win is not None else None
    try:
        wrote = _write(a, points, w, segment) if w is not None else {}
    except (OSError, RuntimeError, ConfigError) as e:
        print(f"mooncake tune: error writing the winner: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    if a.json:
        doc = {"mode": a.mode, "segment": segment, "protocol": a.protocol,
               "operation": a.operation, "block_size": a.block_size, "threads": a.threads,
               "duration_s": a.duration,
               "objective": {"name": "latency_bound" if a.latency_bound is not None
                             else a.objective, "latency_bound_us": a.latency_bound},
               "grid": {k: list(v) for k, v in a.grid.items()},
               "knobs": asdict(knobs_for(a.protocol)),
               "points": [asdict(p) for p in points], "winner": win,
               "config": config_for(a.protocol, w.slice_size, w.workers) if w else None,
               "batch_size": w.batch_size if w else None, "wrote": wrote}
        print(json.dumps(doc, indent=2))
    else:
        _table(a, points, win)
        if w is not None:
            cfg = config_for(a.protocol, w.slice_size, w.workers)
            print(f"chosen ({_objective_text(a)}): slice {_size(w.slice_size)}, {w.workers} "
                  f"workers, batch {w.batch_size}: {w.gbps:.3f} GB/s, p99 {w.p99_us:,.0f} µs\n"
                  f"config: {' '.join(f'{k}={v}' for k, v in cfg.items())} "
                  f"(batch size {w.batch_size} is the application's requests per batch)")
            for kind, path in wrote.items():
                print(f"wrote {kind}: {path}")
    if w is None:
        ok = [p for p in points if p.ok]
        if ok and a.latency_bound is not None:
            best = min(ok, key=lambda p: p.p99_us)
            why = (f"no point has p99 <= {a.latency_bound:g} µs; the lowest is "
                   f"{best.p99_us:,.0f} µs (slice {_size(best.slice_size)}, {best.workers} "
                   f"workers, batch {best.batch_size}); nothing written")
        else:
            why = "every point failed; nothing written"
        print(f"mooncake tune: {why}", file=sys.stderr)
        return 1
    return 0
