"""A small user-style model/guide pair of plain functions (pyro.module + pyro.param), for tests."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch


def make_plain_pair(data_dim: int = 12, latent_dim: int = 2):
    """Return ``(model, guide, decoder)``: a Bernoulli decoder network and a global-loc guide."""
    decoder = torch.nn.Linear(latent_dim, data_dim)

    def model(x=None):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(latent_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)  # batch (N,) event (Dz,)
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)  # event (D,)

    def guide(x=None):
        loc = pyro.param("loc", torch.zeros(latent_dim))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))  # batch (N,) event (Dz,)

    return model, guide, decoder
