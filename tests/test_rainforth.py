"""MIWAE, CIWAE and PIWAE (Rainforth et al., "Tighter Variational Bounds are Not Necessarily
Better", ICML 2018): each reduces to IWAE or the ELBO at its limits, draw for draw, and PIWAE's
gradients are the IWAE bound's on the model and the MIWAE bound's on the guide."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import lvmkit
from conftest import assert_close
from lvmkit.inference.calls import call_of
from lvmkit.inference.kernel import log_density_pass
from lvmkit.inference.layout import find_layout

SMALL = lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,))


def _setup(n=16):
    pyro.set_rng_seed(0)
    model, guide = lvmkit.build_vae(SMALL)
    x = torch.bernoulli(torch.rand(n, 6, generator=torch.Generator().manual_seed(0)))
    return model, guide, x


def _loss(objective, model, guide, x, seed=3):
    pyro.set_rng_seed(seed)
    return objective.differentiable_loss(model, guide, x=x)


def _log_w(model, guide, x, draws, seed=3):
    """The same draws as the objectives take: one pass of ``draws`` particles."""
    call = call_of((), {"x": x})
    layout = find_layout(model, guide, call)
    pyro.set_rng_seed(seed)
    log_p, log_q = log_density_pass(model, guide, call, draws, layout)
    return log_p - log_q


def test_the_limits_draw_for_draw():
    model, guide, x = _setup()
    with torch.no_grad():
        iwae = _loss(lvmkit.IWAE(8), model, guide, x)
        assert_close(_loss(lvmkit.MIWAE(8, groups=1), model, guide, x), iwae, rtol=1e-6)
        assert_close(_loss(lvmkit.CIWAE(8, beta=0.0), model, guide, x), iwae, rtol=1e-6)
        log_w = _log_w(model, guide, x, 8)
        elbo = -log_w.mean(0).sum()  # the ELBO averaged over the same 8 draws
        assert_close(_loss(lvmkit.MIWAE(1, groups=8), model, guide, x), elbo, rtol=1e-6)
        assert_close(_loss(lvmkit.CIWAE(8, beta=1.0), model, guide, x), elbo, rtol=1e-6)
        mixed = 0.3 * log_w.mean(0) + 0.7 * (log_w.logsumexp(0) - math.log(8))
        assert_close(_loss(lvmkit.CIWAE(8, beta=0.3), model, guide, x), -mixed.sum(), rtol=1e-6)
        miwae = -(log_w.reshape(2, 4, -1).logsumexp(1) - math.log(4)).mean(0).sum()
        assert_close(_loss(lvmkit.MIWAE(4, groups=2), model, guide, x), miwae, rtol=1e-6)
        # the bounds' order at the same draws: ELBO ≤ MIWAE(2 × 4) ≤ IWAE(8)
        assert float(elbo) >= float(miwae) >= float(iwae)


def test_piwae_trains_the_model_by_iwae_and_the_guide_by_miwae():
    model, guide, x = _setup()
    params = {"model": list(model.parameters()), "guide": list(guide.parameters())}

    def grads(objective):
        model.zero_grad()
        guide.zero_grad()
        loss = _loss(objective, model, guide, x)
        loss.backward()
        return loss.detach(), {k: [p.grad.clone() for p in v] for k, v in params.items()}

    value, piwae = grads(lvmkit.PIWAE(4, groups=2))
    iwae_value, iwae = grads(lvmkit.IWAE(8))
    _, miwae = grads(lvmkit.MIWAE(4, groups=2))
    assert_close(value, iwae_value, rtol=1e-6)  # its value: the IWAE bound of the 8 draws
    for ours, theirs in zip(piwae["model"], iwae["model"], strict=True):
        assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    for ours, theirs in zip(piwae["guide"], miwae["guide"], strict=True):
        assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    pairs = zip(iwae["guide"], miwae["guide"], strict=True)
    assert any((a - b).abs().max() > 1e-4 for a, b in pairs)  # (the two guide gradients differ)


def test_they_train_through_fit_and_refuse_bad_settings():
    model, guide, x = _setup(128)
    for objective in (lvmkit.MIWAE(4, groups=2), lvmkit.CIWAE(4, beta=0.05),
                      lvmkit.PIWAE(4, groups=2)):  # fmt: skip
        pyro.set_rng_seed(0)
        model, guide = lvmkit.build_vae(SMALL)
        result = lvmkit.fit(model, guide, x, epochs=3, batch_size=32, lr=1e-2, objective=objective,
                            progress=False)  # fmt: skip
        assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0]
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]; got 2.0"):
        lvmkit.CIWAE(4, beta=2.0)
    with pytest.raises((ValueError, TypeError), match="groups"):
        lvmkit.MIWAE(4, groups=0)
