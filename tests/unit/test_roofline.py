import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labkit import roofline
from labkit.errors import BadParameter

dims = st.integers(min_value=1, max_value=10_000)


@given(dims, dims, dims)
def test_matmul_flops(m, n, k):
    assert roofline.matmul_flops(m, n, k) == 2 * m * n * k


@given(st.integers(max_value=0))
def test_sizes_must_be_positive(bad):
    with pytest.raises(BadParameter):
        roofline.matmul_flops(bad, 1, 1)


@given(dims, st.integers(1, 64), st.integers(1, 4096), st.integers(1, 256))
def test_attention_flops_two_products_and_causal_half(batch, heads, seq, head_dim):
    full = roofline.attention_flops(batch, heads, seq, seq, head_dim)
    assert full == 4 * batch * heads * seq * seq * head_dim
    assert roofline.attention_flops(batch, heads, seq, seq, head_dim, causal=True) == full // 2


def test_element_size():
    assert roofline.element_size("bf16") == 2 and roofline.element_size("float32") == 4


@given(st.floats(0, 1e15), st.floats(1e-3, 1e15))
def test_fraction_of_limit(achieved, limit):
    assert roofline.fraction_of_limit(achieved, limit) == pytest.approx(achieved / limit)


def test_fraction_of_limit_rejects_nonsense():
    with pytest.raises(BadParameter):
        roofline.fraction_of_limit(1.0, 0.0)
    with pytest.raises(BadParameter):
        roofline.fraction_of_limit(-1.0, 1.0)


@given(st.floats(0, 1e4), st.floats(1, 1e15), st.floats(1, 1e13))
def test_roofline_is_the_lower_of_the_two_roofs(intensity, peak, bandwidth):
    attainable = roofline.attainable_flops_per_s(intensity, peak, bandwidth)
    assert attainable <= peak and attainable <= intensity * bandwidth + 1e-6
    assert attainable == pytest.approx(min(peak, intensity * bandwidth))


def test_measured_ceilings_on_cpu_are_positive():
    ceilings = roofline.measure_ceilings("cpu", "float32", matmul_size=128, copy_megabytes=4)
    assert ceilings["matmul"]["flops"] == 2 * 128**3
    assert ceilings["matmul_flops_per_s"]["float32"] > 0 and ceilings["copy_bytes_per_s"] > 0
    assert ceilings["copy"]["bytes"] == 2 * 4 * 2**20


def test_ceilings_are_saved_per_device_and_dtypes_accumulate(tmp_path):
    path = tmp_path / "ceilings.json"
    first = roofline.measure_ceilings("cpu", "float32", matmul_size=64, copy_megabytes=1)
    second = roofline.measure_ceilings("cpu", "bfloat16", matmul_size=64, copy_megabytes=1)
    roofline.save_ceilings(first, path)
    roofline.save_ceilings(second, path)
    stored = roofline.load_ceilings("cpu", path)
    assert set(stored["matmul_flops_per_s"]) == {"float32", "bfloat16"}
    assert stored["copy_bytes_per_s"] == second["copy_bytes_per_s"]
    assert list(json.loads(path.read_text())) == [first["device_label"]]


def test_quick_ceilings_never_replace_full_ones(tmp_path):
    path = tmp_path / "ceilings.json"
    full = roofline.measure_ceilings("cpu", "float32", matmul_size=64, copy_megabytes=1)
    quick = roofline.measure_ceilings("cpu", "float32", matmul_size=32, copy_megabytes=1, quick=True)
    roofline.save_ceilings(full, path)
    roofline.save_ceilings(quick, path)
    stored = roofline.load_ceilings("cpu", path)
    assert stored["matmul"]["size"] == 64 and stored["quick"] is False
    roofline.save_ceilings(quick, tmp_path / "only-quick.json")
    assert roofline.load_ceilings("cpu", tmp_path / "only-quick.json")["quick"] is True


def test_no_ceilings_yet(tmp_path):
    assert roofline.load_ceilings("cpu", tmp_path / "none.json") is None


def test_default_sizes_shrink_when_quick():
    assert roofline.default_sizes("cpu", quick=True)["matmul_size"] < roofline.default_sizes("cpu")["matmul_size"]
    assert roofline.default_sizes("cuda:0")["matmul_size"] > roofline.default_sizes("cpu")["matmul_size"]
