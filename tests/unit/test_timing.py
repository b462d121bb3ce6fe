import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import timing
from labkit.errors import BadParameter

samples = st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=50)


@given(samples)
def test_spread_is_ordered(values):
    t = timing.Timing(device="cpu", times_ms=values)
    assert min(values) <= t.p10_ms <= t.median_ms <= t.p90_ms <= max(values)


@settings(deadline=None, max_examples=20)
@given(st.integers(min_value=0, max_value=5), st.integers(min_value=1, max_value=8))
def test_measure_calls_warmup_plus_repeats(warmup, repeats):
    calls = []
    result = timing.measure(lambda: calls.append(1), warmup=warmup, repeats=repeats, min_time_s=0)
    assert len(calls) == warmup + repeats
    assert len(result.times_ms) == repeats and all(t >= 0 for t in result.times_ms)
    assert result.peak_memory_bytes is None  # CPU: no allocator statistics


def test_measure_sees_real_time():
    result = timing.measure(lambda: time.sleep(0.01), warmup=0, repeats=3)
    assert 9 <= result.median_ms < 200


def test_measure_rejects_bad_counts():
    with pytest.raises(BadParameter):
        timing.measure(lambda: None, repeats=0)
    with pytest.raises(BadParameter):
        timing.measure(lambda: None, warmup=-1)


def test_out_of_memory_is_recognised():
    assert timing.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert timing.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"))
    assert timing.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert timing.is_out_of_memory(MemoryError())
    assert not timing.is_out_of_memory(RuntimeError("shape mismatch"))


def test_measure_repeats_until_the_minimum_time_is_filled():
    result = timing.measure(lambda: time.sleep(0.002), warmup=0, repeats=2, min_time_s=0.03)
    assert result.repeats == len(result.times_ms) >= 10  # 2 repeats would fill 4 ms, not 30
    assert sum(result.times_ms) >= 30
    capped = timing.measure(lambda: None, warmup=0, repeats=1, min_time_s=10, max_repeats=50)
    assert capped.repeats == 50


def test_attempt_turns_out_of_memory_and_kernel_failures_into_rows():
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    def kernel_failure():
        raise RuntimeError("CUDA error: an illegal memory access")

    assert timing.attempt(lambda: 42) == {"status": "ok", "value": 42}
    assert timing.attempt(out_of_memory)["status"] == "oom"
    failed = timing.attempt(kernel_failure)
    assert failed["status"] == "failed" and "illegal memory access" in failed["reason"]


def test_attempt_does_not_hide_real_errors():
    def bug():
        raise ValueError("a bug, not a memory problem")

    with pytest.raises(ValueError):
        timing.attempt(bug)


def point(work, median, spread=0.05):
    return {"work": work, "median_ms": median, "p10_ms": median * (1 - spread), "p90_ms": median * (1 + spread)}


def test_a_time_that_falls_as_the_work_grows_is_against_the_trend():
    rising = [point(1, 1.0), point(2, 2.1), point(4, 3.9)]
    assert timing.against_the_trend(rising, work="work") == []
    within_spread = [point(1, 1.0, 0.2), point(2, 0.95, 0.2)]  # flat within its own spread: launch-bound, not noise
    assert timing.against_the_trend(within_spread, work="work") == []
    falling = [point(256, 44.0), point(1024, 30.0), point(2048, 20.0)]  # 02's prefill on the H100, shape only
    assert timing.against_the_trend(falling, work="work") == [0, 1, 2]


def test_a_time_growing_faster_than_its_cost_model_allows_is_against_the_trend():
    quadratic = [point(512, 1.0), point(1024, 4.1), point(2048, 16.5)]  # N^2 work, N^2 time
    assert timing.against_the_trend(quadratic, work="work", max_exponent=2.5) == []
    loaded = [point(512, 1.0), point(1024, 4.0), point(2048, 96.0)]  # N^4.6 between the last two: a neighbour's load
    assert timing.against_the_trend(loaded, work="work", max_exponent=2.5) == [0, 1, 2]
    assert timing.against_the_trend(loaded, work="work") == []  # without a cost model, only falling time counts
    steep_within_spread = [point(1, 1.0, 0.5), point(2, 8.0, 0.5)]  # 2^3, but the spreads overlap 2^2.5's allowance
    assert timing.against_the_trend(steep_within_spread, work="work", max_exponent=2.5) == []


def test_recheck_remeasures_once_and_marks_what_stays_inconsistent():
    calls = []

    def remeasure_fixed(p):
        calls.append(p["work"])
        return point(p["work"], p["work"] * 1.0)  # measured again: now time grows with the work

    fixed = timing.recheck_trend([point(1, 5.0), point(2, 2.0)], work="work", remeasure=remeasure_fixed)
    assert calls == [1, 2] and not any(p["noisy"] for p in fixed) and all(p["remeasured"] for p in fixed)

    def remeasure_same(p):
        return {k: p[k] for k in ("median_ms", "p10_ms", "p90_ms")}

    still = timing.recheck_trend([point(1, 1.0), point(2, 5.0), point(4, 2.0)], work="work", remeasure=remeasure_same)
    assert [p["noisy"] for p in still] == [False, True, True]


def test_time_by_op_finds_the_matrix_product_and_splits_busy_time_by_op():
    weight, x = torch.randn(256, 256), torch.randn(64, 256)
    seen = timing.time_by_op(lambda: [torch.mm(x, weight).relu() for _ in range(20)])
    assert seen.table.loc[0, "name"] in {"aten::mm", "aten::clamp_min", "aten::relu"}
    assert seen.ms_of("aten::mm") > 0 and seen.table["calls"][seen.table["name"] == "aten::mm"].item() == 20
    assert abs(seen.table["share"].sum() - 1) < 1e-9
    assert 0 < seen.busy_ms <= seen.wall_ms and 0 < seen.busy_share <= 1


def test_matrix_products_count_a_linear_layer_and_not_the_ops_around_it():
    layer, x = torch.nn.Linear(256, 256), torch.randn(64, 256)  # a bias: aten::addmm on a CPU
    seen = timing.time_by_op(lambda: [torch.relu(layer(x)) @ layer.weight for _ in range(10)])
    products = seen.ms_of(*timing.MATRIX_PRODUCTS)
    assert products == seen.ms_of("aten::addmm") + seen.ms_of("aten::mm") > 0
    assert products < seen.busy_ms  # relu and the rest are not counted
    batched = timing.time_by_op(lambda: torch.randn(4, 64, 32) @ torch.randn(4, 32, 64))  # MATH attention's products
    assert batched.ms_of(*timing.MATRIX_PRODUCTS) == batched.ms_of("aten::bmm") > 0


def test_time_by_op_sees_host_time_outside_the_ops():
    seen = timing.time_by_op(lambda: (time.sleep(0.02), torch.ones(4) + 1))
    assert seen.wall_ms >= 20 and seen.busy_share < 0.5  # the sleep is wall time with no op running


def test_time_by_op_records_a_worker_threads_ops_only_when_asked():
    import threading

    weight = torch.randn(128, 128)

    def in_a_thread():
        worker = threading.Thread(target=lambda: [weight @ weight for _ in range(10)])
        worker.start()
        worker.join()

    assert "aten::mm" not in set(timing.time_by_op(in_a_thread).table["name"])
    assert "aten::mm" in set(timing.time_by_op(in_a_thread, all_threads=True).table["name"])
