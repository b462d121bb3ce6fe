"""labkit: the helper package of the efficient transformer inference workbook.

Submodules load on first use (``labkit.probes``, ``labkit.models``, ...): the ``labkit`` command imports this package
first, and ``labkit --help`` should not wait for torch and transformers, which most submodules import at their top.
"""

from __future__ import annotations

import importlib

from labkit import compat

__version__ = "0.1.0"
compat.drop_import_chatter()

_SUBMODULES = {"errors", "paths", "compat", "probes", "machine", "models", "timing", "roofline", "results",
               "footprint", "launcher",
               "widgets", "plots", "attention", "generation", "fastpath", "quant", "parallel",
               "serving", "exercises", "lab", "report", "cli", "registry", "outputs"}


def start(notebook: str, params: dict):
    """Open a notebook: see :func:`labkit.lab.start`."""
    from labkit.lab import start as _start  # on first use, as the submodules below

    return _start(notebook, params)


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"labkit.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
