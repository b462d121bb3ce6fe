"""The launcher, in the core: torchrun jobs on one machine or on "nodes" rehearsed on this one over a c10d
rendezvous, each stopped with all its workers when it ends or runs past its time, and a failure told in one
sentence that ends with the job's last lines. Notebook 05's jobs and the tests use it; the job scripts live in
``notebooks/scripts``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from labkit.errors import BadParameter, LabkitError, check_sizes


class LaunchFailed(LabkitError, RuntimeError):
    """A torchrun job exited with an error; the message ends with the job's last lines of output."""


def scripts_dir() -> Path:
    """``notebooks/scripts`` of the workbook (labkit is installed from the repository, editable)."""
    return Path(__file__).resolve().parents[1] / "notebooks" / "scripts"


def torchrun_args(script: str | os.PathLike, nproc: int, args: dict[str, Any] | None = None, *,
                  nnodes: int = 1, rdzv_endpoint: str = "") -> list[str]:
    """The arguments after ``torchrun``: one machine (``--standalone``, a free port) or a rendezvous."""
    check_sizes(1, nproc=nproc, nnodes=nnodes)
    launcher = ["--standalone"] if nnodes == 1 and not rdzv_endpoint else \
        ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", "labkit"]
    script_args: list[str] = []
    for key, value in (args or {}).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            script_args += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            script_args += [flag, *map(str, value)]
        else:
            script_args += [flag, str(value)]
    return [*launcher, "--nproc-per-node", str(nproc), str(script), *script_args]


def torchrun_command(script: str | os.PathLike, nproc: int, args: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """The command a learner types in a terminal for the same job."""
    return "torchrun " + shlex.join(torchrun_args(script, nproc, args, **kwargs))


def threads_per_process(nproc: int) -> int:
    """CPU threads for each of ``nproc`` processes: OMP_NUM_THREADS when set, else the cores shared out."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // nproc)


def _job_env(nproc: int, gpus: bool) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(nproc)), "PYTHONUNBUFFERED": "1"}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the job's processes see no GPU: gloo on the CPU
    return env


def _failure(script: Path, what: str, returncode: int, output: str) -> LaunchFailed:
    """The worker's own error first, then its last lines (torchrun's summary after them says little more)."""
    lines = output.strip().splitlines()
    summary = next((i for i, line in enumerate(lines)
                    if line.startswith("=" * 20) or "torch/distributed/elastic/multiprocessing" in line), len(lines))
    errors = [line for line in lines[:summary] if _ERROR_LINE.match(line)]
    headline = f": {_without_rank(errors[-1])}" if errors else ""
    tail = "\n".join(lines[:summary][-6:])
    return LaunchFailed(f"{script.name} {what} failed (exit status {returncode}){headline}\n{tail}")


_ERROR_LINE = re.compile(r"^\s*(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|BadParameter|ModelNotAvailable|LaunchFailed): ")


def _without_rank(line: str) -> str:
    return re.sub(r"^\s*\[rank\d+\]:\s*", "", line).strip()


def launch(script: str | os.PathLike, nproc: int, args: dict[str, Any] | None = None, *, gpus: bool = True,
           timeout_s: float = 600, echo: bool = True) -> dict[str, Any]:
    """Run ``script`` under torchrun with ``nproc`` processes and return the JSON its rank 0 wrote.

    The job runs in its own processes (a Jupyter kernel cannot host torch.distributed workers), started by the
    caller's Python (``python -m torch.distributed.run`` is ``torchrun``). ``gpus=False`` hides the GPUs from
    the job, so that it runs on CPU processes with gloo.
    """
    script = _existing(script)
    with tempfile.TemporaryDirectory(prefix="labkit-job-") as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run",
                   *torchrun_args(script, nproc, {**(args or {}), "out": str(out)})]
        if echo:
            print("$ " + torchrun_command(script, nproc, args))
        start = time.perf_counter()
        job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=_job_env(nproc, gpus), start_new_session=True)
        output = _wait(job, timeout_s, f"{script.name} with {_processes(nproc)}")
        if job.returncode != 0 or not out.exists():
            raise _failure(script, f"with {_processes(nproc)}", job.returncode, output)
        result = json.loads(out.read_text())
    result["launch_s"] = time.perf_counter() - start
    return result


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_nodes(script: str | os.PathLike, nnodes: int, nproc: int, args: dict[str, Any] | None = None, *,
                 gpus: bool = False, timeout_s: float = 600, echo: bool = True) -> dict[str, Any]:
    """Run ``script`` as ``nnodes`` "machines" of ``nproc`` processes each, all on this one, meeting at a
    c10d rendezvous on 127.0.0.1: the multi-node launch, rehearsed. Returns the JSON the global rank 0 wrote."""
    script = _existing(script)
    endpoint = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="labkit-nodes-") as folder:
        out = Path(folder) / "result.json"
        full = {**(args or {}), "out": str(out)}
        if echo:
            for node in range(nnodes):
                print(f"node {node}$ " + torchrun_command(script, nproc, args, nnodes=nnodes, rdzv_endpoint=endpoint))
        env = _job_env(nproc * nnodes, gpus)
        launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run",
                                       *torchrun_args(script, nproc, full, nnodes=nnodes, rdzv_endpoint=endpoint)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      start_new_session=True)
                     for _ in range(nnodes)]
        start = time.perf_counter()
        texts = []
        try:
            for launcher in launchers:
                left = max(1.0, timeout_s - (time.perf_counter() - start))
                texts.append(_wait(launcher, left, f"{script.name} on {nnodes} nodes", total_s=timeout_s))
        finally:
            for launcher in launchers:
                _stop(launcher)
        for node, (launcher, output) in enumerate(zip(launchers, texts, strict=True)):
            if launcher.returncode != 0:
                raise _failure(script, f"on node {node} of {nnodes}", launcher.returncode, output)
        if not out.exists():
            raise LaunchFailed(f"{script.name} on {nnodes} nodes ended without writing its results.")
        result = json.loads(out.read_text())
    result["launch_s"] = time.perf_counter() - start
    return result


def _stop(process: subprocess.Popen) -> None:
    """Stop a launcher and every worker it started (they share its process group)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait(process: subprocess.Popen, timeout_s: float, what: str, *, total_s: float | None = None) -> str:
    """The output of ``process`` once it ends; past ``timeout_s`` it is stopped with its workers."""
    try:
        return process.communicate(timeout=timeout_s)[0] or ""
    except subprocess.TimeoutExpired:
        _stop(process)
        raise LaunchFailed(f"{what} ran past {total_s or timeout_s:.0f} s and was stopped.") from None


def _existing(script: str | os.PathLike) -> Path:
    script = Path(script)
    if not script.exists():
        raise BadParameter(f"{script} does not exist; the scripts live in {scripts_dir()}.")
    return script
