"""Every exercise: its solution passes its check, no answer is "not attempted", typical wrong answers get their message."""

import json

import pytest
import torch

from labkit import exercises, registry
from labkit.errors import BadParameter
from labkit.exercises import CORRECT, NOT_ATTEMPTED, WRONG

ALL = list(exercises.EXERCISES.values())


def bound(exercise_id, solutions=False, **given):
    e = exercises.get(exercise_id)
    return exercises.Bound(e, given or dict(e.example_context), solutions=solutions)


@pytest.fixture(autouse=True)
def private_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_PROGRESS", str(tmp_path / "progress.json"))
    return tmp_path / "progress.json"


@pytest.mark.parametrize("exercise", ALL, ids=[e.id for e in ALL])
def test_the_solution_passes(exercise):
    context = exercise.example_context
    verdict = exercise.verdict(exercise.solved(**context), context)
    assert verdict.status == CORRECT, verdict.message


@pytest.mark.parametrize("exercise", ALL, ids=[e.id for e in ALL])
def test_no_answer_is_not_attempted_and_not_recorded(exercise, private_progress):
    for placeholder in (None, ...):
        verdict = bound(exercise.id).check(placeholder)
        assert verdict.status == NOT_ATTEMPTED and not verdict
    assert not private_progress.exists()


CASES = [(e, answer, words) for e in ALL for answer, words in e.typical_mistakes]


@pytest.mark.parametrize("exercise, answer, words", CASES, ids=[f"{e.id}-{i}" for i, (e, _, _) in enumerate(CASES)])
def test_a_typical_mistake_gets_its_message(exercise, answer, words, capsys):
    verdict = bound(exercise.id).check(answer)
    assert verdict.status != CORRECT
    assert words in verdict.message, verdict.message
    assert words in capsys.readouterr().out  # printed for the learner too


def test_every_exercise_has_hints_a_solution_and_mistakes():
    with_exercises = {n.number for n in registry.NOTEBOOKS if n.exercises}
    assert {e.notebook for e in ALL} == with_exercises
    for e in ALL:
        assert len(e.hints) >= 2 and e.solution_code().strip() and e.kind in ("predict", "code")
        assert e.typical_mistakes, f"{e.id} has no typical mistake under test"
    for notebook in sorted(with_exercises):
        assert 3 <= len(exercises.module_of(notebook).EXERCISES) <= 5


def test_each_exercise_module_belongs_to_one_notebook():
    for module in exercises.MODULES:
        assert len({e.notebook for e in module.EXERCISES}) == 1, module.__name__


def test_hints_go_one_level_further_each_time(capsys):
    q = bound("01.2")
    first, second, third = q.hint(), q.hint(), q.hint()
    assert first != second and second == third
    assert "Hint 1 of 2" in capsys.readouterr().out


def test_a_workshop_run_fills_in_the_solution_and_records_nothing(private_progress):
    q = bound("03.3", solutions=True)
    assert q.check(None) and q.answer == 4.0
    assert not private_progress.exists()


def test_the_revealing_cell_compares_the_prediction_with_the_measurement(capsys):
    q = bound("02.1")
    q.compare(480.0, "tokens/s")
    assert "no prediction" in capsys.readouterr().out
    q.check(500.0)
    q.compare(480.0, "tokens/s")
    assert "you predicted 500 tokens/s; measured 480 tokens/s" in capsys.readouterr().out


def test_an_int8_row_passes_with_torchaos_scale_and_is_told_why_when_it_is_asymmetric_or_unrounded():
    def torchao_scale(row):  # torchao 0.18 divides by 127.5, half of int8's 255 steps
        scale = row.abs().max() / 127.5
        return torch.round(row / scale).clamp(-128, 127).to(torch.int8), scale

    def asymmetric(row):  # a zero point, which this format does not store
        scale = (row.max() - row.min()) / 255
        return torch.round((row - row.min()) / scale - 128).to(torch.int8), scale

    def as_float(row):
        return row / (row.abs().max() / 127), row.abs().max() / 127

    assert bound("04.3").check(torchao_scale)
    for function, words in ((asymmetric, "give the row back"), (as_float, "torch.int8")):
        verdict = bound("04.3").check(function)
        assert not verdict and words in verdict.message, verdict.message


def test_a_kv_cache_loop_that_passes_the_returned_cache_passes_and_one_that_returns_logits_is_told_why():
    from labkit import compat

    def returned_cache(model, input_ids, new_tokens):  # the cache each output returns, passed to the next step
        name, tokens, ids, cache = compat.forward_keywords(model)["cache"], [], input_ids, None
        with torch.inference_mode():
            for _ in range(new_tokens):
                out = model(input_ids=ids, use_cache=True, **({name: cache} if cache is not None else {}))
                ids, cache = out.logits[:, -1:].argmax(-1), compat.output_cache(out)
                tokens.append(ids)
        return torch.cat(tokens, dim=1)

    def logits(model, input_ids, new_tokens):
        return model(input_ids=input_ids).logits

    assert bound("02.4").check(returned_cache)
    verdict = bound("02.4").check(logits)
    assert not verdict and "shape" in verdict.message, verdict.message


def test_a_converted_layer_with_the_wrong_norm_order_or_activation_is_told_why():
    from labkit.fastpath import convert_layer

    def pre_norm(layer, config):
        converted = convert_layer(layer, config)
        converted.norm_first = True
        return converted

    def relu(layer, config):
        right = convert_layer(layer, config)
        converted = torch.nn.TransformerEncoderLayer(config.hidden_size, config.num_attention_heads,
                                                     dim_feedforward=config.intermediate_size, dropout=0.0,
                                                     activation="relu", layer_norm_eps=config.layer_norm_eps,
                                                     batch_first=True)
        converted.load_state_dict(right.state_dict())
        return converted

    def swapped_norms(layer, config):
        converted = convert_layer(layer, config)
        converted.norm1, converted.norm2 = converted.norm2, converted.norm1
        return converted

    def default_eps(layer, config):  # PyTorch's 1e-5, not BERT's 1e-12: the outputs differ by about 1e-5
        converted = convert_layer(layer, config)
        converted.norm1.eps = converted.norm2.eps = 1e-5
        return converted

    assert "norm_first=False" in bound("03.2").check(pre_norm).message
    assert "GELU" in bound("03.2").check(relu).message
    assert "LayerNorm" in bound("03.2").check(swapped_norms).message
    assert "layer_norm_eps" in bound("03.2").check(default_eps).message
    assert bound("03.2").check(convert_layer)


def test_attention_with_the_softmax_over_the_wrong_axis_is_told_why():
    def wrong_axis(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-2) @ v

    assert "wrong axis" in bound("01.1").check(wrong_axis).message


def test_a_function_that_raises_is_an_answer_to_explain_not_a_crash():
    def broken(q, k, v):
        raise ValueError("oops")

    def unwritten(q, k, v):
        raise NotImplementedError

    assert "raised ValueError: oops" in bound("01.1").check(broken).message
    assert bound("01.1").check(unwritten).status == NOT_ATTEMPTED


def test_progress_records_correct_answers_only_and_labkit_progress_lists_them(private_progress, capsys):
    from labkit import cli

    bound("03.3", padding_fraction=0.75).check(0.25)
    assert not private_progress.exists()
    bound("03.3", padding_fraction=0.75).check(4.0)
    done = json.loads(private_progress.read_text())["done"]
    assert list(done) == ["03.3"]
    assert cli.main(["progress"]) == 0
    out = capsys.readouterr().out
    assert "03.3" in out and f"1 of {len(ALL)} exercises done" in out


def test_an_unreadable_progress_file_counts_as_none_done(private_progress):
    private_progress.write_text("not json")
    assert all(row["done"] == "" for row in exercises.progress())


def test_an_unknown_exercise_is_one_sentence():
    with pytest.raises(BadParameter, match="no exercise '09.9'"):
        exercises.get("09.9")


def test_the_workshop_guide_lists_the_current_mistakes_and_messages():
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "notebooks" / "WORKSHOP.md").read_text()
    assert exercises.mistakes_markdown() in guide


@pytest.mark.parametrize("exercise", ALL, ids=[e.id for e in ALL])
def test_the_solution_shown_runs_in_the_exercise_cell_and_passes(exercise):
    """What ex.solution() prints, pasted into the exercise's cell (where `ex` is the bound exercise), is right."""
    ex = bound(exercise.id)
    cell = {"ex": ex}
    exec(exercise.solution_code(), cell)
    assert ex.check(cell["answer"]), exercise.solution_code()


def test_a_solution_is_the_function_the_checks_use_not_a_copy():
    import inspect

    for e in ALL:
        assert inspect.getsource(e.solution) in e.solution_code()


def test_an_answer_the_checker_did_not_foresee_is_explained_not_raised():
    verdict = bound("06.4").check(lambda pool, table, length: torch.empty(length, 2, 4, device="meta"))
    assert verdict.status == WRONG and "could not be checked" in verdict.message


def test_a_whole_float_counts_as_a_whole_number_and_near_ties_count_as_right():
    assert bound("05.1").check(2.0)
    assert bound("04.4", kl={"nf4": 0.248, "nf4-double": 0.247}).check("nf4")


def test_tiled_attention_is_judged_on_its_memory_too():
    """01.3's solution passes with a peak below one score matrix, and the MATH backend's is above it."""
    import re

    from labkit.exercises.flash_attention import tiled_attention

    verdict = bound("01.3").check(tiled_attention)
    yours, math_backend, one_matrix = (float(x) for x in re.findall(r"([\d.]+) MiB", verdict.message))
    assert verdict and yours < one_matrix <= math_backend, verdict.message
