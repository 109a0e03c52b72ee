"""The VampPrior: the mixture of the guide's own posteriors at learned pseudo-inputs, sharing
the guide's encoder weights."""

from __future__ import annotations

import math

import pyro
import torch

import lvmkit
from conftest import assert_close

SMALL = lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,))


def _binary(n=64):
    return torch.bernoulli(torch.full((n, 6), 0.4), generator=torch.Generator().manual_seed(0))


def test_the_prior_is_the_mixture_of_the_encoders_posteriors_at_the_pseudo_inputs():
    model, guide = lvmkit.build_vamp_vae(SMALL, num_pseudo=3)
    z = torch.randn(5, 2)
    with torch.no_grad():
        u = model.prior.pseudo_inputs
        loc, scale = guide.encode(u)
        by_hand = torch.stack([
            torch.distributions.Normal(loc[k], scale[k]).log_prob(z).sum(-1) for k in range(3)
        ]).logsumexp(0) - math.log(3)  # fmt: skip
        assert_close(model.prior.distribution().log_prob(z), by_hand, atol=1e-5)
        assert ((u >= 0) & (u <= 1)).all()
    one, one_guide = lvmkit.build_vamp_vae(SMALL, num_pseudo=1)  # K = 1: q(z | u) itself
    with torch.no_grad():
        loc, scale = one_guide.encode(one.prior.pseudo_inputs)
        expected = torch.distributions.Normal(loc[0], scale[0]).log_prob(z).sum(-1)
        assert_close(one.prior.distribution().log_prob(z), expected, atol=1e-5)


def test_one_encoder_serves_guide_and_prior_and_the_pseudo_inputs_learn():
    pyro.set_rng_seed(0)
    model, guide = lvmkit.build_vamp_vae(SMALL, num_pseudo=4)
    assert model.prior.encoder is guide
    x = _binary(256)
    before = model.prior.pseudo_raw.detach().clone()
    result = lvmkit.fit(model, guide, x, epochs=5, batch_size=64, lr=1e-2, progress=False)
    assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0]
    assert not torch.equal(model.prior.pseudo_raw, before)
    scores = lvmkit.evaluate(model, guide, x[:32], num_samples=50)
    assert (scores.log_likelihood >= scores.elbo - 1e-4).all()
    assert model(batch_size=3).shape == (3, 6)
