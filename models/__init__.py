"""Generative models p(x, z): one family per file."""

from lvmkit.models.gmm import (
    COVARIANCE_TYPES,
    GaussianMixture,
    GaussianMixtureModel,
    GMMConfig,
    empty_guide,
)
from lvmkit.models.nonlinear import (
    NonlinearConfig,
    NonlinearLVM,
    build_nonlinear,
    exact_log_likelihood,
)
from lvmkit.models.vae import LIKELIHOODS, VAE, VAEConfig

__all__ = [
    "COVARIANCE_TYPES",
    "LIKELIHOODS",
    "VAE",
    "GMMConfig",
    "GaussianMixture",
    "GaussianMixtureModel",
    "NonlinearConfig",
    "NonlinearLVM",
    "VAEConfig",
    "build_nonlinear",
    "empty_guide",
    "exact_log_likelihood",
]
