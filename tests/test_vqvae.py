"""VQ-VAE as a Pyro pair: the straight-through gradient, the codebook's two ways of training, the
bound against an exact computation, the learned prior over codes, and codebook usage."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import lvmkit
from conftest import assert_close
from lvmkit.models import CodePrior


def _pair(*, positions=2, codes=4, latent=4, ema=False, beta=0.25, data_dim=6):
    torch.manual_seed(0)
    cfg = lvmkit.VQVAEConfig(
        lvmkit.VAEConfig(data_dim=data_dim, latent_dim=latent, hidden_dims=(8,)),
        positions=positions, num_codes=codes, ema=ema, beta=beta,
    )  # fmt: skip
    return lvmkit.build_vqvae(cfg)


def _data(n=16, d=6):
    return torch.bernoulli(torch.full((n, d), 0.4), generator=torch.Generator().manual_seed(1))


def test_the_straight_through_gradient_reaches_the_encoder():
    """The decoder sees e_c's value and passes its gradient to z_e as if z were z_e; with β = 0
    the encoder output's gradient is exactly the reconstruction's gradient at e_c."""
    model, guide = _pair(beta=0.0)
    x = _data()
    z_e = guide.encode(x).detach().requires_grad_(True)
    guide.encode = lambda _: z_e
    loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, x)
    loss.backward()
    index = model.codebook.nearest(z_e.detach())
    e = model.codebook.embeddings[index].detach().requires_grad_(True)
    (-model.likelihood(e).log_prob(x).sum()).backward()
    assert z_e.grad is not None and z_e.grad.abs().sum() > 0
    assert_close(z_e.grad, e.grad, atol=1e-6)


def test_the_codebook_learns_from_its_loss_alone():
    """Without moving averages, the codebook's gradient is the codebook term's, 2 Σ (e_k − z_e)
    over the outputs assigned to code k: the decoder and the prior pass it nothing."""
    model, guide = _pair()
    x = _data()
    pyro.infer.Trace_ELBO().differentiable_loss(model, guide, x).backward()
    z_e = guide.encode(x).detach()
    index = model.codebook.nearest(z_e)
    e = model.codebook.embeddings.detach()
    step = 2 * (e[index] - z_e).reshape(-1, e.shape[1])
    expected = torch.zeros_like(e).index_add_(0, index.reshape(-1), step)
    assert_close(model.codebook.embeddings.grad, expected, atol=1e-5)


def test_the_moving_average_codebook_moves_towards_its_assigned_outputs():
    model, guide = _pair(ema=True)
    x = _data()
    codebook = model.codebook
    before = codebook.embeddings.clone()
    z_e = guide.encode(x).detach()
    index = codebook.nearest(z_e)
    guide.train()
    guide(x)  # a training-mode pass stages its assignments; the codebook stands still
    assert torch.equal(codebook.embeddings, before)
    guide(x)  # the next one applies them first
    decay, eps, k = 0.99, 1e-5, codebook.num_codes
    counts = torch.bincount(index.reshape(-1), minlength=k).float()
    sums = torch.zeros_like(before).index_add_(0, index.reshape(-1), z_e.reshape(-1, 2))
    size = decay * torch.ones(k) + (1 - decay) * counts
    summed = decay * before + (1 - decay) * sums
    smoothed = (size + eps) / (size.sum() + k * eps) * size.sum()
    assert_close(codebook.embeddings, summed / smoothed[:, None], atol=1e-6)
    for code in index.unique():  # each used code nearer the mean of what it was assigned
        mean = z_e.reshape(-1, 2)[index.reshape(-1) == code].mean(0)
        assert (codebook.embeddings[code] - mean).norm() < (before[code] - mean).norm()
    assert not any(p is codebook.embeddings for p in guide.parameters())  # buffers, not trained


def test_the_bound_is_the_reconstruction_less_l_log_k_and_below_the_exact_likelihood():
    """One position, three codes: log p(x) = logsumexp_c log p(x | e_c) − log 3 exactly, and the
    point-mass guide's bound log p(x | e_c(x)) − log 3 is what evaluate reports, IS included."""
    model, guide = _pair(positions=1, codes=3, latent=2, data_dim=3)
    x = _data(d=3)
    scores = lvmkit.evaluate(model, guide, x, num_samples=5)
    with torch.no_grad():
        codebook = model.codebook.embeddings
        per_code = torch.stack(
            [model.likelihood(e.expand(len(x), 1, 2)).log_prob(x) for e in codebook]
        )
        chosen = per_code.gather(0, guide.codes(x).T).squeeze(0)
    bound = chosen - math.log(3)
    assert_close(scores.elbo.to_numpy().copy(), bound, atol=1e-5)
    assert_close(scores.log_likelihood.to_numpy().copy(), bound, atol=1e-5)
    exact = per_code.logsumexp(0) - math.log(3)
    assert (exact >= bound - 1e-6).all()


def test_a_learned_code_prior_learns_the_codes_dependence_and_tightens_the_bound():
    """Codes whose second position copies the first (uniform over 3): the GRU prior learns
    log p(c) → −log 3, far above the uniform −2 log 4; attached, it is the bound's log p(c)."""
    torch.manual_seed(0)
    first = torch.randint(3, (300, 1))
    codes = torch.cat([first, first], dim=1)
    prior = CodePrior(num_codes=4, positions=2, hidden=16)
    lvmkit.fit(prior, lvmkit.models.empty_guide, codes, epochs=60, lr=0.02, batch_size=100,
               progress=False)  # fmt: skip
    with torch.no_grad():
        assert prior.log_prob(codes).mean() == pytest.approx(-math.log(3), abs=0.1)
        drawn = prior.sample_codes(200)
    assert (drawn[:, 0] == drawn[:, 1]).float().mean() > 0.9

    model, guide = _pair()
    x = _data()
    uniform = lvmkit.evaluate(model, guide, x, num_samples=1).elbo
    lvmkit.fit_code_prior(model, guide, x, hidden=16, epochs=30, lr=0.02, progress=False)
    learned = lvmkit.evaluate(model, guide, x, num_samples=1).elbo
    with torch.no_grad():
        log_prior = model.code_prior.log_prob(guide.codes(x))
    assert_close((learned - uniform).to_numpy().copy(), log_prior + 2 * math.log(4), atol=1e-4)
    assert learned.mean() > uniform.mean()
    assert model(batch_size=5).shape == (5, 6)


def test_codebook_usage_and_values_that_are_not_codes():
    model, guide = _pair()
    x = _data(40)
    usage = guide.usage(x)
    assert usage.counts.sum() == 40 * 2 and 1 <= usage.used <= 4
    assert 1.0 <= usage.perplexity <= usage.used + 1e-9
    last = guide.net[-1]
    with torch.no_grad():  # an encoder that always says code 2: one code used, perplexity 1
        last.weight.zero_()
        last.bias.copy_(model.codebook.embeddings[2].repeat(2))
    collapsed = guide.usage(x)
    assert collapsed.used == 1 and collapsed.perplexity == pytest.approx(1.0)
    prior = model.prior()
    assert prior.log_prob(model.codebook.embeddings[[0, 3]]).item() == pytest.approx(
        -2 * math.log(4)
    )
    assert prior.log_prob(torch.full((2, 2), 7.0)).item() == -math.inf


def test_a_vqvae_trains_compiled_and_from_its_own_networks():
    model, guide = _pair()
    x = _data(64)
    result = lvmkit.fit(model, guide, x, epochs=2, batch_size=16, compile=True, progress=False)
    assert result.compiled and result.history.train_loss.notna().all()
    ema_model, ema_guide = _pair(ema=True)
    result = lvmkit.fit(ema_model, ema_guide, x, epochs=2, batch_size=16, progress=False)
    assert not result.compiled  # the moving averages write buffers: trained eagerly
