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
