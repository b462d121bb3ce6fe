"""labkit.serving_internals: the parameters, the step log and the output reader (with stand-ins for transformers'
manager, so that these tests start no continuous batching), and exercises 07.1-07.3 against the installed engine's
own page hashing and against 06's gather."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.continuous_batching.cache_allocators.cache_allocator import compute_block_hash

from labkit import exercises, serving_internals
from labkit.errors import BadParameter

# --------------------------------------------------------------------------- the parameters


def test_left_at_zero_the_sizes_are_the_quick_ones_and_a_budget_holds_every_conversation():
    p = serving_internals.Parameters()
    line = p.resolve(device="cpu", quick=True)
    quick = serving_internals.SIZES["quick"]
    assert p.shared_prompt_tokens == quick["shared_prompt_tokens"] and p.token_budgets == quick["token_budgets"]
    assert min(p.token_budgets) > p.requests and "tiny-llama" in line


@pytest.mark.parametrize("given, says", [
    ({"requests": -1}, "requests=-1"),
    ({"token_budgets": 512}, "token_budgets=512"),
    ({"token_budgets": [0, 64]}, "token_budgets[0]=0"),
    ({"page_size": 2}, "page_size=2"),
    ({"requests": 8, "token_budgets": [8, 64]}, "more than requests=8"),
])
def test_a_wrong_parameter_stops_with_one_sentence(given, says):
    with pytest.raises(BadParameter, match=says.replace("[", r"\[").replace("]", r"\]")):
        serving_internals.Parameters(**given).resolve(device="cpu", quick=True)


# --------------------------------------------------------------------------- the step log and the reader

class Allocator:
    bytes_per_block = 100


def stand_in_manager(free_bytes):
    cache = SimpleNamespace(cache_allocators={"full_attention": Allocator()}, num_blocks=10,
                            compute_free_capacity=lambda relative: free_bytes[0])
    return SimpleNamespace(batch_processor=SimpleNamespace(cache=cache))


class Model(torch.nn.Module):
    def forward(self, input_ids):
        return input_ids


def test_the_step_log_notes_query_tokens_and_blocks_held_until_removed():
    model, free = Model(), [700.0]
    log = serving_internals.StepLog(model, stand_in_manager(free))
    model(input_ids=torch.zeros(1, 12))
    free[0] = 250.0  # 2.5 blocks free: 2 whole ones, so 8 held
    model(input_ids=torch.zeros(1, 3))
    steps = log.remove()
    model(input_ids=torch.zeros(1, 5))  # removed: not noted
    assert steps.to_dict("records") == [{"query tokens": 12, "blocks held": 3}, {"query tokens": 3, "blocks held": 8}]


def output(request_id, tokens, finished, error=None):
    return SimpleNamespace(request_id=request_id, generated_tokens=tokens, error=error, is_finished=lambda: finished)


def test_collect_keeps_the_last_output_of_each_request_and_stops_when_they_are_done():
    stream = [output("a", [1], False), output("other", [1], True), output("b", [1], False),
              output("a", [1, 2], True), output("b", [1, 2], True), output("never read", [], False)]
    done = serving_internals.collect(iter(stream), ["a", "b"])
    assert {r: o.generated_tokens for r, o in done.items()} == {"a": [1, 2], "b": [1, 2]}
    started = serving_internals.collect(iter(stream), ["a", "b"], started_only=True)
    assert set(started) == {"a", "b"} and started["b"].generated_tokens == [1]


def test_collect_says_when_the_engine_stopped_or_a_request_failed():
    with pytest.raises(RuntimeError, match="stopped before"):
        serving_internals.collect(iter([output("a", [1], False)]), ["a"])
    with pytest.raises(AssertionError, match="request a failed: out of pages"):
        serving_internals.collect(iter([output("a", [], True, error="out of pages")]), ["a"])


# --------------------------------------------------------------------------- the exercises

def shared_pages_found(shared, own, page, requests):
    """What transformers 5.25's cache finds for each request of the burst: the earlier request's full pages are
    hashed in a chain (mark_complete_blocks), each request's prompt is looked up page by page, never its last token
    (match_prefix_blocks); the prompt tokens left to compute, summed over the burst."""
    system, hashes, parent = list(range(1000, 1000 + shared)), set(), None
    for b in range(shared // page):
        parent = compute_block_hash(parent, system[b * page:(b + 1) * page])
        hashes.add(parent)
    computed = 0
    for r in range(requests):
        prompt, parent, matched = system + [r] * own, None, 0
        for b in range((len(prompt) - 1) // page):
            parent = compute_block_hash(parent, prompt[b * page:(b + 1) * page])
            if parent not in hashes:
                break
            matched += 1
        computed += len(prompt) - matched * page
    return computed


@pytest.mark.parametrize("shared, own, page, requests", [(250, 8, 16, 6), (256, 8, 16, 3), (500, 1, 64, 2),
                                                         (15, 8, 16, 4)])
def test_07_1_counts_what_the_engine_s_page_hashing_leaves_to_compute(shared, own, page, requests):
    solve = exercises.get("07.1").solution
    assert solve(shared, own, page, requests) == shared_pages_found(shared, own, page, requests)


def test_07_2_the_shared_pages_are_held_once():
    solve = exercises.get("07.2").solution
    # 250 shared tokens: 15 full pages of 16; each request caches 250 + 8 + 4 - 1 = 261 tokens, 17 pages, 2 its own
    assert solve(250, 8, 4, 16, 6) == 15 + 6 * 2
    without = 6 * math.ceil((250 + 8 + 4 - 1) / 16)
    assert solve(250, 8, 4, 16, 6) < without == 102


def test_07_3_writing_then_gathering_gives_the_rows_back_and_leaves_other_pages_alone():
    write, gather = exercises.get("07.3").solution, exercises.get("06.4").solution
    generator = torch.Generator().manual_seed(3)
    pool = torch.randn(9, 4, 2, 3, generator=generator)
    before, table, rows = pool.clone(), [7, 2, 5], torch.randn(10, 2, 3, generator=generator)
    write(pool, table, rows)
    assert torch.equal(gather(pool, table, len(rows)), rows)
    untouched = [p for p in range(len(pool)) if p not in table]
    assert torch.equal(pool[untouched], before[untouched])
    assert torch.equal(pool[5, 2:], before[5, 2:]), "the last page's unused rows are left alone"


# --------------------------------------------------------------------------- section 4: early exit

@pytest.mark.parametrize("given, layers, chosen", [([], 30, [5, 15, 25]), ([], 2, [1]), ([3, 9], 12, [3, 9])])
def test_exit_layers_are_sized_by_depth_or_taken_as_given(given, layers, chosen):
    assert serving_internals.exit_layers(given, layers) == chosen


def test_an_exit_layer_that_runs_the_whole_model_stops_with_one_sentence():
    with pytest.raises(BadParameter, match=r"exit_layers=\[4, 30\]: the model has 30 layers.*\[30\]"):
        serving_internals.exit_layers([4, 30], 30)


@pytest.mark.parametrize("given, says", [({"exit_layers": 4}, "exit_layers=4"), ({"exit_layers": [0]}, "exit_layers"),
                                         ({"handoff_tokens": [64, -1]}, r"handoff_tokens\[1\]=-1")])
def test_section_4_and_5_sizes_are_checked_at_the_opening(given, says):
    with pytest.raises(BadParameter, match=says):
        serving_internals.Parameters(**given).resolve(device="cpu", quick=True)


class Layered(torch.nn.Module):
    """Runs ``config.num_hidden_layers`` of its layers, as a Llama does; the early-exit draft lowers that number."""

    def __init__(self):
        super().__init__()
        self.config, self.device = SimpleNamespace(num_hidden_layers=4), torch.device("cpu")

    def forward(self, input_ids):
        return input_ids


def test_the_forward_log_tells_the_draft_s_passes_from_the_model_s_by_their_layers():
    model = Layered()
    log = serving_internals.ForwardLog(model)
    model(input_ids=torch.zeros(1, 9))  # the model's own pass over a prompt and its proposals
    model.config.num_hidden_layers = 2  # what EarlyExitCandidateGenerator.get_candidates does while it drafts
    model(input_ids=torch.zeros(1, 1))
    model.config.num_hidden_layers = 4
    forwards = log.remove()
    model(input_ids=torch.zeros(1, 1))  # removed: not noted
    assert forwards[["tokens", "layers"]].to_dict("records") == [{"tokens": 9, "layers": 4}, {"tokens": 1, "layers": 2}]
    assert (forwards["ms"] >= 0).all()


def test_the_early_exit_draft_runs_the_first_layers_of_the_installed_llama():
    """The source behind ForwardLog's layer count: transformers' draft lowers num_hidden_layers on the base model."""
    import inspect

    from transformers.generation.candidate_generator import EarlyExitCandidateGenerator
    from transformers.models.llama.modeling_llama import LlamaModel
    assert "base_model.config.num_hidden_layers = self.assistant_early_exit" in inspect.getsource(
        EarlyExitCandidateGenerator.get_candidates)
    assert "self.layers[: self.config.num_hidden_layers]" in inspect.getsource(LlamaModel.forward)


# --------------------------------------------------------------------------- section 5: the handoff's script

def handoff_script():
    """notebooks/scripts/kv_handoff.py as a module (its main() does not run)."""
    import importlib.util

    from labkit import launcher
    spec = importlib.util.spec_from_file_location("kv_handoff", launcher.scripts_dir() / "kv_handoff.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_llama():
    """A 2-layer Llama with grouped-query attention (4 heads, 2 key/value heads), random weights, vocabulary 1000."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_decoding_from_the_prefill_s_cache_gives_generate_s_greedy_tokens(small_llama):
    handoff = handoff_script()
    ids = handoff.prompt_ids(40, small_llama.config.vocab_size)
    assert torch.equal(ids, handoff.prompt_ids(40, small_llama.config.vocab_size)), "the same prompt in every process"
    first, cache = handoff.prefill(small_llama, ids)
    alone = small_llama.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, 40:].tolist()
    assert handoff.decode(small_llama, first, cache, 6) == alone


def test_a_cache_rebuilt_from_its_tensors_decodes_as_the_original(small_llama):
    """What rank 1 does with what it receives: a new DynamicCache, layer by layer, from the keys and values alone."""
    from transformers import DynamicCache
    handoff = handoff_script()
    ids = handoff.prompt_ids(33, small_llama.config.vocab_size)
    first, cache = handoff.prefill(small_llama, ids)
    assert tuple(cache.layers[0].keys.shape) == (1, 2, 33, 16)  # the shape receive_cache allocates
    rebuilt = DynamicCache(config=small_llama.config)
    for i, layer in enumerate(cache.layers):
        rebuilt.update(layer.keys.clone(), layer.values.clone(), i)
    assert handoff.decode(small_llama, first, rebuilt, 5) == handoff.decode(small_llama, first, cache, 5)


def test_the_handoff_loads_a_random_model_from_load_model_s_folder_and_any_other_from_its_own(monkeypatch):
    from labkit import models
    calls = []
    monkeypatch.setattr(models, "random_folder", lambda name, seed, dtype: calls.append((name, seed, dtype)) or "saved")
    monkeypatch.setattr(models, "resolve_folder", lambda name: f"folder of {name}")
    assert models.folder_for_processes("tiny-llama") == "saved" and calls == [("tiny-llama", 0, torch.float32)]
    assert models.folder_for_processes("smollm2-135m") == "folder of smollm2-135m"
