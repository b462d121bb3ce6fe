"""labkit: the helper package of the efficient transformer inference workbook.

Submodules load on first use (``labkit.probes``, ``labkit.models``, ...), so ``import labkit``
stays fast and pulls in neither torch nor transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"errors", "probes", "models", "timing", "roofline", "results", "widgets", "plots", "attention",
               "generation", "fastpath", "quant", "cli", "exercises", "parallel", "report"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"labkit.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
