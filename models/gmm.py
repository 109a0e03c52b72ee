"""Finite Gaussian mixtures: Pr(x) = Σ_k λ_k N(x; μ_k, Σ_k), the seeds' first latent-variable model.

:class:`GaussianMixtureModel` is the Pyro model: the assignment y ~ Categorical(λ) is a discrete
latent marked for parallel enumeration, so ``TraceEnum_ELBO`` sums it out exactly and the ELBO
*is* the log-likelihood; λ, μ and Σ are point estimates (``PyroParam``s), fitted by gradient
ascent on that exact log-likelihood — the same objective EM climbs. ``lvmkit.evaluate`` sums the
enumerated y out as well, so the reported log p(x) is exact (no importance sampling needed).

The data plate knows the full data size (``GMMConfig.num_data``): a minibatch of n points out of
N is scaled by N / n, so minibatch SVI estimates the full-data objective without bias.

:class:`lvmkit.GaussianMixture` (in :mod:`lvmkit.estimators`) puts a scikit-learn face on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam

from lvmkit.base import check_choice, check_data_matrix, check_float, check_int

COVARIANCE_TYPES = ("full", "diag")


@dataclass(frozen=True)
class GMMConfig:
    """Shape of a :class:`GaussianMixtureModel`."""

    n_components: int
    data_dim: int
    covariance_type: str = "full"  # "full" (Σ_k any SPD matrix) or "diag"
    num_data: int | None = None  # full data size, so minibatches are scaled by N / n
    reg_covar: float = 1e-6  # added to the covariance diagonals, as in scikit-learn

    def __post_init__(self) -> None:
        check_int("n_components", self.n_components)
        check_int("data_dim", self.data_dim)
        check_choice("covariance_type", self.covariance_type, COVARIANCE_TYPES)
        if self.num_data is not None:
            check_int("num_data", self.num_data)
        check_float("reg_covar", self.reg_covar)


class GaussianMixtureModel(PyroModule):
    """p(x) = Σ_k λ_k N(x; μ_k, Σ_k) with y ~ Categorical(λ) enumerated.

    Called with data ``x`` of shape ``(n, D)`` it scores them; with ``x=None`` it draws
    ``batch_size`` points by ancestral sampling (y first, then x | y) and returns them.

    Example::

        >>> import torch, lvmkit
        >>> from lvmkit.models import GaussianMixtureModel, empty_guide
        >>> model = GaussianMixtureModel(lvmkit.GMMConfig(n_components=2, data_dim=3))
        >>> model(batch_size=5).shape
        torch.Size([5, 3])
        >>> lvmkit.evaluate(model, empty_guide, torch.zeros(4, 3), num_samples=1).shape[0]
        4
    """

    static_structure = False  # trained with TraceEnum_ELBO, whose Dice reads values on the host
    # PyroParams read back as constrained tensors
    logits: torch.Tensor
    locs: torch.Tensor
    scale_tril: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        config: GMMConfig,
        *,
        weights: torch.Tensor | None = None,
        means: torch.Tensor | None = None,
        covariances: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        k, d = config.n_components, config.data_dim
        weights = torch.full((k,), 1.0 / k) if weights is None else torch.as_tensor(weights)
        means = torch.randn(k, d) if means is None else torch.as_tensor(means)
        self.logits = PyroParam(weights.float().clamp_min(1e-12).log())  # type: ignore[assignment]
        self.locs = PyroParam(means.float().clone())  # type: ignore[assignment]
        reg = config.reg_covar
        if config.covariance_type == "full":
            cov = torch.eye(d).expand(k, d, d) if covariances is None else covariances
            # Σ = LLᵀ + reg·I: L from Σ − reg·I, its eigenvalues floored so that a singular
            # starting covariance (a cluster on a line, repeated points) still factorizes
            values, vectors = torch.linalg.eigh(torch.as_tensor(cov).double() - reg * torch.eye(d))
            floor = 1e-6 * max(1.0, float(values.abs().max()))
            cov = vectors @ torch.diag_embed(values.clamp_min(floor)) @ vectors.transpose(-1, -2)
            tril = torch.linalg.cholesky(cov).float()
            self.scale_tril = PyroParam(  # type: ignore[assignment]
                tril, constraint=dist.constraints.lower_cholesky
            )
        else:
            var = torch.ones(k, d) if covariances is None else torch.as_tensor(covariances)
            self.scales = PyroParam(  # type: ignore[assignment]
                (var.float() - reg).clamp_min(1e-12).sqrt(), constraint=dist.constraints.positive
            )

    # -- the parameters in scikit-learn's terms -------------------------------------------------

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)

    def covariances(self) -> torch.Tensor:
        """Σ_k, shape (K, D, D) for "full", (K, D) variances for "diag"."""
        reg = self.config.reg_covar
        if self.config.covariance_type == "full":
            tril = self.scale_tril
            eye = torch.eye(tril.shape[-1], device=tril.device, dtype=tril.dtype)
            return tril @ tril.transpose(-1, -2) + reg * eye
        return self.scales**2 + reg

    # -- the model --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None):
        n = x.shape[0] if x is not None else (1 if batch_size is None else batch_size)
        total = self.config.num_data
        subsample = None
        if x is not None and total is not None and n != total:
            subsample = torch.arange(n, device=self.locs.device)  # scale by N / n, draw nothing
        cov = self.covariances()
        full = self.config.covariance_type == "full"
        scale = torch.linalg.cholesky(cov) if full else cov.sqrt()
        with pyro.plate("data", total if subsample is not None else n, subsample=subsample):
            y = pyro.sample(
                "y", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"}
            )
            component = (
                dist.MultivariateNormal(self.locs[y], scale_tril=scale[y])
                if full
                else dist.Normal(self.locs[y], scale[y]).to_event(1)
            )
            return pyro.sample("x", component, obs=x)

    def validate_data(self, x: torch.Tensor | None = None, **_: object) -> None:
        """Raise when ``x`` cannot be scored by this mixture (called by ``fit``/``evaluate``)."""
        check_data_matrix(x, self.config.data_dim, "Gaussian mixture", "GMMConfig")


def empty_guide(*args: Any, **kwargs: Any) -> None:
    """The guide of a model whose only latent is enumerated: nothing to propose."""
