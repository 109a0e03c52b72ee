"""The example scripts run as documented (at a few epochs)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pandas as pd
import torch

import lvmkit

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_model_example_trains_evaluates_and_plots_with_arviz(tmp_path, capsys):
    example = _load("custom_model")
    example.main(["--epochs", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "held-out: ELBO" in out and "log p(x) ≈" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "elbo.png",
        "khat.png",
        "latent.png",
        "posterior.png",
        "posterior_summary.csv",
        "ppc.png",
    ]
    summary = pd.read_csv(tmp_path / "posterior_summary.csv", index_col=0)
    assert list(summary.index) == [f"z[{p}, {d}]" for p in range(3) for d in range(2)]


def test_m2_ablation_example_scales_kingmas_alpha_and_initialises_like_kingma():
    from lvmkit.benchmarks import m2

    example = _load("m2_ablation")
    task = m2.m2_task(100, 50_000)
    contender = example.alpha_times(10.0)(task)
    assert task.extra["aux_weight"] == 50.0
    assert contender.model.config.aux_weight == 500.0
    assert example.alpha_times(1.0, absolute=46.0)(task).model.config.aux_weight == 46.0
    m1 = (lvmkit.VAE(m2.M1_CONFIG), lvmkit.GaussianEncoder(lvmkit.GaussianEncoderConfig(784, 50)))
    stacked = dataclasses.replace(task, extra={**task.extra, "pretrained_m1": lambda: m1})
    made = example.alpha_times(1.0, 46.0, m2.builtin_m1_m2)(stacked)  # M1+M2 on the suite's M1
    assert isinstance(made.model, lvmkit.StackedM2) and made.model.config.aux_weight == 46.0
    assert made.model.m1_decoder is m1[0] and made.guide.m1_encoder is m1[1]
    assert example.latent(5)(task).model.config.latent_dim == 5
    initialised = example.initialised(1e-3)(task)
    weights = [
        layer.weight
        for module in (initialised.model, initialised.guide)
        for layer in module.modules()
        if isinstance(layer, torch.nn.Linear)
    ]
    assert weights and all(float(w.detach().std()) < 2e-3 for w in weights)
    assert all(float(w.detach().abs().max()) > 0 for w in weights)


def test_m2_diagnosis_measures_the_classifier_and_the_decoders_use_of_y():
    import math

    example = _load("m2_diagnosis")
    model, guide = lvmkit.build_m2(
        lvmkit.M2Config(6, num_classes=3, latent_dim=2, hidden_dims=(8,))
    )
    x, y = torch.bernoulli(torch.full((30, 6), 0.4)), torch.arange(30) % 3
    out = example.diagnose(model, guide, x, y, classes=3)
    assert 0 <= out["accuracy"] <= 100 and 0 <= out["model_accuracy"] <= 100
    assert 0 < out["q_entropy"] <= math.log(3) + 1e-6
    assert math.isfinite(out["y_use_nats"])
