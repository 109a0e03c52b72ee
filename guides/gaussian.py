"""Gaussian encoder q(z | x) = N(μ(x), diag σ²(x)), reparameterized."""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from lvmkit.base import check_choice, check_int, check_sizes
from lvmkit.models.mlp import ACTIVATIONS, mlp


@dataclass(frozen=True)
class GaussianEncoderConfig:
    """Sizes of a :class:`GaussianEncoder`; ``data_dim`` comes from the data."""

    data_dim: int  # features per data point
    latent_dim: int = 20  # must equal the model's latent_dim
    hidden_dims: tuple[int, ...] = (400,)  # mirrors the default decoder
    activation: str = "relu"  # one of lvmkit.models.mlp.ACTIVATIONS

    def __post_init__(self) -> None:
        check_int("data_dim", self.data_dim)
        check_int("latent_dim", self.latent_dim)
        object.__setattr__(self, "hidden_dims", check_sizes("hidden_dims", self.hidden_dims))
        check_choice("activation", self.activation, ACTIVATIONS)


class GaussianEncoder(PyroModule):
    """Amortized guide q(z | x) = N(μ(x), diag exp(log σ²(x))) for the site ``"z"``.

    It has the model's signature ``(x=None, *, batch_size=None)``; ``batch_size`` is ignored
    because the guide always conditions on ``x``.

    Example::

        >>> import torch, lvmkit
        >>> guide = lvmkit.GaussianEncoder(lvmkit.GaussianEncoderConfig(data_dim=4, latent_dim=2))
        >>> loc, scale = guide.encode(torch.zeros(3, 4))
        >>> loc.shape, bool((scale > 0).all())
        (torch.Size([3, 2]), True)

    References: Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014 (appendix C.2).
    """

    static_structure = True  # same sites and shapes every call (compile=None may compile it)

    def __init__(self, config: GaussianEncoderConfig) -> None:
        if not isinstance(config, GaussianEncoderConfig):
            raise TypeError(f"config must be a GaussianEncoderConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        # One network with two heads: loc and log-variance, as in the AEVB appendix.
        self.net = mlp(
            config.data_dim, config.hidden_dims, 2 * config.latent_dim, config.activation
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the posterior's ``(loc, scale)``, each of shape ``(N, latent_dim)``."""
        loc, log_var = self.net(x).split(self.config.latent_dim, dim=-1)  # (N, Dz) each
        return loc, torch.exp(0.5 * log_var)

    def forward(
        self, x: torch.Tensor | None = None, *, batch_size: int | None = None
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("GaussianEncoder needs data: call guide(x) with x of shape (N, D)")
        loc, scale = self.encode(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))  # batch (N,) event (Dz,)
