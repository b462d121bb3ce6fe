import matplotlib

matplotlib.use("Agg")

from labkit import plots  # noqa: E402

ROWS = [
    {"backend": b, "head_dim": 64, "causal": True, "seq": n, "status": "ok", "median_ms": t * n / 64,
     "peak_extra_bytes": m * n, "fraction_of_ceiling": f}
    for b, t, m, f in (("MATH", 2.0, 4096, 0.2), ("FLASH_ATTENTION", 1.0, 64, 0.6)) for n in (64, 128, 256)
] + [{"backend": "CUDNN_ATTENTION", "head_dim": 64, "causal": True, "seq": 64, "status": "refused"}]


def test_attention_sweep_draws_one_line_per_backend_that_ran():
    fig = plots.attention_sweep(ROWS, head_dim=64, causal=True, score_bytes_per_token_pair=4.0)
    time_ax, memory_ax, fraction_ax = fig.axes
    assert [line.get_label() for line in time_ax.lines] == ["math", "flash"]
    assert len(memory_ax.lines) == 3  # two backends and the N^2 score-matrix line
    assert list(time_ax.lines[0].get_xdata()) == [64, 128, 256]
    assert time_ax.get_xscale() == "log" and time_ax.get_yscale() == "log"


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
