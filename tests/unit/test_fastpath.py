import pytest
import torch
from torch import nn

from labkit import compat, fastpath, models, outputs
from labkit.errors import BadParameter, ModelNotAvailable
from labkit.results import reference_runs, table


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = models.load_model("minilm-l6", attn_implementation="eager")
    return model, tokenizer, fastpath.to_fastpath(model)


@pytest.fixture(scope="module")
def tiny_bert():
    model, tokenizer = models.load_model("tiny-bert", attn_implementation="sdpa")
    return model, tokenizer


def _batch(tokenizer, padding=0.5, side="right"):
    batch = fastpath.padded_batch(tokenizer, batch=4, length=32, padding_fraction=padding, seed=1)
    if side == "left":  # move each sequence's tokens to the end
        ids, mask = batch["input_ids"], batch["attention_mask"]
        order = torch.argsort(mask, dim=1, stable=True)
        batch = {**batch, "input_ids": ids.gather(1, order), "attention_mask": mask.gather(1, order)}
    return batch


def _encoder(**changes):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True, **changes)
    with pytest.warns(UserWarning) if changes else _nothing():
        encoder = nn.TransformerEncoder(layer, num_layers=2)
    src = torch.randn(3, 12, 32)
    padding = torch.arange(12)[None, :] >= torch.tensor([12, 7, 3])[:, None]
    return encoder.eval(), src, padding


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- the parameters

def resolved(quick=True, **parameters):
    p = fastpath.Parameters(**parameters)
    line = p.resolve(device="cpu", quick=quick)
    return p, line


def test_the_parameters_are_sized_for_a_quick_cpu_run():
    p, line = resolved()
    assert p.dtype is torch.float32 and p.tolerance == 1e-4 and p.sweep_model == "minilm-l6" and p.repeats == 3
    assert p.batch_sizes == [8] and p.lengths == [128] and p.padding_fractions == [0.0, 0.25, 0.5, 0.75]
    assert p.implementations == fastpath.QUICK_IMPLEMENTATIONS and "minilm-l6" in line and p.model_problem == ""
    full, _ = resolved(quick=False, batch_sizes=[16, 4, 4], padding_fractions=[0.5, 0.0])
    assert full.batch_sizes == [4, 16] and full.padding_fractions == [0.0, 0.5]
    assert full.implementations == fastpath.IMPLEMENTATIONS and full.repeats == 5


def test_the_parameters_defaults_are_the_notebooks():
    from pathlib import Path

    cell = (Path(__file__).parents[2] / "notebooks/src/03_encoder_fastpath.py").read_text().split("# %%")[2]
    given = {}
    exec(cell.split("\n", 1)[1], {}, given)  # the parameters cell: plain assignments
    defaults = fastpath.Parameters()
    for name in ("dtype", "model_id", "sweep_model", "padding_fractions", "batch_sizes", "lengths"):
        assert given[name] == getattr(defaults, name), name


@pytest.mark.parametrize("parameters, named", [
    ({"padding_fractions": [0.5, 1.5]}, "padding_fractions=[0.5, 1.5]"),
    ({"padding_fractions": []}, "padding_fractions=[]"),
    ({"padding_fractions": ["half"]}, "padding_fractions=['half']"),
    ({"padding_fractions": 0.5}, "padding_fractions=0.5"),
    ({"batch_sizes": [0]}, "batch_sizes[0]=0"),
    ({"lengths": [128, -1]}, "lengths[1]=-1"),
    ({"batch_sizes": 8}, "batch_sizes=8"),
    ({"batch_sizes": [1, 8]}, "batch_sizes=[1, 8]"),
    ({"dtype": "int4"}, "int4"),
])
def test_a_bad_parameter_gets_one_sentence_naming_it(parameters, named):
    with pytest.raises(BadParameter) as caught:
        resolved(**parameters)
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_a_misspelt_model_stops_the_notebook():
    with pytest.raises(ModelNotAvailable):
        resolved(model_id="minilm-l7")


def test_one_sequence_per_batch_is_fine_without_padding():
    assert resolved(batch_sizes=[1], padding_fractions=[0.0])[0].batch_sizes == [1]


# --------------------------------------------------------------------------- the converter

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
        hidden = fast.embeddings(input_ids=batch["input_ids"])
        assert fastpath.why_not_fastpath(fast.encoder, hidden, batch["attention_mask"] == 0) == ""


def test_what_ran_tells_the_converted_model_from_transformers(minilm):
    model, tokenizer, fast = minilm
    batch = _batch(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode():
        assert fastpath.what_ran(lambda: fast(**inputs), "cpu") == {"padding skipped": True, "fused layers": 6}
        assert fastpath.what_ran(lambda: model(**inputs), "cpu") == {"padding skipped": False, "fused layers": 0}


@pytest.mark.parametrize("case, needle", [("training", "training mode"), ("left padding", "not on the right"),
                                          ("no mask", "no key padding mask"), ("gradients", "gradients are tracked")])
def test_silent_fallbacks_are_named_and_really_fall_back(minilm, case, needle):
    _, tokenizer, fast = minilm
    batch = _batch(tokenizer, side="left" if case == "left padding" else "right")
    mask = None if case == "no mask" else batch["attention_mask"]

    def run():
        hidden = fast.embeddings(input_ids=batch["input_ids"])
        reason = fastpath.why_not_fastpath(fast.encoder, hidden, None if mask is None else mask == 0)
        return reason, fastpath.what_ran(lambda: fast(batch["input_ids"], mask), "cpu")

    try:
        if case == "training":
            fast.train()
        if case == "gradients":
            reason, ran = run()
        else:
            with torch.inference_mode():
                reason, ran = run()
    finally:
        fast.eval()
    assert needle in reason
    assert not ran["padding skipped"]
    # left padding and a missing mask still fuse each layer; training mode and gradients do not
    assert (ran["fused layers"] == 6) == (case in ("left padding", "no mask"))


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


# --------------------------------------------------------------------------- the conditions torch 2.13 checks

def test_no_grad_and_frozen_weights_are_enough():
    encoder, src, padding = _encoder()
    with torch.no_grad():
        assert fastpath.why_not_fastpath(encoder, src, padding) == "" == fastpath.why_not_fused(encoder, src, padding)
    with torch.enable_grad():
        assert "gradients are tracked" in fastpath.why_not_fastpath(encoder, src, padding)
        encoder.requires_grad_(False)
        assert fastpath.why_not_fastpath(encoder, src, padding) == ""


def test_norm_first_stops_the_packing_but_not_the_fused_layer():
    encoder, src, padding = _encoder(norm_first=True)
    with torch.no_grad():
        assert "norm_first=True" in fastpath.why_not_fastpath(encoder, src, padding)
        assert fastpath.why_not_fused(encoder, src, padding) == ""


def test_bias_false_stops_both():
    encoder, src, padding = _encoder(bias=False)
    with torch.no_grad():
        assert "bias=False" in fastpath.why_not_fastpath(encoder, src, padding)
        assert "layers 0, 1: it was built with bias=False" == fastpath.why_not_fused(encoder, src, padding)


def test_a_hook_stops_the_fused_layer_it_sits_on_only():
    encoder, src, padding = _encoder()
    handle = encoder.layers[1].linear1.register_forward_pre_hook(lambda module, args: None)
    with torch.no_grad():
        assert fastpath.why_not_fastpath(encoder, src, padding) == ""
        assert fastpath.why_not_fused(encoder, src, padding).startswith("layer 1: a forward hook")
    handle.remove()
    with torch.no_grad():
        assert fastpath.why_not_fused(encoder, src, padding) == ""


def test_compilation_and_a_second_mask_stop_the_packing():
    encoder, src, padding = _encoder()
    compiled = torch.compile(encoder, backend="eager")  # not run: the reason comes from the wrapper
    with torch.no_grad():
        assert "torch.compile" in fastpath.why_not_fastpath(compiled, src, padding)
        assert fastpath.why_not_fused(compiled, src, padding) == ""
        assert "attention mask" in fastpath.why_not_fastpath(encoder, src, padding, mask=torch.zeros(12, 12))


# --------------------------------------------------------------------------- the sweep

def test_each_implementation_is_timed_on_the_same_batch(tiny_bert):
    model, tokenizer = tiny_bert
    fast = fastpath.to_fastpath(model)
    batch = fastpath.padded_batch(tokenizer, batch=4, length=16, padding_fraction=0.5)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode():
        expected = fast(**inputs).last_hidden_state
        for implementation in ("eager", "sdpa"):
            model.set_attn_implementation(implementation)
            real = batch["attention_mask"].bool()
            assert torch.allclose(model(**inputs).last_hidden_state[real], expected[real], atol=1e-4)
        timed = fastpath.timed(lambda: fast(**inputs), "cpu", repeats=2)
    assert timed["status"] == "ok" and 0 < timed["p10_ms"] <= timed["median_ms"] <= timed["p90_ms"]
    assert compat.attn_implementation(model) == "sdpa"


def test_a_timing_that_runs_out_of_memory_is_a_row_not_a_crash():
    def too_big():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")

    assert fastpath.timed(too_big, "cpu", repeats=2) == {
        "status": "oom", "why": "DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB"}


def test_the_headline_names_are_the_reference_runs():
    stored = reference_runs("03_encoder_fastpath")["nvidia-h100"]["metrics"]
    b, n = max(fastpath.GPU_SIZES["batch_sizes"]), max(fastpath.GPU_SIZES["lengths"])
    assert f"speedup_fastpath_vs_sdpa_b{b}_n{n}_pad{round(100 * 0.75)}" in stored  # as the notebook names them


# --------------------------------------------------------------------------- skipping padding today

def _hidden(model, inputs):
    with torch.inference_mode():
        return model(**inputs).last_hidden_state


def test_varlen_attention_reads_the_boundaries_transformers_passes(tiny_bert, monkeypatch):
    """The GPU-only way's plumbing, on a CPU: varlen_attn replaced by SDPA run on each sequence alone."""
    import torch.nn.attention.varlen as varlen
    from transformers import AttentionInterface

    model, tokenizer = tiny_bert
    calls = []

    def per_sequence(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        calls.append((tuple(q.shape), cu_q.tolist(), max_q))
        bounds = cu_q.tolist()
        outs = [torch.nn.functional.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)),
                                                                 scale=scale).transpose(0, 1)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return torch.cat(outs)

    monkeypatch.setattr(varlen, "varlen_attn", per_sequence)
    from transformers import DataCollatorWithFlattening

    batch = fastpath.padded_batch(tokenizer, batch=4, length=16, padding_fraction=0.5)
    expected = _hidden(model, {k: batch[k] for k in ("input_ids", "attention_mask")})[batch["attention_mask"].bool()]
    pairs = zip(batch["input_ids"], batch["attention_mask"], strict=True)
    sequences = [{"input_ids": ids[m.bool()].tolist()} for ids, m in pairs]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(sequences)
    packed.pop("labels", None)  # as notebook 03 packs a batch
    AttentionInterface.register("labkit_varlen", fastpath.varlen_attention)  # as notebook 03 registers it
    model.set_attn_implementation("labkit_varlen")
    try:
        got = _hidden(model, packed)[0]  # the row with its boundaries
    finally:
        model.set_attn_implementation("sdpa")
    assert outputs.relative_error(got, expected) < 1e-5
    assert calls and calls[0][1][0] == 0 and len(calls[0][0]) == 3  # (tokens, heads, head size) and boundaries


def test_a_way_is_timed_beside_its_output_and_one_that_breaks_is_a_row_not_a_crash():
    x = torch.ones(3)
    measured, out = fastpath.measure_way(lambda: (lambda: x * 2), "cpu", repeats=2)
    assert measured["status"] == "ok" and measured["first call s"] >= 0 and torch.equal(out, x * 2)

    def missing_kernel():
        raise NotImplementedError("Could not run 'aten::_flash_attention_forward' with arguments from the 'CPU' "
                                  "backend.\nmore lines")

    measured, out = fastpath.measure_way(lambda: missing_kernel, "cpu", repeats=2)
    assert out is None and measured == {"status": "failed", "why": "NotImplementedError: Could not run "
                                        "'aten::_flash_attention_forward' with arguments from the 'CPU' backend."}


def test_the_varlen_kernel_on_a_cpu_is_a_failed_row_in_one_sentence():
    from torch.nn.attention.varlen import varlen_attn

    q, cu = torch.randn(6, 2, 64), torch.tensor([0, 2, 6], dtype=torch.int32)
    measured, out = fastpath.measure_way(lambda: lambda: varlen_attn(q, q, q, cu, cu, 4, 4), "cpu", repeats=2)
    assert out is None and measured["status"] == "failed" and "CPU" in measured["why"]  # a GPU kernel
    assert ". " not in measured["why"] and len(measured["why"]) < 200


def test_the_stored_h100_run_has_a_sweep_to_read():
    runs = reference_runs("03_encoder_fastpath")
    frame = table(runs["nvidia-h100"], "sweep")
    assert set(frame["implementation"]) == set(fastpath.IMPLEMENTATIONS)
    assert len(frame) == 3 * 3 * 3 * 4  # implementations x batches x lengths x padding fractions


def test_the_boundaries_03_1_asks_for_are_what_transformers_collator_returns(tiny_bert):
    """03.1's solution (cu_seqlens, document ids) against DataCollatorWithFlattening, which the notebook packs with."""
    from transformers import DataCollatorWithFlattening

    from labkit.exercises.encoder import packed_boundaries

    _, tokenizer = tiny_bert
    batch = fastpath.padded_batch(tokenizer, batch=5, length=16, padding_fraction=0.5, seed=3)
    pairs = zip(batch["input_ids"], batch["attention_mask"], strict=True)
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(
        [{"input_ids": ids[m.bool()].tolist()} for ids, m in pairs])
    cu, ids = packed_boundaries(batch["attention_mask"])
    assert cu.dtype == torch.int32 and torch.equal(cu, packed["cu_seq_lens_q"].int())
    restarts = (packed["position_ids"][0] == 0).long().cumsum(0) - 1  # a new document where the positions restart
    assert torch.equal(ids, restarts) and len(ids) == packed["input_ids"].shape[1]

