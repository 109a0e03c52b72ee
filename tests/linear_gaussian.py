"""Factor analysis, a model whose marginal likelihood and posterior are known in closed form.

z ~ N(0, I_k), x | z ~ N(W z + b, ψ I_d)  ⇒  p(x) = N(x; b, W Wᵀ + ψ I),
p(z | x) = N(A (x − b), Σ) with Σ = (I + Wᵀ W / ψ)⁻¹ and A = Σ Wᵀ / ψ.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn


class FactorAnalysis(PyroModule):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, noise: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())  # (D, Dz)
        self.bias = nn.Parameter(bias.clone())  # (D,)
        self.noise = noise  # ψ, fixed

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else (batch_size or 1)
        dz = self.weight.shape[1]
        with pyro.plate("data", n):
            z = pyro.sample(
                "z", dist.Normal(torch.zeros(dz), 1.0).to_event(1)
            )  # batch (N,) event (Dz,)
            loc = z @ self.weight.T + self.bias  # (..., N, D)
            return pyro.sample(
                "x", dist.Normal(loc, self.noise**0.5).to_event(1), obs=x
            )  # batch (N,) event (D,)

    def exact_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.detach(), self.bias.detach()
        cov = w @ w.T + self.noise * torch.eye(w.shape[0])
        return dist.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)

    def exact_posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(A, Σ)``: posterior mean A (x − b) and covariance Σ."""
        w = self.weight.detach()
        sigma = torch.linalg.inv(torch.eye(w.shape[1]) + w.T @ w / self.noise)
        return sigma @ w.T / self.noise, sigma


class LinearGaussianGuide(PyroModule):
    """q(z | x) = N(A (x − b), Σ) with learnable A, b and a Cholesky factor of Σ."""

    def __init__(self, data_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.zeros(latent_dim, data_dim))
        self.center = nn.Parameter(torch.zeros(data_dim))
        self.scale_tril = PyroParam(torch.eye(latent_dim), dist.constraints.lower_cholesky)

    def forward(self, x=None, *, batch_size=None):
        loc = (x - self.center) @ self.proj.T  # (N, Dz)
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z", dist.MultivariateNormal(loc, scale_tril=self.scale_tril)
            )  # batch (N,) event (Dz,)

    def set_exact(self, model: FactorAnalysis) -> LinearGaussianGuide:
        proj, sigma = model.exact_posterior()
        with torch.no_grad():
            self.proj.copy_(proj)
            self.center.copy_(model.bias.detach())
        self.scale_tril = PyroParam(torch.linalg.cholesky(sigma), dist.constraints.lower_cholesky)
        return self


def make_problem(
    seed: int = 0, data_dim: int = 5, latent_dim: int = 2, n: int = 200, noise: float = 0.3
):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(data_dim, latent_dim, generator=gen)
    bias = torch.randn(data_dim, generator=gen)
    model = FactorAnalysis(weight, bias, noise)
    z = torch.randn(n, latent_dim, generator=gen)
    x = z @ weight.T + bias + noise**0.5 * torch.randn(n, data_dim, generator=gen)
    return model, x
