"""The class hub's decisions, apart from JupyterHub so that they can be tested without one.

``jupyterhub_config.py`` (beside this file) reads its settings here (:func:`settings`), refuses an unsafe start here
(:func:`refusal`), gives each learner a share of the GPUs here (:func:`gpu_share_env`) and copies the workbook into a
learner's home here (:func:`copy_workbook`).
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What a learner's kernel reads (labkit.lab.start): the share of a GPU's memory this kernel may allocate.
SHARE_VARIABLE = "LABKIT_GPU_SHARE"
# The variables of the teacher's shell that the learners' servers keep (JupyterHub passes no other).
KEPT = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")


def settings(environ: dict[str, str] | None = None) -> dict:
    """The hub's settings, from the teacher's environment (``hub/start`` documents each one)."""
    env = os.environ if environ is None else environ
    port = int(env.get("LABKIT_HUB_PORT") or 8000)
    return {
        "ip": env.get("LABKIT_HUB_IP", "127.0.0.1"),
        "port": port,
        "hub_port": port + 1,  # the hub's own API, on loopback
        "proxy_api_port": port + 2,  # the proxy's API, on loopback
        "group": env.get("LABKIT_HUB_GROUP") or "labkit-learners",
        "teachers": {n for n in (env.get("LABKIT_HUB_TEACHER") or "").replace(",", " ").split() if n},
        "state": Path(env.get("LABKIT_HUB_STATE") or "/srv/labkit-hub"),
        "venv": Path(env.get("LABKIT_HUB_VENV") or REPO / ".venv"),
        "gpu_share": (env.get("LABKIT_HUB_GPU_SHARE") or "off").strip().lower(),
        "gpus": env.get("LABKIT_HUB_GPUS", ""),
    }


# --------------------------------------------------------------------------- safety

def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name, '' meaning every interface) is reachable from this machine only."""
    if host.strip("[]") in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # '' (every interface) or a host name that other machines resolve too
        return False


def admits_anyone(authenticator) -> bool:
    """Whether an authenticator class (or JupyterHub's name for one: 'dummy', 'null') lets anyone in without a
    password of their own: JupyterHub's DummyAuthenticator takes any name and password (jupyterhub/auth.py,
    DummyAuthenticator.authenticate) and the NullAuthenticator has no login at all."""
    if isinstance(authenticator, str):
        name = authenticator.strip()
        if name.lower() in ("dummy", "null"):
            return True
        from importlib import import_module
        from importlib.metadata import entry_points

        found = [e for e in entry_points(group="jupyterhub.authenticators") if e.name == name]
        if found:
            authenticator = found[0].load()
        elif "." in name:
            module, _, attribute = name.rpartition(".")
            authenticator = getattr(import_module(module), attribute)
        else:
            return False
    from jupyterhub.auth import DummyAuthenticator, NullAuthenticator

    return isinstance(authenticator, type) and issubclass(authenticator, (DummyAuthenticator, NullAuthenticator))


def refusal(host: str, authenticator) -> str:
    """'' when the hub may start; else the one sentence that stops it: an authenticator that admits anyone, on an
    address that other machines reach."""
    if is_loopback(host) or not admits_anyone(authenticator):
        return ""
    shown = getattr(authenticator, "__name__", authenticator)
    where = f"address {host!r}" if host else "every address"
    return (f"labkit hub: refusing to start on {where}, reachable from other machines, with {shown}, which lets "
            "anyone in without a password; use PAM accounts (the default) or bind 127.0.0.1.")


# --------------------------------------------------------------------------- the class and its GPUs

def learners(group: str, teachers: set[str]) -> list[str]:
    """Everyone who may sign in: the members of ``group`` and the teachers, sorted (a learner's place in this list
    chooses their GPU)."""
    try:
        members = set(grp.getgrnam(group).gr_mem)
    except KeyError:
        members = set()
    return sorted(members | set(teachers))


def gpu_count(given: str = "") -> int:
    """The GPUs to share: ``given`` (LABKIT_HUB_GPUS) when set, else the lines of ``nvidia-smi -L``, else 0."""
    if str(given).strip():
        return int(given)
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def gpu_share_env(name: str, everyone: list[str], gpus: int, setting: str) -> dict[str, str]:
    """The environment that gives learner ``name`` their share of ``gpus`` GPUs.

    ``setting`` is LABKIT_HUB_GPU_SHARE: 'off' (nothing), 'auto', or a fraction such as '0.25'.
    - 'auto' with several GPUs: one GPU each, round-robin by the learner's place in ``everyone``
      (CUDA_VISIBLE_DEVICES); when there are more learners than GPUs, those on one GPU split its memory evenly.
    - 'auto' with one GPU: each of the n learners may allocate 1/n of its memory (LABKIT_GPU_SHARE).
    - a fraction: that share of the learner's GPU, with round-robin GPUs when there are several.
    """
    if setting in ("", "off", "none"):
        return {}
    if setting != "auto":
        try:
            fraction = float(setting)
        except ValueError:
            fraction = -1.0
        if not 0 < fraction <= 1:
            raise ValueError(f"LABKIT_HUB_GPU_SHARE={setting!r}: use 'off', 'auto' or a fraction of a GPU's memory "
                             "above 0 and at most 1, such as 0.25.")
    if gpus < 1:
        return {}
    everyone = everyone if name in everyone else [*everyone, name]
    place = everyone.index(name)
    env = {"CUDA_VISIBLE_DEVICES": str(place % gpus)} if gpus > 1 else {}
    if setting == "auto":
        per_gpu = math.ceil(len(everyone) / gpus)  # the most learners any one GPU gets, round-robin
        fraction = math.floor(100 / per_gpu) / 100 if per_gpu > 1 else 1.0
    if fraction < 1:
        env[SHARE_VARIABLE] = f"{fraction:g}"
    return env


# --------------------------------------------------------------------------- a learner's home

def copy_workbook(home: Path, uid: int, gid: int, notebooks: Path = REPO / "notebooks") -> Path:
    """Copy the workbook's notebooks into ``home``/workbook, owned by the learner; a notebook already there (the
    learner's own work) is kept. The home itself is made private (0700): another learner cannot read it."""
    home = Path(home)
    os.chmod(home, 0o700)
    folder = home / "workbook"
    folder.mkdir(exist_ok=True)
    os.chown(folder, uid, gid)
    for source in sorted(notebooks.glob("*.ipynb")) + [notebooks / "WORKSHOP.md"]:
        target = folder / source.name
        if source.is_file() and not target.exists():
            shutil.copyfile(source, target)
            os.chown(target, uid, gid)
    return folder


def seed_cache(home: Path, uid: int, gid: int, prepared: Path) -> list[str]:
    """Give a learner the models ``labkit prepare`` converted once for the class (``prepared``: a labkit cache
    folder), so that no learner converts them again. A file every account may read is hard-linked where the file
    system allows: it stays root's and read-only (chown on a link would hand the one shared file to this learner);
    any other file is copied, and the copy is the learner's.
    The folders are the learner's. Models already in the learner's cache are kept. Returns the models given."""
    source = Path(prepared) / "models"
    if not source.is_dir():
        return []
    cache = Path(home) / ".cache" / "labkit" / "models"

    def link_or_copy(origin: str, target: str) -> None:
        if os.stat(origin).st_mode & 0o004:  # readable by every account: one file for the whole class
            try:
                os.link(origin, target)
                return
            except OSError:  # another file system
                pass
        shutil.copy2(origin, target)
        os.chown(target, uid, gid)

    given = []
    for model in sorted(p for p in source.iterdir() if p.is_dir()):
        if not (cache / model.name).exists():
            cache.mkdir(parents=True, exist_ok=True)
            shutil.copytree(model, cache / model.name, copy_function=link_or_copy)
            given.append(model.name)
    for folder in (cache.parent.parent, cache.parent, cache):
        if folder.exists() and folder.stat().st_uid == 0:  # made here, by the hub
            os.chown(folder, uid, gid)
    for name in given:
        for folder, _, _ in os.walk(cache / name):
            os.chown(folder, uid, gid)
    return given
