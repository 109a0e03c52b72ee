"""The Hamiltonian VAE's generative model (Caterini, Doucet & Sejdinovic, "Hamiltonian
Variational Auto-Encoder", NeurIPS 2018): the VAE's p(x, z) on the space extended by a momentum
ρ of z's size,

    p(x, z, ρ) = N(z; 0, I) p(x | f(z)) N(ρ; 0, I),

so that a guide may move its draw of (z, ρ) by Hamiltonian dynamics (:class:`lvmkit.
HamiltonianEncoder`) and still have an exact density. ρ is independent of x and integrates out:
the ELBO on the extended space is a lower bound on the same log p(x), and importance sampling on
it estimates the same p(x). The site ``"z"`` holds (z, ρ) concatenated, event ``(2 · latent_dim,)``;
the decoder reads the first half.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from lvmkit.models.vae import VAE, VAEConfig, decoder_likelihood


class HamiltonianVAE(VAE):
    """:class:`lvmkit.VAE` on (z, ρ) (see the module docstring); built with its guide by
    :func:`lvmkit.build_hvae`. ``log_joint(x, z)`` is log p(x, z) for z alone — the potential
    whose gradient the guide's dynamics follow.

    Example::

        >>> import torch, lvmkit
        >>> model = lvmkit.HamiltonianVAE(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                hidden_dims=(8,)))
        >>> model.prior_loc.shape, model(batch_size=3).shape
        (torch.Size([4]), torch.Size([3, 4]))
        >>> model.log_joint(torch.ones(3, 4), torch.zeros(3, 2)).shape
        torch.Size([3])
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        self.prior_loc = torch.zeros(2 * config.latent_dim)  # (z, ρ): both standard normal
        self.prior_scale = torch.ones(2 * config.latent_dim)

    def likelihood(self, z: torch.Tensor) -> torch.distributions.Distribution:
        """p(x | z) from the first ``latent_dim`` coordinates of ``z`` (z, or z and ρ)."""
        return decoder_likelihood(self.decoder(z[..., : self.config.latent_dim]), self.config)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) + log p(x | z) for ``z`` ``(..., latent_dim)``: shape ``(...)``."""
        d = self.config.latent_dim  # (the prior over z: the first half of the model's own)
        prior = dist.Normal(self.prior_loc[:d], self.prior_scale[:d]).to_event(1)
        return prior.log_prob(z) + self.likelihood(z).log_prob(x)


__all__ = ["HamiltonianVAE"]
