import contextlib
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_refused
from torch.nn.attention import SDPBackend, sdpa_kernel

from labkit import attention, outputs, timing
from labkit.errors import LabkitError
from labkit.exercises.flash_attention import my_attention


def qkv(batch, heads, seq, head_dim, dtype=torch.float32):
    return torch.randn(3, batch, heads, seq, head_dim, dtype=dtype)


def forced(q, k, v, backend=None, **kwargs):
    """A call of scaled_dot_product_attention restricted to one backend (None: PyTorch chooses)."""
    def call():
        with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return call


def test_relative_error_and_score_matrix_bytes():
    a = torch.ones(4)
    assert outputs.relative_error(a, a) == 0.0
    assert math.isclose(outputs.relative_error(a.double() * 1.01, a), 0.01, rel_tol=1e-9)
    assert attention.score_matrix_bytes(2, 4, 128, 64, "float16") == 2 * 4 * 128 * 64 * 2
    assert attention.score_matrix_bytes(1, 1, 10, 10, "float32") == 400


def test_backend_from_ops_reads_the_aten_op():
    assert timing.backend_from_ops(["aten::empty", "aten::_scaled_dot_product_flash_attention_for_cpu"]) == "FLASH_ATTENTION"
    assert timing.backend_from_ops(["aten::_scaled_dot_product_cudnn_attention"]) == "CUDNN_ATTENTION"
    assert timing.backend_from_ops(["aten::_scaled_dot_product_efficient_attention"]) == "EFFICIENT_ATTENTION"
    assert timing.backend_from_ops(["aten::_scaled_dot_product_attention_math", "aten::bmm"]) == "MATH"
    assert timing.backend_from_ops(["aten::bmm", "aten::softmax"]) is None


@pytest.mark.parametrize("backend", ["MATH", "FLASH_ATTENTION"])
def test_the_profiler_sees_the_forced_backend_on_cpu(backend):
    q, k, v = qkv(1, 2, 32, 16)
    seen = timing.ops_that_ran(forced(q, k, v, backend, is_causal=True), "cpu")
    assert seen.backend == backend
    assert "aten::_scaled_dot_product" in seen.evidence


def test_the_profiler_sees_no_sdpa_in_attention_by_hand():
    q, k, v = qkv(1, 2, 32, 16)
    seen = timing.ops_that_ran(lambda: my_attention(q, k, v), "cpu")  # exercise 01.1's solution
    assert seen.backend is None and seen.evidence == "no attention op recorded"


def test_profiling_leaves_no_native_log_on_stderr(capfd):
    q, k, v = qkv(1, 1, 8, 8)
    timing.ops_that_ran(forced(q, k, v), "cpu")
    assert "profiler_start" not in capfd.readouterr().err


def test_math_holds_the_score_matrix_and_flash_does_not():
    q, k, v = qkv(1, 4, 512, 64)
    one_matrix = attention.score_matrix_bytes(1, 4, 512, 512, "float32")
    math_peak = timing.peak_extra_memory(forced(q, k, v, "MATH"), "cpu")
    flash_peak = timing.peak_extra_memory(forced(q, k, v, "FLASH_ATTENTION"), "cpu")
    assert math_peak >= one_matrix
    assert flash_peak < one_matrix / 2


def test_time_call_times_a_call_and_measures_its_peak_memory():
    q, k, v = qkv(1, 2, 64, 16)
    row = attention.time_call(forced(q, k, v, "MATH"), "cpu", "MATH", warmup=0, repeats=2)
    assert row["status"] == "ok" and row["why"] == ""
    assert 0 < row["p10 ms"] <= row["ms"] <= row["p90 ms"]
    assert row["peak MiB"] >= attention.score_matrix_bytes(1, 2, 64, 64) / 2**20  # MATH holds the scores
    quick = attention.time_call(forced(q, k, v), "cpu", memory=False, warmup=0, repeats=1)
    assert quick["status"] == "ok" and quick["peak MiB"] is None


def test_time_call_turns_a_refusal_an_out_of_memory_and_a_kernel_failure_into_a_row():
    q, k, v = qkv(1, 2, 16, 8)
    refused = attention.time_call(forced(q, k, v, "CUDNN_ATTENTION"), "cpu", "CUDNN_ATTENTION")
    assert refused["status"] == "refused" and "no CUDNN_ATTENTION kernel for cpu" in refused["why"]
    assert all(refused[key] is None for key in attention.MEASURED)

    def out_of_memory():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1073741824 bytes.")

    def broken():
        raise RuntimeError("cuDNN Frontend error: [cudnn_frontend] Error: No execution plans support the graph.")

    oom = attention.time_call(out_of_memory, "cpu")
    assert oom["status"] == "oom" and "can't allocate memory" in oom["why"] and oom["ms"] is None
    failed = attention.time_call(broken, "cpu", warmup=0, repeats=1)
    assert failed["status"] == "failed" and failed["why"].startswith("RuntimeError: cuDNN Frontend error")
    assert set(oom) == set(failed) == set(refused)  # every row has every column


def test_a_time_that_falls_as_the_work_grows_is_measured_again_and_marked_noisy():
    def point(n, ms):
        return {"backend": "MATH", "n": n, "status": "ok", "why": "", "ms": ms, "p10 ms": ms, "p90 ms": ms,
                "peak MiB": None}

    series = [point(64, 1.0), point(128, 2.0), point(256, 1.5), point(512, 7.0),
              {**point(1024, None), "status": "oom", "why": "out of memory"}]
    again = []

    def remeasure(row):  # N=256 stays faster than N=128 when measured again
        again.append(row["n"])
        ms = 1.4 if row["n"] == 256 else row["ms"]
        return {**row, "ms": ms, "p10 ms": ms, "p90 ms": ms}

    by_n = {r["n"]: r for r in attention.mark_noisy(series, remeasure)}
    assert sorted(again) == [128, 256]  # the pair that contradicts each other, measured once more
    assert by_n[256]["noisy"] and by_n[128]["noisy"] and "not used" in by_n[256]["why"]
    assert by_n[256]["ms"] == 1.4 and "remeasured" not in by_n[256]
    assert not by_n[64]["noisy"] and not by_n[512]["noisy"] and not by_n[1024]["noisy"]
    steady = attention.mark_noisy([point(64, 1.0), point(128, 3.0)], remeasure)
    assert not any(r["noisy"] for r in steady) and sorted(again) == [128, 256]


def test_a_point_measured_again_in_line_with_the_trend_is_kept():
    series = [{"n": n, "status": "ok", "why": "", "ms": ms, "p10 ms": ms, "p90 ms": ms} for n, ms in ((64, 2.0),
                                                                                                     (128, 1.0))]
    checked = attention.mark_noisy(series, lambda row: dict.fromkeys(("ms", "p10 ms", "p90 ms"), row["n"] / 32))
    assert not any(r["noisy"] for r in checked) and checked[1]["ms"] == 4.0
    assert checked[1]["why"].startswith("re-measured once")


def test_math_is_not_tried_where_its_scores_would_not_fit(monkeypatch):
    assert attention.math_too_big("cpu", 1, 2, 128) == ""
    monkeypatch.setattr(attention.psutil, "virtual_memory", lambda: SimpleNamespace(available=4 * 2**20))
    assert "quarter" in attention.math_too_big("cpu", 1, 1, 1024)


def test_parameters_are_sized_for_this_device():
    p = attention.Parameters()
    line = p.resolve(device="cpu", quick=True)
    assert p.dtype == torch.float32 and p.runnable == ["MATH", "FLASH_ATTENTION"]
    assert (p.batch, p.heads, p.seq_lengths, p.head_dims) == (1, 4, [128, 256, 512], [64, 128])
    assert (p.warmup, p.repeats, p.flex_seq, p.model_problem) == (1, 5, 512, None)
    assert p.math_seq == 512  # the MATH backend's scores fit at every quick length
    assert p.compile_flex is False and "quick" in p.compile_flex_why
    assert "MATH, FLASH_ATTENTION" in line
    full = attention.Parameters(seq_lengths=[512, 64, 64], compile_flex="auto")
    full.resolve(device="cpu", quick=False)
    assert full.compile_flex is True and full.compile_flex_why == "" and full.seq_lengths == [64, 512]
    off = attention.Parameters(compile_flex=False)
    off.resolve(device="cpu", quick=True)
    assert off.compile_flex_why == "compile_flex=False"


def test_parameters_defaults_are_the_notebooks():
    import dataclasses
    import re
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "notebooks" / "src" / "01_flash_attention.py").read_text()
    cell = source.split('# %% tags=["parameters"]')[1].split("# %%")[0]
    cell_values = dict(re.findall(r"^(\w+) = (.+?)\s*(?:#.*)?$", cell, flags=re.M))
    fields = {f.name: f for f in dataclasses.fields(attention.Parameters) if f.init}
    assert set(fields) == set(cell_values) - {"device", "quick", "results_path", "solutions"}
    for name, f in fields.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert default == eval(cell_values[name]), name


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
def test_a_bad_parameter_stops_with_one_sentence(bad, named):
    assert_refused(attention.Parameters, bad, named)


def test_a_misspelt_model_stops():
    with pytest.raises(LabkitError):
        attention.Parameters(model_id="smollm-135m").resolve(device="cpu", quick=True)


def test_refusal_is_judged_on_the_real_inputs():
    q, k, v = qkv(1, 2, 16, 8)
    assert attention.refusal(forced(q, k, v, "MATH"), "cpu", "MATH") == ""
    three_d = forced(q[:, 0], k[:, 0], v[:, 0], "FLASH_ATTENTION")
    assert "4 dimensional" in attention.refusal(three_d, "cpu", "FLASH_ATTENTION")
    assert "no CUDNN_ATTENTION kernel for cpu" in attention.refusal(forced(q, k, v, "CUDNN_ATTENTION"),
                                                                    "cpu", "CUDNN_ATTENTION")


def test_gpu_kernels_of_eager_attention_name_no_sdpa_backend():
    eager_on_gpu = timing.Profiled(ops=["aten::matmul", "aten::softmax", "aten::bmm"],
                                      kernels=["ampere_sgemm_128x64_tn", "void cunn_SoftMaxForward<4, float>"])
    assert eager_on_gpu.backend is None
    assert "cunn_SoftMaxForward" in eager_on_gpu.evidence
    flash_on_gpu = timing.Profiled(ops=["aten::_scaled_dot_product_flash_attention", "aten::empty"],
                                      kernels=["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>"])
    assert flash_on_gpu.backend == "FLASH_ATTENTION" and "flash_fwd_kernel" in flash_on_gpu.evidence


# --------------------------------------------------------------------------- a corrected fact, kept from regressing

def test_a_list_of_backends_runs_in_pytorchs_order_not_the_lists():
    """sdpa_kernel([MATH, FLASH_ATTENTION]) without set_priority only *allows* both: PyTorch tries them in its own
    order, which on this CPU runs FLASH_ATTENTION (the profiler proves it), whichever order the list gives."""
    q, k, v = qkv(1, 2, 64, 16)

    def call():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    for listed in ([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION], [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        with sdpa_kernel(listed):
            assert timing.ops_that_ran(call, "cpu").backend == "FLASH_ATTENTION"
    with sdpa_kernel(SDPBackend.MATH):  # and one backend alone is the one that runs
        assert timing.ops_that_ran(call, "cpu").backend == "MATH"


def test_math_seq_is_the_longest_length_the_sweep_tries_math_at(monkeypatch):
    def math_seq(lengths, available=None):
        if available is not None:
            monkeypatch.setattr(attention.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
        p = attention.Parameters(batch=4, heads=16, seq_lengths=lengths)
        p.resolve(device="cpu", quick=True)
        return p.math_seq

    assert math_seq([128, 256]) == 256
    free = 2 * attention.score_matrix_bytes(4, 16, 8192, 8192, "float32") * 4 - 1  # 8192's scores just too big
    assert math_seq([4096, 8192, 16384], free) == 4096
    assert math_seq([4096, 8192], 1) == 4096  # none fits: the shortest


def test_the_reference_h100_ran_cudnn_faster_than_flash():
    h100 = attention.reference_sweep(head_dim=128)["nvidia-h100"]  # its sweep table (reference/README.md)
    at_longest = {b: rate for (b, n), rate in h100.items() if n == 16384}
    assert max(at_longest, key=at_longest.get) == "CUDNN_ATTENTION"
    assert at_longest["CUDNN_ATTENTION"] / at_longest["FLASH_ATTENTION"] == pytest.approx(628 / 344, rel=0.01)


def test_a_reference_run_with_a_sweep_table_is_read_from_the_table(monkeypatch):
    import pandas as pd

    from labkit.results import Results

    run = Results("01_flash_attention")
    run.table("sweep", pd.DataFrame({"backend": ["MATH", "MATH", "MATH"], "head_dim": [128, 128, 64],
                                     "causal": [True, False, True], "n": [512, 512, 512],
                                     "TFLOP/s": [3.0, 5.0, 7.0]}))
    monkeypatch.setattr(attention.results, "reference_runs", lambda notebook: {"gpu": run.as_dict()})
    assert attention.reference_sweep(128) == {"gpu": {("MATH", 512): 3.0}}


def test_the_first_call_is_timed_apart_and_its_warnings_kept():
    import warnings

    def call():
        warnings.warn("not compiled: this will be slow\nmore detail", UserWarning, stacklevel=2)
        return torch.ones(2)

    out, row = attention.timed_with_first_call(call, "cpu", warmup=0, repeats=2)
    assert torch.equal(out, torch.ones(2)) and row["first call s"] > 0
    assert row["warning"] == "not compiled: this will be slow"
    assert row["p10 ms"] <= row["ms"] <= row["p90 ms"]


@pytest.mark.skipif(importlib.util.find_spec("kernels") is not None, reason="with kernels a Hub id would download")
def test_attn_implementation_rows_show_the_kernels_fallback_and_a_hub_id_without_downloading():
    rows = {r["attn_implementation"]: r for r in attention.attn_implementation_rows()}
    assert rows["sdpa"]["ok"] and rows["flex_attention"]["ok"]
    assert rows["flash_attention_2"]["kernels fallback"] == "kernels-community/flash-attn2"
    hub = rows["kernels-community/flash-attn2"]
    assert hub["ok"] is False and "kernels" in hub["reason"]
