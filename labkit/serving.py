"""Notebook 06's topic: from one ``generate()`` call to a server under load, the mechanisms too long for a cell.

The notebook writes its experiments in its cells: the two ways of batching, the pages a paged cache holds, the decode
curve against its roofline bounds, the speculative runs and their counts, the bytes each KV cache holds, the bounded
load of concurrent clients and what the server answers to bad input, and every conclusion. This module holds its
typed parameters (:class:`Parameters`) and what a learner should not have to write:

- the **workload** shipped with labkit (``data/serving_workload.txt``, written by :func:`make_workload`, read by
  :func:`load_workload`);
- why optimum-quanto's KV cache cannot run here (:func:`quanto_problem`);
- a **real server**: ``transformers serve --continuous-batching`` in a subprocess that labkit starts, waits for and
  always stops (:class:`Server`), and the probes that tell whether a process or a port is still alive.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from labkit import launcher, models, probes
from labkit.errors import BadParameter, LabkitError, ModelNotAvailable, check_sizes
from labkit.paths import cache_dir

WORKLOAD_FILE = Path(__file__).parent / "data" / "serving_workload.txt"
WORKLOAD_SEED = 6
WORKLOAD_SIZE = 128
QUOTED_TEXT = Path(__file__).parent / "data" / "lighthouse_keepers.txt"  # what the workload's prompts are cut from
SERVING_PACKAGES = ("fastapi", "uvicorn", "openai", "pydantic")  # what `transformers serve` imports (its extra)

# Sizes where a parameter was left at 0 or empty (the shipped workload's lengths are divided by length_scale)
SIZES = {
    "gpu": {"requests": 128, "length_scale": 1, "static_batch": 32, "page_size": 256, "repeats": 3,
            "batch_sizes": [1, 4, 16, 64, 256], "curve_prompt": 128, "curve_new_tokens": 32, "spec_new_tokens": 128,
            "quote_words": 240, "kv_context": 2048, "kv_read": 256, "server_concurrency": [1, 4, 16, 64],
            "server_requests": 64},
    "quick": {"requests": 8, "length_scale": 16, "static_batch": 4, "page_size": 16, "repeats": 1,
              "batch_sizes": [1, 2, 4, 8], "curve_prompt": 8, "curve_new_tokens": 4, "spec_new_tokens": 16,
              "quote_words": 60, "kv_context": 128, "kv_read": 32, "server_concurrency": [1, 4], "server_requests": 4},
    "cpu": {"requests": 32, "length_scale": 4, "static_batch": 8, "page_size": 16, "repeats": 1,
            "batch_sizes": [1, 2, 4, 8, 16, 32], "curve_prompt": 32, "curve_new_tokens": 16, "spec_new_tokens": 64,
            "quote_words": 120, "kv_context": 1024, "kv_read": 64, "server_concurrency": [1, 2, 4, 8],
            "server_requests": 16},
}


# --------------------------------------------------------------------------- the parameters

@dataclass
class Parameters:
    """Notebook 06's parameters cell, typed (the same names and defaults); :meth:`resolve` sizes what was left at 0
    or empty for the machine, and stops a wrong value with one sentence."""

    dtype: Any = "auto"
    model_id: str = "smollm2-135m"
    draft_model_id: str = "tiny-llama"
    requests: int = 0
    static_batch: int = 0
    batch_sizes: list = field(default_factory=list)
    kv_context: int = 0
    server_concurrency: list = field(default_factory=list)
    server_requests: int = 0
    length_scale: int = field(init=False, default=0)  # the shipped workload's lengths are divided by this
    page_size: int = field(init=False, default=0)  # tokens per page of section 1's paged cache
    repeats: int = field(init=False, default=0)  # runs of the whole workload (the median is kept)
    curve_prompt: int = field(init=False, default=0)  # section 2: prompt tokens ...
    curve_new_tokens: int = field(init=False, default=0)  # ... and new tokens of each decode point
    spec_new_tokens: int = field(init=False, default=0)  # section 3: tokens generated per speculative run
    quote_words: int = field(init=False, default=0)  # section 3: words of the passage the repeating prompt quotes
    kv_read: int = field(init=False, default=0)  # section 4: tokens read through each cache after kv_context

    def resolve(self, *, device: str, quick: bool) -> str:
        self.dtype = probes.resolve_dtype(self.dtype, device)
        probes.check_dtype(device, self.dtype)
        check_sizes(0, requests=self.requests, static_batch=self.static_batch, kv_context=self.kv_context,
                    server_requests=self.server_requests)
        for label in ("batch_sizes", "server_concurrency"):
            values = getattr(self, label)
            if isinstance(values, (str, int)):
                raise BadParameter(f"{label}={values!r}: give a list of whole numbers, e.g. [1, 4].")
            check_sizes(1, **{f"{label}[{i}]": v for i, v in enumerate(values)})
        if self.requests > WORKLOAD_SIZE:
            raise BadParameter(f"requests={self.requests}: the shipped workload holds {WORKLOAD_SIZE} requests.")
        problem = models.check_model(self.model_id)  # a misspelt name stops here with one sentence
        if problem:
            raise ModelNotAvailable(f"notebook 06 serves {self.model_id}, and {problem}")
        # what was left at 0 or empty, and the sizes the parameters cell does not show, for this machine
        sizes = SIZES["gpu" if device.startswith("cuda") and not quick else "quick" if quick else "cpu"]
        for name, size in sizes.items():
            chosen = getattr(self, name) or size
            setattr(self, name, sorted(set(chosen)) if isinstance(chosen, list) else chosen)
        text_tokens = len(models.load_tokenizer(self.model_id)(QUOTED_TEXT.read_text(encoding="utf-8"))["input_ids"])
        if self.kv_context + self.kv_read + 1 > text_tokens:
            raise BadParameter(f"kv_context={self.kv_context}: the shipped text has {text_tokens} tokens, and the "
                               f"quantized caches read {self.kv_read} more after the context.")
        _, prompts, news = zip(*workload_rows(self.requests, self.length_scale), strict=True)
        return (f"Model {self.model_id}; a workload of {len(prompts)} requests (prompts {min(prompts)}-{max(prompts)} "
                f"tokens, outputs {min(news)}-{max(news)}); static batches of {self.static_batch}; server concurrency "
                f"{self.server_concurrency}.")


# --------------------------------------------------------------------------- the shipped workload

@dataclass(frozen=True)
class Request:
    """One request of the workload: its prompt (token ids) and how many tokens it asks for."""

    id: str
    prompt_ids: tuple[int, ...]
    new_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def make_workload(seed: int = WORKLOAD_SEED, count: int = WORKLOAD_SIZE) -> list[tuple[int, int, int]]:
    """The workload's (offset, prompt tokens, new tokens) rows, in arrival order: log-normal lengths (median 160
    prompt and 96 output tokens), clipped to 32..1024 and 16..512. ``data/serving_workload.txt`` holds its output."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = int(min(1024, max(32, rng.lognormvariate(math.log(160), 0.8))))
        new = int(min(512, max(16, rng.lognormvariate(math.log(96), 0.9))))
        rows.append((rng.randrange(2048), prompt, new))
    return rows


def workload_rows(requests: int = WORKLOAD_SIZE, length_scale: int = 1) -> list[tuple[int, int, int]]:
    """(offset, prompt tokens, new tokens) of the first ``requests`` requests of the shipped workload, the lengths
    divided by ``length_scale`` (at least 4 prompt and 2 new tokens)."""
    check_sizes(1, requests=requests, length_scale=length_scale)
    rows = np.loadtxt(WORKLOAD_FILE, dtype=int, ndmin=2)[:requests].tolist()  # lines of offset, prompt, new
    return [(offset, max(4, prompt // length_scale), max(2, new // length_scale)) for offset, prompt, new in rows]


def load_workload(tokenizer, *, requests: int = WORKLOAD_SIZE, length_scale: int = 1) -> list[Request]:
    """The first ``requests`` requests of the shipped workload (:func:`workload_rows`). Each prompt is a slice of the
    quoted text in ``tokenizer``'s tokens, from the request's offset, wrapping around."""
    text_ids = tokenizer(QUOTED_TEXT.read_text(encoding="utf-8"))["input_ids"]
    return [Request(f"r{i}", tuple(text_ids[(offset + j) % len(text_ids)] for j in range(prompt)), new)
            for i, (offset, prompt, new) in enumerate(workload_rows(requests, length_scale))]


# --------------------------------------------------------------------------- a quantized KV cache

def quanto_extension_built() -> bool:
    """Whether optimum-quanto's CPU extension is compiled already (its first use on a CPU compiles it)."""
    spec = importlib.util.find_spec("optimum.quanto")
    build = Path(spec.origin).parent / "library" / "extensions" / "cpp" / "build"
    return any(build.glob("quanto_cpp*.so"))


def quanto_problem(*, quick: bool) -> str | None:
    """Why ``QuantizedCache(backend="quanto")`` is left out here, or None."""
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        return "optimum-quanto is not installed (pip install optimum-quanto)"
    if quick and not quanto_extension_built():
        return ("optimum-quanto compiles its CPU extension the first time it quantizes (minutes, with a C++ "
                "compiler), too long for quick sizes: a run without quick sizes builds it once")
    return None


# --------------------------------------------------------------------------- the server

class ServerFailed(LabkitError, RuntimeError):
    """The server process ended or never answered; the message ends with the last lines of its log."""


def serving_problem() -> str | None:
    """Why ``transformers serve`` cannot start here (its packages are missing), or None."""
    missing = [p for p in SERVING_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        return (f"transformers serve needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                "installed: pip install 'transformers[serving]'")
    return None


# The watchdog between the notebook's kernel and the server: it starts the server as its child in its own process
# group and stops it when the kernel goes away, even when the kernel is killed (it never runs its atexit handlers).
# On Linux the kernel's death signals the watchdog at once (prctl PR_SET_PDEATHSIG) and the watchdog's own death
# kills the server; everywhere, the watchdog also notices within WATCH_PERIOD_S that its parent changed. It imports
# nothing but the standard library, so it starts in milliseconds. Its signal handler only notes the signal: one that
# stopped the server itself could interrupt `child.poll()` while it held Popen's waitpid lock, and then its own
# `child.wait()` waited forever for that lock, leaving the watchdog running and the killed server unreaped.
WATCH_PERIOD_S = 0.2
WATCHDOG = r"""
import ctypes, os, signal, subprocess, sys, time
parent, log, use_pdeathsig, command = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
linux = sys.platform.startswith("linux")
def die_with_parent(sig):
    if linux:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
if use_pdeathsig:
    die_with_parent(signal.SIGTERM)
if os.getppid() != parent:
    sys.exit(0)
with open(log, "ab", buffering=0) as out:
    child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=(lambda: die_with_parent(signal.SIGKILL)) if linux else None)
stopping = []
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # noted only: the loop stops the server
    signal.signal(sig, lambda *_: stopping.append(True))
while child.poll() is None:
    if stopping or os.getppid() != parent:
        child.terminate()
        try:
            child.wait(timeout=3)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        os._exit(0)
    time.sleep(PERIOD)
sys.exit(child.returncode)
""".replace("PERIOD", str(WATCH_PERIOD_S))


def _transformers_command() -> list[str]:
    script = Path(sys.executable).parent / "transformers"
    return [str(script)] if script.exists() else [sys.executable, "-m", "transformers.cli.transformers"]


def pid_running(pid: int | None) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an ended process its parent has not reaped)."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class Server:
    """``transformers serve`` on a loopback port, in a subprocess that labkit starts, waits for and always stops.

    ``start()`` launches it behind a watchdog in a process group of its own, writes its log to ``log_path`` and
    waits until ``/health`` answers. ``stop()`` ends the whole group (also registered with ``atexit``, and done by
    ``with Server(...) as server:``). If the Python process that started it is killed, the watchdog stops the
    server within a fraction of a second: nothing outlives the notebook.
    """

    def __init__(self, model: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32",
                 port: int | None = None, kv_pages: int | None = None, max_batch_tokens: int | None = None,
                 max_model_len: int | None = None, log_path: str | os.PathLike | None = None):
        self.model, self.port, self.max_model_len = str(model), port or launcher.free_port(), max_model_len
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else cache_dir() / "serving" / f"transformers-serve-{self.port}.log"
        flags = ["--host", "127.0.0.1", "--port", str(self.port), "--device", device, "--dtype", dtype,
                 "--continuous-batching"]
        flags += ["--max-model-len", str(max_model_len)] if max_model_len else []  # transformers 5.25 and newer
        flags += ["--cb-num-blocks", str(kv_pages)] if kv_pages else []
        flags += ["--cb-max-batch-tokens", str(max_batch_tokens)] if max_batch_tokens else []
        self.command = [*_transformers_command(), "serve", self.model, *flags]
        self.command_line = "transformers " + shlex.join(["serve", self.model, *flags])  # what a learner types for it
        self.process: subprocess.Popen | None = None
        self.started_s: float | None = None

    @property
    def watchdog_pid(self) -> int | None:
        return self.process.pid if self.process else None

    def server_pid(self) -> int | None:
        """The server's own process id (the watchdog's child), once it runs."""
        try:
            children = psutil.Process(self.process.pid).children() if self.process else []
        except psutil.NoSuchProcess:
            return None
        return children[0].pid if children else None

    def start(self, *, timeout_s: float = 300.0) -> Server:
        """Launch the server and wait until it answers ``/health`` (or raise ServerFailed with its log's end)."""
        if self.process is not None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text(f"$ {self.command_line}\n")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        main_thread = threading.current_thread() is threading.main_thread()  # PDEATHSIG follows the thread
        begin = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(self.log_path), "1" if main_thread else "0",
             *self.command], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        atexit.register(self.stop)
        try:
            while time.perf_counter() - begin < timeout_s:
                if self.process.poll() is not None:
                    raise ServerFailed(f"the server exited with status {self.process.returncode} before it "
                                       "answered.\n" + self.log_tail())
                with contextlib.suppress(OSError):  # not answering yet (urllib's errors are OSErrors)
                    with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                        if answer.status == 200:
                            self.started_s = time.perf_counter() - begin
                            return self
                time.sleep(0.25)
            raise ServerFailed(f"the server did not answer {self.url}/health within {timeout_s:.0f} s.\n"
                               + self.log_tail())
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop the server and its watchdog: SIGTERM to their process group, SIGKILL after ``timeout_s``."""
        atexit.unregister(self.stop)
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
