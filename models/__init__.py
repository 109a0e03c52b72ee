"""Generative models p(x, z): one family per file."""

from lvmkit.models.gmm import (
    COVARIANCE_TYPES,
    GaussianMixture,
    GaussianMixtureModel,
    GMMConfig,
    empty_guide,
)
from lvmkit.models.vae import LIKELIHOODS, VAE, VAEConfig

__all__ = [
    "COVARIANCE_TYPES",
    "LIKELIHOODS",
    "VAE",
    "GMMConfig",
    "GaussianMixture",
    "GaussianMixtureModel",
    "VAEConfig",
    "empty_guide",
]
