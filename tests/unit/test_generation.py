import pytest
from conftest import assert_refused

from labkit import generation, models, outputs
from labkit.errors import BadParameter


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny-llama")


def test_random_prompt_is_reproducible_and_in_range(tiny):
    model, _ = tiny
    ids = outputs.random_prompt(model, batch=2, length=7, seed=3)
    assert ids.shape == (2, 7) and int(ids.min()) >= 100
    assert int(ids.max()) < model.get_input_embeddings().weight.shape[0]
    assert (ids == outputs.random_prompt(model, batch=2, length=7, seed=3)).all()
    with pytest.raises(BadParameter):
        outputs.random_prompt(model, batch=0, length=7)


def test_generate_exactly_never_stops_early(tiny):
    model, tokenizer = tiny
    ids = outputs.random_prompt(model, batch=1, length=5)
    out = outputs.generate_exactly(model, ids, 6, tokenizer=tokenizer)
    assert out.shape == (1, 11)


def test_measure_decode(tiny):
    model, tokenizer = tiny
    ids = outputs.random_prompt(model, batch=2, length=4)
    row = outputs.measure_decode(model, ids, new_tokens=5, repeats=2, tokenizer=tokenizer)
    assert row["tokens_per_s"] > 0 and row["step_ms"] > 0 and row["timing_fallback"] in (True, False)
    assert len(row["token_ids"]) == 2 and all(len(t) == 5 for t in row["token_ids"])
    again = outputs.measure_decode(model, ids, new_tokens=5, repeats=1, tokenizer=tokenizer)
    assert again["token_ids"] == row["token_ids"]
    with pytest.raises(BadParameter, match="at least 2"):
        outputs.measure_decode(model, ids, new_tokens=1)


def test_the_hand_loop_matches_generate(tiny):
    model, tokenizer = tiny
    ids = outputs.random_prompt(model, batch=2, length=6, seed=5)
    loop = outputs.GreedyLoop(model, batch=2, prompt_tokens=6, new_tokens=7)
    expected = outputs.generate_exactly(model, ids, 7, tokenizer=tokenizer)[:, 6:]
    assert (loop(ids) == expected).all()
    assert (loop(ids, 3) == expected[:, :3]).all()  # the cache is reset between calls
    row = outputs.measure_loop(loop, ids, repeats=1)
    assert row["tokens_per_s"] > 0 and row["token_ids"] == expected.tolist()
    with pytest.raises(BadParameter, match="built for prompts of 6 tokens"):
        loop(ids[:, :5])
    with pytest.raises(BadParameter):
        loop(ids, 8)


# --------------------------------------------------------------------------- measurements on a tiny model

def test_decode_reports_its_spread_and_first_call(tiny):
    model, tokenizer = tiny
    ids = outputs.random_prompt(model, batch=1, length=4)
    row = outputs.measure_decode(model, ids, new_tokens=4, repeats=2, tokenizer=tokenizer)
    assert 0 <= row["step_p10_ms"] <= row["step_p90_ms"] and row["first_call_extra_s"] >= 0


def test_right_padding_is_caught_in_transformers_warnings(tiny):
    model, tokenizer = tiny
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    batch = tokenizer(["Hello my dog is cute", "Hi"], return_tensors="pt", padding=True)
    with generation.transformers_warnings() as said:
        outputs.generate_exactly(model, batch.input_ids, 2, attention_mask=batch.attention_mask, tokenizer=tokenizer)
    tokenizer.padding_side = "left"
    assert any("right-padding" in m for m in said)
    with generation.transformers_warnings() as quiet:
        batch = tokenizer(["Hello my dog is cute", "Hi"], return_tensors="pt", padding=True)
        outputs.generate_exactly(model, batch.input_ids, 2, attention_mask=batch.attention_mask, tokenizer=tokenizer)
    assert not any("right-padding" in m for m in quiet)


# --------------------------------------------------------------------------- the parameters: one sentence per bad one

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
def test_parameters_refuse_a_bad_value_in_one_sentence(bad, named):
    assert_refused(generation.Parameters, bad, named)


def test_parameters_refuse_a_misspelt_model_and_a_dtype_that_is_not_for_weights():
    from labkit.errors import LabkitError

    with pytest.raises(LabkitError, match="smollm-135m"):
        generation.Parameters(decode_model="smollm-135m").resolve(device="cpu", quick=True)
    with pytest.raises(LabkitError):
        generation.Parameters(dtype="int4").resolve(device="cpu", quick=True)


def test_parameters_are_sized_for_a_cpu_and_keep_what_was_given():

    import torch

    p = generation.Parameters()
    line = p.resolve(device="cpu", quick=True)
    assert p.dtype == torch.float32 and p.decode_model == "smollm2-135m" and "compiled step off" in line
    assert p.prompt_lengths == [32, 128] and p.prefill_batch == 1 and p.new_tokens >= 2 and p.repeats == 2
    assert p.batch_sizes == [1, 4] and p.compile_step is False and p.implementations == ["eager", "sdpa"]
    assert set(p.problems) == {"smollm2-135m", "tiny-opt"}
    mine = generation.Parameters(prompt_lengths=[64, 16, 64], batch_sizes=[2], new_tokens=5, compile=True,
                                 decode_model="tiny-llama")
    mine.resolve(device="cpu", quick=False)
    assert mine.prompt_lengths == [16, 64] and mine.batch_sizes == [2] and mine.new_tokens == 5
    assert mine.compile_step is True and mine.decode_model == "tiny-llama"


def test_the_parameters_are_the_notebooks_parameters_cell_with_its_defaults():
    import dataclasses
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "notebooks" / "src" / "02_decoders_and_generation.py").read_text()
    cell: dict = {}
    exec(source.split('# %% tags=["parameters"]', 1)[1].split("# %%", 1)[0], cell)
    given = {k: v for k, v in cell.items() if k not in ("__builtins__", "device", "quick", "results_path", "solutions")}
    defaults = {f.name: getattr(generation.Parameters(), f.name) for f in dataclasses.fields(generation.Parameters)
                if f.init}
    assert defaults == given
