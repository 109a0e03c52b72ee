"""Categorical encoder q(y | x) = Categorical(softmax(f(x))): an amortized guide for a discrete
latent, e.g. the assignment of a Gaussian mixture, trained with Trace_ELBO's score-function
estimator (its gradient through a discrete sample has no reparameterization)."""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from lvmkit.base import check_choice, check_int, check_sizes
from lvmkit.models.mlp import ACTIVATIONS, mlp


@dataclass(frozen=True)
class CategoricalEncoderConfig:
    """Sizes of a :class:`CategoricalEncoder`."""

    data_dim: int
    n_categories: int  # the model's number of components
    hidden_dims: tuple[int, ...] = (32,)
    activation: str = "relu"
    site: str = "y"  # the model's discrete sample site
    num_data: int | None = None  # as the model's: the data plate must scale alike

    def __post_init__(self) -> None:
        check_int("data_dim", self.data_dim)
        check_int("n_categories", self.n_categories)
        object.__setattr__(self, "hidden_dims", check_sizes("hidden_dims", self.hidden_dims))
        check_choice("activation", self.activation, ACTIVATIONS)
        if not isinstance(self.site, str) or not self.site:
            raise TypeError(f"site must be a non-empty str; got {self.site!r}")
        if self.num_data is not None:
            check_int("num_data", self.num_data)


class CategoricalEncoder(PyroModule):
    """Amortized guide q(y | x) for the discrete site ``config.site``.

    Example::

        >>> import torch
        >>> from lvmkit.guides import CategoricalEncoder, CategoricalEncoderConfig
        >>> guide = CategoricalEncoder(CategoricalEncoderConfig(data_dim=2, n_categories=3))
        >>> guide.probs(torch.zeros(4, 2)).shape
        torch.Size([4, 3])
    """

    static_structure = True

    def __init__(self, config: CategoricalEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.net = mlp(config.data_dim, config.hidden_dims, config.n_categories, config.activation)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """q(y = k | x_n), shape (n, K)."""
        return torch.softmax(self.net(x), dim=-1)

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None):
        if x is None:
            raise ValueError("CategoricalEncoder needs data: call guide(x) with x of shape (N, D)")
        n, total = x.shape[0], self.config.num_data
        subsample = torch.arange(n, device=x.device) if total is not None and n != total else None
        with pyro.plate("data", total if subsample is not None else n, subsample=subsample):
            return pyro.sample(self.config.site, dist.Categorical(logits=self.net(x)))
