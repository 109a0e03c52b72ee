"""Generative models p(x, z): one family per file."""

from lvmkit.models.autoencoder import (
    KINDS,
    Autoencoder,
    AutoencoderConfig,
    build_autoencoder,
)
from lvmkit.models.cvae import CVAE, ConditionalBaseline, CVAEConfig, build_cvae
from lvmkit.models.gmm import (
    COVARIANCE_TYPES,
    GaussianMixture,
    GaussianMixtureModel,
    GMMConfig,
    empty_guide,
)
from lvmkit.models.m2 import M2, M2Config, StackedM2, build_m1_m2, build_m2, kingma_aux_weight
from lvmkit.models.nonlinear import (
    NonlinearConfig,
    NonlinearLVM,
    build_nonlinear,
    exact_log_likelihood,
)
from lvmkit.models.sequence import (
    SEQUENCE_LIKELIHOODS,
    DeepMarkovModel,
    DMMConfig,
    RecurrentVAE,
    RecurrentVAEConfig,
    build_dmm,
    build_recurrent_vae,
)
from lvmkit.models.vae import LIKELIHOODS, VAE, VAEConfig

__all__ = [
    "COVARIANCE_TYPES",
    "CVAE",
    "KINDS",
    "LIKELIHOODS",
    "M2",
    "SEQUENCE_LIKELIHOODS",
    "VAE",
    "Autoencoder",
    "AutoencoderConfig",
    "CVAEConfig",
    "ConditionalBaseline",
    "DMMConfig",
    "DeepMarkovModel",
    "GMMConfig",
    "GaussianMixture",
    "GaussianMixtureModel",
    "M2Config",
    "NonlinearConfig",
    "NonlinearLVM",
    "RecurrentVAE",
    "RecurrentVAEConfig",
    "StackedM2",
    "VAEConfig",
    "build_autoencoder",
    "build_cvae",
    "build_dmm",
    "build_m1_m2",
    "build_m2",
    "build_nonlinear",
    "build_recurrent_vae",
    "empty_guide",
    "exact_log_likelihood",
    "kingma_aux_weight",
]
