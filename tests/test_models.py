"""The VAE's likelihoods against the seeds' formulas, generation, and config validation."""

from __future__ import annotations

import math

import pytest
import torch

import lvmkit
from conftest import assert_close
from lvmkit.models import VAE, VAEConfig


def _model(likelihood: str, **kw) -> VAE:
    return VAE(VAEConfig(data_dim=6, latent_dim=3, hidden_dims=(5,), likelihood=likelihood, **kw))


def test_bernoulli_log_prob_is_the_negative_cross_entropy():
    model = _model("bernoulli")
    z, x = torch.randn(4, 3), torch.bernoulli(torch.full((4, 6), 0.4))
    p = torch.sigmoid(model.decoder(z))
    expected = (x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum(
        -1
    )  # Σ_j x log p + (1−x) log(1−p)
    assert_close(model.likelihood(z).log_prob(x), expected, atol=1e-5)


def test_gaussian_log_prob_with_learned_variance():
    model = _model("gaussian")
    z, x = torch.randn(4, 3), torch.rand(4, 6)
    loc, raw = model.decoder(z).split(6, dim=-1)
    sigma = torch.nn.functional.softplus(raw) + model.config.min_scale
    # log N(x; μ, σ²) = −log(√(2π) σ) − (x − μ)² / (2σ²), summed over pixels
    expected = (-torch.log(math.sqrt(2 * math.pi) * sigma) - (x - loc) ** 2 / (2 * sigma**2)).sum(
        -1
    )
    assert_close(model.likelihood(z).log_prob(x), expected, atol=1e-5)


@pytest.mark.parametrize("sigma", [1.0, 0.5], ids=["identity", "sigma=0.5"])
def test_fixed_variance_gaussian_is_squared_error(sigma):
    model = _model("gaussian_fixed", sigma=sigma)
    z, x = torch.randn(4, 3), torch.rand(4, 6)
    mu = model.decoder(z)
    d = x.shape[-1]
    # −log p = (D/2) log(2πσ²) + ‖x − μ‖² / (2σ²): the squared error of the seeds when σ = 1
    expected = -0.5 * d * math.log(2 * math.pi * sigma**2) - ((x - mu) ** 2).sum(-1) / (
        2 * sigma**2
    )
    assert_close(model.likelihood(z).log_prob(x), expected, atol=1e-5)


@pytest.mark.parametrize("likelihood", lvmkit.LIKELIHOODS)
def test_model_generates_with_x_none(likelihood):
    model = _model(likelihood)
    samples = model(batch_size=9)
    assert samples.shape == (9, 6)
    if likelihood == "bernoulli":
        assert set(samples.unique().tolist()) <= {0.0, 1.0}


def test_predictive_draws_in_parallel():
    from pyro.infer import Predictive

    model = _model("bernoulli")
    draws = Predictive(model, num_samples=5, parallel=True)(batch_size=2)
    assert draws["x"].shape == (5, 2, 6) and draws["z"].shape == (5, 2, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"likelihood": "bernouli"}, ValueError, "Did you mean 'bernoulli'"),
        ({"activation": "rellu"}, ValueError, "Did you mean 'relu'"),
        ({"latent_dim": 0}, ValueError, "latent_dim must be an int >= 1; got 0"),
        ({"latent_dim": 2.5}, TypeError, "latent_dim must be an int"),
        ({"hidden_dims": (400, -1)}, ValueError, "hidden_dims"),
        ({"hidden_dims": "400"}, TypeError, "hidden_dims must be a sequence"),
        ({"sigma": 0.0}, ValueError, "sigma must be > 0"),
    ],
    ids=[
        "likelihood",
        "activation",
        "latent0",
        "latent-float",
        "hidden-neg",
        "hidden-str",
        "sigma",
    ],
)
def test_bad_config_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        VAEConfig(data_dim=4, **kwargs)


def test_list_hidden_dims_become_a_tuple_and_encoder_mirrors():
    cfg = VAEConfig(data_dim=4, hidden_dims=[8, 6])
    assert cfg.hidden_dims == (8, 6)
    _, guide = lvmkit.build_vae(cfg)
    assert guide.config.hidden_dims == (6, 8) and guide.config.latent_dim == cfg.latent_dim


def test_guide_without_data_says_so():
    _, guide = lvmkit.build_vae(VAEConfig(data_dim=4))
    with pytest.raises(ValueError, match="needs data"):
        guide()
