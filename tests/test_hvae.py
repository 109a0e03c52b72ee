"""The Hamiltonian VAE (Caterini et al. 2018): its posterior's density is exact (checked against
the change of variables at points it did not draw), it reduces to the VAE with no leapfrog step,
its importance weights estimate the exact log p(x) of a linear-Gaussian model, and it trains,
compiled as eager."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import lvmkit
from lvmkit.guides import HamiltonianFlow


def _pair(num_steps: int, **config):
    pyro.set_rng_seed(0)
    options = {"data_dim": 6, "latent_dim": 2, "hidden_dims": (8,), **config}
    return lvmkit.build_hvae(lvmkit.VAEConfig(**options), num_steps=num_steps, step_size=0.2)


def _data(n: int = 40) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 6), 0.3), generator=torch.Generator().manual_seed(1))


def test_the_posteriors_density_is_the_change_of_variables_at_points_it_did_not_draw():
    model, guide = _pair(num_steps=3)
    x = _data(1)
    q = guide.posterior(x)
    d = 2
    start = torch.randn(1, 2 * d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    q64 = HamiltonianFlow(
        x.double(), q.loc.double().detach(), q.scale.double().detach(),
        lambda x_, z: model.double().log_joint(x_, z), q.step_size.double().detach(),
        q.beta0.double().detach(), q.num_steps,
    )  # fmt: skip

    def push(both: torch.Tensor) -> torch.Tensor:
        z, rho = q64._forward(both[:, :d], both[:, d:])
        return torch.cat([z, rho], dim=-1)

    end = push(start)
    jacobian = torch.autograd.functional.jacobian(push, start).reshape(2 * d, 2 * d)
    beta0 = q64.beta0
    z0, rho0 = start[:, :d], start[:, d:]
    expected = (
        torch.distributions.Normal(q64.loc, q64.scale).log_prob(z0).sum(-1)
        + torch.distributions.Normal(0, 1 / beta0.sqrt()).log_prob(rho0).sum(-1)
        - torch.linalg.slogdet(jacobian).logabsdet
    )
    # the tempering scales ρ by √β₀ in all: the Jacobian's determinant is β₀^(d/2)
    assert float(torch.linalg.slogdet(jacobian).logabsdet) == pytest.approx(
        0.5 * d * math.log(float(beta0)), abs=1e-9
    )
    torch.testing.assert_close(q64.log_prob(end.detach().clone()), expected)
    model.float()


def test_with_no_leapfrog_step_its_weights_are_the_vaes_draw_for_draw():
    model, guide = _pair(num_steps=0)
    vae, encoder = lvmkit.build_vae(model.config)
    vae.decoder.load_state_dict(model.decoder.state_dict())
    encoder.load_state_dict(guide.base.state_dict())
    x = _data(5)
    weights = []
    for m, g in ((model, guide), (vae, encoder)):
        torch.manual_seed(3)
        weights.append(lvmkit.log_weights(m, g, x, 7, vectorize_particles=True))
    torch.testing.assert_close(weights[0], weights[1])


def test_its_importance_weights_estimate_a_linear_gaussian_models_exact_log_likelihood():
    model, guide = _pair(num_steps=2, hidden_dims=(), likelihood="gaussian_fixed", sigma=0.5)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    result = lvmkit.fit(model, guide, x, epochs=200, batch_size=4, device="cpu", progress=False,
                        compile=False, lr=0.02)  # fmt: skip
    linear = model.decoder[-1] if isinstance(model.decoder, torch.nn.Sequential) else model.decoder
    w, b = linear.weight.detach().double(), linear.bias.detach().double()
    covariance = w @ w.T + 0.25 * torch.eye(6, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(b, covariance).log_prob(x.double())
    scores = lvmkit.evaluate(model, guide, x, num_samples=4000, progress=False, compile=False)
    assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0]
    assert (scores["elbo"].to_numpy() <= exact.numpy() + 1e-4).all()
    assert scores["log_likelihood"].to_numpy() == pytest.approx(exact.numpy(), abs=0.05)


def test_it_trains_compiled_as_eager_and_learns_its_step_sizes():
    histories, steps = [], []
    for compile in (False, True):
        pyro.clear_param_store()
        model, guide = _pair(num_steps=3)
        start = guide.step_size.detach().clone()
        result = lvmkit.fit(model, guide, _data(64), epochs=3, batch_size=16, device="cpu",
                            progress=False, compile=compile, seed=1)  # fmt: skip
        histories.append(result.history.train_loss.tolist())
        steps.append(guide.step_size.detach())
        assert result.compiled is compile
        assert not torch.equal(guide.step_size.detach(), start)  # ε learned
    assert histories[1] == pytest.approx(histories[0], rel=1e-5)
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"step_size": 0.0}, r"step_size must be > 0; got 0.0"),
        ({"beta0": 1.0}, r"beta0 must be in \(0, 1\); got 1.0"),
        ({"num_steps": -1}, r"num_steps"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        lvmkit.build_hvae(lvmkit.VAEConfig(data_dim=4, latent_dim=2), **options)
