"""The legacy track: the source page's BetterTransformer code in its own kernel, and the report that puts it beside
today's path. `make legacy` builds the kernel (make test tries it first); without it these tests skip, saying so."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import cli, report

ROOT = Path(__file__).resolve().parents[2]
LEGACY = ROOT / "notebooks" / "legacy" / "bettertransformer.ipynb"


def needs_the_legacy_kernel():
    missing = cli.missing_kernels([LEGACY])
    if missing:
        pytest.skip(f"the legacy notebook cannot run here: {missing[LEGACY.stem]}")


@pytest.mark.notebook
def test_legacy_notebook_runs_and_the_report_compares_it_with_notebook_03(tmp_path, guarded_kernels):
    needs_the_legacy_kernel()
    run = tmp_path / "run"
    env = {**os.environ, "IPYTHONDIR": guarded_kernels, "HF_HUB_OFFLINE": "1"}
    # the legacy notebook converts minilm-l6 only here (its default adds tiny-bert): the encoder the report compares
    done = subprocess.run([sys.executable, "-m", "labkit.cli", "run", "--quick", "--no-progress", "--notebooks",
                           "03,legacy", "--out", str(run), "-p", 'encoder_ids=["minilm-l6"]'],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    summary = report.read_summary(run)
    statuses = {name: (e["status"], e.get("error", "")) for name, e in summary["notebooks"].items()}
    assert done.returncode == 0 and all(s == "ok" for s, _ in statuses.values()), (statuses, done.stdout[-2000:])
    legacy = summary["notebooks"]["bettertransformer"]
    for check in ("bettertransformer_tokens_identical_tiny_opt", "old_sdp_kernel_warns_tiny_opt",
                  "bettertransformer_matches_eager", "labkit_fastpath_matches_eager",
                  "sdpa_copy_runs_sdpa_attention_minilm_l6"):
        assert legacy["checks"].get(check) is True, (check, legacy["checks"], legacy["skipped"])
    assert "bettertransformer_beats_eager_with_padding" in {**legacy["checks"], **legacy.get("observations", {})} \
        or "BetterTransformer against eager with padding" in legacy["skipped"]
    # the comparison: every padding level of minilm-l6 has the legacy paths and notebook 03's numbers beside them
    rows = [r for r in report.legacy_comparison(summary) if r["model"] == "minilm_l6"]
    assert [r["padding %"] for r in rows] == [0, 25, 50, 75]
    for row in rows:
        assert all(row[c] > 0 for c in report.LEGACY_COLUMNS[3:]), row
    page = (run / "report.html").read_text()
    assert "Legacy BetterTransformer against today&#x27;s path" in page or "Legacy BetterTransformer against today's path" in page


def test_the_legacy_notebook_stops_in_the_main_kernel_with_one_sentence(tmp_path, guarded_kernels, monkeypatch):
    import papermill

    monkeypatch.setenv("IPYTHONDIR", guarded_kernels)
    with pytest.raises(papermill.PapermillExecutionError) as stopped:
        papermill.execute_notebook(str(LEGACY), str(tmp_path / LEGACY.name), kernel_name="python3",
                                   parameters={"quick": True}, cwd=str(LEGACY.parent), progress_bar=False)
    assert stopped.value.ename == "BadParameter" and stopped.value.exec_count <= 3
    assert "make legacy" in stopped.value.evalue and len(stopped.value.traceback) == 1


def test_labkit_run_names_the_missing_legacy_kernel_in_one_sentence(monkeypatch):
    from labkit.errors import BadParameter

    monkeypatch.setattr(cli, "missing_kernels", lambda notebooks: {
        "bettertransformer": "its kernel 'labkit-legacy' is not installed (`make legacy` builds it)"})
    with pytest.raises(BadParameter, match="make legacy"):
        cli._cmd_run(cli.build_parser().parse_args(["run", "--notebooks", "legacy"]))


def test_legacy_is_selected_by_name_and_never_by_default():
    folder = ROOT / "notebooks"
    assert LEGACY not in cli.find_notebooks(None, folder)
    assert cli.find_notebooks("03,legacy", folder)[-1] == LEGACY
    assert cli.kernel_of(LEGACY) == "labkit-legacy" and cli.kernel_of(folder / "03_encoder_fastpath.ipynb") == "python3"
