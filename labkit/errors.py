"""The errors labkit raises on purpose: each carries one sentence a learner can act on."""

from __future__ import annotations


class LabkitError(Exception):
    """Base of labkit's own errors; the message is meant to be read, not debugged."""


class BadParameter(LabkitError, ValueError):
    """A notebook or function parameter this machine cannot honour (device, dtype, size)."""


class ModelNotAvailable(LabkitError, OSError):
    """A model name that is neither embedded, nor a local folder, nor reachable on the Hub."""


def check_sizes(minimum: int = 1, **sizes: int) -> None:
    """Raise BadParameter, naming every offender, when a size is not an integer >= ``minimum``."""
    bad = {name: value for name, value in sizes.items()
           if isinstance(value, bool) or not isinstance(value, int) or value < minimum}
    if bad:
        listed = ", ".join(f"{name}={value!r}" for name, value in bad.items())
        raise BadParameter(f"{listed}: each must be a whole number >= {minimum}.")


def first_line(err: BaseException | str) -> str:
    """An exception's (or an error text's) first line, or its type's name when it says nothing."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
