"""labkit.registry: one entry per notebook, and everything that lists notebooks reads it."""

import dataclasses
import importlib
from pathlib import Path

import pytest

from labkit import exercises, lab, registry
from labkit.errors import BadParameter

ROOT = Path(__file__).resolve().parents[2]


def test_every_notebook_has_one_entry_and_every_entry_a_notebook_and_its_source():
    stems = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [n.stem for n in registry.NOTEBOOKS] == stems
    for entry in registry.NOTEBOOKS:
        assert (ROOT / "notebooks" / "src" / f"{entry.stem}.py").exists()


@pytest.mark.parametrize("entry", registry.NOTEBOOKS, ids=[n.number for n in registry.NOTEBOOKS])
def test_an_entry_names_modules_that_exist_and_parameters_its_notebook_has(entry):
    source = (ROOT / "notebooks" / "src" / f"{entry.stem}.py").read_text()
    parameters = source.split('# %% tags=["parameters"]', 1)[1].split("# %%", 1)[0]
    module = entry.topic_module()
    assert dataclasses.is_dataclass(module.Parameters) and callable(module.Parameters.resolve)
    for name in [entry.model_parameter, entry.dtype_parameter, *entry.bad_size[0],
                 *(entry.bad_value[0] if entry.bad_value else ())]:
        if name:
            assert f"\n{name} = " in parameters, f"{entry.stem} has no parameter {name}"
    if entry.exercises:
        exercise_module = importlib.import_module(f"labkit.exercises.{entry.exercises}")
        assert exercise_module in exercises.MODULES
        assert {e.notebook for e in exercise_module.EXERCISES} == {entry.number}


def test_a_notebook_is_found_by_stem_or_number_and_a_wrong_name_lists_them():
    assert registry.get("02") is registry.get("02_decoders_and_generation")
    assert lab.topic("00").__name__ == "labkit.machine"
    with pytest.raises(BadParameter, match="no notebook '42'; there are 00_setup_and_probes, 01_flash_attention"):
        registry.get("42")


NOT_TYPED = {"device", "quick", "results_path", "solutions"}  # labkit.start reads these itself


def parameters_cell(stem: str) -> dict:
    import ast

    source = (ROOT / "notebooks" / "src" / f"{stem}.py").read_text()
    cell = source.split('# %% tags=["parameters"]', 1)[1].split("# %%", 1)[0]
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell).body
            if isinstance(node, ast.Assign)}


TYPED = [n for n in registry.NOTEBOOKS if hasattr(n.topic_module(), "Parameters")]


@pytest.mark.parametrize("entry", TYPED, ids=[n.number for n in TYPED])
def test_typed_parameters_are_the_parameters_cell_with_its_defaults(entry):
    import dataclasses

    cell = {k: v for k, v in parameters_cell(entry.stem).items() if k not in NOT_TYPED}
    fields = {f.name: f for f in dataclasses.fields(entry.topic_module().Parameters) if f.init}
    assert set(fields) == set(cell), "the Parameters dataclass and the parameters cell name different parameters"
    for name, f in fields.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert default == cell[name], f"{name}: {default!r} in Parameters, {cell[name]!r} in the cell"


def test_at_least_one_notebook_has_typed_parameters():
    assert TYPED, "labkit.start's typed path is exercised by a real notebook"
