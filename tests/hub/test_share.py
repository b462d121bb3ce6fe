"""The class hub's decisions without a hub: the GPU share each learner gets (with pretend GPUs), the start it refuses,
a learner's home; and the kernel's side of the share, labkit.lab's hook (with a pretend GPU). Fast: runs in make test."""

import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from labkit import lab, probes
from labkit.errors import BadParameter

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hub"))
import classroom  # noqa: E402


def shares(names, gpus, setting):
    return {name: classroom.gpu_share_env(name, names, gpus, setting) for name in names}


def test_one_gpu_is_split_evenly():
    got = shares(["ann", "bob", "cy", "dee"], 1, "auto")
    assert all(env == {"LABKIT_GPU_SHARE": "0.25"} for env in got.values()), got
    assert shares(["ann", "bob", "cy"], 1, "auto")["ann"] == {"LABKIT_GPU_SHARE": "0.33"}  # rounded down: fits


def test_several_gpus_go_round_robin_and_split_only_when_shared():
    assert shares(["ann", "bob", "cy"], 4, "auto") == {
        "ann": {"CUDA_VISIBLE_DEVICES": "0"}, "bob": {"CUDA_VISIBLE_DEVICES": "1"}, "cy": {"CUDA_VISIBLE_DEVICES": "2"}}
    five = shares(["a1", "a2", "a3", "a4", "a5"], 2, "auto")
    assert [env["CUDA_VISIBLE_DEVICES"] for env in five.values()] == ["0", "1", "0", "1", "0"]
    assert {env["LABKIT_GPU_SHARE"] for env in five.values()} == {"0.33"}  # GPU 0 holds three of them


@pytest.mark.parametrize("learners", [1, 2, 3, 5, 7, 20, 33])
@pytest.mark.parametrize("gpus", [1, 2, 3, 8])
def test_auto_never_gives_one_gpu_more_than_its_memory(learners, gpus):
    names = [f"learner{i:02d}" for i in range(learners)]
    per_gpu: dict[str, float] = {}
    for env in shares(names, gpus, "auto").values():
        device = env.get("CUDA_VISIBLE_DEVICES", "0")
        per_gpu[device] = per_gpu.get(device, 0) + float(env.get("LABKIT_GPU_SHARE", 1))
    assert len(per_gpu) == min(gpus, learners) and round(max(per_gpu.values()), 9) <= 1


def test_a_fraction_the_teacher_names_and_no_share():
    assert shares(["ann", "bob"], 2, "0.2") == {"ann": {"CUDA_VISIBLE_DEVICES": "0", "LABKIT_GPU_SHARE": "0.2"},
                                                 "bob": {"CUDA_VISIBLE_DEVICES": "1", "LABKIT_GPU_SHARE": "0.2"}}
    assert shares(["ann"], 1, "1") == {"ann": {}}  # the whole GPU: nothing to cap
    assert shares(["ann", "bob"], 2, "off") == {"ann": {}, "bob": {}}
    assert shares(["ann", "bob"], 0, "auto") == {"ann": {}, "bob": {}}  # no GPU: nothing to share
    assert classroom.gpu_share_env("zed", ["ann", "bob"], 2, "auto") == {"CUDA_VISIBLE_DEVICES": "0",
                                                                        "LABKIT_GPU_SHARE": "0.5"}  # not listed: last


@pytest.mark.parametrize("setting", ["2", "0", "-0.5", "half"])
def test_a_bad_share_is_one_sentence_even_without_a_gpu(setting):
    with pytest.raises(ValueError) as caught:
        classroom.gpu_share_env("ann", ["ann"], 0, setting)
    assert str(caught.value).startswith(f"LABKIT_HUB_GPU_SHARE={setting!r}: ") and "\n" not in str(caught.value)


def test_the_gpus_counted(monkeypatch):
    assert classroom.gpu_count("3") == 3
    monkeypatch.setattr(classroom.shutil, "which", lambda name: None)
    assert classroom.gpu_count("") == 0
    monkeypatch.setattr(classroom.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    listing = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n"
    monkeypatch.setattr(classroom.subprocess, "run", lambda *a, **k: types.SimpleNamespace(returncode=0, stdout=listing))
    assert classroom.gpu_count("") == 2


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
                                           ("localhost", True), ("0.0.0.0", False), ("", False), ("::", False),
                                           ("192.168.1.20", False), ("hub.example.org", False)])
def test_which_addresses_are_this_machine_only(host, loopback):
    assert classroom.is_loopback(host) is loopback


def test_an_open_authenticator_is_refused_off_loopback_only():
    assert classroom.admits_anyone("dummy") and classroom.admits_anyone("null")
    assert not classroom.admits_anyone("pam")
    why = classroom.refusal("0.0.0.0", "dummy")
    assert why.startswith("labkit hub: refusing to start on address '0.0.0.0'") and "\n" not in why
    assert classroom.refusal("", "null").startswith("labkit hub: refusing to start on every address")
    assert classroom.refusal("127.0.0.1", "dummy") == ""  # a teacher trying it alone on this machine
    assert classroom.refusal("0.0.0.0", "pam") == ""  # passwords of accounts the teacher made


def test_authenticator_classes_are_judged_by_what_they_are():
    auth = pytest.importorskip("jupyterhub.auth", reason="JupyterHub is installed by make hub only")

    class Relaxed(auth.DummyAuthenticator):
        pass

    assert classroom.admits_anyone(Relaxed) and classroom.admits_anyone("jupyterhub.auth.DummyAuthenticator")
    assert not classroom.admits_anyone(auth.PAMAuthenticator)
    assert classroom.refusal("10.0.0.5", Relaxed).startswith("labkit hub: refusing to start on address '10.0.0.5'")


def test_a_learners_home_gets_the_workbook_and_keeps_their_work(tmp_path):
    notebooks, home = tmp_path / "notebooks", tmp_path / "home"
    notebooks.mkdir()
    home.mkdir(mode=0o755)
    for name in ("00_a.ipynb", "01_b.ipynb", "WORKSHOP.md"):
        (notebooks / name).write_text(f"the workbook's {name}")
    (home / "workbook").mkdir()
    (home / "workbook" / "01_b.ipynb").write_text("the learner's answers")
    folder = classroom.copy_workbook(home, os.getuid(), os.getgid(), notebooks)
    assert (home.stat().st_mode & 0o777) == 0o700, "another account could read this home"
    assert (folder / "00_a.ipynb").read_text() == "the workbook's 00_a.ipynb"
    assert (folder / "01_b.ipynb").read_text() == "the learner's answers"
    assert (folder / "WORKSHOP.md").exists()


def test_the_prepared_models_are_linked_when_everyone_may_read_them(tmp_path):
    prepared, home = tmp_path / "prepared", tmp_path / "home"
    model = prepared / "models" / "smollm2-135m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "config.json").chmod(0o644)
    (model / "model.safetensors").write_text("weights")
    (model / "model.safetensors").chmod(0o600)  # as labkit's conversion leaves it
    home.mkdir()
    assert classroom.seed_cache(home, os.getuid(), os.getgid(), prepared) == ["smollm2-135m"]
    given = home / ".cache" / "labkit" / "models" / "smollm2-135m"
    assert (given / "config.json").stat().st_ino == (model / "config.json").stat().st_ino  # one file, linked
    assert (given / "model.safetensors").stat().st_ino != (model / "model.safetensors").stat().st_ino  # a copy
    assert (given / "model.safetensors").read_text() == "weights"
    assert classroom.seed_cache(home, os.getuid(), os.getgid(), prepared) == []  # already there: kept
    assert classroom.seed_cache(home, os.getuid(), os.getgid(), tmp_path / "nothing") == []


# --------------------------------------------------------------------------- the kernel's side: labkit.lab

@pytest.fixture
def share(monkeypatch):
    """Set $LABKIT_GPU_SHARE for one test (lab.gpu_share reads it once per process, so its cache is cleared)."""
    def set_to(value):
        monkeypatch.setenv("LABKIT_GPU_SHARE", value)
        probes.gpu_share.cache_clear()
    yield set_to
    probes.gpu_share.cache_clear()


def test_the_share_is_read_once(share, monkeypatch):
    monkeypatch.delenv("LABKIT_GPU_SHARE", raising=False)
    probes.gpu_share.cache_clear()
    assert probes.gpu_share() is None
    share("0.25")
    assert probes.gpu_share() == 0.25
    monkeypatch.setenv("LABKIT_GPU_SHARE", "0.5")
    assert probes.gpu_share() == 0.25, "read once: a kernel keeps the share it started with"


@pytest.mark.parametrize("value", ["0", "1.5", "a quarter"])
def test_a_bad_share_stops_the_opening_cell_in_one_sentence(share, value):
    share(value)
    with pytest.raises(BadParameter) as caught:
        lab.apply_gpu_share("cpu")
    assert str(caught.value).startswith(f"LABKIT_GPU_SHARE={value!r}: ") and "\n" not in str(caught.value)


def test_the_share_caps_the_gpu_it_runs_on(share, monkeypatch):
    capped = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: capped.append((f, d)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=80 * 2**30))
    share("0.25")
    assert lab.apply_gpu_share("cpu") == "" and not capped  # no GPU: nothing to cap
    words = lab.apply_gpu_share("cuda:1")
    assert capped == [(0.25, torch.device("cuda:1"))]
    assert words == " This kernel may allocate 25% of the GPU's memory, 20.0 GiB (LABKIT_GPU_SHARE)."


def test_start_applies_the_share_first_and_says_so(monkeypatch, capsys):
    order = []

    @dataclass
    class Parameters:
        def resolve(self, *, device, quick):
            order.append("sizes")
            return ""

    monkeypatch.setattr(lab, "topic", lambda notebook: types.SimpleNamespace(Parameters=Parameters))
    monkeypatch.setattr(lab, "apply_gpu_share", lambda device: order.append(f"share on {device}") or " SHARED.")
    lab.start("99_fake", {"device": "cpu", "quick": True})
    assert order == ["share on cpu", "sizes"]
    assert capsys.readouterr().out.rstrip().endswith("quick sizes. SHARED.")
