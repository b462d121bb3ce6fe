"""Notebook 00's topic: what this machine can do, summed up (the probes and ceilings themselves live in
:mod:`labkit.probes` and :mod:`labkit.roofline`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from labkit import models, results
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


def default_dtype(env: dict[str, Any]) -> str:
    """The compute dtype ``dtype="auto"`` gives on the device an environment report recorded: bfloat16 on a GPU of
    compute capability 8.0 or newer, float16 on an older GPU, float32 on a CPU (the rule of
    :func:`labkit.probes.resolve_dtype`)."""
    gpus = env.get("devices", {}).get("cuda") or []
    if not gpus:
        return "float32"
    major = int(str(gpus[0].get("capability", "0.0")).split(".")[0])
    return "bfloat16" if major >= 8 else "float16"


def matmul_label(dtype_name: str) -> str:
    """The words of the matmul ceiling's row beside the reference runs, with the dtype of each: the reference runs
    were made with ``dtype="auto"``, so each in its device's default dtype."""
    others = [f"{default_dtype(run['env'])} on {device}"
              for device, run in results.reference_runs("00_setup_and_probes").items()]
    return f"matmul GFLOP/s ({', '.join([f'{dtype_name} here', *others])})"
