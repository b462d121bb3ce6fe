import math

import pytest
import torch
import torch.nn.functional as F

from labkit import attention
from labkit.errors import BadParameter


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
