"""Conditional VAE (Sohn, Lee & Yan, NeurIPS 2015; seed 003) and its deterministic baseline.

The model predicts an output x from a condition c through a latent z:

    p(z | c) = N(μ_p(c), diag σ_p²(c))        (the prior network)
    p(x | z, c) = Bernoulli(sigmoid(g(z, c)))  (the generation network)

and its guide (:class:`lvmkit.guides.ConditionalEncoder`) is the recognition network
q(z | x, c). Entries of x can be left out of the likelihood with a boolean ``mask`` (True =
scored): the quadrant-completion task scores only the quadrants that were not given. The
baseline (:class:`ConditionalBaseline`) is the same generation network without z,
p(x | c) = Bernoulli(sigmoid(h(c))), trained by the same ``fit`` with an empty guide; its
log-likelihood is exact, the CVAE's is estimated by importance sampling with ``evaluate``.

Data are dicts: ``{"x": outputs (N, data_dim), "c": conditions (N, cond_dim), "mask": (N,
data_dim) bool}`` (``mask`` optional); :func:`lvmkit.datasets.quadrants` builds the MNIST task.
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
    check_int,
    check_sizes,
)
from lvmkit.models.mlp import ACTIVATIONS, mlp


@dataclass(frozen=True)
class CVAEConfig:
    """Sizes of a :class:`CVAE`, its guide and its baseline (defaults: Pyro's CVAE example)."""

    data_dim: int  # outputs x per point (784: the whole image, masked to the hidden quadrants)
    cond_dim: int  # conditions c per point (784: the image with hidden quadrants set to -1)
    latent_dim: int = 200
    hidden_dims: tuple[int, ...] = (500, 500)
    activation: str = "relu"

    def __post_init__(self) -> None:
        check_int("data_dim", self.data_dim)
        check_int("cond_dim", self.cond_dim)
        check_int("latent_dim", self.latent_dim)
        object.__setattr__(self, "hidden_dims", check_sizes("hidden_dims", self.hidden_dims))
        check_choice("activation", self.activation, ACTIVATIONS)


class _Conditional(PyroModule):
    """What the CVAE and the baseline share: data checks and the masked Bernoulli likelihood."""

    static_structure = True
    config: CVAEConfig

    def validate_data(self, x=None, c=None, mask=None, **_: object) -> None:
        cfg = self.config
        name = type(self).__name__
        check_data_matrix(c, cfg.cond_dim, name, "CVAEConfig.cond_dim: CVAEConfig", key="c")
        if x is not None:
            check_data_matrix(x, cfg.data_dim, name, "CVAEConfig")
            check_bernoulli_data(x)
        if mask is not None and (
            not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool
            or mask.shape != (len(c), cfg.data_dim)
        ):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else mask
            raise ValueError(f"mask must be a bool tensor of shape (N, {cfg.data_dim}); got {got}")

    @staticmethod
    def _likelihood(logits: torch.Tensor, mask: torch.Tensor | None):
        base = dist.Bernoulli(logits=logits)
        return (base.mask(mask) if mask is not None else base).to_event(1)


class CVAE(_Conditional):
    """p(x, z | c) = p(z | c) p(x | z, c); called with ``x=None`` it samples outputs for ``c``.

    Example::

        >>> import torch, lvmkit
        >>> cfg = lvmkit.CVAEConfig(data_dim=4, cond_dim=4, latent_dim=2, hidden_dims=(8,))
        >>> model, guide = lvmkit.build_cvae(cfg)
        >>> model(c=torch.zeros(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(self, config: CVAEConfig) -> None:
        if not isinstance(config, CVAEConfig):
            raise TypeError(f"config must be a CVAEConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        h, act = config.hidden_dims, config.activation
        self.prior_net = mlp(config.cond_dim, h, 2 * config.latent_dim, act)
        self.generation_net = mlp(config.latent_dim + config.cond_dim, h, config.data_dim, act)

    def prior(self, c: torch.Tensor) -> dist.TorchDistribution:
        loc, raw = self.prior_net(c).split(self.config.latent_dim, dim=-1)
        return dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1)

    def forward(self, x=None, *, c: torch.Tensor, mask: torch.Tensor | None = None):
        with pyro.plate("data", c.shape[0]):
            z = pyro.sample("z", self.prior(c))  # batch (N,) event (Dz,)
            c_b = c.expand(*z.shape[:-1], c.shape[-1])  # particle/enumeration dims of z
            logits = self.generation_net(torch.cat([z, c_b], dim=-1))
            return pyro.sample("x", self._likelihood(logits, mask), obs=x)  # batch (N,) event (Dx,)


class ConditionalBaseline(_Conditional):
    """The deterministic network p(x | c) = Bernoulli(sigmoid(h(c))), no latent (Sohn et al.'s
    baseline); train it with :func:`lvmkit.models.empty_guide`."""

    def __init__(self, config: CVAEConfig) -> None:
        if not isinstance(config, CVAEConfig):
            raise TypeError(f"config must be a CVAEConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.net = mlp(config.cond_dim, config.hidden_dims, config.data_dim, config.activation)

    def forward(self, x=None, *, c: torch.Tensor, mask: torch.Tensor | None = None):
        with pyro.plate("data", c.shape[0]):
            return pyro.sample(
                "x", self._likelihood(self.net(c), mask), obs=x
            )  # batch (N,) event (Dx,)
