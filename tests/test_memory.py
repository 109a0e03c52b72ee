"""Memory budgets: a step or an evaluation pass that cannot fit is refused at once, with advice."""

from __future__ import annotations

import importlib
import re

import pytest
import torch

import lvmkit
from lvmkit.inference import _memory

D = 64
weights_module = importlib.import_module("lvmkit.inference.weights")  # the stream calls the kernel


def _vae():
    torch.manual_seed(0)
    return lvmkit.build_vae(lvmkit.VAEConfig(data_dim=D, latent_dim=4, hidden_dims=(128,)))


def _data(n=512):
    return torch.bernoulli(torch.full((n, D), 0.3), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, None), (1000, 1000), ("2GiB", 2 * 2**30), ("1.5 kb", 1500), (" 3MiB ", 3 * 2**20)],
)
def test_budget_sizes(given, expected):
    assert _memory.parse_budget(given) == expected


@pytest.mark.parametrize("bad", ["2 parsecs", "", "-1GB", 0, -5, 1.5, True])
def test_bad_budget_sizes_are_refused(bad):
    with pytest.raises((ValueError, TypeError), match="memory_budget"):
        _memory.parse_budget(bad)


def test_a_step_over_budget_is_refused_with_the_batch_size_that_fits():
    model, guide = _vae()
    x = _data()
    budget = "1MiB"
    with pytest.raises(
        ValueError, match=r"one training step needs about .* Use batch_size <= "
    ) as info:
        lvmkit.fit(model, guide, x, epochs=1, batch_size=512, memory_budget=budget, progress=False)
    assert "nothing was trained" in str(info.value)
    fits = int(re.search(r"batch_size <= (\d+)", str(info.value)).group(1))
    assert 1 <= fits < 512
    # the advice holds: that batch size trains within the same budget
    result = lvmkit.fit(
        model, guide, x, epochs=1, batch_size=fits, memory_budget=budget, progress=False
    )
    assert len(result.history) == 1


def test_the_default_budget_is_the_free_memory(monkeypatch):
    model, guide = _vae()
    monkeypatch.setattr(_memory, "available", lambda dev: 200_000)
    with pytest.raises(ValueError, match=r"more than 90% of the memory free on cpu"):
        lvmkit.fit(model, guide, _data(), epochs=1, batch_size=512, progress=False)


def test_evaluation_lowers_max_pairs_to_the_budget_or_refuses(monkeypatch):
    model, guide = _vae()
    x = _data(8)
    passes = []
    real = weights_module.log_density_pass

    def spy(model, guide, call, k, layout, **kwargs):
        passes.append(k * call.num_points)
        return real(model, guide, call, k, layout, **kwargs)

    monkeypatch.setattr(weights_module, "log_density_pass", spy)
    lvmkit.evaluate(model, guide, x, 200, memory_budget="256KiB")
    per_pair = passes[0]  # the measuring probe is one pair; then the real passes
    assert per_pair == 1 and max(passes[1:]) < 4096  # lowered from the default 4096 pairs
    with pytest.raises(ValueError, match=r"max_pairs=100000 needs about .* use max_pairs <= \d+"):
        lvmkit.evaluate(model, guide, x, 200, max_pairs=100_000, memory_budget="256KiB")
    with pytest.raises(ValueError, match=r"one \(sample, data point\) pair needs about"):
        lvmkit.evaluate(model, guide, x, 200, memory_budget=16)


def test_log_weights_refuses_a_result_larger_than_the_budget():
    model, guide = _vae()
    with pytest.raises(ValueError, match=r"use lvmkit\.evaluate"):
        lvmkit.log_weights(model, guide, _data(100), 10_000, memory_budget="1MiB")


def test_saved_bytes_count_what_a_view_reaches_not_its_whole_storage():
    data = torch.randn(1000, 64)
    weight = torch.randn(64, 8, requires_grad=True)
    # a one-row slice of a large tensor, and two halves of one output (sharing a storage)
    _, saved = _memory.measure_saved(lambda: (data[:1] @ weight).split(4, dim=1))
    assert saved[data.untyped_storage().data_ptr()] == 64 * 4  # one row, not 1000
    halves = torch.randn(16, 8, requires_grad=True)
    _, saved = _memory.measure_saved(lambda: [(h * h).sum() for h in halves.split(4, dim=1)])
    assert saved[halves.untyped_storage().data_ptr()] == 16 * 8 * 4  # union of both halves
    assert _memory._union_bytes([(0, 10), (5, 20), (30, 40), (32, 35)]) == 30


def test_evaluation_pair_estimate_does_not_grow_with_the_data(monkeypatch):
    """The probe is a slice of the data: its estimate once included the whole data set, so that
    evaluating more points silently shrank the passes (on CPU, 10k MNIST images: 4096 → ~600)."""
    model, guide = _vae()
    chosen = []
    real = weights_module.WeightStream._pairs_in_budget

    def spy(self, *args, **kwargs):
        chosen.append(real(self, *args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(weights_module.WeightStream, "_pairs_in_budget", spy)
    budget = "8MiB"
    lvmkit.evaluate(model, guide, _data(4), 50, memory_budget=budget)
    lvmkit.evaluate(model, guide, _data(20_000), 1, memory_budget=budget)
    assert chosen[0] == chosen[1] > 1


def test_evaluation_does_not_depend_on_the_free_memory(monkeypatch):
    """With the data set charged to each pair, the pass size — and so the draws — followed the
    free memory: the same run evaluated to different numbers on a busier machine."""
    model, guide = _vae()
    x = _data(2000)
    tables = []
    for free in (1 << 30, 4 << 30):
        monkeypatch.setattr(_memory, "available", lambda dev, free=free: free)
        tables.append(lvmkit.evaluate(model, guide, x, 50))
    assert tables[0].equals(tables[1])


def test_the_heap_guard_trims_when_the_process_grew_past_its_slack(monkeypatch):
    """glibc keeps freed megabyte blocks resident, more or less of them by where ASLR placed the
    heap: the same evaluation peaked anywhere from +113 MB to +960 MB. The stream trims the heap
    whenever the process grew more than twice a pass's measured need since it began."""
    resident = {"now": 1000 * 2**20}
    trims: list[int] = []
    monkeypatch.setattr(_memory, "resident_bytes", lambda: resident["now"])
    monkeypatch.setattr(_memory, "_TRIM", trims.append)
    guard = _memory.HeapGuard(slack=100 * 2**20)
    resident["now"] += 99 * 2**20
    guard.check()
    assert trims == []
    resident["now"] += 2 * 2**20
    guard.check()
    assert trims == [0] and guard.trims == 1
    assert _memory.HeapGuard(slack=1).slack == _memory.MIN_HEAP_SLACK

    model, guide = _vae()
    made: list[_memory.HeapGuard] = []
    real = _memory.HeapGuard.__init__

    def growing(self, slack):
        real(self, slack)
        made.append(self)

    monkeypatch.setattr(_memory.HeapGuard, "__init__", growing)
    monkeypatch.setattr(_memory, "resident_bytes", lambda: resident.__setitem__(
        "now", resident["now"] + 2**30) or resident["now"])  # fmt: skip
    lvmkit.evaluate(model, guide, _data(64), 100, max_pairs=1600, memory_budget="4GiB")
    assert len(made) == 1 and made[0].trims == 4  # one trim a pass: 16 points a pass


@pytest.mark.slow
def test_the_peak_memory_of_an_evaluation_repeats():
    """The default VAE on 1,000 test images at K = 1,000, one thread, three fresh processes: the
    peak resident memory within a pass's worth (before the guard: +113 to +960 MB)."""
    import subprocess
    import sys

    script = (
        "import resource, torch, lvmkit; torch.manual_seed(0); "
        "x = lvmkit.load_mnist('test', binarization='static', limit=1000).x; "
        "m, g = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=784)); "
        "b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "lvmkit.evaluate(m, g, x, 1000, threads=1); "
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - b) / 1024)"
    )
    peaks = [
        float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True).stdout.split()[-1])
        for _ in range(3)
    ]  # fmt: skip
    assert max(peaks) - min(peaks) < 150, peaks
    assert max(peaks) < 400, peaks
