"""The exercise framework: an exercise, its check, its hints, its solution, and the verdict a learner sees.

A **predict** exercise asks for a number or a name before the cell that measures it; a **code** exercise asks for a
few lines (a function, a config). ``check`` tests behaviour, never the text of an answer: a function is called on
fresh random inputs and compared with the solution's output; a number is compared with the exact count or with this
machine's measurement. A wrong answer gets the message of the mistake it looks like: each exercise keeps a table of
typical mistakes (a wrong number, or a wrong function), which its tests and WORKSHOP.md read too. The solution is a
real function in the notebook's exercise module; ``solution()`` shows its source (``inspect.getsource``), so what a
learner reads is what the checks run.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

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
