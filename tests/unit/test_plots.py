import matplotlib

matplotlib.use("Agg")

from labkit import plots  # noqa: E402

ROWS = [
    {"backend": b, "head_dim": 64, "causal": True, "n": n, "status": "ok", "ms": t * n / 64,
     "peak MiB": m * n / 2**20, "fraction of ceiling": f}
    for b, t, m, f in (("MATH", 2.0, 4096, 0.2), ("FLASH_ATTENTION", 1.0, 64, 0.6)) for n in (64, 128, 256)
] + [{"backend": "CUDNN_ATTENTION", "head_dim": 64, "causal": True, "n": 64, "status": "refused"}]


def test_attention_sweep_draws_one_line_per_backend_that_ran():
    fig = plots.attention_sweep(ROWS, head_dim=64, causal=True, score_bytes_per_token_pair=4.0)
    time_ax, memory_ax, fraction_ax = fig.axes
    assert [line.get_label() for line in time_ax.lines] == ["math", "flash"]
    assert len(memory_ax.lines) == 3  # two backends and the N^2 score-matrix line
    assert list(time_ax.lines[0].get_xdata()) == [64, 128, 256]
    assert time_ax.get_xscale() == "log" and time_ax.get_yscale() == "log"


def test_attention_sweep_marks_noisy_points_on_the_time_and_fraction_panels():
    rows = [dict(r) for r in ROWS]
    rows[1]["noisy"] = True  # MATH at N=128
    time_ax, memory_ax, fraction_ax = plots.attention_sweep(rows, head_dim=64, causal=True).axes
    for ax in (time_ax, fraction_ax):
        crosses = [c for c in ax.collections if c.get_label() == "noisy (not used)"]
        assert len(crosses) == 1 and list(crosses[0].get_offsets()[:, 0]) == [128]
    assert not memory_ax.collections  # memory is not a timing: nothing to doubt there


def test_attention_sweep_with_nothing_measured_still_draws():
    fig = plots.attention_sweep(ROWS, head_dim=128, causal=False)
    assert all(not ax.lines or ax is fig.axes[2] for ax in fig.axes)


def test_bars_with_a_limit_line():
    fig = plots.bars(["MATH", "FLASH_ATTENTION"], [1.0, 3.0], xlabel="TFLOP/s", limit=4.0)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 and ax.lines[0].get_xdata()[0] == 4.0


def test_panels_draw_one_axis_per_panel_and_one_line_per_label():
    fig = plots.panels({"batch 8": {"a": ([0, 0.5], [1, 2]), "b": ([0, 0.5], [2, 1])}, "batch 32": {"a": ([0], [3])}},
                       xlabel="padding", ylabel="tokens/s")
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2 and fig.axes[1].get_title() == "batch 32"


def test_panels_cross_the_noisy_points_only():
    fig = plots.panels({"batch 8": {"fastpath": ([0, 0.5, 0.75], [1, 2, 3], [False, True, False]),
                                    "sdpa": ([0, 0.5], [2, 1])}}, xlabel="padding", ylabel="tokens/s")
    crosses = [c for c in fig.axes[0].collections if c.get_label() == "noisy (not used)"]
    assert len(crosses) == 1 and [tuple(p) for p in crosses[0].get_offsets()] == [(0.5, 2)]
    assert not plots.panels({"b": {"a": ([0], [1], [False])}}, xlabel="x", ylabel="y").axes[0].collections


def test_prefill_sweep_draws_a_panel_per_model_and_marks_noisy_points():
    import pandas as pd

    table = pd.DataFrame([{"model": m, "attention": i, "prompt tokens": n, "median ms": t, "p10 ms": t * 0.9,
                           "p90 ms": t * 1.1, "noisy": noisy}
                          for m, i, n, t, noisy in (("a", "eager", 32, 2.0, False), ("a", "eager", 128, 1.0, True),
                                                    ("a", "sdpa", 32, 1.5, False), ("a", "sdpa", 128, 3.0, False),
                                                    ("b", "sdpa", 32, 0.5, False))])
    fig = plots.prefill_sweep(table)
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"]
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "eager: noisy, no conclusion" in labels and "sdpa: noisy, no conclusion" not in labels
    assert plots.prefill_sweep(pd.DataFrame()).axes[0].get_title() == "(nothing measured)"


def test_quantized_formats_draws_three_panels_of_one_bar_per_format():
    rows = [{"format": "16-bit", "MiB": 256.0, "fraction of bound": 0.05, "perplexity change": 0.0},
            {"format": "nf4", "MiB": 111.0, "fraction of bound": 0.03, "perplexity change": 0.3},
            {"format": "torchao-int4", "MiB": 111.0, "fraction of bound": None, "perplexity change": 0.4}]
    fig = plots.quantized_formats(rows, title="t")
    assert len(fig.axes) == 3 and all(len(ax.patches) == 3 for ax in fig.axes)
    assert [p.get_width() for p in fig.axes[2].patches] == [0.0, 30.0, 40.0]


def test_weight_only_sweep_draws_the_measured_and_the_roofline_speed_up():
    rows = [{"batch": 1, "int4 speed-up": 3.0, "roofline speed-up": 4.0, "noisy": ""},
            {"batch": 16, "int4 speed-up": 0.8, "roofline speed-up": 2.0, "noisy": "noisy"}]
    ax = plots.weight_only_sweep(rows, roofline_batch=39.0).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert {"measured", "roofline", "no gain", "roofline: batch 39", "noisy (not used)"} <= set(labels)
    assert ax.get_xscale() == "log"
