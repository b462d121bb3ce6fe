"""labkit.serving: the parameters, the workload, padding and pages, speculation counts, KV bytes, the bounded load,
the server's process handling (with a stand-in server, so that these tests need neither transformers serve nor a
model)."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from labkit import exercises, serving
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


# --------------------------------------------------------------------------- padding and pages


def test_padding_waste_counts_padded_prompts_and_the_steps_after_short_outputs():
    prompts, news = [12, 30, 8, 20], [40, 6, 10, 4]
    assert serving.padded_positions(prompts, news) == 4 * (30 + 40)
    assert serving.padding_waste(prompts, news) == pytest.approx(1 - 130 / 280)
    assert serving.padding_waste([5, 5], [3, 3]) == 0


def test_peak_pages_counts_the_pages_of_running_requests():
    rows = [{"prompt_tokens": 10, "new_tokens": 3, "scheduled_s": 0.0, "latency_s": 3.0,
             "times_s": [1.0, 2.0, 3.0]},
            {"prompt_tokens": 20, "new_tokens": 2, "scheduled_s": 2.5, "latency_s": 5.0, "times_s": [4.0, 5.0]}]
    # at 3.0 both run: 13 tokens -> 2 pages, 20 tokens -> 3 pages; later the second alone grows to 22 tokens, 3 pages
    assert serving.peak_pages(rows, page_size=8) == 5
    assert serving.peak_pages(rows[:1], page_size=8) == 2


# --------------------------------------------------------------------------- speculative decoding


def test_speculation_stats_from_forward_lengths():
    # prompt of 20 tokens; first forward carries 10 proposals, then two steps with 10 proposals each
    stats = serving.speculation_stats([30, 11, 11], prompt_tokens=20, new_tokens=24)
    assert stats["proposed"] == 30 and stats["accepted"] == 21 and stats["acceptance_rate"] == pytest.approx(0.7)
    assert stats["tokens_per_forward"] == 8
    plain = serving.speculation_stats([20] + [1] * 15, prompt_tokens=20, new_tokens=16)
    assert plain["proposed"] == 0 and plain["acceptance_rate"] == 0 and plain["tokens_per_forward"] == 1


def test_the_break_even_exercise_shares_a_steps_extra_cost_among_the_proposals():
    # a step that costs 1.5 greedy steps with 4 proposals breaks even at (1.5 - 1) / 4
    solve = exercises.get("06.2").solution
    assert solve(proposals=4, verify_cost=1.3, draft_cost=0.05) == pytest.approx(0.125)


def test_the_repeating_prompt_quotes_its_own_passage():
    prompt = serving.repeating_prompt(40)
    passage, copy = prompt.split("Passage: ")[1].split("\n\nCopy: ")
    assert passage.startswith(copy) and len(passage.split()) == 40


# --------------------------------------------------------------------------- KV bytes


def test_held_bytes_of_a_real_cache_match_the_formula_and_a_quantized_one_holds_less():
    from transformers import DynamicCache, LlamaConfig, QuantizedCache

    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=64, vocab_size=32)
    keys = torch.randn(1, 2, 40, 32)
    full, fp8 = DynamicCache(config=config), QuantizedCache(backend="fp8", config=config)
    for cache in (full, fp8):
        for layer in range(2):
            cache.update(keys, keys, layer)
    assert serving.held_bytes(full) == 40 * 2 * 2 * 2 * 32 * 4  # tokens x layers x K,V x heads x size x float32
    assert serving.held_bytes(fp8) < serving.held_bytes(full) / 3
    assert serving.held_bytes([keys, keys.view(-1)]) == keys.numel() * 4, "a storage is counted once"


def test_notebook_05s_calculator_fits_more_sequences_with_a_smaller_cache():
    full = serving.sequences_that_fit()
    quarter = serving.sequences_that_fit(kv_fraction=0.25)
    assert full["kv_bytes_per_token"] == 327680 and quarter["sequences"] >= 4 * full["sequences"] - 4


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


def test_the_parameters_are_sized_for_the_machine_and_the_caches_for_the_workload():
    p = serving.Parameters(server_concurrency=[4, 1, 4], server_requests=10)
    line = p.resolve(device="cpu", quick=True)
    assert p.requests == 8 and p.length_scale == 16 and p.server_concurrency == [1, 4] and "8 requests" in line
    lengths = serving.workload_lengths(p.requests, p.length_scale)
    assert p.kv_pages * p.page_size >= sum(prompt + new for prompt, new in lengths), "room for every request at once"
    longest = max(prompt + new for prompt, new in lengths)  # the server's 10 requests repeat the workload's 8
    assert p.server_capacity == p.server_pages * 256 >= 4 * longest
    assert p.server_max_batch_tokens > p.server_capacity, "a prompt that cannot fit is refused before any work"
    assert p.dtype is torch.float32 and p.draft_problem is None


def test_a_random_init_model_has_no_folder_to_serve():
    with pytest.raises(BadParameter, match="random weights"):
        serving.model_folder("tiny-llama")


# --------------------------------------------------------------------------- the bounded load


def test_load_never_has_more_than_its_clients_in_flight_and_counts_failures():
    work = serving.load_workload(WordTokenizer(), requests=10, length_scale=16)
    state = {"now": 0, "most": 0}

    async def one_request(request):
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        if request.id == "r3":
            raise RuntimeError("refused")
        return {"ttft_s": 0.001, "latency_s": 0.01, "tokens": 5}

    level = asyncio.run(serving.load(one_request, work, concurrency=3))
    assert state["most"] == 3
    assert level["answered"] == 9 and level["failed"] == 1 and level["errors"] == ["RuntimeError: refused"]
    assert level["tokens_per_s"] == pytest.approx(45 / level["seconds"])


def test_error_answer_takes_the_servers_own_message():
    class Refused(Exception):
        status_code, body = 400, {"detail": "Server is pinned to 'x'; requested 'y'."}

    assert serving.error_answer(Refused()) == {"status": 400, "message": "Server is pinned to 'x'; requested 'y'."}
    assert serving.error_answer(ValueError("boom"))["status"] is None


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
        assert all(serving.pid_running(p) for p in pids) and server.port_in_use()
        assert server.health()[0] == 200 and server.started_s is not None
    assert not any(serving.pid_running(p) for p in pids) and not server.port_in_use()


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
