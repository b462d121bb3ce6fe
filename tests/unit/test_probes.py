import importlib.util
import json
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from labkit import probes, widgets
from labkit.errors import BadParameter

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer; this machine has a GPU")


def test_auto_device_is_cpu_without_cuda():
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert probes.resolve_device("auto") == expected
    assert probes.resolve_device("CPU") == "cpu"


@no_cuda
def test_cuda_without_a_gpu_is_one_clear_sentence():
    with pytest.raises(BadParameter, match="no usable CUDA GPU"):
        probes.resolve_device("cuda")


def test_unknown_device_name():
    with pytest.raises(BadParameter, match="not a device name"):
        probes.resolve_device("tpu")


@given(st.sampled_from(["bf16", "BF16", "bfloat16", "torch.bfloat16"]))
def test_dtype_aliases(name):
    assert probes.resolve_dtype(name) is torch.bfloat16


def test_auto_dtype_on_cpu_is_float32():
    assert probes.resolve_dtype("auto", "cpu") is torch.float32


def test_unknown_dtype():
    with pytest.raises(BadParameter, match="not a dtype for model weights"):
        probes.resolve_dtype("int4")


def test_check_dtype_rejects_a_dtype_the_device_cannot_multiply():
    probes.check_dtype("cpu", torch.float32)
    with pytest.raises(BadParameter, match="cannot run a matrix product on cpu"):
        probes.check_dtype("cpu", torch.bool)


def test_math_backend_runs():
    attempt = probes.try_sdpa("cpu", "float32", "causal", "MATH")
    assert attempt["ok"] and attempt["reason"] == ""


def test_flash_with_dropout_is_the_source_pages_error_with_its_reason():
    attempt = probes.try_sdpa("cpu", "float32", "plain", "FLASH_ATTENTION", dropout_p=0.5)
    assert not attempt["ok"]
    assert "No available kernel" in attempt["error"]
    assert "dropout" in attempt["reason"]


def test_refusal_reasons_keep_what_torch_says_on_cuda():
    # The warnings torch emits when Flash is forced on float32 CUDA inputs (sdp_utils.cpp wording).
    messages = ["Flash attention kernel not used because: (Triggered internally at sdp_utils.cpp:123.)",
                "Expected query, key and value to all be of dtype: {Half, BFloat16}. Got Query dtype: float, "
                "Key dtype: float, and Value dtype: float instead. (Triggered internally at sdp_utils.cpp:98.)",
                "Flash attention kernel not used because:"]
    assert probes.refusal_reasons(messages) == [
        "Expected query, key and value to all be of dtype: {Half, BFloat16}. Got Query dtype: float, "
        "Key dtype: float, and Value dtype: float instead."]


def test_a_refusal_reason_is_never_just_the_error():
    attempt = probes.try_sdpa("cpu", "float32", "plain", "FLASH_ATTENTION", dropout_p=0.5)
    assert attempt["reason"] and attempt["reason"] != attempt["error"]


def test_three_dimensional_inputs_reason():
    attempt = probes.try_sdpa("cpu", "float32", "plain", "FLASH_ATTENTION", ndim=3)
    assert not attempt["ok"] and "4 dimensional" in attempt["reason"]


def test_backend_list_is_a_fallback_order():
    attempt = probes.try_sdpa("cpu", "float32", "plain", ["FLASH_ATTENTION", "MATH"], dropout_p=0.5)
    assert attempt["ok"]


@no_cuda
def test_cuda_only_backends_on_cpu_say_why():
    attempt = probes.try_sdpa("cpu", "float16", "masked", "EFFICIENT_ATTENTION")
    assert not attempt["ok"] and "no EFFICIENT_ATTENTION kernel for cpu" in attempt["reason"]


def test_sdpa_matrix_rows():
    rows = probes.probe(["cpu"])["sdpa"]
    assert len(rows) == len(probes.DTYPES) * len(probes.INPUT_KINDS) * len(probes.BACKENDS)
    for row in rows:
        assert set(row) == {"device", "dtype", "input_kind", "backend", "ok", "reason"}
        assert row["ok"] or (row["reason"] and "No available kernel" not in row["reason"]), row
    assert all(r["ok"] for r in rows if r["backend"] == "MATH")


def test_unknown_backend_name():
    with pytest.raises(BadParameter, match="FLASH unknown"):
        probes.try_sdpa("cpu", "float32", "plain", "FLASH")


def test_bad_input_kind():
    with pytest.raises(BadParameter, match="input_kind"):
        probes.try_sdpa("cpu", "float32", "ragged")


def test_attn_implementations_report_without_crashing():
    rows = {r["attn_implementation"]: r for r in probes.attn_implementations(use_cache=False)}
    assert rows["eager"]["ok"] and rows["sdpa"]["ok"]
    if probes.flash_attn()["ok"] is False and probes.kernels_installed():  # transformers 5.25 and newer require it
        assert rows["flash_attention_2"]["ok"] is None and "download" in rows["flash_attention_2"]["reason"]
    elif probes.flash_attn()["ok"] is False:
        assert not rows["flash_attention_2"]["ok"]
        assert rows["flash_attention_2"]["reason"].startswith("ImportError")


def test_attn_implementations_leave_out_labkits_own_and_never_download(tmp_path, monkeypatch):
    from transformers import AttentionInterface

    from labkit import fastpath

    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))  # the answers built here must not be kept for later runs
    AttentionInterface.register("labkit_varlen", fastpath.varlen_attention)  # what notebook 03 registers
    names = [r["attn_implementation"] for r in probes.attn_implementations(use_cache=False)]
    assert "labkit_varlen" not in names and "sdpa" in names
    monkeypatch.setattr(probes, "kernels_installed", lambda: True)  # transformers would fetch a Hub kernel
    rows = {r["attn_implementation"]: r for r in probes.attn_implementations(use_cache=False)}
    assert rows["flash_attention_2"]["ok"] is None and "download" in rows["flash_attention_2"]["reason"]
    assert rows["sdpa"]["ok"]


def test_attn_implementations_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    first = probes.attn_implementations()
    assert (tmp_path / "attn_implementations.json").exists()
    assert probes.attn_implementations() == first


def test_a_cached_answer_is_rebuilt_when_what_it_depends_on_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    built = []

    def build():
        built.append(len(built) + 1)
        return [{"build": built[-1]}]

    def key():
        return probes.cache_key(("torch", "bitsandbytes"), modules=("bitsandbytes",), devices=["cpu"])

    first = key()
    assert probes.cached("answer", first, build) == [{"build": 1}]
    assert probes.cached("answer", key(), build) == [{"build": 1}]  # same versions: reused, not rebuilt
    real_version, real_find_spec = probes.package_version, importlib.util.find_spec
    monkeypatch.setattr(probes, "package_version", lambda name: "0.0.1" if name == "bitsandbytes" else real_version(name))
    assert key() != first and probes.cached("answer", key(), build) == [{"build": 2}]  # another version
    monkeypatch.setattr(probes, "package_version", real_version)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, package=None: None if name == "bitsandbytes" else real_find_spec(name, package))
    assert key() != first and probes.cached("answer", key(), build) == [{"build": 3}]  # hidden (the fault matrix)
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    assert probes.cached("answer", first, build) == [{"build": 4}]  # one answer is kept: the last one
    assert probes.cached("answer", first, build, use_cache=False) == [{"build": 5}]
    (tmp_path / "answer.json").write_text("{half a fi")
    assert probes.cached("answer", first, build) == [{"build": 6}]  # unreadable: rebuilt
    assert "cpu=" + probes.device_label("cpu") in key()  # another machine sharing the cache folder: rebuilt


def test_labkit_probe_reuses_the_version_dependent_answers_without_importing_bitsandbytes(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    fresh = probes.probe(["cpu"], use_cache=False)

    def must_not_run():
        raise AssertionError("rebuilt although a cached answer fits")

    monkeypatch.setattr(probes, "import_bitsandbytes", must_not_run)
    monkeypatch.setattr(probes, "_build_attn_implementations", must_not_run)
    assert probes.probe(["cpu"]) == fresh  # the same report, from the cache
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["attn_implementations.json", "bitsandbytes_4bit.json"]
    with pytest.raises(AssertionError, match="rebuilt"):
        probes.bitsandbytes_4bit(["cpu"])  # a notebook's own call measures (use_cache=False by default)


def test_bitsandbytes_missing_is_reported(monkeypatch):
    monkeypatch.setattr(probes, "import_bitsandbytes", lambda: None)
    rows = probes.bitsandbytes_4bit(["cpu"])
    assert len(rows) == 2 and not any(r["ok"] for r in rows)
    assert all("bitsandbytes" in r["reason"] for r in rows)


@pytest.mark.skipif(probes.import_bitsandbytes() is None, reason="bitsandbytes is not importable here")
def test_bitsandbytes_4bit_matmul_on_cpu():
    rows = probes.bitsandbytes_4bit(["cpu"])
    assert {r["quant_type"] for r in rows} == {"nf4", "fp4"}
    assert all(r["ok"] and r["relative_error"] < 0.3 for r in rows), rows


def test_nccl_and_topology_answer():
    answer = probes.nccl()
    assert set(answer) >= {"ok", "gloo", "reason"}
    assert answer["ok"] or answer["reason"]
    assert probes.topology()["gpus"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_probe_report_and_text():
    report = probes.probe(["cpu"])
    assert set(report) == {"versions", "devices", "sdpa", "features"}
    assert report["versions"]["torch"] == torch.__version__
    text = widgets.probe_text(report)
    assert "SDPA backends" in text and "attn_implementation" in text


def test_labkit_probe_json_command_is_fast():
    subprocess.run([sys.executable, "-m", "labkit.cli", "probe", "--json"], capture_output=True, check=True)  # warm the cache
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "labkit.cli", "probe", "--json"], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    report = json.loads(done.stdout)
    assert set(report) == {"versions", "devices", "sdpa", "features"}
    row = report["sdpa"][0]
    assert set(row) == {"device", "dtype", "input_kind", "backend", "ok", "reason"}
    # The target is < 5 s on a 2-core machine; the bound leaves room for a loaded CI runner.
    assert seconds < 20, f"labkit probe took {seconds:.1f} s"  # generous for a busy 2-core CI


def test_import_labkit_is_light():
    code = "import sys, labkit; print(any(m in sys.modules for m in ('torch', 'transformers', 'ipywidgets', 'matplotlib')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_refusal_without_a_reason_from_torch_says_so_and_00s_checks_can_tell():
    """00's and 01's checks that every refusal carries a reason test for probes.NO_REASON: explain_refusal never
    returns an empty string, so testing for one could not fail."""
    silent = probes.explain_refusal("No available kernel.  Aborting execution.", [], ["FLASH_ATTENTION"], "cuda:0")
    assert silent.startswith(probes.NO_REASON) and "No available kernel" in silent
    viable = probes.explain_refusal("No viable backend for scaled_dot_product_attention", [], ["CUDNN_ATTENTION"], "cpu")
    assert not viable.startswith(probes.NO_REASON) and "CUDNN_ATTENTION" in viable
