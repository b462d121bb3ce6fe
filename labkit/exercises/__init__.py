"""Exercises with checkers: predict-then-measure questions and small code tasks, one module per notebook.

In a notebook: ``ex = lab.exercise("01.1", batch=..., ...)``, then ``ex.check(answer)`` says whether the answer is
right and, when it is not, which mistake it looks like; ``ex.hint()`` gives the next hint, ``ex.solution()`` shows
one (the source of a real function in the notebook's module below). A predict exercise sits just before the cell
that reveals its answer (the cell tagged ``reveals-<id>``); that cell compares the prediction with the measurement.

Progress: an answer that passes is recorded in a small JSON file on this machine (``progress_path()``), never sent
anywhere; ``labkit progress`` lists it. Solutions filled in by a workshop run (``labkit run --solutions``) are not
recorded.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from labkit import registry
from labkit.errors import BadParameter
from labkit.exercises.core import Exercise, Verdict


def module_of(notebook: str):
    """The exercise module of a notebook ("01" or its stem), imported on first use: a notebook's opening cell loads
    its own, not every topic's (each imports its topic module, and those import transformers' model code)."""
    return importlib.import_module(f"labkit.exercises.{registry.get(notebook[:2]).exercises}")


def __getattr__(name: str):
    """``MODULES`` (every notebook's exercise module) and ``EXERCISES`` (every exercise by id), built on first use."""
    if name == "MODULES":
        return tuple(module_of(n.number) for n in registry.NOTEBOOKS if n.exercises)
    if name == "EXERCISES":
        return {e.id: e for module in __getattr__("MODULES") for e in module.EXERCISES}
    raise AttributeError(f"module 'labkit.exercises' has no attribute {name!r}")


def get(exercise_id: str) -> Exercise:
    """The exercise ``exercise_id`` ("01.1"), or one sentence listing them."""
    notebook = registry.BY_NUMBER.get(exercise_id[:2])
    found = {e.id: e for e in module_of(notebook.number).EXERCISES} if notebook and notebook.exercises else {}
    if exercise_id not in found:
        raise BadParameter(f"no exercise {exercise_id!r}; there are {', '.join(__getattr__('EXERCISES'))}.")
    return found[exercise_id]


class Bound:
    """An exercise with the notebook's own numbers (``given``): what a notebook cell holds.

    ``check(answer)`` prints and keeps the verdict; in a workshop run (``solutions=True``) a missing answer is
    filled in by the solution. ``compare(measured)`` is for the cell that reveals a predict exercise's answer.
    """

    def __init__(self, exercise: Exercise, given: dict[str, Any], *, solutions: bool = False):
        self.exercise, self.given, self.solutions = exercise, given, solutions
        self.answer: Any = None
        self.verdicts: list[Verdict] = []
        self._hints_shown = 0

    def check(self, answer: Any = None) -> Verdict:
        """Check ``answer``; prints the verdict and returns it (truthy when correct). Never raises."""
        if self.solutions and answer is None:
            answer = self.exercise.solved(**self.given)
        self.answer = answer
        verdict = self.exercise.verdict(answer, self.given)
        if verdict and not self.solutions:
            done = _load()  # progress: kept in a small file on this machine
            done.setdefault(self.exercise.id, time.strftime("%Y-%m-%d %H:%M"))
            with contextlib.suppress(OSError):  # a read-only home must not break a notebook
                progress_path().parent.mkdir(parents=True, exist_ok=True)
                progress_path().write_text(json.dumps({"done": done}, indent=2))
        self.verdicts.append(verdict)
        print(verdict)
        return verdict

    def compare(self, measured: Any, unit: str = "") -> None:
        """After the measurement: the prediction beside what this machine showed (nothing when none was given)."""
        unit = f" {unit}" if unit else ""
        if self.answer is None:
            print(f"{self.exercise.id}: measured {_shown(measured)}{unit} (no prediction was given above).")
        else:
            print(f"{self.exercise.id}: you predicted {_shown(self.answer)}{unit}; measured {_shown(measured)}{unit}.")

    def hint(self) -> str:
        """The next hint (each call goes one level further, then repeats the last)."""
        hints = self.exercise.hints
        level = min(self._hints_shown, len(hints) - 1)
        self._hints_shown += 1
        print(f"Hint {level + 1} of {len(hints)}: {hints[level]}")
        return hints[level]

    def solution(self) -> str:
        """One solution, as code (the source of the function the checks use)."""
        code = self.exercise.solution_code()
        print(code)
        return code

    def __repr__(self) -> str:
        given = ", ".join(f"{k}={v!r}" for k, v in self.given.items())
        return f"Exercise {self.exercise.id} · {self.exercise.title}" + (f" (given: {given})" if given else "")


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (set, frozenset)):
        return repr(sorted(value))
    return str(value)


# --------------------------------------------------------------------------- progress, kept on this machine

def progress_path() -> Path:
    """$LABKIT_PROGRESS, else progress.json in the user's data folder ($XDG_DATA_HOME/labkit or
    ~/.local/share/labkit)."""
    if os.environ.get("LABKIT_PROGRESS"):
        return Path(os.environ["LABKIT_PROGRESS"])
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "labkit" / "progress.json"


def _done_in(data: Any) -> dict[str, str]:
    """The exercises a progress file's content records as done: {exercise id: when}."""
    return {k: v for k, v in data.get("done", {}).items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(data, dict) and isinstance(data.get("done"), dict) else {}


def _load() -> dict[str, str]:
    try:
        return _done_in(json.loads(progress_path().read_text()))
    except (OSError, ValueError):
        return {}


# Where a learner's progress file lies inside that learner's folder of a class: a folder their $LABKIT_PROGRESS
# points into, or their home folder (the default place, on a shared machine with an account per learner).
CLASS_PLACES = ("progress.json", ".local/share/labkit/progress.json")


def class_progress(folder: Path) -> tuple[list[dict[str, str]], list[str]]:
    """A class's progress: one row per learner (a subfolder of ``folder`` holding a progress file at one of
    :data:`CLASS_PLACES`) with ``learner`` and, per exercise id, when it was first done ('' if not); and one line
    per subfolder without a readable file."""
    rows, problems = [], []
    for learner in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        found = next((learner / place for place in CLASS_PLACES if (learner / place).is_file()), None)
        if found is None:
            problems.append(f"{learner.name}: no progress file yet")
            continue
        try:
            done = _done_in(json.loads(found.read_text()))
        except (OSError, ValueError) as err:
            problems.append(f"{learner.name}: {found} could not be read ({type(err).__name__}: {err})")
            continue
        rows.append({"learner": learner.name, **{e: done.get(e, "") for e in __getattr__("EXERCISES")}})
    return rows, problems


def progress() -> list[dict[str, str]]:
    """Every exercise, with when it was first answered correctly on this machine."""
    done = _load()
    return [{"exercise": e.id, "title": e.title, "kind": e.kind, "done": done.get(e.id, "")}
            for e in __getattr__("EXERCISES").values()]


def mistakes_markdown() -> str:
    """The typical mistakes of every exercise with the message its checker gives (WORKSHOP.md lists them)."""
    lines = []
    for e in __getattr__("EXERCISES").values():
        for answer, _ in e.typical_mistakes:
            with contextlib.redirect_stdout(io.StringIO()):
                verdict = e.verdict(answer, e.example_context)
            shown = (answer.__doc__ or "a function") if callable(answer) else _shown(answer) \
                if isinstance(answer, float) else repr(answer)
            message = verdict.message.removesuffix(" (.hint() gives a hint)")
            lines.append(f"- **{e.id}** {e.title}, answer {shown}: {message}")
    return "\n".join(lines)
