"""The point-mass encoder q(z | x) = δ(z − f(x)) of the deterministic autoencoders."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch.func import functional_call
from torch.nn import functional as F

from lvmkit.models.autoencoder import AutoencoderConfig
from lvmkit.models.mlp import mlp


class DeterministicEncoder(PyroModule):
    """q(z | x) = δ(z − f(x)) with an MLP f, plus the training-time corruption or penalty of
    ``config.kind`` (see the module docstring)."""

    static_structure = False

    def __init__(self, config: AutoencoderConfig) -> None:
        if not isinstance(config, AutoencoderConfig):
            raise TypeError(f"config must be an AutoencoderConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        v = config.vae
        self.net = mlp(v.data_dim, v.hidden_dims, v.latent_dim, v.activation)
        if config.kind == "aae":
            self.adversary = mlp(v.latent_dim, config.adversary_hidden, 1, "relu")
            self.adversary_lr = config.adversary_lr

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code f(x), shape ``(N, latent_dim)``."""
        return self.net(x)

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None):
        if x is None:
            raise ValueError(
                "DeterministicEncoder needs data: call guide(x) with x of shape (N, D)"
            )
        cfg = self.config
        inputs = x
        if self.training and cfg.kind == "dae" and cfg.corruption > 0:
            inputs = x * (torch.rand_like(x) >= cfg.corruption).to(x.dtype)
        code = self.encode(inputs)
        with pyro.plate("data", x.shape[0]):
            if self.training and cfg.kind == "cae" and cfg.contraction > 0:
                penalty = cfg.contraction * self.jacobian_norm2(x)  # (N,)
                pyro.factor("contractive_penalty", penalty, has_rsample=True)
            if self.training and cfg.kind == "aae":
                adversarial = cfg.adversarial_weight * self._adversarial_losses(code)  # (N,)
                pyro.factor("adversarial_loss", adversarial, has_rsample=True)
            return pyro.sample("z", dist.Delta(code, event_dim=1))  # batch (N,) event (Dz,)

    def jacobian_norm2(self, x: torch.Tensor) -> torch.Tensor:
        """‖∂f(x)/∂x‖²_F per point, shape ``(N,)``, differentiable in the encoder's weights: one
        backward pass per latent unit (each point's code depends on its own row only, so the
        gradient of a unit's sum over points gives every point's Jacobian row at once).
        ``torch.func.jacrev`` would batch these passes, but it refuses to run under the
        saved-tensor hooks with which ``fit`` measures a step's memory."""
        if not torch.is_grad_enabled():  # e.g. a no-grad diagnosis pass: the value alone
            with torch.enable_grad():
                return self.jacobian_norm2(x).detach()
        inputs = x.detach().requires_grad_(True)
        code = self.net(inputs)  # (N, Dz)
        total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for unit in range(code.shape[-1]):
            (row,) = torch.autograd.grad(code[:, unit].sum(), inputs, create_graph=True)
            total = total + row.pow(2).sum(dim=-1)
        return total

    def _adversarial_losses(self, code: torch.Tensor) -> torch.Tensor:
        """Per point: the discriminator's loss (prior draws real, codes fake; codes detached)
        plus the encoder's (codes called real by a discriminator whose weights are detached)."""
        prior_draw = torch.randn_like(code)
        real = self.adversary(prior_draw).squeeze(-1)
        fake = self.adversary(code.detach()).squeeze(-1)
        d_loss = F.binary_cross_entropy_with_logits(
            real, torch.ones_like(real), reduction="none"
        ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake), reduction="none")
        frozen = {name: p.detach() for name, p in self.adversary.named_parameters()}
        fooled = functional_call(self.adversary, frozen, (code,)).squeeze(-1)
        g_loss = F.binary_cross_entropy_with_logits(
            fooled, torch.ones_like(fooled), reduction="none"
        )
        return d_loss + g_loss
