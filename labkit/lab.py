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
from dataclasses import dataclass, field
from typing import Any

from labkit import exercises, probes, registry, widgets
from labkit.errors import BadParameter
from labkit.results import Results, reference_runs


def topic(notebook: str):
    """The topic module of ``notebook`` (``labkit.attention`` for 01, ...): labkit.registry names it."""
    return registry.get(notebook).topic_module()


@dataclass
class Lab:
    """What a notebook's cells share: the resolved parameters, the results record, the exercises."""

    notebook: str
    device: str
    dtype: Any
    quick: bool
    solutions: bool
    results: Results
    p: Any = None  # the notebook's parameters, typed and resolved for this machine (the topic module's Parameters)
    bound: list[exercises.Bound] = field(default_factory=list)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.") if self.dtype is not None else ""

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def device_label(self) -> str:
        return probes.device_label(self.device)

    # the results record
    def metric(self, name: str, value: float) -> None:
        self.results.metric(name, value)

    def record(self, metrics: dict[str, float | None]) -> None:
        """Record several headline metrics at once; a None (not measured in this run) is left out."""
        self.results.record(metrics)

    def table(self, name: str, table, *, title: str = "", show: bool = True) -> None:
        """Record a measurement table (a pandas DataFrame) under ``name`` in the results file, and show it."""
        self.results.table(name, table)
        if show:
            widgets.show(table, title=title)

    def check(self, name: str, passed: Any, detail: str = "", *, timing: bool = False) -> None:
        """Record a claim the notebook makes (silent when it holds; one line in words when it does not);
        ``timing=True`` for a claim about timings, which is an observation on a CPU (labkit.results)."""
        self.results.check(name, passed, detail, timing=timing)

    def skip(self, what: str, why: str) -> None:
        self.results.skip(what, why)

    def figure(self, name: str, fig) -> None:
        self.results.figure(name, fig)

    def environment_rows(self) -> list[dict[str, str]]:
        return probes.environment_rows(self.results.env)

    def beside_references(self, shown: dict[str, str]) -> list[dict[str, Any]]:
        """Rows of this run's metrics beside the stored reference runs of other devices (``reference/<device>/``);
        ``shown`` maps the words a row shows to the metric's name."""
        references = reference_runs(self.notebook)
        if not references:
            print("No results file of this notebook is stored under reference/ yet (reference/README.md lists the "
                  "partial runs): only this machine's numbers are shown.")
        return [{"measured": words, "this machine": self.results.metrics.get(name),
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
        verdicts = [b.verdicts[-1] for b in self.bound if b.verdicts]
        if self.bound:
            counts = exercises.summary(verdicts)
            if self.solutions:
                self.check("exercise_solutions_pass", counts["correct"] == len(self.bound), str(counts))
            else:
                print(f"Exercises: {counts['correct']} of {len(self.bound)} correct.")
        lines = list(measured)
        self.results.summary = lines
        print(f"What you measured on {self.device_label}:")
        for line in lines:
            print(f"- {line}")
        skipped = len(self.results.skipped)
        if skipped:
            print(f"({skipped} part{'s' * (skipped != 1)} skipped on this machine; "
                  "each 'Skipped:' line above says why.)")
        self.results.write()


def resolve_quick(quick: Any, device: str) -> bool:
    """``quick="auto"`` means small sizes on a machine without a GPU (as ``labkit run`` picks); True or False force."""
    if quick == "auto":
        return not device.startswith("cuda")
    if not isinstance(quick, bool):
        raise BadParameter(f"quick={quick!r}: use 'auto' (small sizes without a GPU), True or False.")
    return quick


def start(notebook: str, params: dict[str, Any]) -> Lab:
    """Open ``notebook``: resolve and check the parameters in ``params`` (the notebook's ``globals()``), plan and
    load what it needs, open the results record, and say in one line where it runs."""
    widgets.short_errors()  # a bad parameter stops the notebook with one sentence, not a traceback
    module = topic(notebook)
    device = probes.resolve_device(params.get("device", "auto"))
    quick = resolve_quick(params.get("quick", "auto"), device)
    typed = module.Parameters
    p = typed(**{f.name: params[f.name] for f in dataclasses.fields(typed) if f.init and f.name in params})
    line = p.resolve(device=device, quick=quick)
    dtype = getattr(p, "dtype", None)
    results = Results(notebook, params.get("results_path") or None, env=probes.environment(),
                      timing_checks=device.startswith("cuda"))
    lab = Lab(notebook=notebook, device=device, dtype=dtype, quick=quick,
              solutions=bool(params.get("solutions", False)), results=results, p=p)
    dtype_words = f" in {lab.dtype_name}" if lab.dtype is not None else ""
    print(f"Working on {device} ({lab.device_label}){dtype_words}{', quick sizes' if quick else ''}."
          + (f" {line}" if line else ""))
    return lab
