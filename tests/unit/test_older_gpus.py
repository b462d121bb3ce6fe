"""The decisions every notebook makes on the GPUs people have: a T4 (compute capability 7.5, free notebooks), an
RTX 3090 or A10 (8.6) and an RTX 4090 or L4 (8.9), simulated here without a GPU.

What is simulated is the device's description, as torch would give it (capability, name, memory). The three probes
that run a tiny call on the device answer as follows:
- the 8 x 8 matrix product in the chosen dtype runs;
- bitsandbytes' 4-bit product runs (assumed, not checked on such a GPU; bitsandbytes 0.50 counts its int8 matrix
  units from 7.5, `CUDASpecs.has_imma` in bitsandbytes/cuda_specs.py);
- of SDPA's backends only MATH runs. torch 2.13 keeps its per-capability rules in C++ (sdp_utils.cpp) where labkit
  cannot read them, so notebook 01 finds out by running each backend once. MATH alone is the most limited answer a
  GPU can give, and each notebook must still open.
Everything else is labkit's own rule, read from torch's description: dtype, quantization formats, sizes.

The sizes check uses the workbook's own formulas, weights plus the KV cache (`footprint.memory_needed`, as notebook
05 plans). No run on such a GPU has checked them. Activations are left to the planning margin, as in 05.
"""

import types

import pytest
import torch
from conftest import first_run_cache

import labkit
from labkit import footprint, models, probes, quant, registry, serving
from labkit.errors import BadParameter

GIB = 2**30
# (name, capability, GiB that torch shows: a little less than the card is sold with)
GPUS = {"T4": ("Tesla T4", (7, 5), 15), "RTX 3090": ("NVIDIA GeForce RTX 3090", (8, 6), 24),
        "RTX 4090": ("NVIDIA GeForce RTX 4090", (8, 9), 24)}


@pytest.fixture(params=list(GPUS), ids=list(GPUS))
def gpu(request, monkeypatch, tmp_path):
    name, capability, gib = GPUS[request.param]
    props = types.SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=gib * GIB,
                                  multi_processor_count=40)
    for attribute, value in {"is_available": lambda: True, "device_count": lambda: 1,
                             "get_device_capability": lambda device=None: capability,
                             "get_device_properties": lambda device=None: props,
                             "get_device_name": lambda device=None: name,
                             "mem_get_info": lambda device=None: (gib * GIB - GIB // 2, gib * GIB)}.items():
        monkeypatch.setattr(torch.cuda, attribute, value)
    monkeypatch.setattr(probes, "tiny_matmul", lambda device, dtype: None)
    monkeypatch.setattr(probes, "bitsandbytes_4bit",
                        lambda devices=None, **_: [{"device": d, "ok": True, "reason": ""} for d in devices or []])
    monkeypatch.setattr(probes, "try_sdpa", lambda device="cpu", dtype="float32", input_kind="plain",
                        backends="MATH", **_: {"ok": backends == "MATH", "reason": "simulated: MATH only"})
    monkeypatch.setenv("LABKIT_CACHE", str(first_run_cache(tmp_path / "cache")))  # no simulated answer is kept
    return types.SimpleNamespace(label=request.param, capability=capability, memory=gib * GIB)


def opened(notebook: str, **params):
    return labkit.start(notebook, {"quick": False, **params})


@pytest.mark.parametrize("notebook", [n.stem for n in registry.NOTEBOOKS])
def test_every_notebook_opens_with_its_gpu_sizes(gpu, notebook, capsys):
    lab = opened(notebook)
    said = capsys.readouterr().out
    assert lab.device == "cuda:0" and GPUS[gpu.label][0] in said, said
    if getattr(lab.p, "dtype", None) is not None and notebook != "05_multi_gpu":  # 05's jobs run on CPU processes
        wanted = torch.bfloat16 if gpu.capability >= probes.BF16_CAPABILITY else torch.float16
        if notebook == "03_encoder_fastpath":  # 03 runs float16 on every GPU, as the source page's encoders do
            wanted = torch.float16
        assert lab.dtype == wanted, (notebook, lab.dtype)


def test_bfloat16_asked_for_on_a_t4_stops_in_one_sentence(gpu):
    if gpu.capability >= probes.BF16_CAPABILITY:
        probes.check_dtype("cuda:0", torch.bfloat16)  # native from 8.0: no stop
        return
    with pytest.raises(BadParameter, match=r"bfloat16 is not native on cuda:0 \(compute capability 7\.5"):
        opened("02_decoders_and_generation", dtype="bfloat16")


def test_the_quantization_formats_each_gpu_runs_and_why_the_others_skip(gpu):
    lab = opened("04_quantization", formats=["16-bit", "nf4", "int8", "torchao-int8", "torchao-int4",
                                             "torchao-float8"])
    skipped = lab.p.skipped
    int4 = gpu.capability >= (8, 0)  # tinygemm's layout, in bfloat16 (a T4 gets float16 too)
    fp8 = gpu.capability >= quant.FP8_CAPABILITY
    assert ("torchao-int4" in lab.p.formats) == int4 and ("torchao-int4" in skipped) != int4
    assert ("torchao-float8" in lab.p.formats) == fp8 and ("torchao-float8" in skipped) != fp8
    if not int4:
        assert "compute capability 8.0 and bfloat16; this is 7.5 in float16" in skipped["torchao-int4"]
    if not fp8:
        assert f"this run is on compute capability {gpu.capability[0]}.{gpu.capability[1]}" in \
            skipped["torchao-float8"]
    assert {"nf4", "int8", "torchao-int8"} <= set(lab.p.formats)  # bitsandbytes and torchao int8 run on all three
    assert bool(quant.fp8_problem("cuda:0")) != fp8  # 04's FP8 through transformers: the same rule


def test_attention_scores_that_would_not_fit_are_not_tried(gpu):
    lab = opened("01_flash_attention")
    longest = lab.p.seq_lengths[-1]
    assert lab.p.runnable == ["MATH"] and lab.p.math_seq < longest  # 16384 tokens of scores: far past a quarter
    needed = 2 * 4 * lab.p.batch * lab.p.heads * lab.p.math_seq**2  # float32 scores and their softmax
    assert needed <= (gpu.memory - GIB // 2) / 4


def test_the_decoding_notebooks_gpu_sizes_fit_in_16_and_24_gb(gpu):
    """Weights and the largest KV cache each notebook's GPU sizes hold at once, under the planning margin."""
    usable = gpu.memory * footprint.USABLE_FRACTION
    p2 = opened("02_decoders_and_generation").p
    need = {"02": footprint.memory_needed(models.empty_model(p2.decode_model), batch=max(p2.batch_sizes),
                                          context=max(p2.prompt_lengths) + p2.new_tokens)["total"]}
    p6 = opened("06_serving").p  # every request at once, each at the longest prompt and output
    _, prompts, outputs = zip(*serving.workload_rows(p6.requests, p6.length_scale), strict=True)
    need["06"] = footprint.memory_needed(models.empty_model(p6.model_id), batch=p6.requests,
                                         context=max(prompts) + max(outputs))["total"]
    p7 = opened("07_serving_internals").p
    need["07"] = footprint.memory_needed(models.empty_model(p7.model_id), batch=p7.requests,
                                         context=p7.shared_prompt_tokens + p7.question_tokens + p7.new_tokens)["total"]
    p4 = opened("04_quantization").p  # 04 holds every format of its speed model at once
    speed = models.empty_model(p4.speed_model_id)
    need["04"] = sum(footprint.memory_needed(speed, fmt=f)["weights"] for f in p4.formats)
    too_big = {n: f"{b / GIB:.1f} GiB" for n, b in need.items() if b > usable}
    assert not too_big, f"on {gpu.label} ({usable / GIB:.1f} GiB usable): {too_big}"


def test_a_learners_share_of_the_gpu_shrinks_what_01_tries(gpu, monkeypatch):
    """The class hub's share (LABKIT_GPU_SHARE): torch's allocator is capped at it, and 01's memory guard reads it."""
    whole = opened("01_flash_attention").p.math_seq
    capped = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share, device=None: capped.append(share))
    monkeypatch.setenv(probes.GPU_SHARE, "0.1")
    probes.gpu_share.cache_clear()
    try:
        shared = opened("01_flash_attention").p.math_seq
    finally:
        probes.gpu_share.cache_clear()
    assert capped == [0.1] and shared < whole
