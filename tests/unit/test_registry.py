"""labkit.registry: one entry per notebook, and everything that lists notebooks reads it."""

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
    assert hasattr(module, "Parameters") or hasattr(module, "notebook_plan")
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
