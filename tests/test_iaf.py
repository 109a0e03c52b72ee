"""The inverse-autoregressive-flow posterior: its density is the base Gaussian's less the flow's
log-Jacobian, exactly; with no flow it is the Gaussian encoder; it trains by the ELBO and IWAE and
scores by IS and AIS (whose chains need the flow's inverse at values it did not draw)."""

from __future__ import annotations

import pyro
import torch

import lvmkit
from conftest import assert_close

SMALL = lvmkit.VAEConfig(data_dim=6, latent_dim=3, hidden_dims=(8,))


def _binary(n=64):
    return torch.bernoulli(torch.full((n, 6), 0.4), generator=torch.Generator().manual_seed(0))


def test_the_density_is_the_gaussians_less_the_log_jacobian():
    torch.manual_seed(0)
    _, guide = lvmkit.build_iaf_vae(SMALL, num_flows=3)
    for flow in guide.flows:  # move the flows off the identity they start near
        for p in flow.parameters():
            p.data.normal_(0, 0.3)
    x = _binary(4)
    q = guide.posterior(x)
    loc, scale = guide.base.encode(x)
    z0 = loc + scale * torch.randn_like(loc)

    def push(v):
        for t in guide.chain():
            v = t(v)
        return v

    with torch.no_grad():
        z = push(z0)
        for n in range(4):
            jac = torch.autograd.functional.jacobian(push, z0[n : n + 1]).reshape(3, 3)
            base = torch.distributions.Normal(loc[n], scale[n]).log_prob(z0[n]).sum()
            expected = base - torch.linalg.slogdet(jac).logabsdet
            fresh = guide.posterior(x[n : n + 1])  # no cached pair: the flow's own inverse
            assert_close(fresh.log_prob(z[n : n + 1])[0], expected, atol=1e-4)
        assert q.batch_shape == (4,) and q.event_shape == (3,)


def test_without_flows_it_is_the_gaussian_encoder():
    model, guide = lvmkit.build_iaf_vae(SMALL, num_flows=0)
    _, gaussian = lvmkit.build_vae(SMALL)
    gaussian.load_state_dict(guide.base.state_dict())
    x = _binary(16)
    ours = lvmkit.evaluate(model, guide, x, num_samples=30)
    theirs = lvmkit.evaluate(model, gaussian, x, num_samples=30)
    assert_close(ours.to_numpy().copy(), theirs.to_numpy().copy(), atol=1e-5)


def test_it_trains_by_the_elbo_and_iwae_and_scores_by_is_and_ais():
    pyro.set_rng_seed(0)
    model, guide = lvmkit.build_iaf_vae(SMALL, num_flows=2)
    x = _binary(256)
    for options in ({}, {"objective": "iwae", "num_particles": 4}):
        result = lvmkit.fit(model, guide, x, epochs=4, batch_size=64, lr=1e-2, progress=False,
                            **options)  # fmt: skip
        assert result.history.train_loss.notna().all()
    scores = lvmkit.evaluate(model, guide, x[:16], num_samples=50)
    assert (scores.log_likelihood >= scores.elbo).all()
    annealed = lvmkit.evaluate(model, guide, x[:4], num_samples=2, method="ais", num_steps=3)
    assert annealed.log_likelihood.notna().all()
