"""The nonlinear latent model: exact likelihood by quadrature, IS against it, generation."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

import lvmkit
from lvmkit import datasets
from lvmkit.models import NonlinearConfig, NonlinearLVM, exact_log_likelihood
from lvmkit.pairs import build_nonlinear


def _linear(latent_dim: int, sigma=0.3) -> NonlinearLVM:
    torch.manual_seed(0)
    return NonlinearLVM(
        NonlinearConfig(data_dim=3, latent_dim=latent_dim, hidden_dims=(), sigma=sigma)
    )


@pytest.mark.parametrize("latent_dim", [1, 2])
def test_quadrature_is_exact_for_a_linear_f(latent_dim):
    """f(z) = Wz + b gives p(x) = N(b, WWᵀ + σ²I) in closed form."""
    model = _linear(latent_dim)
    w, b = model.f[0].weight.detach().double(), model.f[0].bias.detach().double()
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + 0.09 * torch.eye(3).double())
    x = marginal.sample((30,)).float()
    np.testing.assert_allclose(
        exact_log_likelihood(model, x), marginal.log_prob(x.double()), rtol=0, atol=1e-5
    )


def test_importance_sampling_agrees_with_quadrature_on_a_1d_latent_model():
    data = datasets.make_spiral(1200, seed=0)
    train, test = data.split(0.5, seed=0)
    pyro.set_rng_seed(0)
    model, guide = build_nonlinear(NonlinearConfig(data_dim=2, latent_dim=1, hidden_dims=(32, 32)))
    lvmkit.fit(model, guide, train.x, epochs=15, batch_size=64, lr=3e-3, progress=False)
    x = torch.as_tensor(test.x[:100])
    scores = lvmkit.evaluate(model, guide, x, num_samples=2000)
    exact = exact_log_likelihood(model, x).numpy()
    assert abs(scores.log_likelihood.mean() - exact.mean()) < 0.05
    assert scores.elbo.mean() < exact.mean()  # the bound sits below


def test_generation_has_the_right_shapes_and_statistics():
    model = _linear(2, sigma=0.5)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        x = model(batch_size=50_000)
    assert x.shape == (50_000, 3)
    w, b = model.f[0].weight.detach(), model.f[0].bias.detach()
    np.testing.assert_allclose(x.mean(0), b, atol=0.03)
    np.testing.assert_allclose(torch.cov(x.T), w @ w.T + 0.25 * torch.eye(3), atol=0.05)


def test_learned_sigma_moves_and_fixed_sigma_does_not():
    data = torch.as_tensor(datasets.make_ring(400, seed=0).x)
    learned = NonlinearLVM(NonlinearConfig(data_dim=2, sigma_init=1.0))
    fixed = NonlinearLVM(NonlinearConfig(data_dim=2, sigma=1.0))
    for model in (learned, fixed):
        guide = build_nonlinear(model.config)[1]
        lvmkit.fit(model, guide, data, epochs=3, batch_size=50, lr=1e-2, progress=False)
    assert float(learned.sigma().detach()) < 0.9 and float(fixed.sigma()) == 1.0


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="latent_dim 1 or 2"):
        exact_log_likelihood(
            NonlinearLVM(NonlinearConfig(data_dim=2, latent_dim=3)), torch.zeros(1, 2)
        )
    with pytest.raises(ValueError, match="Did you mean 'tanh'"):
        NonlinearConfig(data_dim=2, activation="tan")
    model = NonlinearLVM(NonlinearConfig(data_dim=2))
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        lvmkit.fit(model, build_nonlinear(model.config)[1], torch.zeros(5, 3), progress=False)
