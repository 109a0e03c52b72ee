"""The VampPrior (Tomczak & Welling, "VAE with a VampPrior", AISTATS 2018): the VAE's prior
replaced by the mixture of the encoder's own posteriors at K learned pseudo-inputs,

    p(z) = (1/K) Σ_k q(z | u_k),

the prior that maximises the ELBO when the u_k are the training data (the aggregate posterior),
approximated with K ≪ N learned inputs (the paper: K = 500 on MNIST; u_k kept in [0, 1] by a
hard-tanh, as there). The model holds the encoder it shares with the guide, so one set of
encoder weights serves q(z | x) in the guide and the mixture in the model (both register the same
tensors; ``fit`` trains them once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from lvmkit.base import check_int
from lvmkit.models.vae import VAE, VAEConfig, num_points_of


class VampPrior(nn.Module):
    """p(z) = (1/K) Σ_k q(z | u_k) for an ``encoder`` with ``encode(x) -> (loc, scale)`` (the
    guide's :class:`lvmkit.GaussianEncoder`, say) and K learned pseudo-inputs."""

    def __init__(self, encoder: nn.Module, data_dim: int, num_pseudo: int = 500) -> None:
        super().__init__()
        if not callable(getattr(encoder, "encode", None)):
            raise TypeError(
                f"encoder must have encode(x) -> (loc, scale); got {type(encoder).__name__}"
            )
        check_int("num_pseudo", num_pseudo)
        self.encoder = encoder
        # the paper's initialisation, N(0.05, 0.01²), mapped into [0, 1] by the hard-tanh
        self.pseudo_raw = nn.Parameter(0.05 + 0.01 * torch.randn(num_pseudo, data_dim))

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """u_1 … u_K, each in [0, 1]: ``(K, data_dim)``."""
        return F.hardtanh(self.pseudo_raw, 0.0, 1.0)

    def distribution(self) -> dist.MixtureSameFamily:
        """The mixture, batch shape ``()``, event shape ``(latent_dim,)``."""
        encode = cast(
            Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], self.encoder.encode
        )
        loc, scale = encode(self.pseudo_inputs)  # (K, Dz) each
        components = dist.Normal(loc, scale).to_event(1)
        weights = dist.Categorical(logits=torch.zeros(loc.shape[0], device=loc.device))
        return dist.MixtureSameFamily(weights, components)


class VampVAE(VAE):
    """:class:`lvmkit.VAE` with a :class:`VampPrior` over z (see the module docstring); built
    with its guide by :func:`lvmkit.build_vamp_vae`.

    Example::

        >>> import lvmkit
        >>> model, guide = lvmkit.build_vamp_vae(
        ...     lvmkit.VAEConfig(data_dim=4, latent_dim=2, hidden_dims=(8,)), num_pseudo=3)
        >>> model.prior.encoder is guide, model(batch_size=5).shape
        (True, torch.Size([5, 4]))

    References: Tomczak & Welling, "VAE with a VampPrior", AISTATS 2018.
    """

    def __init__(self, config: VAEConfig, prior: VampPrior) -> None:
        super().__init__(config)
        if not isinstance(prior, VampPrior):
            raise TypeError(f"prior must be a VampPrior; got {type(prior).__name__}")
        self.prior = prior

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None):
        n = num_points_of(x, batch_size)
        mixture = self.prior.distribution()
        with pyro.plate("data", n):
            z = pyro.sample("z", mixture)  # batch (N,) event (Dz,)
            return pyro.sample("x", self.likelihood(z), obs=x)  # batch (N,) event (Dx,)


__all__ = ["VampPrior", "VampVAE"]
