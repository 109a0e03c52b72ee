"""The VQ-VAE's guide: a point mass on the nearest codes of an encoder's output, with the
straight-through gradient, and the codebook's training terms (see :mod:`lvmkit.models.vqvae`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from lvmkit.models.mlp import mlp
from lvmkit.models.vqvae import Codebook, VQVAEConfig


@dataclass(frozen=True)
class CodebookUsage:
    """How a guide uses its codebook on some data: the times each code was chosen (over every
    point and position), how many codes were chosen at all, and the perplexity of the choices,
    exp(entropy) — K when every code is used equally, 1 when one code takes everything. Dead
    codes (never chosen) are the VQ-VAE's form of posterior collapse."""

    counts: np.ndarray  # (K,)
    used: int
    perplexity: float

    @property
    def total(self) -> int:
        return len(self.counts)


class VQEncoder(PyroModule):
    """q(z | x) = δ(z − e_c(x)), c(x) the nearest codes of an MLP encoder's output z_e(x) at each
    of L positions; the value passed on is z_e + sg[e_c − z_e] (straight-through). In training
    mode it adds β‖z_e − sg[e]‖² (and, without moving averages, ‖sg[z_e] − e‖²) per point as a
    factor, and moves a moving-average codebook towards the outputs the previous training pass
    assigned to each code (at the start of this one: within a step the codebook stands still,
    so that the model's prior finds the codes the guide chose).

    Example::

        >>> import torch, lvmkit
        >>> cfg = lvmkit.VQVAEConfig(lvmkit.VAEConfig(data_dim=4, latent_dim=6, hidden_dims=(8,)),
        ...                          positions=3, num_codes=5)
        >>> model, guide = lvmkit.build_vqvae(cfg)
        >>> guide.codes(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
        >>> guide.usage(torch.zeros(2, 4)).total
        5
    """

    def __init__(self, config: VQVAEConfig, codebook: Codebook) -> None:
        if not isinstance(config, VQVAEConfig):
            raise TypeError(f"config must be a VQVAEConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.static_structure = not config.ema
        v = config.vae
        self.net = mlp(v.data_dim, tuple(reversed(v.hidden_dims)), v.latent_dim, v.activation)
        self.codebook = codebook

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z_e(x): ``(..., data_dim)`` → ``(..., L, D)``."""
        cfg = self.config
        return self.net(x).reshape(*x.shape[:-1], cfg.positions, cfg.code_dim)

    def codes(self, x: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
        """The code index at each position, ``(N, L)``, on the codebook's device (``x`` goes
        there ``chunk`` points at a time)."""
        device = self.codebook.embeddings.device
        with torch.no_grad():
            parts = [
                self.codebook.nearest(self.encode(x[start : start + chunk].to(device)))
                for start in range(0, x.shape[0], chunk)
            ]
        return torch.cat(parts)

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None):
        if x is None:
            raise ValueError("VQEncoder needs data: call guide(x) with x of shape (N, D)")
        cfg = self.config
        codebook = self.codebook
        if self.training and cfg.ema:
            codebook.apply_staged(cfg.decay, cfg.epsilon)  # the previous pass's assignments
        z_e = self.encode(x)  # (N, L, D)
        index = codebook.nearest(z_e.detach())  # (N, L)
        e = codebook.embeddings[index]  # (N, L, D)
        with pyro.plate("data", x.shape[0]):
            if self.training:
                loss = cfg.beta * (z_e - e.detach()).pow(2).sum((-2, -1))  # commitment
                if cfg.ema:
                    codebook.stage(z_e.detach(), index)  # applied at the next training pass
                else:
                    loss = loss + (z_e.detach() - e).pow(2).sum((-2, -1))  # the codebook's
                pyro.factor("vq_loss", loss, has_rsample=True)
            z = z_e + (e - z_e).detach()  # straight-through: e's value, z_e's gradient
            return pyro.sample("z", dist.Delta(z, event_dim=2))  # batch (N,) event (L, D)

    def usage(self, x: torch.Tensor) -> CodebookUsage:
        """Which codes the encoder chooses on ``x`` (:class:`CodebookUsage`)."""
        index = self.codes(x).reshape(-1).cpu()
        counts = torch.bincount(index, minlength=self.codebook.num_codes)
        freq = counts.double() / max(1, int(counts.sum()))
        entropy = -float((freq[freq > 0] * freq[freq > 0].log()).sum())
        return CodebookUsage(counts.numpy(), int((counts > 0).sum()), math.exp(entropy))


__all__ = ["CodebookUsage", "VQEncoder"]
