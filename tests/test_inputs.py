"""Bad input at the public boundary: a ValueError/TypeError naming the argument, nothing lost."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lvmkit

D = 6


@pytest.fixture
def pair():
    return lvmkit.build_vae(lvmkit.VAEConfig(data_dim=D, latent_dim=2, hidden_dims=(8,)))


def _x(n: int = 16) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, D), 0.5))


def _with(value_at_00: float) -> torch.Tensor:
    x = _x()
    x[0, 0] = value_at_00
    return x


BAD_DATA = [
    (_with(float("nan")), ValueError, r"data must be finite; got 1 NaN or infinite values"),
    (_with(float("inf")), ValueError, r"data must be finite"),
    (_with(1.5), ValueError, r"Bernoulli decoder needs data in \[0, 1\].*got values in \[0, 1.5\]"),
    (_with(-0.5), ValueError, r"Bernoulli decoder needs data in \[0, 1\]"),
    (torch.zeros(16, D + 1), ValueError, rf"must have shape \(N, {D}\).*got \(16, {D + 1}\)"),
    (
        torch.zeros(0, D),
        ValueError,
        r"data is empty: expected at least one data point; got length 0",
    ),
    (torch.tensor(1.0), ValueError, r"must have a data dimension first"),
    ("images.npy", TypeError, r"a torch.Tensor, a numpy array, a pandas DataFrame, or a dict"),
    ({}, ValueError, r"data must hold at least one tensor; got an empty dict"),
    ({"x": torch.zeros(4, D), "y": torch.zeros(3)}, ValueError, r"same length; got lengths"),
    (np.array([["a"] * D] * 4), TypeError, r"must be numeric"),
]
BAD_DATA_IDS = [
    "nan",
    "inf",
    "above-1",
    "below-0",
    "feature-dim",
    "empty",
    "scalar",
    "string",
    "empty-dict",
    "ragged-dict",
    "strings",
]


@pytest.mark.parametrize(("data", "error", "match"), BAD_DATA, ids=BAD_DATA_IDS)
def test_fit_refuses_bad_data(pair, data, error, match):
    with pytest.raises(error, match=match):
        lvmkit.fit(*pair, data, epochs=1, device="cpu", progress=False)


@pytest.mark.parametrize(("data", "error", "match"), BAD_DATA, ids=BAD_DATA_IDS)
def test_evaluate_refuses_bad_data(pair, data, error, match):
    with pytest.raises(error, match=match):
        lvmkit.evaluate(*pair, data, num_samples=5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"objective": "elbow"}, ValueError, r"unknown objective 'elbow'.*Did you mean 'elbo'\?"),
        ({"objective": "meanfield"}, ValueError, r"Did you mean 'mean_field'\?"),
        ({"epochs": 0}, ValueError, r"epochs must be an int >= 1; got 0"),
        ({"epochs": "3"}, TypeError, r"epochs must be an int >= 1; got str"),
        ({"batch_size": 12.0}, TypeError, r"batch_size must be an int"),
        ({"lr": -1e-3}, ValueError, r"lr must be > 0; got -0.001"),
        ({"lr": float("nan")}, ValueError, r"lr must be finite"),
        ({"seed": -1}, ValueError, r"seed must be an int >= 0"),
        ({"num_particles": 0}, ValueError, r"num_particles must be an int >= 1"),
        (
            {"device": "tpu"},
            ValueError,
            r"device must be None \(where the data and parameters are\), 'auto', 'cpu', "
            r"'cuda' or 'cuda:N'; got 'tpu'",
        ),
        ({"transform": "binarize"}, TypeError, r"transform must be callable"),
        ({"resume": True}, ValueError, r"resume=True needs run_dir"),
        ({"compile": "yes"}, TypeError, r"compile must be True, False or None \(auto\); got 'yes'"),
        ({"validation_data": torch.zeros(3, D + 2)}, ValueError, rf"shape \(N, {D}\)"),
        (
            {"validation_data": torch.full((3, D), float("nan"))},
            ValueError,
            r"validation_data must be finite",
        ),
    ],
    ids=[
        "objective",
        "objective-2",
        "epochs0",
        "epochs-str",
        "batch-float",
        "lr-neg",
        "lr-nan",
        "seed-neg",
        "particles",
        "device",
        "transform",
        "resume-no-dir",
        "compile",
        "val-shape",
        "val-nan",
    ],
)
def test_fit_refuses_bad_options(pair, kwargs, error, match):
    with pytest.raises(error, match=match):
        lvmkit.fit(*pair, _x(), **{"epochs": 1, "device": "cpu", "progress": False, **kwargs})


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_without_cuda_is_a_clear_error(pair):
    with pytest.raises(ValueError, match="sees no CUDA device; use device='auto' or 'cpu'"):
        lvmkit.fit(*pair, _x(), epochs=1, device="cuda", progress=False)


def test_non_callable_model_is_refused(pair):
    with pytest.raises(TypeError, match="model must be a Pyro model"):
        lvmkit.fit("vae", pair[1], _x(), device="cpu", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples must be an int >= 1"),
        ({"max_pairs": 0}, "max_pairs must be an int >= 1"),
        ({"seed": 1.5}, "seed must be an int"),
    ],
    ids=["samples", "max-pairs", "seed"],
)
def test_evaluate_refuses_bad_options(pair, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lvmkit.evaluate(*pair, _x(), **{"num_samples": 5, **kwargs})


def test_numpy_float64_data_are_accepted(pair):
    result = lvmkit.fit(
        *pair, _x().numpy().astype(np.float64), epochs=1, device="cpu", progress=False
    )
    assert len(result.history) == 1


def test_summarize_refuses_a_foreign_table():
    import pandas as pd

    with pytest.raises(ValueError, match="columns"):
        lvmkit.summarize(pd.DataFrame({"a": [1.0]}))


def test_a_model_failing_on_the_data_is_reported_as_a_mismatch():
    """A model that breaks inside torch on the data (here: a Linear of the wrong width) gives a
    ValueError naming the data's shapes, with the torch error chained, in fit and in evaluate."""
    import pyro
    import pyro.distributions as dist
    from torch import nn

    net = nn.Linear(5, 3)

    def model(x):
        pyro.module("net", net)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(net(x), 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    x = torch.zeros(8, 3)
    with pytest.raises(
        ValueError, match=r"first minibatch of data \(x: \(8, 3\) torch.float32\)"
    ) as info:
        lvmkit.fit(model, guide, x, epochs=1, batch_size=8, device="cpu", progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(
        ValueError, match=r"first data points \(x: \(2, 3\) torch.float32\): Runtime"
    ):
        lvmkit.evaluate(model, guide, x, 2, device="cpu")
