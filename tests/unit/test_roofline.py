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


def _ceilings(dtype="float32", flops=100.0, copy=10.0, quick=False, label="cpu-test", size=64):
    return {"device": "cpu", "device_label": label, "quick": quick, "matmul_flops_per_s": {dtype: flops},
            "copy_bytes_per_s": copy, "matmul": {"size": size}, "measured_at": "now"}


def test_measured_ceilings_are_saved_per_device_and_dtypes_accumulate(tmp_path):
    path = tmp_path / "ceilings.json"
    first = roofline.measure_ceilings("cpu", "float32", matmul_size=64, copy_megabytes=1)
    second = roofline.measure_ceilings("cpu", "bfloat16", matmul_size=64, copy_megabytes=1)
    roofline.save_ceilings(first, path)
    roofline.save_ceilings(second, path)
    stored = roofline.load_ceilings("cpu", path)
    assert set(stored["matmul_flops_per_s"]) == {"float32", "bfloat16"}
    assert stored["copy_bytes_per_s"] == max(first["copy_bytes_per_s"], second["copy_bytes_per_s"])
    assert list(json.loads(path.read_text())) == [first["device_label"]]


def test_a_saved_ceiling_is_the_highest_measured(tmp_path):
    path = tmp_path / "ceilings.json"
    roofline.save_ceilings(_ceilings(flops=100.0, copy=10.0), path)
    roofline.save_ceilings(_ceilings(flops=80.0, copy=12.0), path)
    stored = json.loads(path.read_text())["cpu-test"]
    assert stored["matmul_flops_per_s"]["float32"] == 100.0 and stored["copy_bytes_per_s"] == 12.0


def test_quick_sizes_raise_a_matmul_ceiling_but_never_replace_a_full_copy_ceiling(tmp_path):
    path = tmp_path / "ceilings.json"
    roofline.save_ceilings(_ceilings(flops=100.0, copy=10.0, size=1024), path)
    roofline.save_ceilings(_ceilings(flops=150.0, copy=50.0, quick=True, size=512), path)
    stored = json.loads(path.read_text())["cpu-test"]
    assert stored["matmul_flops_per_s"]["float32"] == 150.0
    assert stored["copy_bytes_per_s"] == 10.0 and stored["quick"] is False and stored["matmul"]["size"] == 1024
    roofline.save_ceilings(_ceilings(quick=True), tmp_path / "only-quick.json")
    assert json.loads((tmp_path / "only-quick.json").read_text())["cpu-test"]["quick"] is True


def test_compute_ceiling_measures_now_and_keeps_the_best(tmp_path):
    path = tmp_path / "ceilings.json"
    first = roofline.compute_ceiling("cpu", "float32", quick=True, path=path)
    assert first["flops_per_s"] > 0 and "measured now" in first["source"]
    label = roofline.load_ceilings("cpu", path)["device_label"]
    roofline.save_ceilings(_ceilings(flops=1e18, label=label), path)
    second = roofline.compute_ceiling("cpu", "float32", quick=True, path=path)
    assert second["flops_per_s"] == 1e18 and "best saved" in second["source"]


def test_no_ceilings_yet(tmp_path):
    assert roofline.load_ceilings("cpu", tmp_path / "none.json") is None


def test_default_sizes_shrink_when_quick():
    assert roofline.default_sizes("cpu", quick=True)["matmul_size"] < roofline.default_sizes("cpu")["matmul_size"]
    assert roofline.default_sizes("cuda:0")["matmul_size"] > roofline.default_sizes("cpu")["matmul_size"]
