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


def test_lines_draw_one_axis_per_panel_and_one_line_per_series():
    rows = [{"batch": b, "length": 64, "way": w, "padding": p, "tokens/s": t}
            for b, w, p, t in ((8, "a", 0, 1), (8, "a", 0.5, 2), (8, "b", 0, 2), (8, "b", 0.5, 1), (32, "a", 0, 3))]
    fig = plots.lines(rows, x="padding", y="tokens/s", series="way", panel=["batch", "length"])
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2 and fig.axes[1].get_title() == "batch 32, length 64"
    assert plots.lines(rows, x="padding", y="tokens/s", series="way", panel="batch").axes[1].get_title() == "32"


def test_lines_cross_the_noisy_points_only():
    rows = [{"way": "fastpath", "padding": p, "tokens/s": t, "noisy": n}
            for p, t, n in ((0, 1, False), (0.5, 2, True), (0.75, 3, False))] + \
        [{"way": "sdpa", "padding": 0, "tokens/s": 2}]
    crosses = [c for c in plots.lines(rows, x="padding", y="tokens/s", series="way").axes[0].collections
               if c.get_label() == "noisy (not used)"]
    assert len(crosses) == 1 and [tuple(p) for p in crosses[0].get_offsets()] == [(0.5, 2)]
    assert not plots.lines([{"way": "a", "padding": 0, "tokens/s": 1, "noisy": False}], x="padding", y="tokens/s",
                           series="way").axes[0].collections


def test_lines_with_a_spread_draw_error_bars_and_a_panel_per_model():
    import pandas as pd

    table = pd.DataFrame([{"model": m, "attention": i, "prompt tokens": n, "median ms": t, "p10 ms": t * 0.9,
                           "p90 ms": t * 1.1, "noisy": noisy}
                          for m, i, n, t, noisy in (("a", "eager", 32, 2.0, False), ("a", "eager", 128, 1.0, True),
                                                    ("a", "sdpa", 32, 1.5, False), ("a", "sdpa", 128, 3.0, False),
                                                    ("b", "sdpa", 32, 0.5, False))])
    fig = plots.lines(table, x="prompt tokens", y="median ms", series="attention", panel="model",
                      spread=("p10 ms", "p90 ms"), logx=True, logy=True)
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"]
    assert fig.axes[0].containers and fig.axes[0].get_xscale() == "log"  # the p10-p90 error bars
    assert sorted(fig.axes[0].get_legend().get_texts()[i].get_text() for i in range(3)) == \
        ["eager", "noisy (not used)", "sdpa"]  # the cross once, although both series could have one
    assert plots.lines(pd.DataFrame(), x="n", y="ms", series="a", panel="m").axes[0].get_title() == "(nothing measured)"


def test_scaling_draws_each_job_beside_the_ideal():
    rows = [{"job": j, "processes": n, "speed-up": s} for j, n, s in (("tp", 1, 1.0), ("tp", 2, 1.6), ("dp", 2, 1.9))]
    ax = plots.scaling(rows, ylabel="speed-up").axes[0]
    assert [line.get_label() for line in ax.lines] == ["tp", "dp", "ideal: N x"]


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
