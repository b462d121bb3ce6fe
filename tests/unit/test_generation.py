import pytest

from labkit import generation, models
from labkit.errors import BadParameter


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny-llama")


def test_random_prompt_is_reproducible_and_in_range(tiny):
    model, _ = tiny
    ids = generation.random_prompt(model, batch=2, length=7, seed=3)
    assert ids.shape == (2, 7) and int(ids.min()) >= 100
    assert int(ids.max()) < model.get_input_embeddings().weight.shape[0]
    assert (ids == generation.random_prompt(model, batch=2, length=7, seed=3)).all()
    with pytest.raises(BadParameter):
        generation.random_prompt(model, batch=0, length=7)


def test_generate_exactly_never_stops_early(tiny):
    model, tokenizer = tiny
    ids = generation.random_prompt(model, batch=1, length=5)
    out = generation.generate_exactly(model, ids, 6, tokenizer=tokenizer)
    assert out.shape == (1, 11)


def test_measure_prefill(tiny):
    model, _ = tiny
    row = generation.measure_prefill(model, generation.random_prompt(model, batch=2, length=16), repeats=2)
    assert row["batch"] == 2 and row["prompt_tokens"] == 16
    assert row["median_ms"] > 0 and row["tokens_per_s"] == pytest.approx(32 / (row["median_ms"] / 1e3))
    assert row["peak_extra_bytes"] > 0


def test_measure_decode(tiny):
    model, tokenizer = tiny
    ids = generation.random_prompt(model, batch=2, length=4)
    row = generation.measure_decode(model, ids, new_tokens=5, repeats=2, tokenizer=tokenizer)
    assert row["tokens_per_s"] > 0 and row["step_ms"] > 0 and row["timing_fallback"] in (True, False)
    assert len(row["token_ids"]) == 2 and all(len(t) == 5 for t in row["token_ids"])
    again = generation.measure_decode(model, ids, new_tokens=5, repeats=1, tokenizer=tokenizer)
    assert again["token_ids"] == row["token_ids"]
    with pytest.raises(BadParameter, match="at least 2"):
        generation.measure_decode(model, ids, new_tokens=1)


def test_the_hand_loop_matches_generate(tiny):
    model, tokenizer = tiny
    ids = generation.random_prompt(model, batch=2, length=6, seed=5)
    loop = generation.GreedyLoop(model, batch=2, prompt_tokens=6, new_tokens=7)
    expected = generation.generate_exactly(model, ids, 7, tokenizer=tokenizer)[:, 6:]
    assert (loop(ids) == expected).all()
    assert (loop(ids, 3) == expected[:, :3]).all()  # the cache is reset between calls
    row = generation.measure_loop(loop, ids, repeats=1)
    assert row["tokens_per_s"] > 0 and row["token_ids"] == expected.tolist()
    with pytest.raises(BadParameter, match="built for prompts of 6 tokens"):
        loop(ids[:, :5])
    with pytest.raises(BadParameter):
        loop(ids, 8)


def test_bandwidth_bound_of_a_decode_row(tiny):
    from labkit import roofline

    model, _ = tiny
    row = {"batch": 2, "prompt_tokens": 4, "new_tokens": 6, "tokens_per_s": 10.0}
    got = generation.bandwidth_bound(model, row, 1e9, extra_bytes=100)
    weights = roofline.weight_bytes_per_token(model) + 100
    cache = roofline.kv_cache_bytes(model.config, batch=2, context=4 + 3, dtype=model.dtype)
    assert got["weight_bytes"] == weights and got["kv_cache_bytes"] == cache
    assert got["bound_tokens_per_s"] == pytest.approx(2 * 1e9 / (weights + cache))
    assert got["fraction_of_bound"] == pytest.approx(10.0 / got["bound_tokens_per_s"])


def test_the_compute_bound_on_all_sequences_is_the_same_at_every_batch(tiny):
    from labkit import roofline

    model, _ = tiny
    one = {"batch": 1, "prompt_tokens": 4, "new_tokens": 6}
    flops = roofline.decoder_flops_per_token(sum(p.numel() for p in model.parameters()),
                                             layers=model.config.num_hidden_layers, context=4 + 3,
                                             hidden=model.config.hidden_size)
    # FLOP/s / FLOPs per token is tokens/s: a batch of 8 does 8 tokens' work per step and yields 8 tokens
    assert generation.compute_bound(model, one, 1e12) == pytest.approx(1e12 / flops)
    assert generation.compute_bound(model, {**one, "batch": 8}, 1e12) == generation.compute_bound(model, one, 1e12)
    # while the bandwidth bound grows with the batch: the two meet at some batch
    low = generation.bandwidth_bound(model, one, 1e9)["bound_tokens_per_s"]
    assert generation.bandwidth_bound(model, {**one, "batch": 8}, 1e9)["bound_tokens_per_s"] > 4 * low


def test_batch_sweep_puts_each_batch_beside_both_bounds(tiny, monkeypatch):
    model, tokenizer = tiny

    def fake_decode(model, ids, *, new_tokens, **kwargs):
        b = ids.shape[0]
        return {"batch": b, "prompt_tokens": ids.shape[1], "new_tokens": new_tokens, "step_ms": 10.0 + b,
                "tokens_per_s": b * 1e3 / (10.0 + b)}

    monkeypatch.setattr(generation, "measure_decode", fake_decode)
    rows = generation.batch_sweep(model, tokenizer, batch_sizes=[1, 4, 16], new_tokens=6, repeats=1, prompt_tokens=4,
                                  bandwidth_bytes_per_s=1e9, flops_per_s=1e12)
    compute = {r["compute bound tokens/s"] for r in rows}
    assert len(compute) == 1 and compute.pop() == pytest.approx(
        generation.compute_bound(model, {"prompt_tokens": 4, "new_tokens": 6}, 1e12))
    assert rows[0]["bound tokens/s"] < rows[1]["bound tokens/s"] < rows[2]["bound tokens/s"]


# --------------------------------------------------------------------------- the plan: one sentence per bad parameter

@pytest.mark.parametrize("bad, named", [
    ({"new_tokens": 1}, "new_tokens=1"),
    ({"new_tokens": -3}, "new_tokens=-3"),
    ({"prefill_batch": 1.5}, "prefill_batch=1.5"),
    ({"prompt_lengths": [32, 0]}, "prompt_lengths[1]=0"),
    ({"batch_sizes": [0]}, "batch_sizes[0]=0"),
    ({"model_ids": "smollm2-135m"}, "model_ids='smollm2-135m'"),
    ({"model_ids": []}, "model_ids=[]"),
    ({"compile": "yes"}, "compile='yes'"),
])
def test_notebook_plan_refuses_a_bad_parameter_in_one_sentence(bad, named):
    with pytest.raises(BadParameter) as caught:
        generation.notebook_plan(device="cpu", quick=True, **bad)
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_notebook_plan_refuses_a_misspelt_model_and_a_dtype_that_is_not_for_weights():
    from labkit.errors import LabkitError

    with pytest.raises(LabkitError, match="smollm-135m"):
        generation.notebook_plan(device="cpu", quick=True, decode_model="smollm-135m")
    with pytest.raises(LabkitError):
        generation.notebook_plan(device="cpu", quick=True, dtype="int4")


def test_notebook_plan_sizes_a_cpu_run():
    import torch

    plan = generation.notebook_plan(device="cpu", quick=True)
    assert plan["dtype"] == torch.float32 and plan["decode_model"] == "smollm2-135m"
    assert plan["prompt_lengths"] == [32, 128] and plan["prefill_batch"] == 1 and plan["new_tokens"] >= 2
    assert plan["batch_sizes"] == [1, 4] and plan["compile_step"] is False and plan["implementations"] == ["eager", "sdpa"]
    assert set(plan["problems"]) == {"smollm2-135m", "tiny-opt"} and "line" in plan
    mine = generation.notebook_plan(device="cpu", quick=False, prompt_lengths=[64, 16, 64], batch_sizes=[2],
                                    new_tokens=5, compile=True, decode_model="tiny-llama")
    assert mine["prompt_lengths"] == [16, 64] and mine["batch_sizes"] == [2] and mine["new_tokens"] == 5
    assert mine["compile_step"] is True and mine["decode_model"] == "tiny-llama"


def test_gpu_sizes_leave_tiny_opt_a_prompt_length():
    sizes = generation.default_sizes(on_gpu=True, quick=False)
    assert min(sizes["prompt_lengths"]) + 1 <= 512  # tiny-opt's position table
    assert sizes["new_tokens"] >= 2 and 1 in sizes["batch_sizes"]


# --------------------------------------------------------------------------- measurements on a tiny model

def test_prefill_sweep_marks_a_point_that_stays_against_the_trend(tiny, monkeypatch):
    model, _ = tiny
    times = {16: 9.0, 32: 3.0}  # more tokens, less time: against the cost model, every time it is measured

    def fake(model, ids, *, warmup=1, repeats=3):
        n = ids.shape[1]
        return {"batch": ids.shape[0], "prompt_tokens": n, "tokens": ids.numel(), "median_ms": times[n],
                "p10_ms": times[n] * 0.9, "p90_ms": times[n] * 1.1, "tokens_per_s": ids.numel() / times[n] * 1e3,
                "peak_extra_bytes": 100}

    monkeypatch.setattr(generation, "measure_prefill", fake)
    rows = generation.prefill_sweep(model, [16, 32], batch=1, repeats=1)
    assert [r["noisy"] for r in rows] == [True, True] and all(r["remeasured"] for r in rows)
    times[32] = 20.0  # the second measurement follows the trend: nothing is noisy
    rows = generation.prefill_sweep(model, [16, 32], batch=1, repeats=1)
    assert [r.get("noisy") for r in rows] == [False, False]


def test_prefill_sweep_on_a_real_model(tiny):
    model, _ = tiny
    rows = generation.prefill_sweep(model, [8, 16], batch=1, repeats=1)
    assert [r["prompt_tokens"] for r in rows] == [8, 16] and all("noisy" in r for r in rows)
    assert generation.usable_lengths(model, [8, 511, 512]) == [8, 511]


def test_decode_reports_its_spread_and_first_call(tiny):
    model, tokenizer = tiny
    ids = generation.random_prompt(model, batch=1, length=4)
    row = generation.measure_decode(model, ids, new_tokens=4, repeats=2, tokenizer=tokenizer)
    assert 0 <= row["step_p10_ms"] <= row["step_p90_ms"] and row["first_call_extra_s"] >= 0


def test_weights_alone_reads_every_weight_once(tiny):
    import torch

    model, _ = tiny
    alone = generation.weights_alone(model, repeats=2)
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert alone["products"] == len(weights)  # the tied output layer counts once
    assert alone["bytes"] == sum(w.numel() * w.element_size() for w in weights.values()) and alone["median_ms"] > 0


def test_the_measured_kv_cache_is_the_formula(tiny):
    from labkit import roofline

    model, _ = tiny
    measured = generation.kv_cache_measured(model, context=64)
    assert measured == roofline.kv_cache_bytes(model.config, batch=1, context=64, dtype=model.dtype)
    found = generation.kv_cache_findings(model, measured, context=64)
    assert found["checks"]["kv_cache_size_is_the_formula"][0] is True
    assert found["metrics"]["kv_cache_measured_mib"] == pytest.approx(measured / 2**20)


def test_implementations_agree_on_a_tiny_model(tiny):
    from labkit import compat

    model, tokenizer = tiny
    agree = generation.implementations_agree(model, tokenizer, "Hello", ["eager", "sdpa"], new_tokens=3)
    assert agree["same_tokens"] and agree["logit_error"] < 1e-4 and set(agree["text"]) == {"eager", "sdpa"}
    assert compat.attn_implementation(model) == "sdpa"  # switched back
    found = generation.agreement_findings({"tiny-llama": agree})
    assert found["checks"]["greedy_tokens_identical_across_implementations"][0] is True
    assert "logits_relative_difference_tiny_llama" in found["metrics"]


def test_right_padding_is_caught_in_transformers_warnings(tiny):
    model, tokenizer = tiny
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    batch = tokenizer(["Hello my dog is cute", "Hi"], return_tensors="pt", padding=True)
    with generation.transformers_warnings() as said:
        generation.generate_exactly(model, batch.input_ids, 2, attention_mask=batch.attention_mask, tokenizer=tokenizer)
    tokenizer.padding_side = "left"
    found = generation.padding_findings({"alone": [1], "left": [1], "right": [2]}, said)
    assert found["checks"] == {"left_padding_matches_the_prompt_alone": True, "right_padding_is_warned_about": True}


def test_attempt_with_reasons_keeps_the_first_line_and_the_warnings():
    import warnings

    def refuse():
        warnings.warn("Flash attention kernel not used because:", stacklevel=1)
        warnings.warn("Flash Attention does not support non-null attn_mask.", stacklevel=1)
        raise RuntimeError("No available kernel. Aborting execution.\nmore")

    got = generation.attempt_with_reasons(refuse)
    assert got["ok"] is False and got["error"] == "No available kernel. Aborting execution."
    assert any("attn_mask" in r for r in got["reasons"])
    assert generation.attempt_with_reasons(lambda: None) == {"ok": True, "error": "", "reasons": []}


# --------------------------------------------------------------------------- rows into metrics, checks and words

def prefill_row(model, implementation, n, ms, peak, noisy=False):
    return {"model": model, "attn_implementation": implementation, "batch": 1, "prompt_tokens": n, "tokens": n,
            "median_ms": ms, "p10_ms": ms, "p90_ms": ms, "tokens_per_s": n / ms, "peak_extra_bytes": peak,
            "noisy": noisy}


def test_prefill_findings_and_the_longest_prompt():
    from types import SimpleNamespace

    from labkit.metrics import decoders as names

    rows = [prefill_row("m", "eager", 32, 2.0, 4 * 2**20), prefill_row("m", "eager", 128, 6.0, 16 * 2**20, True),
            prefill_row("m", "sdpa", 32, 2.0, 2**20), prefill_row("m", "sdpa", 128, 3.0, 2 * 2**20)]
    found = generation.prefill_findings(rows)["metrics"]
    assert found[names.prefill("m", "eager", 128, "ms")] == 6.0 and found[names.prefill("m", "sdpa", 32, "peak_mib")] == 1
    assert found[names.prefill("m", "eager", 128, "noisy")] == 1 and names.prefill("m", "sdpa", 128, "noisy") not in found
    longest = generation.longest_prompt(rows, {"m": SimpleNamespace(num_attention_heads=2)}, "float32")
    assert longest == [{"model": "m", "prompt tokens": 128, "eager / sdpa memory": 8.0, "eager / sdpa time": None,
                        "one layer's scores MiB": 4 * 2 * 128 * 128 / 2**20, "timing": "noisy"}]
    assert generation.longest_prompt_findings(longest) == {"metrics": {names.eager_over_sdpa_memory("m"): 8.0}}
    shown = generation.prefill_table(rows)
    assert [r["timing"] for r in shown] == ["ok", "noisy", "ok", "ok"] and shown[0]["peak MiB"] == 4


def recipe_row(label, step_ms, tokens=(1, 2), spread=0.1):
    return {"recipe": label, "batch": 1, "prompt_tokens": 16, "new_tokens": 2, "step_ms": step_ms,
            "step_p10_ms": step_ms - spread, "step_p90_ms": step_ms + spread, "tokens_per_s": 1e3 / step_ms,
            "token_ids": [list(tokens)], "first_call_extra_s": 3.0, "bound_step_ms": 1.0,
            "fraction_of_bound": 1.0 / step_ms}


def test_recipe_findings_and_the_step_budget():
    import torch

    from labkit.metrics import decoders as names

    recipes = [recipe_row("dynamic cache", 10.0), recipe_row("static cache", 10.05),
               recipe_row("hand loop, compiled step", 2.0, tokens=(1, 3))]
    alone = {"median_ms": 1.5, "p10_ms": 1.4, "p90_ms": 1.6, "bytes": 10**6, "bytes_per_s": 1e9, "products": 7}
    found = generation.recipe_findings(recipes, alone, dtype=torch.float32)
    assert found["metrics"][names.BEST_FRACTION_BATCH1] == 0.5 and found["metrics"][names.RECIPES_AGREEING] == 2
    assert found["metrics"][names.recipe("hand loop, compiled step", "compile_seconds")] == 3.0
    assert names.recipe("static cache", "compile_seconds") not in found["metrics"]
    assert found["metrics"][names.WEIGHTS_ALONE_MS] == 1.5
    assert found["checks"]["recipes_generate_the_same_tokens"][0] is False
    assert found["checks"]["recipes_decode_the_same_number_of_tokens"][0] is True
    in_bf16 = generation.recipe_findings(recipes, alone, dtype=torch.bfloat16)
    assert "recipes_generate_the_same_tokens" not in in_bf16["checks"]  # a count there, not a claim
    budget = generation.step_budget(recipes, alone)
    assert budget[0]["the rest ms"] == pytest.approx(8.5) and budget[0]["matrix products ms"] == 1.5
    lines = generation.budget_lines(recipes, alone, 2e9)
    assert "15%" in lines[0] and "no difference shown" in lines[1] and "3.0 s more" in lines[2]
    assert "8 ms less" in lines[3] and "2 of 3 recipes generated exactly" in lines[4]
    assert generation.budget_lines([], alone, 2e9) == []


def test_step_verdict_names_what_sets_the_pace():
    far = generation.step_verdict(22.8, 0.09, "cuda:0")  # the usual reading, not a measured fact
    assert "memory does not set the pace (on a GPU, usually the launching of many small kernels)" in far
    on_cpu = generation.step_verdict(22.8, 0.09, "cpu")  # without the products timed alone: no cause claimed
    assert "launch" not in on_cpu and "0.39% of the step" in on_cpu and "section 4" in on_cpu
    assert "bandwidth-bound" in generation.step_verdict(1.2, 1.0, "cuda")
    assert "they set the pace; they read the weights at 25% of the copy's speed" in generation.step_verdict(
        100.0, 20.0, "cpu", products_ms=80.0)
    rest = generation.step_verdict(20.0, 1.0, "cuda", products_ms=2.0)
    assert "the rest of the step sets the pace: on a GPU, usually the launching" in rest and "(10%)" in rest
    assert "Python" in generation.step_verdict(20.0, 1.0, "cpu", products_ms=2.0)


def test_decode_and_batch_findings():
    from labkit.metrics import decoders as names

    rows = [{"model": "m", "attn_implementation": "sdpa", "tokens_per_s": 10.0, "step_ms": 100.0,
             "bound_step_ms": 20.0, "fraction_of_bound": 0.2}]
    found = generation.decode_findings(rows, 25e9)["metrics"]
    assert found[names.BANDWIDTH] == 25.0 and found[names.decode("m", "sdpa", "bound_step_ms")] == 20.0
    batches = [{"batch": 1, "step ms": 10.0, "tokens/s (all sequences)": 100.0},
               {"batch": 4, "step ms": 12.0, "tokens/s (all sequences)": 330.0}]
    found = generation.batch_findings(batches)
    assert found["metrics"][names.batch(4, "tokens_per_s")] == 330.0 and found["metrics"]["batch1_step_ms"] == 10.0
    assert found["timing"]["batching_raises_throughput"][0] is True


def test_expected_quick_metrics_are_built_by_the_same_builders():
    from labkit.metrics import decoders as names

    expected = names.expected_quick()
    assert len(expected) == len(set(expected))
    assert names.prefill("smollm2-135m", "sdpa", 32, "ms") in expected and "batch1_tokens_per_s" in expected
    assert names.recipe("dynamic cache", "fraction_of_bandwidth_bound") in expected


# --------------------------------------------------------------------------- what you measured

def results(metrics, checks=None, skipped=None):
    return {"metrics": metrics, "checks": checks or {}, "skipped": skipped or {}}


def test_what_you_measured_with_every_part():
    from labkit.metrics import decoders as names

    metrics = {names.decode("smollm2-135m", "eager", "step_ms"): 110.0,
               names.decode("smollm2-135m", "sdpa", "step_ms"): 100.0,
               names.decode("smollm2-135m", "sdpa", "bound_step_ms"): 20.0,
               names.eager_over_sdpa_memory("smollm2-135m"): 1.5, names.prefill("m", "sdpa", 128, "noisy"): 1,
               names.recipe("dynamic cache", "fraction_of_bandwidth_bound"): 0.2,
               names.recipe("hand loop", "fraction_of_bandwidth_bound"): 0.3,
               names.recipe("dynamic cache", "step_ms"): 100.0, names.WEIGHTS_ALONE_MS: 40.0,
               names.BEST_FRACTION_BATCH1: 0.3, names.batch(1, "tokens_per_s"): 10.0,
               names.batch(4, "tokens_per_s"): 30.0}
    lines = generation.what_you_measured(results(metrics, {"left_padding_matches_the_prompt_alone": True}))
    text = "\n".join(lines)
    assert "smollm2 135m" in lines[0] and "100 ms a step" in lines[0] and "5.0x, far above it" in lines[0]
    assert "hand loop, reached 30%" in text and "40 ms of the dynamic cache's 100 ms" in text
    assert "1.50x" in text and "1 prefill time stayed" in text and "3.0x the tokens/s" in text
    assert "continued exactly as it does alone" in text and "_" not in text.replace("smollm2 135m", "")


def test_what_you_measured_when_parts_were_skipped():
    only_prefill = results({"prefill_m_eager_over_sdpa_memory": 2.0}, skipped={"recipes on x": "not installed"})
    lines = generation.what_you_measured(only_prefill)
    assert len(lines) == 1 and "2.00x" in lines[0]
    nothing = generation.what_you_measured(results({}, skipped={"prefill and decode of smollm2-135m": "no package"}))
    assert nothing == ["No decode ran on this machine: the 'Skipped:' lines above say why."]
    no_products = generation.what_you_measured(results({"recipe_hand_loop_fraction_of_bandwidth_bound": 0.1,
                                                        "best_fraction_of_bandwidth_bound_batch1": 0.1}))
    assert no_products == ["The best batch-1 recipe, hand loop, reached 10% of the bandwidth bound."]
