import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import timing
from labkit.errors import BadParameter

samples = st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=50)


@given(samples, st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy(values, q):
    assert timing.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)


@given(samples)
def test_spread_is_ordered(values):
    t = timing.Timing(device="cpu", warmup=0, repeats=len(values), times_ms=values)
    assert min(values) <= t.p10_ms <= t.median_ms <= t.p90_ms <= max(values)


@settings(deadline=None, max_examples=20)
@given(st.integers(min_value=0, max_value=5), st.integers(min_value=1, max_value=8))
def test_measure_calls_warmup_plus_repeats(warmup, repeats):
    calls = []
    result = timing.measure(lambda: calls.append(1), warmup=warmup, repeats=repeats)
    assert len(calls) == warmup + repeats
    assert len(result.times_ms) == repeats and all(t >= 0 for t in result.times_ms)
    assert result.peak_memory_bytes is None  # CPU: no allocator statistics


def test_measure_sees_real_time():
    import time

    result = timing.measure(lambda: time.sleep(0.01), warmup=0, repeats=3)
    assert 9 <= result.median_ms < 200
    assert "ms median" in str(result)


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


def test_sweep_records_out_of_memory_and_skips_larger_sizes():
    seen = []

    def make_call(n):
        if n >= 3:
            raise torch.OutOfMemoryError(f"CUDA out of memory while allocating for n={n}")
        x = torch.ones(n, n)
        return lambda: x @ x

    rows = timing.sweep(make_call, [1, 2, 3, 4], warmup=0, repeats=2, on_row=seen.append)
    assert [r["status"] for r in rows] == ["ok", "ok", "oom", "skipped"]
    assert "n=3" in rows[2]["reason"] and "ran out of memory" in rows[3]["reason"]
    assert seen == rows


def test_sweep_can_keep_going_after_out_of_memory():
    def make_call(n):
        def call():
            if n == 2:
                raise torch.OutOfMemoryError("out of memory")
        return call

    rows = timing.sweep(make_call, [1, 2, 3], warmup=0, repeats=1, stop_after_oom=False)
    assert [r["status"] for r in rows] == ["ok", "oom", "ok"]


def test_sweep_does_not_hide_real_errors():
    def make_call(n):
        raise ValueError("a bug, not a memory problem")

    with pytest.raises(ValueError):
        timing.sweep(make_call, [1])
