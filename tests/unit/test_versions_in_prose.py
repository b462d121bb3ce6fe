"""Every sentence that names a library version agrees with a lock, so that moving a lock shows what to re-read.

A version named in prose (the notebooks' text and strings, README, WORKSHOP.md, reference/README.md, what labkit prints
and the versions its shims serve) must be one the workbook installs: the main lock (requirements/lock.txt), the oldest
versions (requirements/oldest.txt, the GPU image's torch 2.11 and transformers 5.17) or the legacy track's
(requirements/legacy.txt); torch from the Makefile (TORCH_CPU, OLDEST_TORCH), since make chooses or keeps torch
itself. A version said to bound a change is history and passes: "since transformers 5.25", "before 5.25", "from
transformers 5.25 on", "torch 2.11 or newer". When `make lock` moves transformers from 5.25 to 5.26, every plain
"transformers 5.25" fails here: each is a sentence to re-read against the new version.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"torch": "torch", "pytorch": "torch", "transformers": "transformers", "accelerate": "accelerate",
            "bitsandbytes": "bitsandbytes", "torchao": "torchao", "optimum": "optimum", "optimum-quanto": "optimum-quanto",
            "kernels": "kernels", "huggingface_hub": "huggingface-hub", "huggingface-hub": "huggingface-hub",
            "papermill": "papermill", "jupyterlab": "jupyterlab", "python": "python"}
MENTION = re.compile(r"(?<![\w.-])(?P<package>" + "|".join(re.escape(p) for p in PACKAGES) + r")"
                     r"(?P<gap>\s+|\s+v|==)(?P<version>\d+\.\d+(?:\.\d+)?)(?![\d])", re.IGNORECASE)
# A version that bounds a change: the word just before "package version", or the words just after it.
# (A comment's "# " may stand between, where the sentence breaks across lines of a notebook's text source.) A cited
# document names the version it was written for: "transformers 4.53's documentation".
BEFORE = re.compile(r"(since|before|until|after|from|below|above|than|through|pre|[<>]=?|≥|≤)\s*(#\s*)?$",
                    re.IGNORECASE)
AFTER = re.compile(r"^('s)?\s*(#\s*)?(\+|(and|or)\s+(#\s*)?(newer|later|older|earlier|above|below)|on\b|onwards?|"
                   r"'s (documentation|docs|release notes|changelog))", re.IGNORECASE)


def sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "notebooks" / "WORKSHOP.md", ROOT / "reference" / "README.md"]
    files += sorted((ROOT / "notebooks" / "src").rglob("*.py")) + sorted((ROOT / "notebooks" / "scripts").glob("*.py"))
    files += sorted((ROOT / "labkit").rglob("*.py"))
    return files


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower()] = version.strip()
    return out


def installed_versions() -> dict[str, set[str]]:
    """Every version of each package that some install path of the workbook installs."""
    known: dict[str, set[str]] = {}
    for lock in ("lock.txt", "oldest.txt", "legacy.txt"):
        for name, version in pins(ROOT / "requirements" / lock).items():
            known.setdefault(name, set()).add(version)
    makefile = (ROOT / "Makefile").read_text()
    known["torch"] = set(re.findall(r"^(?:TORCH_CPU|OLDEST_TORCH) \?= torch==([\d.]+)", makefile, re.M))
    known["python"] = {"3.11"}  # the Python the locks are made on (tools/lock.py)
    pack = (ROOT / "reference" / "device" / "pack.sh").read_text()
    known["python"] |= set(re.findall(r"--python-version (3\.\d+)", pack))  # the lent GPU machines' image
    return known


def agrees(mentioned: str, versions: set[str]) -> bool:
    """'5.25' agrees with 5.25.0 and 5.25.3; '5.25.1' only with 5.25.1."""
    return any(v == mentioned or v.startswith(mentioned + ".") for v in versions)


def mentions(text: str):
    for match in MENTION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        bounded = BEFORE.search(text[max(0, match.start() - 12):match.start()]) or AFTER.search(text[match.end():])
        yield line, PACKAGES[match["package"].lower()], match["version"], bool(bounded), match.group(0)


def test_the_pattern_finds_versions_and_bounds():
    found = list(mentions("In transformers 5.25, masks; since transformers 5.25 too; torch 2.11 or newer; "
                          "Python 3.11; transformers 5.24's error; optimum-quanto 0.2.7; refuses transformers 4.49\n"
                          "# and newer; transformers 4.53's documentation."))
    assert [(p, v, b) for _, p, v, b, _ in found] == [
        ("transformers", "5.25", False), ("transformers", "5.25", True), ("torch", "2.11", True),
        ("python", "3.11", False), ("transformers", "5.24", False), ("optimum-quanto", "0.2.7", False),
        ("transformers", "4.49", True), ("transformers", "4.53", True)]


def test_every_version_named_in_prose_is_installed_or_bounds_a_change():
    known = installed_versions()
    assert known["transformers"] and known["torch"], "the locks and the Makefile's torch pins were not found"
    stale = []
    for path in sources():
        for line, package, version, bounded, said in mentions(path.read_text()):
            if package == "python":  # a Python is named by its minor version: 3.12.3 is a 3.12
                version = ".".join(version.split(".")[:2])
            if not bounded and not agrees(version, known.get(package, set())):
                stale.append(f"{path.relative_to(ROOT)}:{line}: {said!r} (installed: "
                             f"{', '.join(sorted(known.get(package, set()))) or 'not locked'})")
    assert not stale, ("versions named in prose that no lock installs; re-read each sentence against the installed "
                       "source, then name the locked version, or say since/before which version it holds:\n"
                       + "\n".join(stale))
