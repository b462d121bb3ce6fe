import pytest
import torch

from labkit import attention, fastpath, models
from labkit.errors import BadParameter


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = models.load_model("minilm-l6", attn_implementation="eager")
    return model, tokenizer, fastpath.to_fastpath(model)


def _batch(tokenizer, padding=0.5, side="right"):
    batch = fastpath.padded_batch(tokenizer, batch=4, length=32, padding_fraction=padding, seed=1)
    if side == "left":  # move each sequence's tokens to the end
        ids, mask = batch["input_ids"], batch["attention_mask"]
        order = torch.argsort(mask, dim=1, stable=True)
        batch = {**batch, "input_ids": ids.gather(1, order), "attention_mask": mask.gather(1, order)}
    return batch


def test_converted_minilm_matches_transformers_on_a_padded_batch(minilm):
    model, tokenizer, fast = minilm
    batch = _batch(tokenizer)
    with torch.inference_mode():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = fast(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max() < 1e-4
    assert (got[~real] == 0).all(), "the nested-tensor path leaves exact zeros at padded positions"
    with torch.inference_mode():
        assert fast.why_not(batch["input_ids"], batch["attention_mask"]) == ""


def test_the_profiler_sees_the_fused_layer_and_the_nested_tensor(minilm):
    _, tokenizer, fast = minilm
    batch = _batch(tokenizer)
    with torch.inference_mode():
        seen = attention.ops_that_ran(lambda: fast(batch["input_ids"], batch["attention_mask"]), "cpu")
    assert fastpath.fastpath_ran(seen.ops) and fastpath.padding_skipped(seen.ops)


@pytest.mark.parametrize("case, needle", [("training", "training mode"), ("left padding", "not on the right"),
                                          ("no mask", "no key padding mask"), ("gradients", "gradients are enabled")])
def test_silent_fallbacks_are_named_and_really_fall_back(minilm, case, needle):
    _, tokenizer, fast = minilm
    batch = _batch(tokenizer, side="left" if case == "left padding" else "right")
    mask = None if case == "no mask" else batch["attention_mask"]

    def run():
        return fast(batch["input_ids"], mask)

    try:
        if case == "training":
            fast.train()
        if case == "gradients":
            seen = attention.ops_that_ran(run, "cpu")
            reason = fast.why_not(batch["input_ids"], mask)
        else:
            with torch.inference_mode():
                seen = attention.ops_that_ran(run, "cpu")
                reason = fast.why_not(batch["input_ids"], mask)
    finally:
        fast.eval()
    assert needle in reason
    assert not fastpath.padding_skipped(seen.ops)
    # left padding and a missing mask still fuse each layer; training mode and gradients do not
    assert fastpath.fastpath_ran(seen.ops) == (case in ("left padding", "no mask"))


def test_electra_with_a_projected_embedding_is_refused():
    from transformers import ElectraConfig, ElectraModel

    config = ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64)
    with pytest.raises(fastpath.UnsupportedModel, match="embedding_size=16"):
        fastpath.to_fastpath(ElectraModel(config))


def test_unsupported_models_get_a_clear_error():
    llama, _ = models.load_model("tiny-llama")
    with pytest.raises(fastpath.UnsupportedModel, match="type is 'llama'"):
        fastpath.to_fastpath(llama)
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=36, num_hidden_layers=1, num_attention_heads=3, intermediate_size=64,
                        hidden_act="gelu_new")
    with pytest.raises(fastpath.UnsupportedModel) as caught:
        fastpath.to_fastpath(BertModel(config))
    assert "hidden_act='gelu_new'" in str(caught.value) and "odd" in str(caught.value)


@pytest.mark.parametrize("size", [2, 4, 8])
def test_padded_batch_makes_the_padding_asked_for(minilm, size):
    _, tokenizer, _ = minilm
    for fraction in (0.0, 0.25, 0.5):
        batch = fastpath.padded_batch(tokenizer, batch=size, length=64, padding_fraction=fraction)
        assert abs(batch["padding_fraction"] - fraction) < 0.01, (size, fraction, batch["padding_fraction"])
        assert batch["attention_mask"][:, 0].all() and batch["attention_mask"].sum(1).max() == 64
    # 75% padding is reachable only when the longest sequence is a small share of the batch
    assert abs(fastpath.padded_batch(tokenizer, batch=8, length=64, padding_fraction=0.75)["padding_fraction"] - 0.75) < 0.01
    with pytest.raises(BadParameter):
        fastpath.padded_batch(tokenizer, batch=1, length=8, padding_fraction=0.5)
    with pytest.raises(BadParameter):
        fastpath.padded_batch(tokenizer, batch=4, length=8, padding_fraction=1.0)


def test_masked_mean_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(fastpath.masked_mean(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
