"""Exercises with checkers: predict-then-measure questions and small code tasks, one module per notebook.

In a notebook: ``ex = lab.exercise("01.1", batch=..., ...)``, then ``ex.check(answer)`` says whether the answer is
right and, when it is not, which mistake it looks like; ``ex.hint()`` gives the next hint, ``ex.solution()`` shows
one. A **predict** exercise asks for a number or a name before the cell that reveals it (tagged ``reveals-<id>``),
which compares the prediction with the measurement; a **code** exercise asks for a few lines (a function).

``check`` tests behaviour, never the text of an answer: a function is called on fresh random inputs and compared with
the solution's output; a number is compared with the exact count or with this machine's measurement. A wrong answer
gets the message of the mistake it looks like: each exercise keeps a table of typical mistakes (a wrong number, or a
wrong function), which its tests and WORKSHOP.md read too. The solution is a real function in the notebook's module;
``solution()`` shows its source (``inspect.getsource``), so what a learner reads is what the checks run.

Progress: an answer that passes is recorded in a small JSON file on this machine (``progress_path()``), never sent
anywhere; ``labkit progress`` lists it. Solutions filled in by a workshop run (``labkit run --solutions``) are not
recorded.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from labkit import registry
from labkit.errors import BadParameter

CORRECT, WRONG, NOT_ATTEMPTED = "correct", "wrong", "not attempted"


class Wrong(Exception):
    """Raised by a checker: the message says which mistake the answer looks like."""


class NotAttempted(Exception):
    """Raised by a checker when the answer is still the placeholder."""


@dataclass
class Verdict:
    exercise: str
    status: str
    message: str

    def __bool__(self) -> bool:
        return self.status == CORRECT

    def __str__(self) -> str:
        mark = {CORRECT: "Correct", WRONG: "Not yet", NOT_ATTEMPTED: "Not attempted yet"}[self.status]
        return f"{self.exercise} · {mark}: {self.message}"

    def _ipython_display_(self) -> None:
        """A cell ending in ``ex.check(answer)`` shows the verdict once: ``check`` has printed it already."""


@dataclass
class Exercise:
    id: str                      # "01.1": notebook, then number
    title: str
    kind: str                    # "predict" or "code"
    checker: Callable[[Any, dict[str, Any]], str]   # raises Wrong / NotAttempted, or returns what was right
    solution: Callable[..., Any]  # predict: solution(**context) is the answer; code: the function is the answer
    hints: tuple[str, ...]
    example_context: dict[str, Any] = field(default_factory=dict)  # a context the tests (and a reader) can use
    typical_mistakes: tuple[tuple[Any, str], ...] = ()  # (answer, words its message must contain), for the tests

    @property
    def answer_is_function(self) -> bool:  # a code exercise's solution that takes no inputs builds the answer (04.3)
        return self.kind == "code" and bool(inspect.signature(self.solution).parameters)

    @property
    def notebook(self) -> str:
        return self.id.split(".")[0]

    def verdict(self, answer: Any, context: dict[str, Any]) -> Verdict:
        """The verdict on ``answer`` (never raises: an answer the checker did not foresee is explained)."""
        if answer is None or answer is Ellipsis:
            return Verdict(self.id, NOT_ATTEMPTED, "write your answer in the cell, then run it again.")
        try:
            return Verdict(self.id, CORRECT, self.checker(answer, context) or "well done.")
        except NotAttempted as why:
            return Verdict(self.id, NOT_ATTEMPTED, str(why))
        except Wrong as why:
            return Verdict(self.id, WRONG, f"{why} (.hint() gives a hint)")
        except Exception as error:  # the learner's answer broke the checker: explained, never a crash
            return Verdict(self.id, WRONG, f"this answer could not be checked ({type(error).__name__}: {error}); "
                                           "see the question for what to give (.hint() gives a hint)")

    def solved(self, **context: Any) -> Any:
        """The answer the solution gives for ``context`` (what a workshop run fills in)."""
        return self.solution if self.answer_is_function else given_to(self.solution, context)

    def solution_code(self) -> str:
        """The solution's source, the imports it needs, and the line that turns it into this exercise's answer."""
        source = _imports(self.solution) + inspect.getsource(self.solution).rstrip()
        name = self.solution.__name__
        if self.answer_is_function:
            return f"{source}\n\nanswer = {name}"
        wanted = list(inspect.signature(self.solution).parameters)
        arguments = ", ".join(f"{k}=ex.given[{k!r}]" for k in wanted)
        return f"{source}\n\nanswer = {name}({arguments})"


def given_to(function: Callable, context: dict[str, Any], *first: Any) -> Any:
    """``function(*first, ...)`` with the entries of ``context`` that it names as parameters."""
    wanted = inspect.signature(function).parameters
    return function(*first, **{k: v for k, v in context.items() if k in wanted})


def _imports(function: Callable) -> str:
    """The import lines for the global names ``function`` uses, so that its source runs pasted into a cell."""
    def names(code) -> list[str]:  # the function's global names, and those of the lambdas inside it
        nested = [n for const in code.co_consts if inspect.iscode(const) for n in names(const)]
        return [*code.co_names, *nested]

    lines = []
    for name in names(function.__code__):
        value = function.__globals__.get(name)
        if inspect.ismodule(value):
            package, _, leaf = value.__name__.rpartition(".")
            if leaf == name and package:
                lines.append(f"from {package} import {name}")
            else:
                lines.append(f"import {value.__name__}" + (f" as {name}" if value.__name__ != name else ""))
        elif value is not None and not inspect.isbuiltin(value):
            lines.append(f"from {function.__module__} import {name}")
    return "".join(f"{line}\n" for line in dict.fromkeys(lines)) + ("\n" if lines else "")


# --------------------------------------------------------------------------- predict: a number and its mistakes

def predicted(answer: Any, expected: float, unit: str, mistakes: dict[str, float], rel: float = 0.10) -> str:
    """A predicted number against the true one; ``mistakes`` maps a message to the value that mistake gives (0 where
    it does not apply). Two mistakes that give the same number are both named."""
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise Wrong(f"give a number, not {type(answer).__name__} {answer!r}")
    if not math.isfinite(answer):
        raise Wrong(f"{answer} is not a finite number")
    if math.isclose(answer, expected, rel_tol=rel):
        return f"{answer:.4g} {unit}, and the exact value is {expected:.4g} {unit}."
    matched = [message for message, wrong in mistakes.items()
               if wrong and math.isclose(answer, wrong, rel_tol=min(rel, 0.05))]
    if matched:
        raise Wrong("; or ".join(matched))
    raise Wrong(f"{answer:.4g} {unit} is {answer / expected:.3g}x the right value" if expected
                else f"{answer:.4g} is not it")


def predict(id: str, title: str, solution: Callable[..., float], unit: str, mistakes: Callable[..., dict],
            hints: tuple[str, ...], example: dict[str, Any], *, rel: float = 0.10, also: tuple = ()) -> Exercise:
    """A predict exercise whose answer is a number: right within ``rel`` of ``solution(**context)``.
    ``mistakes(expected, **context)`` is the table of typical mistakes, {message: the number it gives}; on the
    example context, its numbers (and ``also``) are the typical mistakes the tests try."""
    def checker(answer: Any, context: dict[str, Any]) -> str:
        expected = given_to(solution, context)
        return predicted(answer, expected, unit, given_to(mistakes, context, expected), rel)

    table = given_to(mistakes, example, given_to(solution, example))
    typical = tuple((wrong, message) for message, wrong in table.items() if wrong)
    return Exercise(id, title, "predict", checker, solution, hints, example, typical + also)


# --------------------------------------------------------------------------- code: a function and its mistakes

def call(function: Any, *args: Any, what: str = "a function", none: str = "") -> Any:
    """The learner's ``function`` (``what`` the question asks for) called on ``args``. Not a function, an error, or
    a placeholder that still raises NotImplementedError or returns None (``none`` says what to return instead) is an
    answer to explain, never a crash."""
    if not callable(function):
        raise Wrong(f"give {what} (a function), not {type(function).__name__}")
    try:
        out = function(*args)
    except NotImplementedError:
        raise NotAttempted(
            "your function still raises NotImplementedError: write its body, then check again.") from None
    except Exception as error:  # the learner's code: any error is an answer to explain, not a crash
        raise Wrong(f"your function raised {type(error).__name__}: {error}") from None
    if out is None:
        raise NotAttempted(f"your function returns None: {none or 'return what the question asks for.'}")
    return out


def same(got: Any, expected: Any) -> bool:
    """Whether an output equals the solution's: tensors of the same shape and values (float64 rounding allowed; inf
    and nan where the solution has them), pairs item by item, anything else by ``==``."""
    import torch

    if isinstance(expected, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(expected) and all(map(same, got, expected))
    if isinstance(expected, torch.Tensor):
        return (isinstance(got, torch.Tensor) and got.shape == expected.shape
                and torch.allclose(got.double(), expected.double(), atol=1e-6, equal_nan=True))
    return bool(got == expected)


def difference(got: Any, expected: Any) -> str:
    """How an output differs from the solution's, in words: its type, its shape, or its values."""
    import torch

    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"return {len(expected)} things, as a tuple, not {type(got).__name__}"
        i = next(i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if not same(g, e))
        return f"item {i + 1} of the {len(expected)} returned: {difference(got[i], expected[i])}"
    if not isinstance(expected, torch.Tensor):
        return f"your function returned {got!r}, not {expected!r}"
    if not isinstance(got, torch.Tensor):
        return f"return a tensor, not {type(got).__name__}"
    if got.shape != expected.shape:
        return f"the output has shape {tuple(got.shape)}; it must be {tuple(expected.shape)}"
    if torch.isfinite(expected).all() and not torch.isfinite(got).all():
        return "the output holds inf or nan"
    return f"the output differs from the right one by up to {float((got.double() - expected).abs().max()):.3g}"


def behaves_like(answer: Any, what: str, solution: Callable, cases: list[tuple[str, tuple]],
                 mistakes: tuple[tuple[Callable, str], ...] = (), *, none: str = "", otherwise: str = "") -> list:
    """Call the learner's function ``answer`` and ``solution`` on each case (a few words saying what it holds, and
    the arguments; each call gets its own copy of tensors): the answer must give what the solution gives. When it
    does not, the first of ``mistakes`` (a wrong function, the message that explains it) that gives the same output
    names the mistake; else ``otherwise`` does, when the output has the right shape. Returns the answer's
    outputs."""
    import torch

    def fresh(args: tuple) -> tuple:
        return tuple(a.clone() if isinstance(a, torch.Tensor) else list(a) if isinstance(a, list) else a for a in args)

    outputs = []
    for label, args in cases:
        got = call(answer, *fresh(args), what=what, none=none)
        expected = solution(*fresh(args))
        if not same(got, expected):
            found = next((message for wrong, message in mistakes if same(got, wrong(*fresh(args)))), None)
            shaped = getattr(got, "shape", None) == getattr(expected, "shape", False)
            raise Wrong(f"{label}, {found or (otherwise if otherwise and shaped else difference(got, expected))}")
        outputs.append(got)
    return outputs


def returns_none(*args):
    """the placeholder function, still returning None"""
    return None


# --------------------------------------------------------------------------- finding and binding an exercise

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


def _done(path: Path) -> dict[str, str]:
    """The exercises a progress file records as done, {exercise id: when} (OSError or ValueError if unreadable)."""
    data = json.loads(path.read_text())
    done = data.get("done") if isinstance(data, dict) else None
    return {k: v for k, v in done.items() if isinstance(v, str)} if isinstance(done, dict) else {}


def _load() -> dict[str, str]:
    with contextlib.suppress(OSError, ValueError):
        return _done(progress_path())
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
            done = _done(found)
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
            shown = (answer.__doc__ or "a function") if callable(answer) else \
                _shown(answer) if isinstance(answer, float) else repr(answer)
            message = verdict.message.removesuffix(" (.hint() gives a hint)")
            lines.append(f"- **{e.id}** {e.title}, answer {shown}: {message}")
    return "\n".join(lines)
