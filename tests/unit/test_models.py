import time

import pytest
import torch
from transformers import LlamaForCausalLM

from labkit import models, outputs
from labkit.errors import BadParameter, ModelNotAvailable


def test_embedded_models_are_listed_and_installed():
    rows = {r["name"]: r for r in models.embedded_models()}
    assert set(rows) == {"smollm2-135m", "minilm-l6", "tiny-opt", "tiny-llama", "tiny-bert", "random-llama-1b",
                         "random-bert-base"}
    assert all(r["available"] for r in rows.values()), rows


def test_random_llama_1b_has_a_billion_parameters():
    config = models.random_config("random-llama-1b", 49152, {"pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 2})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert 1.0e9 < sum(p.numel() for p in model.parameters()) < 1.1e9


def test_each_model_gets_its_own_config():
    eager, _ = models.load_model("tiny-opt", attn_implementation="eager")
    sdpa, _ = models.load_model("tiny-opt", attn_implementation="sdpa")
    assert eager.config is not sdpa.config
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"


def test_build_from_config_copies_the_config():
    config = models.random_config("tiny-llama", 64, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    eager = models.build_from_config(config, attn_implementation="eager")
    sdpa = models.build_from_config(config, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    assert eager.config is not config


def test_random_models_are_reproducible_and_implementations_agree():
    (a, tok), (b, _) = models.load_model("tiny-llama", attn_implementation="eager"), models.load_model("tiny-llama")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    ids = tok("Hello my dog is cute and", return_tensors="pt")
    out_a = a.generate(**ids, max_new_tokens=8, do_sample=False)
    out_b = b.generate(**ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out_a, out_b)


def test_smollm2_generates_a_real_continuation():
    model, tokenizer = models.load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert models.complete(models.smollm2_folder())
    ids = tokenizer("Hello my dog is cute and", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.split()) >= 3


def test_minilm_is_a_bert_encoder():
    model, tokenizer = models.load_model("minilm-l6")
    batch = tokenizer(["a short one", "a somewhat longer sentence to pad against"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 384 and type(model).__name__ == "BertModel"


def test_tiny_bert_uses_the_minilm_tokenizer():
    model, tokenizer = models.load_model("tiny-bert")
    assert model.config.vocab_size == len(tokenizer)


def test_misspelt_name_gets_a_suggestion():
    with pytest.raises(ModelNotAvailable, match="did you mean 'smollm2-135m'"):
        models.load_model("smollm-135m")


def test_hub_id_offline_is_one_sentence():
    with pytest.raises(ModelNotAvailable) as caught:
        models.load_model("facebook/opt-350m")
    message = str(caught.value)
    assert "offline" in message and "smollm2-135m" in message and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_folder_without_a_model(tmp_path):
    with pytest.raises(ModelNotAvailable, match="holds no model"):
        models.load_model(str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="not a folder"):
        models.load_model(str(tmp_path / "missing"))


def test_local_folder_loads(tmp_path):
    model, tokenizer = models.load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, _ = models.load_model(str(tmp_path))
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_bad_device_and_dtype():
    if not torch.cuda.is_available():
        with pytest.raises(BadParameter, match="no usable CUDA GPU"):
            models.load_model("tiny-opt", device="cuda")
    with pytest.raises(BadParameter, match="dtype"):
        models.load_model("tiny-opt", dtype="fp4")


def test_empty_name():
    with pytest.raises(BadParameter):
        models.load_model("")


def test_check_model_separates_mistakes_from_missing_packages(monkeypatch):
    assert models.check_model("tiny-opt") is None
    with pytest.raises(ModelNotAvailable, match="did you mean"):
        models.check_model("tiny-opts")
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    assert "not installed" in models.check_model("smollm2-135m")


def test_generate_greedy_counts_new_tokens():
    model, tokenizer = models.load_model("tiny-llama")
    first = outputs.generate_greedy(model, tokenizer, "Hello my dog is cute and", max_new_tokens=5)
    again = outputs.generate_greedy(model, tokenizer, "Hello my dog is cute and", max_new_tokens=5)
    assert first["new_tokens"] == 5 and first["seconds"] > 0
    assert first["continuation"] == again["continuation"]
    assert len(first["token_ids"]) == 5 and first["token_ids"] == again["token_ids"]
    assert tokenizer.decode(first["token_ids"], skip_special_tokens=True) == first["continuation"]


def test_next_token_candidates_are_sorted_and_lead_greedy_decoding():
    model, tokenizer = models.load_model("tiny-llama")
    candidates = outputs.next_token_candidates(model, tokenizer, "Hello my dog", k=3)
    assert len(candidates) == 3
    assert [c["logit"] for c in candidates] == sorted((c["logit"] for c in candidates), reverse=True)
    greedy = outputs.generate_greedy(model, tokenizer, "Hello my dog", max_new_tokens=1)
    assert greedy["token_ids"] == [candidates[0]["token_id"]]


def test_unreachable_hub_fails_fast_without_offline_mode(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    monkeypatch.setattr(models, "hub_offline", lambda: False)
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailable, match="cannot be reached"):
        models.load_model("someone/not-cached-here")
    assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------- folders in the cache, written once

def _tiny(work):
    models.build_from_config(models.random_config("tiny-llama", 64, {"pad_token_id": 0, "bos_token_id": 1,
                                                                      "eos_token_id": 2})).save_pretrained(work)


def test_a_saved_folder_is_complete_or_absent(tmp_path):
    folder = models.saved_folder(tmp_path / "m", _tiny, tokenizer=False)
    assert models.complete(folder) and {"config.json", "model.safetensors", models.COMPLETE} <= \
        {p.name for p in folder.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m-")], "the work folder was left behind"


def test_a_build_that_writes_no_weights_leaves_nothing(tmp_path):
    """What a torchrun rank other than 0 wrote before the fix: save_pretrained skipped, only the tokenizer saved."""
    with pytest.raises(models.LabkitError, match="no model.safetensors"):
        models.saved_folder(tmp_path / "m", lambda work: (work / "config.json").write_text("{}"), tokenizer=False)
    assert not (tmp_path / "m").exists()
    with pytest.raises(models.LabkitError, match="tokenizer_config.json"):
        models.saved_folder(tmp_path / "m", _tiny)  # a random model's folder needs its tokenizer too


def test_an_incomplete_folder_in_the_cache_is_built_again(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}")  # what the cache held after the failed first run
    assert not models.complete(folder)
    models.saved_folder(folder, _tiny, tokenizer=False)
    assert models.complete(folder) and not (folder / "tokenizer_config.json").exists()


def test_no_folder_is_built_inside_a_distributed_job(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(models.LabkitError, match="before launching"):
        models.saved_folder(tmp_path / "m", _tiny, tokenizer=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert models.complete(models.saved_folder(tmp_path / "m", _tiny, tokenizer=False))


# --------------------------------------------------------------------------- a model chosen for a notebook (issue 33)

def test_the_task_of_a_model_is_read_without_its_weights(tmp_path):
    assert [models.task_of(n) for n in ("smollm2-135m", "tiny-opt", "minilm-l6", "llama-8b-shape")] == \
        ["causal-lm", "causal-lm", "encoder", "causal-lm"]
    (tmp_path / "config.json").write_text('{"model_type": "roberta", "architectures": ["RobertaModel"]}')
    assert models.task_of(str(tmp_path)) == "encoder"
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    assert models.task_of(str(tmp_path)) == "causal-lm"
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')  # no architecture named: not told, not refused
    assert models.task_of(str(tmp_path)) is None
    assert models.task_of(str(tmp_path / "missing")) is None and models.task_of("no-such/model-here") is None


@pytest.mark.parametrize(("name", "task", "named"), [
    ("minilm-l6", "causal-lm", "is an encoder, and notebook 00 needs a causal language model: use one of smollm2-135m"),
    ("tiny-llama", "encoder", "is a causal language model, and notebook 00 needs an encoder: use one of minilm-l6"),
    ("tiny-opt", "paged-causal-lm", "continuous batching cannot run"),
    ("random-llama-1b", "causal-lm", "too many for quick sizes on a CPU"),
])
def test_a_model_that_cannot_serve_a_notebook_is_refused_in_one_sentence(name, task, named):
    with pytest.raises(BadParameter) as caught:
        models.check_choice("00", "model_id", name, task, device="cpu", quick=True)
    assert named in str(caught.value) and "\n" not in str(caught.value)
    assert f"model_id={name!r}" in str(caught.value)


def test_a_fitting_model_passes_and_the_1b_model_runs_without_quick_sizes():
    for name, task in [("tiny-llama", "paged-causal-lm"), ("tiny-opt", "causal-lm"), ("tiny-bert", "encoder"),
                       ("auto", "causal-lm"), ("", "causal-lm"), ("no-such-model", "causal-lm")]:
        models.check_choice("00", "model_id", name, task, device="cpu", quick=True)  # no error
    models.check_choice("00", "model_id", "random-llama-1b", "causal-lm", device="cpu", quick=False)
    models.check_choice("00", "model_id", "random-llama-1b", "causal-lm", device="cuda:0", quick=True)
