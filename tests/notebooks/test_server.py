"""Nothing notebook 06 starts outlives its kernel: a kernel killed in the middle of a load takes its server down.

The kernel starts `transformers serve` through labkit.serving.Server (as the notebook does), sends a long load (four
requests in flight at a time), and is killed with SIGKILL while requests are in flight, so that no atexit handler and
no `server.stop()` can run. Within a few seconds the watchdog, the server and the listening port must all be gone.
"""

import os
import queue
import signal
import time

import psutil
import pytest

from labkit import models, serving

pytestmark = pytest.mark.notebook

CODE = """
import asyncio
from openai import AsyncOpenAI
from labkit import models, serving

tokenizer = models.load_tokenizer("smollm2-135m")
server = serving.Server(models.folder_for_processes("smollm2-135m"), device="cpu", dtype="float32", kv_pages=8,
                        max_batch_tokens=2304).start()
print("PIDS", server.watchdog_pid, server.server_pid(), server.port, flush=True)
client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600, max_retries=0)
clients = asyncio.Semaphore(4)  # four requests in flight at a time

async def one_request(request):
    async with clients:
        await client.completions.create(model=server.model, prompt=tokenizer.decode(request.prompt_ids),
                                        max_tokens=200, temperature=0)

print("LOAD", flush=True)
await asyncio.gather(*(one_request(r) for r in serving.load_workload(tokenizer, requests=8, length_scale=16) * 8))
"""


def _outputs(client, deadline: float):
    """Stream text the kernel prints, until ``deadline``."""
    while time.monotonic() < deadline:
        try:
            message = client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind == "stream":
            yield content["text"]
        elif kind == "error":
            raise AssertionError(f"the kernel failed: {content['ename']}: {content['evalue']}")


def _described(pid: int) -> dict:
    """What a process left behind is: its state, parent, command line and threads' states, for the failure message."""
    try:
        process = psutil.Process(pid)
        return {"pid": pid, **process.as_dict(attrs=["status", "ppid", "cmdline", "num_threads"]),
                "children": [(c.pid, c.status(), c.cmdline()[:3]) for c in process.children(recursive=True)]}
    except psutil.Error as err:
        return {"pid": pid, "error": repr(err)}


def _gone(pids, port) -> bool:
    return not any(serving.pid_running(pid) for pid in pids) and not serving.port_open(port)


@pytest.mark.skipif(serving.serving_problem() is not None, reason=serving.serving_problem() or "")
@pytest.mark.skipif(models.check_model("smollm2-135m") is not None, reason="the embedded model is not installed")
def test_a_killed_kernel_leaves_no_server_behind(monkeypatch, guarded_kernels):
    from jupyter_client.manager import KernelManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("IPYTHONDIR", guarded_kernels)  # deprecations are errors; no network but loopback
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    pids, port = [], None
    try:
        client.wait_for_ready(timeout=120)
        client.execute(CODE)
        seen = ""
        for text in _outputs(client, time.monotonic() + 240):
            seen += text
            if "LOAD" in seen:
                break
        assert "PIDS" in seen and "LOAD" in seen, f"the server did not start in time; the kernel printed {seen!r}"
        watchdog, server, port = (int(x) for x in seen.split("PIDS", 1)[1].split()[:3])
        pids = [watchdog, server]
        assert all(serving.pid_running(pid) for pid in pids) and serving.port_open(port)
        time.sleep(3)  # requests in flight
        assert serving.pid_running(server), "the server ended before the kernel was killed"
        os.kill(manager.provisioner.pid, signal.SIGKILL)  # no atexit, no stop(): only the watchdog can act
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not _gone(pids, port):
            time.sleep(0.2)
        left = [_described(pid) for pid in pids if serving.pid_running(pid)]
        assert _gone(pids, port), f"still running after the kernel died: {left}, port {port} open: " \
                                  f"{serving.port_open(port)}"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
        for pid in pids:  # never leave a server behind, even when the test fails
            if serving.pid_running(pid):
                os.kill(pid, signal.SIGKILL)
