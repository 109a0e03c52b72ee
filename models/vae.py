"""The variational autoencoder's generative model p(x, z) = p(z) p(x | z).

Prior p(z) = N(0, I); decoder p(x | z) from an MLP with one of the three likelihoods of the seeds:

- ``"bernoulli"``: p(x | z) = Π_j p_j^x_j (1 − p_j)^(1 − x_j), p = sigmoid(f(z)); its negative
  log is the binary cross-entropy. Data must be binary (binarized MNIST).
- ``"gaussian"``: p(x | z) = N(x; μ(z), diag σ²(z)), mean and variance both from the decoder.
- ``"gaussian_fixed"``: p(x | z) = N(x; μ(z), σ² I) with σ fixed by the config; with σ = 1 its
  negative log is ½‖x − μ‖² + (D/2) log 2π, the squared error of the seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch.nn import functional as F

from lvmkit.base import (
    check_bernoulli_data,
    check_choice,
    check_data_matrix,
    check_float,
    check_int,
    check_sizes,
)
from lvmkit.models.mlp import ACTIVATIONS, mlp

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_fixed")


@dataclass(frozen=True)
class VAEConfig:
    """Sizes and likelihood of a :class:`VAE` (and of its matching encoder).

    ``data_dim`` has no default on purpose: it comes from the data (784 for MNIST).
    """

    data_dim: int  # features per data point, taken from the data
    latent_dim: int = 20  # the PyTorch VAE example's 784-400-20 network, our speed reference
    hidden_dims: tuple[int, ...] = (400,)  # one hidden layer, as in AEVB's MNIST runs
    activation: str = "relu"  # one of lvmkit.models.mlp.ACTIVATIONS
    likelihood: str = "bernoulli"  # one of LIKELIHOODS
    sigma: float = 1.0  # decoder σ for "gaussian_fixed" (σ = 1: identity covariance)
    min_scale: float = 1e-3  # floor on the learned σ of "gaussian": pixels that are exactly 0
    # would otherwise drive σ → 0 and the likelihood to +∞

    def __post_init__(self) -> None:
        check_int("data_dim", self.data_dim)
        check_int("latent_dim", self.latent_dim)
        object.__setattr__(self, "hidden_dims", check_sizes("hidden_dims", self.hidden_dims))
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("likelihood", self.likelihood, LIKELIHOODS)
        check_float("sigma", self.sigma)
        check_float("min_scale", self.min_scale)


class VAE(PyroModule):
    """Generative model p(x, z) = N(z; 0, I) p(x | f(z)) with an MLP decoder f.

    Called with data it scores them (``x`` observed); called with ``x=None`` it draws
    ``batch_size`` new points by ancestral sampling and returns them.

    Example::

        >>> import torch, lvmkit
        >>> model = lvmkit.VAE(lvmkit.VAEConfig(data_dim=4, latent_dim=2, hidden_dims=(8,)))
        >>> model(batch_size=3).shape
        torch.Size([3, 4])

    References: Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
    """

    static_structure = True  # same sites and shapes every call (compile=None may compile it)

    def __init__(self, config: VAEConfig) -> None:
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        heads = 2 if config.likelihood == "gaussian" else 1  # loc and raw scale, or one output
        self.decoder = mlp(
            config.latent_dim, config.hidden_dims, heads * config.data_dim, config.activation
        )
        # Buffers, so that `.to(device)` moves the prior with the module.
        self.register_buffer("prior_loc", torch.zeros(config.latent_dim))
        self.register_buffer("prior_scale", torch.ones(config.latent_dim))

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None):
        n = num_points_of(x, batch_size)
        with pyro.plate("data", n):
            prior = dist.Normal(self.prior_loc, self.prior_scale).to_event(1)
            z = pyro.sample("z", prior)  # batch (N,) event (Dz,)
            return pyro.sample("x", self.likelihood(z), obs=x)  # batch (N,) event (Dx,)

    def likelihood(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) as a distribution with event shape ``(data_dim,)``."""
        return decoder_likelihood(self.decoder(z), self.config)

    def validate_data(self, x: torch.Tensor | None = None, **_: object) -> None:
        """Raise ``ValueError`` when ``x`` cannot be scored by this model (called by ``fit``)."""
        check_data_matrix(x, self.config.data_dim, "VAE", "VAEConfig")
        assert x is not None
        if self.config.likelihood == "bernoulli":
            check_bernoulli_data(x)


def decoder_likelihood(out: torch.Tensor, cfg: VAEConfig) -> dist.TorchDistribution:
    """p(x | ·) from a decoder's output ``(..., heads · data_dim)`` under ``cfg``'s likelihood,
    event shape ``(data_dim,)``."""
    if cfg.likelihood == "bernoulli":
        return dist.Bernoulli(logits=out).to_event(1)
    if cfg.likelihood == "gaussian":
        loc, raw_scale = out.split(cfg.data_dim, dim=-1)  # (..., Dx) each
        return dist.Normal(loc, F.softplus(raw_scale) + cfg.min_scale).to_event(1)
    return dist.Normal(out, torch.full_like(out, cfg.sigma)).to_event(1)


def num_points_of(x: torch.Tensor | None, batch_size: int | None) -> int:
    """The points a model call covers: ``x``'s length, or ``batch_size`` when sampling."""
    if x is not None:
        if batch_size is not None and batch_size != x.shape[0]:
            raise ValueError(f"batch_size={batch_size} disagrees with x of length {x.shape[0]}")
        return x.shape[0]
    return 1 if batch_size is None else check_int("batch_size", batch_size)
