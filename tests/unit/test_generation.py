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
