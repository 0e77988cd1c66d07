"""PNG pictures of ``mooncake tune`` sweeps and ``mooncake bench`` runs, drawn with matplotlib
(the ``plot`` extra: ``pip install mooncake[plot]``), off-screen (Agg).

Both pictures are exactly :data:`SIZE` pixels (no tight-bbox cropping), so scripts and tests
can rely on the size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mooncake.errors import ConfigError

__all__ = ["SIZE", "DPI", "require", "check_path", "tune_curves", "bench_run"]

#: width, height in pixels of every picture
SIZE = (1350, 450)
DPI = 100


def require() -> None:
    """Raise ConfigError when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which is not installed; allowed: install "
                          "the plot extra (pip install 'mooncake[plot]') or drop --plot") from None


def check_path(path: str) -> None:
    """Raise ConfigError unless a PNG can be written at ``path`` (before any measuring)."""
    if not path.lower().endswith(".png"):
        raise ConfigError(f"--plot {path!r}: the picture is a PNG; allowed: a path ending "
                          "in .png")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--plot {path!r}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--plot {path!r}: directory {parent} is not writable")


def _figure(ncols: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI,
                             layout="constrained")
    return fig, axes


def _save(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": "mooncake"},
                pil_kwargs={"optimize": True})
    plt.close(fig)


def _plain_ticks() -> Any:
    """Tick labels of a log axis as plain numbers (0.4, 2, 30), not powers of ten."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v:g}")


def _size_label(n: float) -> str:
    n = int(n)
    for unit, per in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= per and n % per == 0:
            return f"{n // per}{unit}"
    return str(n)


def tune_curves(points: Sequence[dict[str, Any]], winner: dict[str, Any], title: str,
                path: str, latency_bound_us: float | None = None) -> None:
    """Three panels from a sweep's ``points`` (dicts with slice_size, workers, batch_size, gbps,
    p99_us): throughput and p99 batch latency against slice size at the winner's batch size,
    and throughput against batch size at the winner's slice size; a line per worker count,
    the winner starred."""
    fig, (a_tp, a_lat, a_batch) = _figure(3)
    ok = [p for p in points if not p.get("error")]
    workers = sorted({p["workers"] for p in ok})
    slices = sorted({p["slice_size"] for p in ok})
    batches = sorted({p["batch_size"] for p in ok})
    wb, ws = winner["batch_size"], winner["slice_size"]
    for w in workers:
        row = sorted((p for p in ok if p["workers"] == w and p["batch_size"] == wb),
                     key=lambda p: p["slice_size"])
        xs = [p["slice_size"] for p in row]
        line, = a_tp.plot(xs, [p["gbps"] for p in row], marker="o", label=f"{w} workers")
        a_lat.plot(xs, [p["p99_us"] / 1e3 for p in row], marker="o", color=line.get_color(),
                   label=f"{w} workers")
        col = sorted((p for p in ok if p["workers"] == w and p["slice_size"] == ws),
                     key=lambda p: p["batch_size"])
        a_batch.plot([p["batch_size"] for p in col], [p["gbps"] for p in col], marker="o",
                     color=line.get_color(), label=f"{w} workers")
    star = dict(marker="*", s=260, color="gold", edgecolors="black", zorder=5, label="chosen")
    a_tp.scatter([ws], [winner["gbps"]], **star)
    a_lat.scatter([ws], [winner["p99_us"] / 1e3], **star)
    a_batch.scatter([wb], [winner["gbps"]], **star)
    if latency_bound_us is not None:
        a_lat.axhline(latency_bound_us / 1e3, color="red", linestyle="--",
                      label=f"bound {latency_bound_us:g} µs")
    for ax, xs in ((a_tp, slices), (a_lat, slices)):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [_size_label(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("slice size (bytes)")
    a_batch.set_xscale("log", base=2)
    a_batch.set_xticks(batches, [str(b) for b in batches])
    a_batch.minorticks_off()
    a_batch.set_xlabel("batch size (requests)")
    a_tp.set_ylabel("throughput (GB/s)")
    a_lat.set_ylabel("p99 batch latency (ms)")
    a_batch.set_ylabel("throughput (GB/s)")
    a_tp.set_title(f"throughput, batch {wb}")
    a_lat.set_title(f"p99 latency, batch {wb}")
    a_batch.set_title(f"throughput, slice {_size_label(ws)}")
    a_lat.set_yscale("log")
    plain = _plain_ticks()
    a_lat.yaxis.set_major_formatter(plain)
    a_lat.yaxis.set_minor_formatter(plain)
    for ax in (a_tp, a_lat, a_batch):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    a_tp.set_ylim(bottom=0)
    a_batch.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def bench_run(completions_s: Sequence[float], latencies_s: Sequence[float], batch_bytes: int,
              elapsed_s: float, title: str, path: str) -> None:
    """Two panels of one benchmark run: throughput over time (batches completed per interval)
    and the batch latency distribution (CDF, p50 and p99 marked)."""
    fig, (a_t, a_cdf) = _figure(2)
    bins = 50
    width = max(elapsed_s, 1e-6) / bins
    counts = [0] * bins
    for t in completions_s:
        counts[min(bins - 1, max(0, int(t / width)))] += 1
    xs = [(i + 0.5) * width for i in range(bins)]
    a_t.plot(xs, [c * batch_bytes / width / 1e9 for c in counts], marker=".")
    a_t.set_xlabel("time (s)")
    a_t.set_ylabel("throughput (GB/s)")
    a_t.set_ylim(bottom=0)
    a_t.set_title(f"throughput per {width * 1e3:.0f} ms")
    lat = sorted(x * 1e3 for x in latencies_s)
    if lat:
        n = len(lat)
        a_cdf.plot(lat, [(i + 1) / n for i in range(n)])
        for q in (0.5, 0.99):
            v = lat[min(n - 1, int(q * n))]
            a_cdf.axvline(v, linestyle="--", color="gray")
            a_cdf.annotate(f"p{int(q * 100)} {v:.3g} ms", (v, q), fontsize=8,
                           xytext=(4, -12), textcoords="offset points")
        a_cdf.set_xscale("log")
        a_cdf.xaxis.set_major_formatter(_plain_ticks())
    a_cdf.set_xlabel("batch latency (ms)")
    a_cdf.set_ylabel("fraction of batches")
    a_cdf.set_title(f"batch latency CDF ({len(lat)} batches)")
    for ax in (a_t, a_cdf):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
