"""Where labkit keeps things on disk: its cache (converted models, measured ceilings) and the reference runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where labkit keeps converted models and measured ceilings ($LABKIT_CACHE, else ~/.cache/labkit)."""
    root = os.environ.get("LABKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "labkit"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomically(path: Path, text: str) -> Path:
    """Write ``text`` aside, then rename it over ``path``: a process reading beside this one never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)
    return path


def reference_dir() -> Path:
    """The repository's reference/ folder (results of runs on real GPUs, one folder per device)."""
    return Path(__file__).resolve().parent.parent / "reference"
