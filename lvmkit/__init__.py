"""lvmkit: latent-variable models on Pyro.

Write a model p(x, z) and a guide q(z | x) as a Pyro model/guide pair, train it with :func:`fit`,
and score it with :func:`evaluate` (ELBO, importance-sampled log-likelihood, Pareto k̂).
"""

from lvmkit.data import Dataset, binarize, load_mnist
from lvmkit.guides import GaussianEncoder, GaussianEncoderConfig
from lvmkit.inference import (
    OBJECTIVES,
    EvaluationSummary,
    FitResult,
    NonFiniteLossError,
    __version__,
    evaluate,
    fit,
    log_weights,
    summarize,
)
from lvmkit.inference.checkpoint import CheckpointError
from lvmkit.models import LIKELIHOODS, VAE, VAEConfig
from lvmkit.runs import build_vae

__all__ = [
    "LIKELIHOODS",
    "OBJECTIVES",
    "VAE",
    "CheckpointError",
    "Dataset",
    "EvaluationSummary",
    "FitResult",
    "GaussianEncoder",
    "GaussianEncoderConfig",
    "NonFiniteLossError",
    "VAEConfig",
    "__version__",
    "binarize",
    "build_vae",
    "evaluate",
    "fit",
    "load_mnist",
    "log_weights",
    "summarize",
]
