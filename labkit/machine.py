"""Notebook 00's topic: what this machine can do, summed up (the probes and ceilings themselves live in
:mod:`labkit.probes` and :mod:`labkit.roofline`)."""

from __future__ import annotations

from typing import Any

from labkit import models, probes, results
from labkit.errors import check_sizes


def notebook_plan(*, device: str, quick: bool, dtype: Any = "auto", model_id: str = "smollm2-135m",
                  max_new_tokens: int = 20, matmul_size: int = 0, copy_megabytes: int = 0) -> dict[str, Any]:
    """Notebook 00's parameters, checked: one sentence for a bad one."""
    check_sizes(0, matmul_size=matmul_size, copy_megabytes=copy_megabytes)
    check_sizes(1, max_new_tokens=max_new_tokens)
    dtype = probes.resolve_dtype(dtype, device)
    probes.check_dtype(device, dtype)
    return {"dtype": dtype, "model_problem": models.check_model(model_id),  # a wrong name stops here
            "matmul_size": matmul_size or None, "copy_megabytes": copy_megabytes or None}


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


def what_you_measured(results: dict[str, Any]) -> list[str]:
    """Notebook 00's results in a few sentences."""
    m, lines = results["metrics"], []
    ran = [b for b in probes.BACKENDS if m.get(f"sdpa_{b.lower()}_cases_that_run")]
    if ran:
        lines.append(f"SDPA backends that ran here for at least one dtype and input: {', '.join(ran)}.")
    if "matmul_gflops_per_s" in m and "copy_gb_per_s" in m:
        lines.append(f"Ceilings: a matrix product at {m['matmul_gflops_per_s']:,.1f} GFLOP/s and a copy at "
                     f"{m['copy_gb_per_s']:,.1f} GB/s. Below {m['ridge_flop_per_byte']:,.1f} FLOP per byte moved "
                     "(the ridge point), a kernel here waits for memory, not for arithmetic.")
    if "generate_tokens_per_s" in m:
        lines.append(f"The embedded model generated {m['generate_tokens_per_s']:.1f} tokens/s after one warm-up call: "
                     "a first look, not a benchmark (notebook 02 measures decoding against the bandwidth bound).")
    if results["checks"].get("no_available_kernel_reproduced"):
        lines.append("'No available kernel' came from forcing one backend on an input it refuses; the warning "
                     "PyTorch prints just before it names the reason.")
    return lines
