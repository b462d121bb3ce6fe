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
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

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
        if value is not False:  # True: the flag alone; a list: the flag and each value
            values = [] if value is True else value if isinstance(value, (list, tuple)) else [value]
            script_args += ["--" + key.replace("_", "-"), *map(str, values)]
    return [*launcher, "--nproc-per-node", str(nproc), str(script), *script_args]


def torchrun_command(script: str | os.PathLike, nproc: int, args: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """The command a learner types in a terminal for the same job."""
    return "torchrun " + shlex.join(torchrun_args(script, nproc, args, **kwargs))


def threads_per_process(nproc: int) -> int:
    """CPU threads for each of ``nproc`` processes: OMP_NUM_THREADS when set, else the cores shared out."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // nproc)


def _failure(script: Path, what: str, returncode: int, output: str) -> LaunchFailed:
    """The worker's own error first, then its last lines (torchrun's summary after them says little more)."""
    lines = output.strip().splitlines()
    summary = next((i for i, line in enumerate(lines)
                    if line.startswith("=" * 20) or "torch/distributed/elastic/multiprocessing" in line), len(lines))
    errors = [match[1].strip() for line in lines[:summary] if (match := _ERROR_LINE.match(line))]
    headline = f": {errors[-1]}" if errors else ""  # without its "[rankN]:" prefix
    tail = "\n".join(lines[:summary][-6:])
    return LaunchFailed(f"{script.name} {what} failed (exit status {returncode}){headline}\n{tail}")


_ERROR_LINE = re.compile(r"^\s*(?:\[rank\d+\]:\s*)?"
                         r"([\w.]*(?:Error|Exception|BadParameter|ModelNotAvailable|LaunchFailed): .*)")


def launch(script: str | os.PathLike, nproc: int, args: dict[str, Any] | None = None, *, nodes: int = 1,
           gpus: bool = True, timeout_s: float = 600, echo: bool = True) -> dict[str, Any]:
    """Run ``script`` under torchrun with ``nproc`` processes (on each of ``nodes``) and return the JSON its rank 0
    wrote.

    The job runs in its own processes (a Jupyter kernel cannot host torch.distributed workers), started by the
    caller's Python (``python -m torch.distributed.run`` is ``torchrun``). ``gpus=False`` hides the GPUs from
    the job, so that it runs on CPU processes with gloo. ``nodes`` > 1 rehearses the multi-node launch: as many
    "machines", all this one, each a torchrun of ``nproc`` processes, meeting at a c10d rendezvous on 127.0.0.1.
    """
    script = Path(script)
    if not script.exists():
        raise BadParameter(f"{script} does not exist; the scripts live in {scripts_dir()}.")
    rendezvous = {} if nodes == 1 else {"nnodes": nodes, "rdzv_endpoint": f"127.0.0.1:{free_port()}"}
    where = f"with {nproc} process{'es' if nproc > 1 else ''}" if nodes == 1 else f"on {nodes} nodes"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(nproc * nodes)), "PYTHONUNBUFFERED": "1"}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the job's processes see no GPU: gloo on the CPU
    with tempfile.TemporaryDirectory(prefix="labkit-job-") as folder:
        out = Path(folder) / "result.json"
        for node in range(nodes if echo else 0):
            print(f"{f'node {node}' if nodes > 1 else ''}$ " + torchrun_command(script, nproc, args, **rendezvous))
        command = [sys.executable, "-m", "torch.distributed.run",
                   *torchrun_args(script, nproc, {**(args or {}), "out": str(out)}, **rendezvous)]
        start = time.perf_counter()
        jobs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                 start_new_session=True) for _ in range(nodes)]
        try:
            texts = [job.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - start)))[0] or ""
                     for job in jobs]
        except subprocess.TimeoutExpired:
            raise LaunchFailed(f"{script.name} {where} ran past {timeout_s:.0f} s and was stopped.") from None
        finally:
            for job in jobs:
                _stop(job)  # the one past its time, and the other nodes with it
        for node, (job, output) in enumerate(zip(jobs, texts, strict=True)):
            if job.returncode != 0 or not out.exists():
                raise _failure(script, where if nodes == 1 else f"on node {node} of {nodes}", job.returncode, output)
        result = json.loads(out.read_text())
    result["launch_s"] = time.perf_counter() - start
    return result


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop a launcher and every worker it started: torchrun starts each worker in a session of its own, out of
    reach of a signal to the launcher's process group, so they are found as its children."""
    if process.poll() is None:  # a launcher that ended has waited for its workers
        with contextlib.suppress(psutil.NoSuchProcess):
            for member in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
        process.wait()
