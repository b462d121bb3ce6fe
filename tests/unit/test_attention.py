import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

from labkit import attention, attention_today, timing
from labkit.errors import BadParameter, LabkitError
from labkit.metrics import attention as names


def test_random_qkv_is_reproducible_and_shaped():
    first = attention.random_qkv(2, 3, 16, 8, seed=1)
    again = attention.random_qkv(2, 3, 16, 8, seed=1)
    other = attention.random_qkv(2, 3, 16, 8, seed=2)
    assert all(t.shape == (2, 3, 16, 8) for t in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    with pytest.raises(BadParameter, match="seq=0"):
        attention.random_qkv(1, 1, 0, 8)


@pytest.mark.parametrize("causal", [False, True])
def test_naive_attention_matches_sdpa(causal):
    q, k, v = attention.random_qkv(1, 2, 32, 16, dtype="float64")
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert attention.relative_error(attention.naive_attention(q, k, v, causal=causal), expected) < 1e-12


def test_relative_error_and_score_matrix_bytes():
    a = torch.ones(4)
    assert attention.relative_error(a, a) == 0.0
    assert math.isclose(attention.relative_error(a.double() * 1.01, a), 0.01, rel_tol=1e-9)
    assert attention.score_matrix_bytes(2, 4, 128, 64, "float16") == 2 * 4 * 128 * 64 * 2
    assert attention.score_matrix_bytes(1, 1, 10, 10, "float32") == 400


def test_backend_names_are_checked():
    assert attention.backend_names(None) == list(attention.BACKENDS)
    assert attention.backend_names("math") == ["MATH"]
    with pytest.raises(BadParameter, match="use one or more of"):
        attention.backend_names(["FLASH"])
    with pytest.raises(BadParameter):
        attention.backend_names([])


def test_backend_from_ops_reads_the_aten_op():
    assert attention.backend_from_ops(["aten::empty", "aten::_scaled_dot_product_flash_attention_for_cpu"]) == "FLASH_ATTENTION"
    assert attention.backend_from_ops(["aten::_scaled_dot_product_cudnn_attention"]) == "CUDNN_ATTENTION"
    assert attention.backend_from_ops(["aten::_scaled_dot_product_efficient_attention"]) == "EFFICIENT_ATTENTION"
    assert attention.backend_from_ops(["aten::_scaled_dot_product_attention_math", "aten::bmm"]) == "MATH"
    assert attention.backend_from_ops(["aten::bmm", "aten::softmax"]) is None


@pytest.mark.parametrize("backend", ["MATH", "FLASH_ATTENTION"])
def test_the_profiler_sees_the_forced_backend_on_cpu(backend):
    q, k, v = attention.random_qkv(1, 2, 32, 16)
    seen = attention.ops_that_ran(attention.sdpa_call(q, k, v, backend, causal=True), "cpu")
    assert seen.backend == backend
    assert "aten::_scaled_dot_product" in seen.evidence


def test_the_profiler_sees_no_sdpa_in_attention_by_hand():
    q, k, v = attention.random_qkv(1, 2, 32, 16)
    seen = attention.ops_that_ran(lambda: attention.naive_attention(q, k, v), "cpu")
    assert seen.backend is None and seen.evidence == "no attention op recorded"


def test_profiling_leaves_no_native_log_on_stderr(capfd):
    q, k, v = attention.random_qkv(1, 1, 8, 8)
    attention.ops_that_ran(attention.sdpa_call(q, k, v), "cpu")
    assert "profiler_start" not in capfd.readouterr().err


def test_math_holds_the_score_matrix_and_flash_does_not():
    q, k, v = attention.random_qkv(1, 4, 512, 64)
    one_matrix = attention.score_matrix_bytes(1, 4, 512, 512, "float32")
    math_peak = attention.peak_extra_memory(attention.sdpa_call(q, k, v, "MATH"), "cpu")
    flash_peak = attention.peak_extra_memory(attention.sdpa_call(q, k, v, "FLASH_ATTENTION"), "cpu")
    assert math_peak >= one_matrix
    assert flash_peak < one_matrix / 2


def test_enabled_backends_reports_the_global_switches():
    assert attention.enabled_backends() == {b: True for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH",
                                                            "CUDNN_ATTENTION")}
    with pytest.warns(FutureWarning, match="sdpa_kernel"):
        with torch.backends.cuda.sdp_kernel(enable_math=False):  # on purpose: the old API's switches
            assert attention.enabled_backends()["MATH"] is False
            assert attention.enabled_backends()["CUDNN_ATTENTION"] is True
    assert attention.enabled_backends()["MATH"] is True


def test_eligibility_on_cpu_names_the_reasons():
    rows = attention.eligibility("cpu", "float32", backends=["MATH", "FLASH_ATTENTION"])
    by_case = {(r["case"], r["backend"]): r for r in rows}
    assert all(r["ok"] for r in rows if r["backend"] == "MATH")
    three_d = by_case[("float32, 3-D inputs (no heads dimension)", "FLASH_ATTENTION")]
    assert not three_d["ok"] and "4 dimensional" in three_d["reason"] and "No available kernel" in three_d["error"]
    dropout = by_case[("float32, dropout_p=0.1", "FLASH_ATTENTION")]
    assert not dropout["ok"] and "dropout" in dropout["reason"]


def test_accuracy_rows_compare_with_float64():
    rows = attention.accuracy("cpu", ["float32", "bfloat16"], batch=1, heads=2, seq=32, head_dim=16)
    ran = [r for r in rows if r["ran"]]
    assert {r["backend"] for r in ran} == {"MATH", "FLASH_ATTENTION"}
    assert all(r["within_tolerance"] for r in ran)
    fp32 = [r["relative_error"] for r in ran if r["dtype"] == "float32"]
    bf16 = [r["relative_error"] for r in ran if r["dtype"] == "bfloat16"]
    assert max(fp32) < min(bf16)
    refused = [r for r in rows if not r["ran"]]
    assert refused and all(r["reason"] for r in refused)


def test_sweep_rows_carry_time_rate_fraction_and_memory():
    seen = []
    rows = attention.sweep("cpu", "float32", seq_lengths=[64, 32], head_dims=[16], causal=[True],
                           backends=["MATH", "EFFICIENT_ATTENTION"], heads=2, ceiling_flops_per_s=1e9,
                           warmup=0, repeats=1, on_row=seen.append)
    assert seen == rows
    math_rows = [r for r in rows if r["backend"] == "MATH"]
    assert [r["seq"] for r in math_rows] == [32, 64]
    for r in math_rows:
        assert r["status"] == "ok"
        assert r["flops"] == 4 * 1 * 2 * r["seq"] ** 2 * 16 // 2
        assert math.isclose(r["tflops"], r["flops"] / (r["median_ms"] / 1e3) / 1e12)
        assert math.isclose(r["fraction_of_ceiling"], r["tflops"] * 1e12 / 1e9)
        assert r["peak_extra_bytes"] > 0
    refused = [r for r in rows if r["backend"] == "EFFICIENT_ATTENTION"]
    assert refused and all(r["status"] == "refused" and "cpu" in r["reason"] for r in refused)


def test_sweep_turns_out_of_memory_into_rows_and_skips_longer_lengths(monkeypatch):
    real = attention.random_qkv

    def tight(batch, heads, seq, head_dim, **kwargs):
        if seq >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(batch, heads, seq, head_dim, **kwargs)

    monkeypatch.setattr(attention, "random_qkv", tight)
    rows = attention.sweep("cpu", "float32", seq_lengths=[32, 64, 128], head_dims=[16], causal=[False],
                           backends=["MATH"], heads=1, warmup=0, repeats=1, measure_memory=False)
    assert [r["status"] for r in rows] == ["ok", "oom", "skipped"]
    assert "out of memory" in rows[1]["reason"] and "(64)" in rows[2]["reason"]
    # Every row has every key, so a notebook can read r["peak_extra_bytes"] of any row (on an H100 it could not).
    assert all(set(r) == set(rows[0]) for r in rows)
    assert all(rows[i][key] is None for i in (1, 2) for key in attention.MEASURED_KEYS)


def test_sweep_skips_math_when_the_scores_would_not_fit(monkeypatch):
    monkeypatch.setattr(attention, "free_memory_bytes", lambda device: 4 * 2**20)
    rows = attention.sweep("cpu", "float32", seq_lengths=[1024], head_dims=[16], causal=[False],
                           backends=["MATH"], heads=1, warmup=0, repeats=1)
    assert rows[0]["status"] == "skipped" and "quarter" in rows[0]["reason"]
    assert rows[0]["peak_extra_bytes"] is None and rows[0]["median_ms"] is None


def test_plan_sweep_fills_defaults_and_rejects_bad_sizes():
    plan = attention.plan_sweep("cpu", quick=True)
    assert plan["seq_lengths"] == attention.default_sweep_sizes("cpu", True)["seq_lengths"]
    assert plan["repeats"] == 5 and plan["warmup"] == 1 and plan["head_dims"] == [64, 128]
    assert attention.plan_sweep("cpu", seq_lengths=[512, 128, 128], batch=2)["seq_lengths"] == [128, 512]
    with pytest.raises(BadParameter, match=r"seq_lengths\[0\]=-4"):
        attention.plan_sweep("cpu", seq_lengths=[-4])
    with pytest.raises(BadParameter, match="head_dims"):
        attention.plan_sweep("cpu", head_dims=[])
    with pytest.raises(BadParameter, match="batch=-1"):
        attention.plan_sweep("cpu", batch=-1)


def test_display_row_converts_units():
    row = {"backend": "MATH", "head_dim": 64, "causal": True, "seq": 128, "status": "ok", "reason": "",
           "median_ms": 2.0, "tflops": 0.5, "fraction_of_ceiling": 0.25, "peak_extra_bytes": 3 * 2**20}
    shown = attention.display_row(row)
    assert shown["% of ceiling"] == 25.0 and shown["peak MiB"] == 3.0 and shown["status"] == ""
    assert list(shown) == list(attention.DISPLAY_COLUMNS)
    refused = attention.display_row({"backend": "CUDNN_ATTENTION", "status": "refused", "reason": "no kernel"})
    assert refused["status"] == "refused" and refused["TFLOP/s"] is None


def test_best_backend_picks_the_fastest_that_ran_and_names_pytorchs_choice():
    choice = attention.best_backend("cpu", "float32", batch=1, heads=2, seq=128, head_dim=32, causal=True,
                                    warmup=0, repeats=2, ceiling_flops_per_s=1e10)
    ran = [r for r in choice.rows if r["status"] == "ok" and r["backend"] in attention.BACKENDS]
    assert {r["backend"] for r in ran} == {"MATH", "FLASH_ATTENTION"}
    assert choice.backend == min(ran, key=lambda r: r["median_ms"])["backend"]
    assert choice.tflops > 0
    assert any(r["backend"].startswith("PyTorch's choice (FLASH_ATTENTION)") for r in choice.rows)


def test_best_backend_with_no_candidate_that_runs():
    choice = attention.best_backend("cpu", "float32", batch=1, heads=1, seq=16, head_dim=8,
                                    candidates=["CUDNN_ATTENTION"], warmup=0, repeats=1)
    assert choice.backend is None and choice.median_ms is None and choice.tflops is None


def test_a_kernel_failure_is_a_failed_row_and_the_sweep_goes_on(monkeypatch):
    real = attention.sdpa_call

    def flaky(q, k, v, backends=None, **kwargs):
        if q.shape[-2] == 64:
            def broken():
                raise RuntimeError("cuDNN Frontend error: [cudnn_frontend] Error: No execution plans support the graph.")
            return broken
        return real(q, k, v, backends, **kwargs)

    monkeypatch.setattr(attention, "sdpa_call", flaky)
    rows = attention.sweep("cpu", "float32", seq_lengths=[32, 64, 128], head_dims=[16], causal=[False],
                           backends=["MATH"], heads=1, warmup=0, repeats=1, measure_memory=False)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[1]["reason"].startswith("RuntimeError: cuDNN Frontend error")


def test_refusal_is_judged_on_the_real_inputs():
    q, k, v = attention.random_qkv(1, 2, 16, 8)
    assert attention.refusal(attention.sdpa_call(q, k, v, "MATH"), "cpu", "MATH") == ""
    three_d = attention.sdpa_call(q[:, 0], k[:, 0], v[:, 0], "FLASH_ATTENTION")
    assert "4 dimensional" in attention.refusal(three_d, "cpu", "FLASH_ATTENTION")
    assert "no CUDNN_ATTENTION kernel for cpu" in attention.refusal(attention.sdpa_call(q, k, v, "CUDNN_ATTENTION"),
                                                                    "cpu", "CUDNN_ATTENTION")


def test_gpu_kernels_of_eager_attention_name_no_sdpa_backend():
    eager_on_gpu = attention.Profiled(ops=["aten::matmul", "aten::softmax", "aten::bmm"],
                                      kernels=["ampere_sgemm_128x64_tn", "void cunn_SoftMaxForward<4, float>"])
    assert eager_on_gpu.backend is None
    assert "cunn_SoftMaxForward" in eager_on_gpu.evidence
    flash_on_gpu = attention.Profiled(ops=["aten::_scaled_dot_product_flash_attention", "aten::empty"],
                                      kernels=["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>"])
    assert flash_on_gpu.backend == "FLASH_ATTENTION" and "flash_fwd_kernel" in flash_on_gpu.evidence


# --------------------------------------------------------------------------- a corrected fact, kept from regressing

def test_a_list_of_backends_runs_in_pytorchs_order_not_the_lists():
    """sdpa_kernel([MATH, FLASH_ATTENTION]) without set_priority only *allows* both: PyTorch tries them in its own
    order, which on this CPU runs FLASH_ATTENTION (the profiler proves it), whichever order the list gives."""
    q, k, v = attention.random_qkv(1, 2, 64, 16)

    def call():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    for listed in ([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION], [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        with sdpa_kernel(listed):
            assert attention.ops_that_ran(call, "cpu").backend == "FLASH_ATTENTION"
    with sdpa_kernel(SDPBackend.MATH):  # and one backend alone is the one that runs
        assert attention.ops_that_ran(call, "cpu").backend == "MATH"


def test_what_ran_proves_each_request_and_its_findings_hold_on_cpu():
    q, k, v = attention.random_qkv(1, 2, 64, 16)
    rows = attention.what_ran(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), "cpu")
    ran = {r["asked for"]: r["ran (profiler)"] for r in rows}
    assert [r["asked for"] for r in rows] == [asked for asked, _, _ in attention.REQUESTS]
    assert ran["no sdpa_kernel: PyTorch chooses"] == "FLASH_ATTENTION"
    assert ran["sdpa_kernel(SDPBackend.MATH)"] == "MATH"
    refused = next(r for r in rows if r["asked for"] == "sdpa_kernel(SDPBackend.CUDNN_ATTENTION)")
    assert refused["ran (profiler)"] is None and refused["evidence"].startswith("refused")
    found = attention.what_ran_findings(rows, "cpu")
    assert all(passed for passed, _ in found["checks"].values()), found["checks"]
    assert "whatever the priority says" in found["lines"][1]  # the CPU dispatcher ignores set_priority


# --------------------------------------------------------------------------- the notebook's plan and summary

def test_notebook_plan_fills_sizes_for_this_device():
    plan = attention.notebook_plan(device="cpu", quick=True)
    assert plan["dtype"] == torch.float32 and plan["runnable"] == ["MATH", "FLASH_ATTENTION"]
    assert plan["seq_lengths"] == [128, 256, 512] and plan["flex_seq"] == 512 and plan["model_problem"] is None
    assert plan["math_seq"] == 512  # the MATH backend's scores fit at every quick length
    assert plan["compile_flex"] is False and "quick" in plan["compile_flex_why"]
    assert "MATH, FLASH_ATTENTION" in plan["line"]
    full = attention.notebook_plan(device="cpu", quick=False, seq_lengths=[512, 64], compile_flex="auto")
    assert full["compile_flex"] is True and full["compile_flex_why"] == "" and full["seq_lengths"] == [64, 512]
    assert attention.notebook_plan(device="cpu", quick=True, compile_flex=False)["compile_flex_why"] == \
        "compile_flex=False"


@pytest.mark.parametrize("bad, named", [
    ({"seq_lengths": [0, 128]}, "seq_lengths[0]=0"),
    ({"seq_lengths": [128, -1]}, "seq_lengths[1]=-1"),
    ({"head_dims": []}, "head_dims=[]"),
    ({"batch": -2}, "batch=-2"),
    ({"repeats": 1.5}, "repeats=1.5"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"compile_flex": "yes"}, "compile_flex='yes'"),
    ({"dtype": "int4"}, "dtype='int4'"),
])
def test_notebook_plan_stops_a_bad_parameter_with_one_sentence(bad, named):
    with pytest.raises(BadParameter) as caught:
        attention.notebook_plan(device="cpu", quick=True, **bad)
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_notebook_plan_stops_a_misspelt_model():
    with pytest.raises(LabkitError):
        attention.notebook_plan(device="cpu", quick=True, model_id="smollm-135m")


FULL_RESULTS = {
    "metrics": {names.memory_growth_exponent("MATH"): 1.93, names.memory_growth_exponent("FLASH_ATTENTION"): 0.96,
                names.MATH_PEAK: 2.4, names.BEST_TFLOPS: 0.03, names.BEST_FRACTION: 0.08,
                names.PYTORCH_CHOICE_VS_BEST: 1.01, names.time_exponent("MATH"): 1.85, names.NOISY_POINTS: 2,
                names.masked("causal", "sdpa"): 9.3, names.masked("causal", "flex_eager"): 39.9,
                names.masked("document", "sdpa"): 9.8, names.masked("document", "flex_eager"): 28.8},
    "checks": {"a_list_runs_in_pytorchs_order_without_set_priority": True}, "skipped": {}}


def test_what_you_measured_says_each_part_in_a_sentence():
    lines = attention.what_you_measured(FULL_RESULTS)
    assert len(lines) == 6
    assert lines[0].startswith("Memory: the MATH backend's extra memory grew like N^1.93 and peaked at 2.4")
    assert "8% of this machine's measured matmul ceiling" in lines[1] and "1.01x" in lines[1]
    assert "N^1.85 (MATH)" in lines[2]
    assert lines[3].startswith("2 sweep point(s)")
    assert "39.9 ms against SDPA's 9.3 ms for a causal mask (flex eager)" in lines[4]
    assert "both orders" in lines[5]
    assert not any(check in line for check in FULL_RESULTS["checks"] for line in lines)  # words, not check names


def test_what_you_measured_reads_right_when_parts_were_skipped():
    assert attention.what_you_measured({"metrics": {}, "checks": {}, "skipped": {"everything": "no"}}) == []
    only_memory = {"metrics": {names.memory_growth_exponent("MATH"): 2.0}, "checks": {}, "skipped": {}}
    assert attention.what_you_measured(only_memory) == ["Memory: the MATH backend's extra memory grew like N^2.00."]
    no_flex = {k: v for k, v in FULL_RESULTS["metrics"].items() if not k.startswith("masked_")}
    no_pick = {k: v for k, v in no_flex.items() if k != names.PYTORCH_CHOICE_VS_BEST}
    lines = attention.what_you_measured({"metrics": no_pick, "checks": {}, "skipped": {}})
    assert len(lines) == 4 and not any("FlexAttention" in line for line in lines)
    assert lines[1].endswith("matmul ceiling.")


# --------------------------------------------------------------------------- findings the cells print and record

def test_math_seq_is_the_longest_length_the_sweep_tries_math_at(monkeypatch):
    assert attention.math_seq("cpu", 1, 2, [128, 256]) == 256
    free = 2 * attention.score_matrix_bytes(4, 16, 8192, 8192, "float32") * 4 - 1  # 8192's scores just too big
    monkeypatch.setattr(attention, "free_memory_bytes", lambda device: free)
    assert attention.math_seq("cuda:0", 4, 16, [4096, 8192, 16384]) == 4096
    monkeypatch.setattr(attention, "free_memory_bytes", lambda device: 1)
    assert attention.math_seq("cuda:0", 4, 16, [4096, 8192]) == 4096  # none fits: the shortest


def test_memory_findings_count_score_matrices_where_math_ran():
    rows = [_row("MATH", 128, 1.0, causal=False, peak=2 * attention.score_matrix_bytes(1, 2, 128, 128)),
            _row("MATH", 256, 2.0, causal=False, peak=2 * attention.score_matrix_bytes(1, 2, 256, 256)),
            {**_row("MATH", 512, None, causal=False), "status": "skipped", "peak_extra_bytes": None},
            _row("FLASH_ATTENTION", 128, 1.0, causal=False, peak=1000),
            _row("FLASH_ATTENTION", 256, 1.0, causal=False, peak=2000),
            _row("FLASH_ATTENTION", 512, 1.0, causal=False, peak=4000)]
    found = attention.memory_findings(rows, batch=1, heads=2, dtype="float32")
    assert found["metrics"][names.MATH_PEAK] == pytest.approx(2.0)  # at N=256, the longest MATH ran
    assert any(line.startswith("At N=256 the MATH backend's peak is 2.0 score matrices") for line in found["lines"])
    assert found["checks"]["fused_backends_never_hold_a_score_matrix"][0]


def test_memory_findings_from_a_measured_picture():
    picture = attention.sweep("cpu", "float32", seq_lengths=[128, 256], head_dims=[32], causal=[False],
                              backends=["MATH", "FLASH_ATTENTION"], heads=2, warmup=0, repeats=1)
    found = attention.memory_findings(picture, batch=1, heads=2, dtype="float32")
    assert found["checks"]["math_memory_grows_like_n_squared"][0]
    assert found["checks"]["fused_backends_never_hold_a_score_matrix"][0]
    assert found["metrics"][names.MATH_PEAK] >= 1.0
    assert attention.peak_bytes(picture, "MATH", 256) >= attention.score_matrix_bytes(1, 2, 256, 256)
    assert attention.peak_bytes(picture, "MATH", 512) is None


def test_eligibility_and_accuracy_findings():
    rows = attention.eligibility("cpu", "float32", backends=["MATH", "FLASH_ATTENTION", "CUDNN_ATTENTION"])
    grid = attention.eligibility_grid(rows)
    assert len(grid) == len(attention.eligibility_cases("cpu", "float32")) and grid[0]["MATH"] is True
    why = attention.why_not(rows)
    assert {"backend": "CUDNN_ATTENTION", "case": "every case",
            "why (PyTorch's words)": "PyTorch has no CUDNN_ATTENTION kernel for cpu devices"} in why
    found = attention.eligibility_findings(rows, ["MATH", "FLASH_ATTENTION"])
    assert found["metrics"][names.eligible_cases("MATH")] == len(grid) and found["checks"]
    accurate = attention.accuracy("cpu", ["float32"], backends=["MATH"], batch=1, heads=1, seq=16, head_dim=8)
    assert attention.accuracy_findings(accurate)["checks"]["every_backend_within_tolerance"]
    assert attention.dtypes_that_run("cpu")[0][0] == "float32"


def test_greedy_agreement_counts_tokens_until_the_first_difference():
    reference = {"token_ids": [1, 2, 3, 4], "continuation": "abcd"}
    found = attention.greedy_agreement({"eager": {"token_ids": [1, 2, 9, 4], "continuation": "ab?d"}}, reference,
                                       "bfloat16")
    assert found["metrics"] == {names.greedy_tokens_agreeing("eager", "bfloat16"): 2}
    assert found["rows"][0]["tokens agreeing with sdpa (bfloat16)"] == "2 of 4"


def _row(backend, seq, ms, *, causal=True, status="ok", peak=None, noisy=False):
    flops = 4 * seq * seq * 64 // (2 if causal else 1)
    return {"backend": backend, "head_dim": 64, "causal": causal, "seq": seq, "status": status, "reason": "",
            "median_ms": ms, "p10_ms": ms, "p90_ms": ms, "flops": flops, "tflops": ms and flops / ms / 1e9,
            "fraction_of_ceiling": 0.5, "peak_extra_bytes": peak, "noisy": noisy, "remeasured": noisy}


def test_sweep_metrics_name_every_point_and_count_the_noisy_ones():
    rows = [_row("MATH", 128, 1.0, peak=2**20), _row("MATH", 256, 0.5, noisy=True),
            {**_row("CUDNN_ATTENTION", 128, None), "status": "refused", **dict.fromkeys(attention.MEASURED_KEYS)}]
    metrics = attention.sweep_metrics(rows)
    assert metrics[names.sweep("MATH", 64, True, 128, "ms")] == 1.0
    assert metrics[names.sweep("MATH", 64, True, 128, "peak_mib")] == 1.0
    assert metrics[names.sweep("MATH", 64, True, 256, "peak_mib")] is None  # recorded as "not measured"
    assert not any("cudnn" in name for name in metrics)
    assert metrics[names.NOISY_POINTS] == 1
    assert set(names.expected_quick()) >= {names.sweep("MATH", 64, True, 128, "ms"), names.NOISY_POINTS}


def test_sweep_findings_leave_noisy_points_out_of_every_conclusion():
    rows = [_row("MATH", 128, 1.0), _row("MATH", 256, 3.0), _row("MATH", 512, 0.01, noisy=True),
            {**_row("MATH", 1024, None), "status": "oom", "reason": "out of memory"}]
    found = attention.sweep_findings(rows, head_dim=64, runnable=["MATH"])
    assert found["metrics"][names.time_exponent("MATH")] == pytest.approx(math.log2(3))  # 128 and 256, not 512
    assert any(line.startswith("Best point: MATH at N=256") for line in found["lines"])
    assert any("marked noisy" in line for line in found["lines"])
    assert found["skipped"] == {"sweep MATH at N=1024, d=64, causal": "out of memory"}
    shown = attention.display_row(rows[2])
    assert shown["status"] == "noisy" and "not used" in shown["why"]
    assert attention.usable(rows) == rows[:2]
    with_full = rows + [_row("MATH", 128, 1.6, causal=False), _row("MATH", 256, 5.0, causal=False)]
    halves = attention.sweep_findings(with_full, head_dim=64, runnable=["MATH"])["lines"]
    assert "Causal against no mask (d=64), the time ratio: MATH 0.60x at N=256" in "\n".join(halves)


def test_a_time_that_falls_as_the_work_grows_is_measured_again_and_marked_noisy(monkeypatch):
    calls = {}

    def fake_measure(fn, *, device="cpu", warmup=0, repeats=1, **kwargs):
        seq = calls["seq"]
        times = [1.5] * 3 if seq == 256 else [seq / 64] * 3  # N=256 always faster than N=128 (2 ms)
        return timing.Timing(device=device, warmup=warmup, repeats=3, times_ms=times)

    real_qkv = attention.random_qkv

    def qkv(batch, heads, seq, head_dim, **kwargs):
        calls["seq"] = seq
        calls[seq] = calls.get(seq, 0) + 1
        return real_qkv(batch, heads, seq, head_dim, **kwargs)

    monkeypatch.setattr(attention, "measure", fake_measure)
    monkeypatch.setattr(attention, "random_qkv", qkv)
    rows = attention.sweep("cpu", "float32", seq_lengths=[64, 128, 256, 512], head_dims=[16], causal=[True],
                           backends=["MATH"], heads=1, warmup=0, repeats=1, measure_memory=False)
    by_n = {r["seq"]: r for r in rows}
    assert by_n[256]["noisy"] and by_n[256]["remeasured"] and calls[256] == 2  # measured again once
    assert by_n[128]["noisy"]  # the pair that contradicts each other: neither is trusted
    assert not by_n[64]["noisy"] and not by_n[512]["noisy"] and calls[64] == 1
    assert all(set(r) == set(rows[0]) for r in rows)
    assert all(key in r for r in rows for key in attention.MEASURED_KEYS)
    unchanged = attention.sweep("cpu", "float32", seq_lengths=[64, 256], head_dims=[16], causal=[True],
                                backends=["MATH"], heads=1, warmup=0, repeats=1, measure_memory=False, recheck=False)
    assert not any(r["noisy"] for r in unchanged)


def test_sweep_size_counts_the_board_rows():
    assert attention.sweep_size(["MATH", "FLASH_ATTENTION"], [64, 128], [128, 256, 256, 512]) == 2 * 2 * 2 * 3


# --------------------------------------------------------------------------- attention today (section 8)

def test_packed_documents_and_their_ids():
    assert attention_today.packed_lengths(512) == [256, 128, 64, 64]
    assert sum(attention_today.packed_lengths(100)) == 100
    assert attention_today.document_ids([2, 3]).tolist() == [0, 0, 1, 1, 1]


def test_flex_attention_against_sdpa_for_a_causal_and_a_document_mask():
    n = 256
    docs = attention_today.document_ids(attention_today.packed_lengths(n))

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def document(b, h, q_idx, kv_idx):
        return (docs[q_idx] == docs[kv_idx]) & (q_idx >= kv_idx)

    q, k, v = attention.random_qkv(1, 2, n, 32)
    cases = {"causal": (create_block_mask(causal, None, None, n, n, device="cpu"), {"is_causal": True}),
             "document": (create_block_mask(document, None, None, n, n, device="cpu"),
                          {"attn_mask": create_mask(document, 1, 1, n, n, "cpu")})}
    rows = attention_today.flex_vs_sdpa(flex_attention, q, k, v, cases, device="cpu", compiled=False, warmup=0,
                                        repeats=1)
    assert [(r["mask"], r["implementation"]) for r in rows] == [
        ("causal", "sdpa"), ("causal", "flex_eager"), ("document", "sdpa"), ("document", "flex_eager")]
    assert all(r["status"] == "" and r["ms"] > 0 for r in rows)
    flex = [r for r in rows if r["implementation"] == "flex_eager"]
    assert all(r["within tolerance"] for r in flex)
    assert flex[1]["blocks skipped %"] > flex[0]["blocks skipped %"] > 0  # the document mask skips more blocks
    found = attention_today.flex_findings(rows, compile_skipped="not in a quick run")
    assert set(found["checks"]) == {"flex_attention_matches_sdpa_causal", "flex_attention_matches_sdpa_document"}
    assert all(passed for passed, _ in found["checks"].values())
    assert set(found["metrics"]) >= {names.masked(m, i) for m in names.MASKS for i in ("sdpa", "flex_eager")}
    assert found["skipped"] == {"FlexAttention compiled": "not in a quick run"}
    assert any(line.startswith("PyTorch warned: flex_attention called without torch.compile()")
               for line in found["lines"])


def test_a_flex_call_that_fails_becomes_a_row():
    q, k, v = attention.random_qkv(1, 1, 128, 16)

    def broken(*args, **kwargs):
        raise RuntimeError("a kernel failed")

    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 128, 128, device="cpu")
    rows = attention_today.flex_vs_sdpa(broken, q, k, v, {"causal": (mask, {"is_causal": True})}, device="cpu",
                                        compiled=True, warmup=0, repeats=1)
    assert rows[1]["implementation"] == "flex_compiled" and rows[1]["status"] == "failed"
    found = attention_today.flex_findings(rows)
    assert "flex_compiled with a causal mask" in found["skipped"] and not found["checks"]


def test_varlen_attn_needs_a_cuda_gpu_and_says_so_on_cpu():
    q, k, v = attention.random_qkv(1, 2, 64, 16)
    row = attention_today.varlen_row(q, k, v, [32, 32], device="cpu", warmup=0, repeats=1)
    assert row["status"] == "skipped" and "CUDA Flash Attention kernel" in row["reason"]
    found = attention_today.varlen_findings(row, dtype=torch.float32)
    assert list(found["skipped"]) == ["torch.nn.attention.varlen.varlen_attn"] and "\n" not in row["reason"]


def test_the_flash_implementations_torch_knows_and_why_they_do_not_activate_here():
    rows = attention_today.flash_implementations()
    # the built-in one is available only where this torch has it compiled in (not in a build without CUDA)
    assert rows[0]["available here"] is torch.backends.cuda.is_flash_attention_available()
    assert "FA2" in rows[0]["what torch says"]
    assert {r["implementation"] for r in rows[1:]} == {"FA3", "FA4"}
    assert all(not r["available here"] and "ModuleNotFoundError" in r["what torch says"] for r in rows[1:])
    assert torch.nn.attention.current_flash_attention_impl() is None  # the default is left in place


def test_the_reference_h100_ran_cudnn_faster_than_flash():
    rows = attention_today.reference_backend_rates(head_dim=128)
    h100 = next(r for r in rows if r["reference run"] == "nvidia-h100")
    assert h100["N"] == 16384 and h100["fastest backend"] == "CUDNN_ATTENTION"
    assert h100["Flash only is slower by"] == pytest.approx(628 / 344, rel=0.01)


@pytest.mark.skipif(importlib.util.find_spec("kernels") is not None, reason="with kernels a Hub id would download")
def test_attn_implementation_rows_show_the_kernels_fallback_and_a_hub_id_without_downloading():
    rows = {r["attn_implementation"]: r for r in attention_today.attn_implementation_rows()}
    assert rows["sdpa"]["ok"] and rows["flex_attention"]["ok"]
    assert rows["flash_attention_2"]["kernels fallback"] == "kernels-community/flash-attn2"
    hub = rows["kernels-community/flash-attn2"]
    assert hub["ok"] is False and "kernels" in hub["reason"]
