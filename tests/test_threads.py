"""threads="auto": the CPUs this process may use, less those other work keeps busy; a count the
user set is kept; fit and evaluate give torch its own count back."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

import lvmkit
from lvmkit.inference import threads


@pytest.fixture(autouse=True)
def _fresh_measurement(monkeypatch):
    monkeypatch.setattr(threads, "_busy", [])
    monkeypatch.setattr(threads, "_said", set())  # (each test hears the choice said anew)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_AT_IMPORT", torch.get_num_threads())


def test_auto_leaves_out_the_cpus_other_work_keeps_busy(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    monkeypatch.setattr(threads, "busy_cpus", lambda: 3)
    monkeypatch.setattr(threads, "_AT_IMPORT", 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert threads.choose("auto") == threads.ThreadChoice(5, 8, 3, "auto")
    monkeypatch.setattr(threads, "busy_cpus", lambda: 20)
    assert threads.choose("auto").threads == 1  # at least one


def test_auto_never_raises_torchs_count_and_follows_the_quota(monkeypatch):
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)  # 1.5 CPUs: two may run
    monkeypatch.setattr(threads, "busy_cpus", lambda: 0)
    assert threads.usable_cpus() <= 2
    monkeypatch.setattr(threads, "usable_cpus", lambda: 64)
    monkeypatch.setattr(threads, "_AT_IMPORT", 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert threads.choose("auto").threads == 4


def test_a_count_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose("auto").reason == "OMP_NUM_THREADS=3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "_AT_IMPORT", torch.get_num_threads() + 1)  # set after import
    assert threads.choose("auto").reason == "set with torch.set_num_threads"
    assert threads.choose(3) == threads.ThreadChoice(3, threads.usable_cpus(), 0, "asked")
    with pytest.raises(ValueError, match=r"threads must be 'auto' or an int >= 1; got 0"):
        threads.choose(0)


def test_fit_and_evaluate_give_torch_its_count_back(caplog):
    before = torch.get_num_threads()
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2, hidden_dims=(8,)))
    x = torch.bernoulli(torch.full((32, 4), 0.3))
    seen = []

    class Spy(lvmkit.Callback):
        def on_epoch_end(self, epoch, metrics):
            seen.append(torch.get_num_threads())

    with caplog.at_level(logging.WARNING, logger="lvmkit"):
        result = lvmkit.fit(model, guide, x, epochs=1, threads=1, device="cpu", progress=False,
                            callbacks=[Spy()])  # fmt: skip
        lvmkit.evaluate(model, guide, x, 5, threads=1)
    assert seen == [1] and torch.get_num_threads() == before
    assert "lvmkit: 1 CPU thread(s) (asked)" in caplog.text
    assert len(result.history) == 1


def test_auto_drops_to_the_free_cpus_beside_a_busy_process():
    """A real busy loop on one of this machine's CPUs is seen (on a 2-CPU machine: one thread)."""
    usable = threads.usable_cpus()
    if usable < 2 or threads._procs_running() is None:
        pytest.skip("needs Linux's /proc/stat and two usable CPUs")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = threads.busy_cpus(samples=10, interval=0.03)
    finally:
        hog.kill()
        hog.wait()
    assert busy >= 1
