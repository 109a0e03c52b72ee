"""Generative models p(x, z): one family per file."""

from lvmkit.models.vae import LIKELIHOODS, VAE, VAEConfig

__all__ = ["LIKELIHOODS", "VAE", "VAEConfig"]
