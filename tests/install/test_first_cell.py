"""The first cell on Colab, Kaggle or a fresh kernel: a Python with torch and without labkit runs a notebook's
`install-if-missing` cell, which installs the workbook (tools/install_workbook.py); then the notebook opens, loads an
embedded model and generates. `make test-first-cell` builds that Python (a venv with torch alone) and runs this; it
installs from the package registries, so it is left out of `make test`.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.install
ROOT = Path(__file__).resolve().parents[2]
PYTHON = os.environ.get("LABKIT_FIRST_CELL_PYTHON", "")


def install_cell() -> str:
    cells = json.loads((ROOT / "notebooks" / "00_setup_and_probes.ipynb").read_text())["cells"]
    return next("".join(c["source"]) for c in cells if "install-if-missing" in c["metadata"].get("tags", []))


def run(code: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([PYTHON, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**env, "HF_HUB_OFFLINE": "1"})


def test_a_kernel_with_torch_alone_installs_the_workbook_and_opens_a_notebook(tmp_path):
    if not PYTHON:
        pytest.skip("no Python with torch alone: `make test-first-cell` builds one and sets LABKIT_FIRST_CELL_PYTHON")
    bare = run("import importlib.util, torch; print(importlib.util.find_spec('labkit') is None, torch.__version__)",
               tmp_path)
    assert bare.stdout.split()[0] == "True", f"this Python already has labkit or lacks torch: {bare}"
    torch_before = bare.stdout.split()[1]
    clone = tmp_path / "workbook"  # a clone of the workbook: its tracked files, not this checkout's build outputs
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, clone / name)
    opened = run(install_cell() + "\n" + "\n".join([
        "import labkit, torch",
        "lab = labkit.start('00_setup_and_probes', {'quick': True})",
        "from labkit import models",
        "model, tokenizer = models.load_model('smollm2-135m')",
        "ids = tokenizer('Hello my dog is cute and', return_tensors='pt').input_ids",
        "print('generated:', tokenizer.decode(model.generate(ids, max_new_tokens=5, do_sample=False)[0]))",
        "print('labkit from', labkit.__file__, 'torch', torch.__version__)"]), clone / "notebooks")
    assert opened.returncode == 0, opened.stdout[-3000:] + opened.stderr[-3000:]
    assert "installing the workbook once" in opened.stdout and "generated: Hello my dog is cute and" in opened.stdout
    assert f"labkit from {clone}" in opened.stdout and f"torch {torch_before}" in opened.stdout  # torch was kept
    again = run(install_cell() + "\nprint('nothing to do')", clone / "notebooks", timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == "nothing to do", again
