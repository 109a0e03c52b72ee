"""The CVAE's recognition network q(z | x, c) = N(μ(x, c), diag σ²(x, c))."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from lvmkit.models.cvae import CVAEConfig
from lvmkit.models.mlp import mlp


class ConditionalEncoder(PyroModule):
    """Guide for :class:`lvmkit.models.CVAE`, with its signature ``(x, *, c, mask=None)``.

    The output enters with its unscored entries (``mask`` False) zeroed, so the encoder sees only
    what the model scores. References: Sohn, Lee & Yan, NeurIPS 2015.
    """

    static_structure = True

    def __init__(self, config: CVAEConfig) -> None:
        if not isinstance(config, CVAEConfig):
            raise TypeError(f"config must be a CVAEConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.net = mlp(
            config.data_dim + config.cond_dim,
            config.hidden_dims,
            2 * config.latent_dim,
            config.activation,
        )

    def forward(self, x=None, *, c: torch.Tensor, mask: torch.Tensor | None = None):
        if x is None:
            raise ValueError("ConditionalEncoder needs the outputs x (and conditions c)")
        seen = x if mask is None else x * mask.to(x.dtype)
        loc, log_var = self.net(torch.cat([seen, c], dim=-1)).split(self.config.latent_dim, -1)
        with pyro.plate("data", c.shape[0]):
            posterior = dist.Normal(loc, torch.exp(0.5 * log_var)).to_event(1)
            return pyro.sample("z", posterior)  # batch (N,) event (Dz,)
