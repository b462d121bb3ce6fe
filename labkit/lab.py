"""A notebook's opening and closing, so that its cells can hold the lesson.

``lab = labkit.start("01_flash_attention", globals())`` is the opening cell's one labkit call: it resolves the
parameters the parameters cell set (``device="auto"`` becomes this machine's device, sizes left at 0 are sized for
it), stops the notebook with one sentence when one is wrong, and opens the results record. The notebook's topic
module (``labkit.registry`` names it) says how: its ``Parameters`` dataclass (defaults equal to the parameters cell's,
``resolve`` sizes and checks them; the cells read ``lab.p.seq_lengths``). The cells record tables with ``lab.table(name,
frame)`` and claims with ``lab.check``, skip with ``lab.skip``, save figures with ``lab.figure``, bind exercises with
``lab.exercise``; the last cell calls ``lab.finish(lines)`` with "What you measured", built in the notebook from its
own tables, and the results file is written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from labkit import exercises, probes, registry, widgets
from labkit.errors import BadParameter
from labkit.results import Results, reference_runs


def topic(notebook: str):
    """The topic module of ``notebook`` (``labkit.attention`` for 01, ...): labkit.registry names it."""
    return registry.get(notebook).topic_module()


class Lab(Results):
    """What a notebook's cells share: the resolved parameters, the exercises, and the results record that a Lab is
    (``lab.metric``, ``lab.check``, ``lab.skip``, ``lab.figure`` are :class:`labkit.results.Results`')."""

    def __init__(self, notebook: str, path: str | None, *, device: str, dtype: Any, quick: bool, solutions: bool,
                 p: Any):
        super().__init__(notebook, path, env=probes.environment(), timing_checks=device.startswith("cuda"))
        self.device, self.dtype, self.quick, self.solutions = device, dtype, quick, solutions
        self.p = p  # the notebook's parameters, typed and resolved for this machine (the topic module's Parameters)
        self.bound: list[exercises.Bound] = []

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.") if self.dtype is not None else ""

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def device_label(self) -> str:
        return probes.device_label(self.device)

    def table(self, name: str, table, *, title: str = "", show: bool = True) -> None:
        """Record a measurement table (a pandas DataFrame) under ``name`` in the results file, and show it."""
        super().table(name, table)
        if show:
            widgets.show(table, title=title)

    def environment_rows(self) -> list[dict[str, str]]:
        return probes.environment_rows(self.env)

    def beside_references(self, shown: dict[str, str]) -> list[dict[str, Any]]:
        """Rows of this run's metrics beside the stored reference runs of other devices (``reference/<device>/``);
        ``shown`` maps the words a row shows to the metric's name."""
        references = reference_runs(self.notebook)
        if not references:
            print("No results file of this notebook is stored under reference/ yet (reference/README.md lists the "
                  "partial runs): only this machine's numbers are shown.")
        return [{"measured": words, "this machine": self.metrics.get(name),
                 **{device: run["metrics"].get(name) for device, run in references.items()}}
                for words, name in shown.items()]

    # exercises
    def exercise(self, exercise_id: str, **given: Any) -> exercises.Bound:
        """The exercise ``exercise_id`` with this notebook's numbers; a workshop run fills in its solution."""
        bound = exercises.Bound(exercises.get(exercise_id), given, solutions=self.solutions)
        self.bound.append(bound)
        return bound

    # the end
    def finish(self, measured: list[str]) -> None:
        """Print "What you measured" (``measured``: the notebook's own lines, built from its tables) and write the
        results file (when the notebook was given a path)."""
        correct = sum(bool(b.verdicts and b.verdicts[-1]) for b in self.bound)
        if self.bound and self.solutions:
            self.check("exercise_solutions_pass", correct == len(self.bound), f"{correct} of {len(self.bound)} correct")
        elif self.bound:
            print(f"Exercises: {correct} of {len(self.bound)} correct.")
        self.summary = list(measured)
        print(f"What you measured on {self.device_label}:")
        for line in self.summary:
            print(f"- {line}")
        skipped = len(self.skipped)
        if skipped:
            print(f"({skipped} part{'s' * (skipped != 1)} skipped on this machine; "
                  "each 'Skipped:' line above says why.)")
        self.write()


GPU_SHARE, gpu_share = probes.GPU_SHARE, probes.gpu_share  # the class hub's share, read once


def apply_gpu_share(device: str) -> str:
    """Cap what this process allocates on ``device`` at its share: torch's caching allocator then raises
    OutOfMemoryError past it (torch/cuda/memory.py, set_per_process_memory_fraction). The opening line's words."""
    share = gpu_share()
    if share is None or not device.startswith("cuda"):
        return ""
    torch.cuda.set_per_process_memory_fraction(share, torch.device(device))
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return f" This kernel may allocate {share:.0%} of the GPU's memory, {share * total / 2**30:.1f} GiB ({GPU_SHARE})."


def start(notebook: str, params: dict[str, Any]) -> Lab:
    """Open ``notebook``: resolve and check the parameters in ``params`` (the notebook's ``globals()``), plan and
    load what it needs, open the results record, and say in one line where it runs."""
    widgets.short_errors()  # a bad parameter stops the notebook with one sentence, not a traceback
    module = topic(notebook)
    device = probes.resolve_device(params.get("device", "auto"))
    shared = apply_gpu_share(device)  # before anything is allocated on the GPU
    quick = params.get("quick", "auto")  # "auto": small sizes on a machine without a GPU (as `labkit run` picks)
    if quick == "auto":
        quick = not device.startswith("cuda")
    elif not isinstance(quick, bool):
        raise BadParameter(f"quick={quick!r}: use 'auto' (small sizes without a GPU), True or False.")
    from labkit import models  # transformers: imported once a notebook opens, not by `import labkit.lab`

    entry = registry.BY_STEM.get(notebook) or registry.BY_NUMBER.get(notebook)  # None: a test's stand-in
    for parameter, task in entry.model_tasks if entry else ():  # a model that cannot serve it stops here, at once
        given = params.get(parameter)
        named = {f"{parameter}[{i}]": n for i, n in enumerate(given)} if isinstance(given, list) else {parameter: given}
        for label, name in named.items():
            models.check_choice(entry.number, label, name, task, device=device, quick=quick)
    typed = module.Parameters
    p = typed(**{f.name: params[f.name] for f in dataclasses.fields(typed) if f.init and f.name in params})
    line = p.resolve(device=device, quick=quick)
    lab = Lab(notebook, params.get("results_path") or None, device=device, dtype=getattr(p, "dtype", None),
              quick=quick, solutions=bool(params.get("solutions", False)), p=p)
    dtype_words = f" in {lab.dtype_name}" if lab.dtype is not None else ""
    print(f"Working on {device} ({lab.device_label}){dtype_words}{', quick sizes' if quick else ''}."
          + (f" {line}" if line else "") + shared)
    return lab
