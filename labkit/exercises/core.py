"""The exercise framework: an exercise, its check, its hints, its solution, and the verdict a learner sees.

A **predict** exercise asks for a number or a name before the cell that measures it; a **code** exercise asks for a
few lines (a function, a config). ``check`` tests behaviour, never the text of an answer: a function is called on
fresh random inputs; a number is compared with the exact count or with this machine's measurement. A wrong answer
gets the message of the mistake it looks like. The solution is a real function in the notebook's exercise module;
``solution()`` shows its source (``inspect.getsource``), so what a learner reads is what the checks run.
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
        if self.answer_is_function:
            return self.solution
        wanted = inspect.signature(self.solution).parameters
        return self.solution(**{k: v for k, v in context.items() if k in wanted})

    def solution_code(self) -> str:
        """The solution's source, the imports it needs, and the line that turns it into this exercise's answer."""
        source = _imports(self.solution) + inspect.getsource(self.solution).rstrip()
        name = self.solution.__name__
        if self.answer_is_function:
            return f"{source}\n\nanswer = {name}"
        wanted = list(inspect.signature(self.solution).parameters)
        arguments = ", ".join(f"{k}=ex.given[{k!r}]" for k in wanted)
        return f"{source}\n\nanswer = {name}({arguments})"


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


# --------------------------------------------------------------------------- helpers for checkers

def predicted(answer: Any, expected: float, unit: str, mistakes: dict[str, float], rel: float = 0.10) -> str:
    """A predicted number against the true one; ``mistakes`` maps a message to the value that mistake gives."""
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise Wrong(f"give a number, not {type(answer).__name__} {answer!r}")
    if not math.isfinite(answer):
        raise Wrong(f"{answer} is not a finite number")
    if math.isclose(answer, expected, rel_tol=rel):
        return f"{answer:.4g} {unit}, and the exact value is {expected:.4g} {unit}."
    for message, wrong in mistakes.items():
        if wrong and math.isclose(answer, wrong, rel_tol=min(rel, 0.05)):
            raise Wrong(message)
    raise Wrong(f"{answer:.4g} {unit} is {answer / expected:.3g}x the right value" if expected
                else f"{answer:.4g} is not it")


def function_answer(answer: Any, what: str) -> Callable:
    if not callable(answer):
        raise Wrong(f"give {what} (a function), not {type(answer).__name__}")
    return answer


def call(function: Callable, *args: Any) -> Any:
    try:
        return function(*args)
    except NotImplementedError:
        raise NotAttempted(
            "your function still raises NotImplementedError: write its body, then check again.") from None
    except Exception as error:  # the learner's code: any error is an answer to explain, not a crash
        raise Wrong(f"your function raised {type(error).__name__}: {error}") from None


def returns_none(*args):
    """the placeholder function, still returning None"""
    return None
