"""The standard figures. Each function takes measured rows and returns a matplotlib Figure.

pyplot is used so that JupyterLab and papermill show the figure when the cell ends; assign the
result (``fig = plots...``) so it is not shown twice.
"""

from __future__ import annotations

from typing import Any, Sequence

# matplotlib is optional (the lab extra, like ipywidgets): each figure function imports pyplot itself, so that
# labkit, and a notebook that only prints its tables, work where it is not installed.

BACKEND_COLORS = {"MATH": "#cf222e", "FLASH_ATTENTION": "#0969da", "EFFICIENT_ATTENTION": "#1a7f37",
                  "CUDNN_ATTENTION": "#8250df"}


def _series(rows: Sequence[dict[str, Any]], key: str, head_dim: int | None, causal: bool | None):
    """{backend: ([n...], [value...])} for the rows that ran and have ``key``."""
    out: dict[str, tuple[list, list]] = {}
    for row in rows:
        if row.get("status") != "ok" or row.get(key) is None or row.get(key) != row.get(key):  # None or NaN
            continue
        if head_dim is not None and row["head_dim"] != head_dim:
            continue
        if causal is not None and row["causal"] != causal:
            continue
        xs, ys = out.setdefault(row["backend"], ([], []))
        xs.append(row["n"])
        ys.append(row[key])
    return out


def attention_sweep(rows, *, head_dim: int, causal: bool, title: str = "",
                    score_bytes_per_token_pair: float | None = None):
    """Three panels for one head size and mask: time vs length (log-log), peak extra memory vs length,
    and the fraction of the measured matmul ceiling each backend reached.

    ``rows``: notebook 01's sweep table (a pandas DataFrame, or its rows as dicts) with columns backend, head_dim,
    causal, n, status, ms, peak MiB, fraction of ceiling and noisy. ``score_bytes_per_token_pair`` (batch x heads x
    element size) draws the memory of one full score matrix, the N^2 term that the math backend materialises and the
    fused backends avoid. Rows marked ``noisy`` (:func:`labkit.attention.mark_noisy`) get a black cross on the time and
    fraction panels.
    """
    import matplotlib.pyplot as plt

    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)
    fig, (ax_time, ax_memory, ax_fraction) = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [(ax_time, "ms", "median time per call (ms)"),
              (ax_memory, "peak MiB", "peak extra memory (MiB)"),
              (ax_fraction, "fraction of ceiling", "fraction of the matmul ceiling")]
    lengths: set[int] = set()
    for ax, key, label in panels:
        for backend, (xs, ys) in _series(rows, key, head_dim, causal).items():
            lengths.update(xs)
            ax.plot(xs, ys, marker="o", label=backend.replace("_ATTENTION", "").lower(),
                    color=BACKEND_COLORS.get(backend))
        # timings still against the trend after a re-measurement (labkit.attention.mark_noisy): shown, not trusted
        noisy = [(r["n"], r[key]) for r in rows if r.get("noisy") and r.get(key) is not None
                 and r["head_dim"] == head_dim and r["causal"] == causal and key != "peak MiB"]
        if noisy:
            ax.scatter(*zip(*noisy, strict=True), marker="x", s=70, color="k", zorder=3, label="noisy (not used)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.set_yscale("log")
    ax_memory.set_yscale("log")
    if score_bytes_per_token_pair and lengths:
        xs = sorted(lengths)
        ax_memory.plot(xs, [score_bytes_per_token_pair * n * n / 2**20 for n in xs], "k--", linewidth=1,
                       label="one N x N score matrix")
    ax_fraction.axhline(1.0, color="k", linewidth=1, linestyle=":")
    ax_fraction.set_ylim(bottom=0)
    for ax in (ax_time, ax_memory, ax_fraction):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or f"SDPA forward, head size {head_dim}, {'causal' if causal else 'no mask'}")
    fig.tight_layout()
    return fig


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


def panels(data: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], *, xlabel: str, ylabel: str,
           title: str = "", logy: bool = False):
    """One panel per key of ``data``; in each, one line per label: ``{panel: {label: (xs, ys)}}``. A third element,
    ``(xs, ys, noisy)``, puts a black cross on the points whose flag is true (re-measured, still against the trend:
    :func:`labkit.timing.recheck_trend`), as :func:`attention_sweep` does."""
    import matplotlib.pyplot as plt

    count = max(1, len(data))
    fig, axes = plt.subplots(1, count, figsize=(4.3 * count, 3.6), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], data.items(), strict=False):
        noisy = []
        for label, (xs, ys, *flags) in lines.items():
            ax.plot(list(xs), list(ys), marker="o", label=label)
            noisy += [(x, y) for x, y, flag in zip(xs, ys, flags[0] if flags else [], strict=False) if flag]
        if noisy:
            ax.scatter(*zip(*noisy, strict=True), marker="x", s=70, color="k", zorder=3, label="noisy (not used)")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


DEVICE_COLORS = ["#0969da", "#1a7f37", "#8250df", "#bf8700", "#cf222e", "#1b7c83", "#953800", "#d6409f"]


def device_maps(placements: dict[str, Sequence[dict[str, Any]]], *, title: str = ""):
    """One bar per plan: the model's blocks from embeddings to output layer, each as wide as its bytes and
    coloured by the device a device map gives it (rows from ``labkit.parallel.plan_device_map``)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    devices: list[Any] = []
    for rows in placements.values():
        for row in rows:
            if row["device"] not in devices:
                devices.append(row["device"])
    gpus = sorted(d for d in devices if isinstance(d, int))
    others = [d for d in ("cpu", "disk", None) if d in devices]
    colors = {d: DEVICE_COLORS[i % len(DEVICE_COLORS)] for i, d in enumerate(gpus)}
    colors.update({"cpu": "#afb8c1", "disk": "#57606a", None: "#ffffff"})
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(placements) + 1.4))
    for y, rows in enumerate(placements.values()):
        left = 0.0
        total = sum(r["bytes"] for r in rows) or 1
        for row in rows:
            width = row["bytes"] / total
            ax.barh(y, width, left=left, color=colors[row["device"]], edgecolor="white", linewidth=0.3)
            left += width
    ax.set_yticks(range(len(placements)), list(placements))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the model's bytes, embeddings on the left, output layer on the right")
    names = {None: "nowhere"}
    handles = [Patch(color=colors[d], label=names.get(d, f"GPU {d}" if isinstance(d, int) else str(d)))
               for d in gpus + others]
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def scaling(lines: dict[str, tuple[Sequence[int], Sequence[float]]], *, ylabel: str, title: str = ""):
    """Speed-up against the number of processes, one line per job, beside the ideal (N processes, N times)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    counts: set[int] = set()
    for label, (xs, ys) in lines.items():
        counts.update(xs)
        ax.plot(list(xs), list(ys), marker="o", label=label)
    if counts:
        ideal = sorted(counts | {1})
        ax.plot(ideal, ideal, "k--", linewidth=1, label="ideal: N x")
    ax.set_xlabel("processes N")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted(counts | {1}))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def bandwidth_sweep(rows: Sequence[dict[str, Any]], *, limit: float | None = None, limit_label: str = "limit",
                    title: str = ""):
    """Bus bandwidth and time per all-reduce against message size (rows from ``scripts/allreduce_bench.py``)."""
    import matplotlib.pyplot as plt

    fig, (ax_bw, ax_time) = plt.subplots(1, 2, figsize=(11, 3.6))
    sizes = [r["bytes"] for r in rows]
    ax_bw.plot(sizes, [r["busbw_bytes_per_s"] / 1e9 for r in rows], marker="o", label="bus bandwidth")
    if limit:
        ax_bw.axhline(limit / 1e9, color="k", linestyle="--", linewidth=1, label=limit_label)
    ax_bw.set_ylabel("GB/s")
    ax_time.plot(sizes, [r["median_us"] for r in rows], marker="o")
    ax_time.set_ylabel("time per all-reduce (µs)")
    ax_time.set_yscale("log")
    for ax in (ax_bw, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
    ax_bw.set_yscale("log")
    ax_bw.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def prefill_sweep(table, *, title: str = ""):
    """Prefill time against prompt tokens, one panel per model and one line per attention implementation (notebook 02's
    prefill table: ``model``, ``attention``, ``prompt tokens``, ``median ms``, ``p10 ms``, ``p90 ms``, ``noisy``): the
    median with its p10-p90 spread; a point the trend recheck left noisy is drawn hollow and labelled, because no
    conclusion is drawn from it."""
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(table.get("model", []))) or ["(nothing measured)"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, model in zip(axes[0], panels, strict=True):
        mine = table[table["model"] == model] if len(table) else table
        for implementation, series in (mine.groupby("attention", sort=False) if len(mine) else []):
            series = series.sort_values("prompt tokens")
            spread = [(series["median ms"] - series["p10 ms"]).clip(lower=0),
                      (series["p90 ms"] - series["median ms"]).clip(lower=0)]
            line = ax.errorbar(series["prompt tokens"], series["median ms"], yerr=spread, marker="o", capsize=3,
                               label=implementation)
            noisy = series[series["noisy"]]
            if len(noisy):
                ax.plot(noisy["prompt tokens"], noisy["median ms"], "o", markersize=11, markerfacecolor="none",
                        color=line[0].get_color(), label=f"{implementation}: noisy, no conclusion")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prefill time (ms)")
        ax.set_title(model, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def quantized_formats(rows: Sequence[dict[str, Any]], *, title: str = ""):
    """Notebook 04's summary: one bar per format in three panels, footprint (MiB), batch-1 decode as a fraction of the
    format's own bandwidth bound, and perplexity change against 16-bit (%). ``rows`` hold ``format``, ``MiB``,
    ``fraction of bound`` and ``perplexity change``; a value left None is drawn as no bar. A DataFrame works too."""
    import matplotlib.pyplot as plt

    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows

    fig, axes = plt.subplots(1, 3, figsize=(13, 0.4 * len(rows) + 1.8))
    names = [r["format"] for r in rows]
    for ax, key, scale, label in ((axes[0], "MiB", 1.0, "footprint (MiB)"),
                                  (axes[1], "fraction of bound", 1.0, "batch-1 decode, fraction of its bound"),
                                  (axes[2], "perplexity change", 100.0, "perplexity change vs 16-bit (%)")):
        ax.barh(names, [(r.get(key) or 0.0) * scale for r in rows],
                color=["#0969da" if n.startswith("torchao") else "#57606a" if n == "16-bit" else "#bf8700"
                       for n in names])
        ax.set_xlabel(label)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def weight_only_sweep(rows: Sequence[dict[str, Any]], *, curve: Sequence[tuple[float, float]] = (),
                      roofline_batch: float | None = None, title: str = ""):
    """int4 weight-only against 16-bit for one layer, by batch (notebook 04's sweep table, a DataFrame or rows with
    ``batch``, ``int4 speed-up``, ``roofline speed-up`` and ``noisy``): the measured speed-up beside the roofline's
    (``curve``: (batch, speed-up) points, else the rows' own), a line at 1x, and the roofline's break-even batch. Noisy
    points get a cross."""
    import matplotlib.pyplot as plt

    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = [r["batch"] for r in rows]
    ax.plot(xs, [r["int4 speed-up"] for r in rows], marker="o", label="measured")
    roof = list(curve) or [(r["batch"], r["roofline speed-up"]) for r in rows]
    ax.plot([b for b, _ in roof], [g for _, g in roof], linestyle="--", color="k", label="roofline")
    noisy = [(r["batch"], r["int4 speed-up"]) for r in rows if r.get("noisy")]
    if noisy:
        ax.scatter(*zip(*noisy, strict=True), marker="x", s=70, color="k", zorder=3, label="noisy (not used)")
    ax.axhline(1.0, color="#cf222e", linewidth=1, label="no gain")
    if roofline_batch:
        ax.axvline(roofline_batch, color="k", linewidth=1, linestyle=":", label=f"roofline: batch {roofline_batch:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("batch (one token per sequence)")
    ax.set_ylabel("int4 speed-up over 16-bit")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
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
    left.set_xlabel("per-token latency (ms per step)")
    left.set_ylabel("tokens/s (all sequences)")
    left.set_title("throughput against latency")
    right.plot(batch, rate, "o-", color="#0969da", label="measured")
    right.plot(batch, curve["bandwidth bound tokens/s"], "--", color="#cf222e", label="bandwidth bound")
    right.plot(batch, curve["compute bound tokens/s"], ":", color="#1a7f37", label="compute bound")
    right.axvline(knee, color="grey", lw=0.8)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("batch")
    right.set_ylabel("tokens/s")
    right.set_title(f"against the roofline (the bounds meet near batch {knee:.0f})")
    right.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def server_load(levels, *, title: str = ""):
    """Requests/s and tokens/s, and TTFT and latency percentiles, per number of concurrent clients (``levels``: a
    DataFrame with a row per level, as notebook 06's load cell builds it)."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    clients = levels["concurrency"]
    left.plot(clients, levels["tokens_per_s"], "o-", label="tokens/s")
    left.plot(clients, levels["requests_per_s"], "s-", label="requests/s")
    left.set_xlabel("concurrent clients")
    left.set_title("throughput")
    left.legend()
    for key, style in (("ttft_p50_ms", "o-"), ("ttft_p99_ms", "o--"), ("latency_p50_ms", "s-"),
                       ("latency_p99_ms", "s--")):
        if key in levels:
            right.plot(clients, levels[key], style, label=key.replace("_ms", "").replace("_", " "))
    right.set_xlabel("concurrent clients")
    right.set_ylabel("ms")
    right.set_title("time to first token and latency")
    right.legend()
    for axis in (left, right):
        axis.set_xscale("log", base=2)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
