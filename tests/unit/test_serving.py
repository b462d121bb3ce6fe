"""labkit.serving: the parameters, the workload, padding (exercise 06.1), the quantized cache's reason to be left
out, the server's process handling (with a stand-in server, so that these tests need neither transformers serve nor a
model)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
from conftest import first_run_cache

from labkit import exercises, models, serving
from labkit.errors import BadParameter

# --------------------------------------------------------------------------- the workload


def test_the_shipped_workload_is_what_its_seeded_generator_writes():
    rows = serving.workload_rows()
    assert rows == serving.make_workload()
    assert len(rows) == serving.WORKLOAD_SIZE
    prompts, news = [p for _, p, _ in rows], [n for _, _, n in rows]
    assert 32 <= min(prompts) and max(prompts) <= 1024 and 16 <= min(news) and max(news) <= 512
    assert len(set(news)) > 50, "a mixed workload: many different output lengths"


class WordTokenizer:
    """Each word is a token (its position in a growing vocabulary): enough to cut prompts from the text."""

    def __call__(self, text):
        return {"input_ids": list(range(len(text.split())))}


def test_load_workload_scales_the_lengths_and_keeps_a_minimum():
    full = serving.load_workload(WordTokenizer(), requests=4)
    small = serving.load_workload(WordTokenizer(), requests=4, length_scale=16)
    rows = serving.workload_rows()[:4]
    assert [r.prompt_tokens for r in full] == [p for _, p, _ in rows]
    assert [r.new_tokens for r in small] == [max(2, n // 16) for _, _, n in rows]
    assert all(r.prompt_tokens >= 4 for r in small)
    assert [r.id for r in small] == ["r0", "r1", "r2", "r3"]


# --------------------------------------------------------------------------- padding and speculation (exercises)


def test_padding_waste_counts_padded_prompts_and_the_steps_after_short_outputs():
    solve = exercises.get("06.1").solution
    # 4 rows x (longest prompt 30 + longest output 40) positions, 130 of them real tokens
    assert solve([12, 30, 8, 20], [40, 6, 10, 4]) == pytest.approx(100 * (1 - 130 / 280))
    assert solve([5, 5], [3, 3]) == 0


def test_the_break_even_exercise_shares_a_steps_extra_cost_among_the_proposals():
    # a step that costs 1.5 greedy steps with 4 proposals breaks even at (1.5 - 1) / 4
    solve = exercises.get("06.2").solution
    assert solve(proposals=4, verify_cost=1.3, draft_cost=0.05) == pytest.approx(0.125)


# --------------------------------------------------------------------------- the parameters


@pytest.mark.parametrize("given, named", [({"server_concurrency": [4, 0]}, "server_concurrency[1]=0"),
                                          ({"batch_sizes": 4}, "batch_sizes=4"),
                                          ({"requests": 200}, "requests=200"),
                                          ({"kv_context": -1}, "kv_context=-1")])
def test_bad_parameters_get_one_sentence(given, named):
    with pytest.raises(BadParameter, match=named.replace("[", r"\[").replace("]", r"\]")):
        serving.Parameters(**given).resolve(device="cpu", quick=True)


def test_a_kv_context_longer_than_the_shipped_text_is_refused():
    with pytest.raises(BadParameter, match="kv_context=5000: the shipped text has"):
        serving.Parameters(kv_context=5000).resolve(device="cpu", quick=True)


def test_the_parameters_are_sized_for_the_machine_and_keep_what_was_given():
    p = serving.Parameters(server_concurrency=[4, 1, 4], server_requests=10)
    line = p.resolve(device="cpu", quick=True)
    assert p.requests == 8 and p.length_scale == 16 and p.server_concurrency == [1, 4] and p.server_requests == 10
    assert all(getattr(p, name) for name in serving.SIZES["quick"]), "every size is set"
    prompts = [prompt // 16 for _, prompt, _ in serving.make_workload()[:8]]  # the shipped lengths, divided
    assert f"8 requests (prompts {min(prompts)}-{max(prompts)} tokens" in line
    assert p.dtype is torch.float32


def test_quanto_is_left_out_with_its_reason(monkeypatch):
    if serving.quanto_problem(quick=False) is None:  # installed: quick sizes leave it out until its extension is built
        assert (serving.quanto_problem(quick=True) is None) == serving.quanto_extension_built()
    monkeypatch.setattr(serving.importlib.util, "find_spec", lambda name: None)
    assert serving.quanto_problem(quick=False) == "optimum-quanto is not installed (pip install optimum-quanto)"


def test_a_random_init_model_is_served_from_a_folder_saved_once(tmp_path, monkeypatch):
    # issue 33: 06 with model_id="tiny-llama" stopped at its server cell; the random model is now saved to serve
    monkeypatch.setenv("LABKIT_CACHE", str(first_run_cache(tmp_path)))  # the converted SmolLM2: its tokenizer
    folder = Path(models.folder_for_processes("tiny-llama"))
    assert models.complete(folder) and folder.parent == tmp_path / "models"
    assert models.folder_for_processes("tiny-llama") == folder, "saved once, then found"


# --------------------------------------------------------------------------- the server's processes

STAND_IN = textwrap.dedent("""
    import http.server, sys
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b'{"status":"ok"}')
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
""")


def _stand_in(tmp_path):
    server = serving.Server("stand-in", log_path=tmp_path / "server.log")
    server.command = [sys.executable, "-c", STAND_IN, str(server.port)]
    return server


def test_a_server_starts_answers_and_stops_with_its_whole_group(tmp_path):
    with _stand_in(tmp_path) as server:
        pids = [server.watchdog_pid, server.server_pid()]
        assert all(serving.pid_running(p) for p in pids) and serving.port_open(server.port)
        assert urllib.request.urlopen(f"{server.url}/health").status == 200 and server.started_s is not None
    assert not any(serving.pid_running(p) for p in pids) and not serving.port_open(server.port)


def test_a_server_that_exits_early_says_so_with_its_log(tmp_path):
    server = serving.Server("stand-in", log_path=tmp_path / "server.log")
    server.command = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    with pytest.raises(serving.ServerFailed, match="(?s)status 3.*no model here"):
        server.start(timeout_s=30)
    assert server.process is None


def test_the_watchdog_stops_the_server_when_its_parent_is_killed(tmp_path):
    """A parent (standing in for a Jupyter kernel) starts the watchdog and is then killed with SIGKILL."""
    parent_code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from labkit import serving
        watchdog = subprocess.Popen([sys.executable, "-c", serving.WATCHDOG, str(os.getpid()), {str(tmp_path / 'log')!r},
                                     "1", sys.executable, "-c", "import time; time.sleep(120)"],
                                    start_new_session=True)
        time.sleep(1.0)
        children = open(f"/proc/{{watchdog.pid}}/task/{{watchdog.pid}}/children").read().split()
        print(watchdog.pid, children[0], flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        watchdog, sleeper = (int(x) for x in parent.stdout.readline().split())
        assert serving.pid_running(watchdog) and serving.pid_running(sleeper)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (serving.pid_running(watchdog) or serving.pid_running(sleeper)):
            time.sleep(0.1)
        assert not serving.pid_running(sleeper) and not serving.pid_running(watchdog)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_watchdog_stops_the_server_when_the_signal_lands_inside_poll(tmp_path):
    """The worst moment for the kernel's death: its SIGTERM reaches the watchdog while `child.poll()` holds Popen's
    waitpid lock. A handler that stopped the server itself then waited forever for that lock (the killed server was
    left unreaped, the watchdog running); the handler only notes the signal now. The race is made certain here: the
    first poll takes the lock and sends the signal, as a preempted poll would receive it."""
    probe = subprocess.Popen(["true"])
    probe.wait()
    if not hasattr(probe, "_waitpid_lock"):
        pytest.skip("this Python's Popen has no waitpid lock to hold")
    marker = f"time.sleep(120)  # {tmp_path}"  # the server's stand-in, found by its command line
    racing = textwrap.dedent(f"""
        import os, signal, subprocess, sys
        real_poll = subprocess.Popen.poll

        def poll(self):
            if not getattr(poll, "raced", False):
                poll.raced = True
                self._waitpid_lock.acquire()
                try:
                    os.kill(os.getpid(), signal.SIGTERM)  # handled here, while the lock is held
                    sum(range(1000))
                finally:
                    self._waitpid_lock.release()
            return real_poll(self)

        subprocess.Popen.poll = poll
        sys.argv = ["-c", str(os.getppid()), {str(tmp_path / "log")!r}, "0", sys.executable, "-c",
                    {"import time; " + marker!r}]
        exec(WATCHDOG)
    """).replace("WATCHDOG)", repr(serving.WATCHDOG) + ")")  # the watchdog's own code, without importing labkit
    watchdog = subprocess.Popen([sys.executable, "-c", racing])
    try:
        assert watchdog.wait(timeout=15) == 0  # it stopped its child and exited, within its 3 s grace
    finally:
        if watchdog.poll() is None:
            watchdog.kill()
            watchdog.wait()
    left = [p for p in psutil.process_iter(["cmdline", "status"])
            if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert not left, f"the watchdog's child outlived it: {left}"
