"""The standard figures. Each function takes measured rows (a pandas DataFrame, or its rows as dicts) and returns a
matplotlib Figure.

pyplot is used so that JupyterLab and papermill show the figure when the cell ends; assign the
result (``fig = plots...``) so it is not shown twice.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import pandas as pd

# matplotlib is optional (the lab extra, like ipywidgets): each figure function imports pyplot itself, so that
# labkit, and a notebook that only prints its tables, work where it is not installed.

BACKEND_COLORS = {"MATH": "#cf222e", "FLASH_ATTENTION": "#0969da", "EFFICIENT_ATTENTION": "#1a7f37",
                  "CUDNN_ATTENTION": "#8250df"}


def _line(ax, series: pd.DataFrame, x: str, y: str, label: str, *, spread: tuple[str, str] | None = None,
          color: str | None = None) -> None:
    """One series, its points joined (with p10-p90 bars where ``spread`` names them), and a black cross on the rows
    whose ``noisy`` is true: re-measured and still against the trend (:func:`labkit.timing.recheck_trend`), shown but
    not trusted."""
    series = series.dropna(subset=[y]).sort_values(x)
    if spread:
        errors = [(series[y] - series[spread[0]]).clip(lower=0), (series[spread[1]] - series[y]).clip(lower=0)]
        ax.errorbar(series[x], series[y], yerr=errors, marker="o", capsize=3, label=label, color=color)
    else:
        ax.plot(series[x], series[y], marker="o", label=label, color=color)
    noisy = series[series["noisy"].fillna(False).astype(bool)] if "noisy" in series else series.iloc[:0]
    if len(noisy):
        ax.scatter(noisy[x], noisy[y], marker="x", s=70, color="k", zorder=3, label="noisy (not used)")


def _finish(ax, xlabel: str, ylabel: str, *, logx: bool = False, logy: bool = False) -> None:
    """Labels, scales (powers of two along x), a grid, and a legend with each label once."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    handles = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    if handles:
        ax.legend(handles.values(), handles.keys(), fontsize=8)


def _titled(fig, title: str):
    """The figure with its title above every panel, laid out."""
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def lines(rows, *, x: str, y: str, series: str, panel: str | list[str] | None = None,
          spread: tuple[str, str] | None = None, xlabel: str = "", ylabel: str = "", title: str = "",
          logx: bool = False, logy: bool = False):
    """One panel per value of the ``panel`` column (its title; several columns: "batch 8, length 128"), in each one
    line per value of ``series``: ``y`` against ``x``, with the p10-p90 spread where ``spread`` names its columns, and
    noisy rows crossed."""
    import matplotlib.pyplot as plt

    table = pd.DataFrame(rows)
    groups = list(table.groupby(panel, sort=False)) if panel and len(table) else \
        [("" if len(table) else "(nothing measured)", table)]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.6), squeeze=False)
    for ax, (name, part) in zip(axes[0], groups, strict=True):
        for label, one in part.groupby(series, sort=False) if len(part) else []:
            _line(ax, one, x, y, label, spread=spread)
        if isinstance(panel, list):
            name = ", ".join(f"{column} {value}" for column, value in zip(panel, name, strict=True))
        ax.set_title(name, fontsize=10)
        _finish(ax, xlabel or x, ylabel or y, logx=logx, logy=logy)
    return _titled(fig, title)


def attention_sweep(rows, *, head_dim: int, causal: bool, title: str = "",
                    score_bytes_per_token_pair: float | None = None):
    """Three panels for one head size and mask: time vs length (log-log), peak extra memory vs length,
    and the fraction of the measured matmul ceiling each backend reached.

    ``rows``: notebook 01's sweep table with columns backend, head_dim, causal, n, status, ms, peak MiB, fraction of
    ceiling and noisy. ``score_bytes_per_token_pair`` (batch x heads x element size) draws the memory of one full score
    matrix, the N^2 term that the math backend materialises and the fused backends avoid. Noisy rows are crossed on
    the time and fraction panels (memory is not a timing).
    """
    import matplotlib.pyplot as plt

    table = pd.DataFrame(rows)
    table = table[(table["status"] == "ok") & (table["head_dim"] == head_dim) & (table["causal"] == causal)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("ms", "peak MiB", "fraction of ceiling"), ("median time per call (ms)",
                              "peak extra memory (MiB)", "fraction of the matmul ceiling"), strict=True):
        for backend, one in table.groupby("backend", sort=False):
            _line(ax, one if key != "peak MiB" else one.drop(columns="noisy", errors="ignore"), "n", key,
                  backend.replace("_ATTENTION", "").lower(), color=BACKEND_COLORS.get(backend))
        if key == "peak MiB" and score_bytes_per_token_pair and len(table):
            n = sorted(table["n"].unique())
            ax.plot(n, [score_bytes_per_token_pair * v * v / 2**20 for v in n], "k--", linewidth=1,
                    label="one N x N score matrix")
        if key == "fraction of ceiling":
            ax.axhline(1.0, color="k", linewidth=1, linestyle=":")
            ax.set_ylim(bottom=0)
        _finish(ax, "sequence length N", label, logx=True, logy=key != "fraction of ceiling")
    return _titled(fig, title or f"SDPA forward, head size {head_dim}, {'causal' if causal else 'no mask'}")


def bars(labels: Sequence[str], values: Sequence[float], *, xlabel: str, title: str = "",
         limit: float | None = None, limit_label: str = "limit"):
    """Horizontal bars (one per label) with an optional vertical line at the machine's limit."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    ax.barh(list(labels), list(values), color=[BACKEND_COLORS.get(label, "#57606a") for label in labels])
    if limit:
        ax.axvline(limit, color="k", linestyle="--", linewidth=1, label=limit_label)
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()
    ax.set_title(title)
    fig.tight_layout()
    return fig


DEVICE_COLORS = ["#0969da", "#1a7f37", "#8250df", "#bf8700", "#cf222e", "#1b7c83", "#953800", "#d6409f"]


def device_maps(placements: dict[str, Sequence[dict[str, Any]]], *, title: str = ""):
    """One bar per plan: the model's blocks from embeddings to output layer, each as wide as its bytes and
    coloured by the device a device map gives it (rows from ``labkit.parallel.plan_device_map``)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    devices = list(dict.fromkeys(row["device"] for rows in placements.values() for row in rows))
    gpus = sorted(d for d in devices if isinstance(d, int))
    others = [d for d in ("cpu", "disk", None) if d in devices]
    colors = {**{d: DEVICE_COLORS[i % len(DEVICE_COLORS)] for i, d in enumerate(gpus)},
              "cpu": "#afb8c1", "disk": "#57606a", None: "#ffffff"}
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(placements) + 1.4))
    for y, rows in enumerate(placements.values()):
        total = sum(r["bytes"] for r in rows) or 1
        widths = [r["bytes"] / total for r in rows]
        ax.barh([y] * len(rows), widths, left=[0.0, *itertools.accumulate(widths)][:-1],
                color=[colors[r["device"]] for r in rows], edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(placements)), list(placements))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the model's bytes, embeddings on the left, output layer on the right")
    handles = [Patch(color=colors[d], label="nowhere" if d is None else f"GPU {d}" if isinstance(d, int) else d)
               for d in gpus + others]
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def scaling(rows, *, ylabel: str, title: str = ""):
    """Speed-up against the number of processes, one line per job, beside the ideal (N processes, N times): ``rows``
    with columns job, processes and speed-up."""
    import matplotlib.pyplot as plt

    table = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for job, one in table.groupby("job", sort=False):
        _line(ax, one, "processes", "speed-up", job)
    counts = sorted(set(table["processes"]) | {1})
    ax.plot(counts, counts, "k--", linewidth=1, label="ideal: N x")
    ax.set_xticks(counts)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    _finish(ax, "processes N", ylabel)
    fig.tight_layout()
    return fig


def bandwidth_sweep(rows: Sequence[dict[str, Any]], *, limit: float | None = None, limit_label: str = "limit",
                    title: str = ""):
    """Bus bandwidth and time per all-reduce against message size (rows from ``scripts/allreduce_bench.py``)."""
    import matplotlib.pyplot as plt

    table = pd.DataFrame(rows).assign(**{"bus bandwidth": lambda t: t["busbw_bytes_per_s"] / 1e9})
    fig, (ax_bw, ax_time) = plt.subplots(1, 2, figsize=(11, 3.6))
    _line(ax_bw, table, "bytes", "bus bandwidth", "bus bandwidth")
    if limit:
        ax_bw.axhline(limit / 1e9, color="k", linestyle="--", linewidth=1, label=limit_label)
    _line(ax_time, table, "bytes", "median_us", "")
    _finish(ax_bw, "message size (bytes)", "GB/s", logx=True, logy=True)
    _finish(ax_time, "message size (bytes)", "time per all-reduce (µs)", logx=True, logy=True)
    return _titled(fig, title)


def quantized_formats(rows, *, title: str = ""):
    """Notebook 04's summary: one bar per format in three panels, footprint (MiB), batch-1 decode as a fraction of the
    format's own bandwidth bound, and perplexity change against 16-bit (%). ``rows`` hold ``format``, ``MiB``,
    ``fraction of bound`` and ``perplexity change``; a value left None is drawn as no bar."""
    import matplotlib.pyplot as plt

    table = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.4 * len(table) + 1.8))
    colors = ["#0969da" if n.startswith("torchao") else "#57606a" if n == "16-bit" else "#bf8700"
              for n in table["format"]]
    for ax, key, scale, label in ((axes[0], "MiB", 1.0, "footprint (MiB)"),
                                  (axes[1], "fraction of bound", 1.0, "batch-1 decode, fraction of its bound"),
                                  (axes[2], "perplexity change", 100.0, "perplexity change vs 16-bit (%)")):
        ax.barh(table["format"], table[key].astype(float).fillna(0.0) * scale, color=colors)
        ax.set_xlabel(label)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    return _titled(fig, title)


def weight_only_sweep(rows, *, curve: Sequence[tuple[float, float]] = (), roofline_batch: float | None = None,
                      title: str = ""):
    """int4 weight-only against 16-bit for one layer, by batch (notebook 04's sweep table, with ``batch``,
    ``int4 speed-up``, ``roofline speed-up`` and ``noisy``): the measured speed-up beside the roofline's (``curve``:
    (batch, speed-up) points, else the rows' own), a line at 1x, and the roofline's break-even batch."""
    import matplotlib.pyplot as plt

    table = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    _line(ax, table, "batch", "int4 speed-up", "measured")
    roof = list(curve) or list(zip(table["batch"], table["roofline speed-up"], strict=True))
    ax.plot([b for b, _ in roof], [g for _, g in roof], linestyle="--", color="k", label="roofline")
    ax.axhline(1.0, color="#cf222e", linewidth=1, label="no gain")
    if roofline_batch:
        ax.axvline(roofline_batch, color="k", linewidth=1, linestyle=":", label=f"roofline: batch {roofline_batch:.0f}")
    ax.set_yscale("log", base=2)
    ax.set_title(title, fontsize=10)
    _finish(ax, "batch (one token per sequence)", "int4 speed-up over 16-bit", logx=True)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- 06 · serving

def serving_curve(curve, *, knee: float, title: str = ""):
    """Tokens/s against per-token latency for each batch size, with the two bounds drawn against the batch (``curve``:
    notebook 06's table, columns batch, tokens/s, per-token latency ms, bandwidth and compute bound tokens/s)."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    batch, rate, step = curve["batch"], curve["tokens/s"], curve["per-token latency ms"]
    left.plot(step, rate, "o-", color="#0969da")
    for b, x, y in zip(batch, step, rate, strict=True):
        left.annotate(f"b{b}", (x, y), textcoords="offset points", xytext=(4, 4))
    left.set_title("throughput against latency")
    _finish(left, "per-token latency (ms per step)", "tokens/s (all sequences)")
    right.plot(batch, rate, "o-", color="#0969da", label="measured")
    right.plot(batch, curve["bandwidth bound tokens/s"], "--", color="#cf222e", label="bandwidth bound")
    right.plot(batch, curve["compute bound tokens/s"], ":", color="#1a7f37", label="compute bound")
    right.axvline(knee, color="grey", lw=0.8)
    right.set_title(f"against the roofline (the bounds meet near batch {knee:.0f})")
    _finish(right, "batch", "tokens/s", logx=True, logy=True)
    return _titled(fig, title)


def server_load(levels, *, title: str = ""):
    """Requests/s and tokens/s, and TTFT and latency percentiles, per number of concurrent clients (``levels``: a
    DataFrame with a row per level, as notebook 06's load cell builds it)."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    clients = levels["concurrency"]
    left.plot(clients, levels["tokens_per_s"], "o-", label="tokens/s")
    left.plot(clients, levels["requests_per_s"], "s-", label="requests/s")
    left.set_title("throughput")
    for key, style in (("ttft_p50_ms", "o-"), ("ttft_p99_ms", "o--"), ("latency_p50_ms", "s-"),
                       ("latency_p99_ms", "s--")):
        if key in levels:
            right.plot(clients, levels[key], style, label=key.replace("_ms", "").replace("_", " "))
    right.set_title("time to first token and latency")
    _finish(left, "concurrent clients", "", logx=True)
    _finish(right, "concurrent clients", "ms", logx=True)
    return _titled(fig, title)
