"""Notebook 00's topic: what this machine can do (the probes and ceilings themselves live in :mod:`labkit.probes`
and :mod:`labkit.roofline`; the notebook's cells ask torch directly)."""

from __future__ import annotations

from dataclasses import dataclass

from labkit import models
from labkit.errors import check_sizes


@dataclass
class Parameters(models.ModelParameters):
    """Notebook 00's parameters (its parameters cell, with the same defaults); sizes left at 0 are sized by
    :func:`labkit.roofline.default_sizes` for the device."""

    matmul_size: int = 0
    copy_megabytes: int = 0

    def resolve(self, *, device: str, quick: bool) -> str:
        check_sizes(0, matmul_size=self.matmul_size, copy_megabytes=self.copy_megabytes)
        self.resolve_model(device)
        return ""
