"""Generative models p(x, z): one family per file."""

from lvmkit.models.autoencoder import KINDS, Autoencoder, AutoencoderConfig
from lvmkit.models.cvae import CVAE, ConditionalBaseline, CVAEConfig
from lvmkit.models.gmm import (
    COVARIANCE_TYPES,
    GaussianMixtureModel,
    GMMConfig,
    empty_guide,
)
from lvmkit.models.hvae import HamiltonianVAE
from lvmkit.models.m2 import M2, M2Config, StackedM2, kingma_aux_weight
from lvmkit.models.nonlinear import (
    NonlinearConfig,
    NonlinearLVM,
    exact_log_likelihood,
)
from lvmkit.models.sequence import (
    SEQUENCE_LIKELIHOODS,
    DeepMarkovModel,
    DMMConfig,
    RecurrentVAE,
    RecurrentVAEConfig,
)
from lvmkit.models.vae import LIKELIHOODS, VAE, VAEConfig
from lvmkit.models.vampprior import VampPrior, VampVAE
from lvmkit.models.vqvae import VQVAE, Codebook, CodebookPrior, CodePrior, VQVAEConfig

__all__ = [
    "COVARIANCE_TYPES",
    "CVAE",
    "KINDS",
    "LIKELIHOODS",
    "M2",
    "SEQUENCE_LIKELIHOODS",
    "VAE",
    "VQVAE",
    "Autoencoder",
    "AutoencoderConfig",
    "CVAEConfig",
    "CodePrior",
    "Codebook",
    "CodebookPrior",
    "ConditionalBaseline",
    "DMMConfig",
    "DeepMarkovModel",
    "GMMConfig",
    "GaussianMixtureModel",
    "HamiltonianVAE",
    "M2Config",
    "NonlinearConfig",
    "NonlinearLVM",
    "RecurrentVAE",
    "RecurrentVAEConfig",
    "StackedM2",
    "VAEConfig",
    "VQVAEConfig",
    "VampPrior",
    "VampVAE",
    "empty_guide",
    "exact_log_likelihood",
    "kingma_aux_weight",
]
