"""The Hamiltonian VAE's posterior (Caterini, Doucet & Sejdinovic, "Hamiltonian Variational
Auto-Encoder", NeurIPS 2018): the Gaussian encoder's draw z₀ ~ N(μ(x), σ(x)²) with a momentum
ρ₀ = γ₀ / √β₀, γ₀ ~ N(0, I), moved by K leapfrog steps of the dynamics whose potential is the
model's U(z) = −log p(x, z), with quadratic tempering after each step:

    ρ̃ = ρ_{k−1} − (ε/2) ⊙ ∇U(z_{k−1}),   z_k = z_{k−1} + ε ⊙ ρ̃,   ρ' = ρ̃ − (ε/2) ⊙ ∇U(z_k),
    ρ_k = (√β_{k−1} / √β_k) ρ',   1/√β_k = (1 − 1/√β₀) k²/K² + 1/√β₀   (so β_K = 1).

Leapfrog steps keep volume and the tempering scales ρ by √β₀ in all, so the density of
(z_K, ρ_K) is exact:

    log q(z_K, ρ_K | x) = log N(z₀; μ(x), σ(x)²) + log N(γ₀; 0, I),

and the draw is reparameterized: the ELBO's gradient reaches μ, σ, the step sizes ε (one per
coordinate) and β₀ through the dynamics — and the decoder, through ∇U. The density at a point the
guide did not draw (AIS needs it) runs the dynamics backwards. The guide needs log p(x, z) from the
model: ``log_joint`` (:meth:`lvmkit.HamiltonianVAE.log_joint`; :func:`lvmkit.build_hvae` wires it).

pythae's ``HVAE`` (0.1.2), for comparison, moves z with the momentum before its half step
(``z + ε ρ`` where the leapfrog has ``z + ε ρ̃``), drops the tempering it computes, and scores
log q(z₀ | x) as −½ Σ log σ² with σ = softplus(log σ²) in the draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule
from torch import nn

from lvmkit.base import check_int
from lvmkit.guides.gaussian import GaussianEncoder, GaussianEncoderConfig

LogJoint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class HamiltonianFlow(dist.TorchDistribution):
    """q(z_K, ρ_K | x) of the module docstring: batch ``loc``'s leading shape, event
    ``(2 · latent_dim,)`` (z_K then ρ_K). ``log_prob`` of a value ``rsample`` just returned is
    the one computed on the way; of any other value, by running the dynamics backwards."""

    arg_constraints: dict[str, constraints.Constraint] = {}  # noqa: RUF012 (torch's)
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        x: torch.Tensor,
        loc: torch.Tensor,
        scale: torch.Tensor,
        log_joint: LogJoint,
        step_size: torch.Tensor,
        beta0: torch.Tensor,
        num_steps: int,
        validate_args: bool | None = None,
    ) -> None:
        self.x, self.loc, self.scale, self.log_joint = x, loc, scale, log_joint
        self.step_size, self.beta0, self.num_steps = step_size, beta0, num_steps
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (value, its log q)
        d = loc.shape[-1]
        super().__init__(loc.shape[:-1], torch.Size((2 * d,)), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> HamiltonianFlow:
        shape = torch.Size(batch_shape) + self.loc.shape[-1:]
        return HamiltonianFlow(
            self.x, self.loc.expand(shape), self.scale.expand(shape), self.log_joint,
            self.step_size, self.beta0, self.num_steps,
        )  # fmt: skip

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        z0 = dist.Normal(self.loc, self.scale).rsample(sample_shape)  # (the VAE's draw)
        gamma = torch.randn(z0.shape, dtype=z0.dtype, device=z0.device)
        z, rho = self._forward(z0, gamma / self._sqrt_beta(0))
        value = torch.cat([z, rho], dim=-1)
        self._last = (value, self._log_q(z0, gamma))
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._last is not None and value is self._last[0]:
            return self._last[1]
        z, rho = value.split(self.loc.shape[-1], dim=-1)
        z0, rho0 = self._backward(z, rho)
        return self._log_q(z0, rho0 * self._sqrt_beta(0))

    def _log_q(self, z0: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        base = dist.Normal(self.loc, self.scale).log_prob(z0).sum(-1)
        return base - 0.5 * (gamma.square() + math.log(2 * math.pi)).sum(-1)

    def _sqrt_beta(self, k: int) -> torch.Tensor:
        if self.num_steps == 0:  # no step to temper back to β = 1: the momentum starts there
            return torch.ones_like(self.beta0)
        inverse = 1 / torch.sqrt(self.beta0)
        return 1 / ((1 - inverse) * (k / self.num_steps) ** 2 + inverse)

    def _grad_potential(self, z: torch.Tensor) -> torch.Tensor:
        """∇U(z) = −∇_z log p(x, z), differentiable where the caller is (training); detached
        where it is not (evaluation under ``torch.no_grad``)."""
        through = torch.is_grad_enabled() and z.requires_grad
        with torch.enable_grad():
            at = z if through else z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(
                self.log_joint(self.x, at).sum(), at, create_graph=through
            )
        return -grad

    def _forward(self, z: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps, grad = self.step_size, self._grad_potential(z)
        for k in range(1, self.num_steps + 1):
            rho = rho - 0.5 * eps * grad
            z = z + eps * rho
            grad = self._grad_potential(z)
            rho = (rho - 0.5 * eps * grad) * (self._sqrt_beta(k - 1) / self._sqrt_beta(k))
        return z, rho

    def _backward(self, z: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps, grad = self.step_size, self._grad_potential(z)
        for k in range(self.num_steps, 0, -1):
            rho = rho * (self._sqrt_beta(k) / self._sqrt_beta(k - 1)) + 0.5 * eps * grad
            z = z - eps * rho
            grad = self._grad_potential(z)
            rho = rho + 0.5 * eps * grad
        return z, rho


class HamiltonianEncoder(PyroModule):
    """q(z, ρ | x) of the Hamiltonian VAE (see the module docstring) for the site ``"z"`` of a
    :class:`lvmkit.HamiltonianVAE`: a :class:`lvmkit.GaussianEncoder` and ``num_steps``
    tempered leapfrog steps on the model's ``log_joint(x, z)``. ``step_size`` (ε, one per
    coordinate, initial value) and ``beta0`` (β₀ in (0, 1), initial value) are learned unless
    ``learn_step_size`` / ``learn_beta0`` is False. ``num_steps=0`` is the Gaussian encoder with
    an independent N(0, I) momentum.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_hvae(
        ...     lvmkit.VAEConfig(data_dim=4, latent_dim=3, hidden_dims=(8,)), num_steps=2)
        >>> guide.posterior(torch.zeros(5, 4)).rsample().shape
        torch.Size([5, 6])
    """

    def __init__(
        self,
        config: GaussianEncoderConfig,
        log_joint: LogJoint,
        *,
        num_steps: int = 4,
        step_size: float = 0.01,
        beta0: float = 0.3,
        learn_step_size: bool = True,
        learn_beta0: bool = True,
    ) -> None:
        if not isinstance(config, GaussianEncoderConfig):
            raise TypeError(f"config must be a GaussianEncoderConfig; got {type(config).__name__}")
        if not callable(log_joint):
            raise TypeError(
                f"log_joint must be a callable log p(x, z) (a HamiltonianVAE's log_joint); "
                f"got {type(log_joint).__name__}"
            )
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0; got {step_size}")
        if not 0 < beta0 < 1:
            raise ValueError(f"beta0 must be in (0, 1); got {beta0}")
        super().__init__()
        self.config = config
        self.num_steps = check_int("num_steps", num_steps, minimum=0)
        self.base = GaussianEncoder(config)
        self.log_joint = log_joint  # (a function, not a module: the model registers its decoder)
        log_step = torch.full((config.latent_dim,), math.log(step_size))
        logit_beta0 = torch.tensor(math.log(beta0 / (1 - beta0)))
        if learn_step_size:
            self.log_step_size = nn.Parameter(log_step)
        else:
            self.register_buffer("log_step_size", log_step)
        if learn_beta0:
            self.logit_beta0 = nn.Parameter(logit_beta0)
        else:
            self.register_buffer("logit_beta0", logit_beta0)

    @property
    def step_size(self) -> torch.Tensor:
        """ε, one per latent coordinate."""
        return self.log_step_size.exp()

    @property
    def beta0(self) -> torch.Tensor:
        """β₀, the initial inverse temperature, in (0, 1)."""
        return torch.sigmoid(self.logit_beta0)

    def posterior(self, x: torch.Tensor) -> HamiltonianFlow:
        """q(z, ρ | x), batch ``(N,)``, event ``(2 · latent_dim,)``."""
        loc, scale = self.base.encode(x)
        return HamiltonianFlow(
            x, loc, scale, self.log_joint, self.step_size, self.beta0, self.num_steps
        )

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None):
        if x is None:
            raise ValueError("HamiltonianEncoder needs data: call guide(x) with x of shape (N, D)")
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(x))  # batch (N,) event (2 Dz,)


__all__ = ["HamiltonianEncoder", "HamiltonianFlow"]
