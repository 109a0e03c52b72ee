"""lvmkit: latent-variable models on Pyro.

Write a model p(x, z) and a guide q(z | x) as a Pyro model/guide pair, train it with :func:`fit`,
and score it with :func:`evaluate` (ELBO, importance-sampled log-likelihood, Pareto k̂).
"""

from lvmkit import datasets
from lvmkit.data import Dataset, binarize, load_mnist
from lvmkit.guides import (
    CategoricalEncoder,
    CategoricalEncoderConfig,
    GaussianEncoder,
    GaussianEncoderConfig,
)
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
from lvmkit.models import (
    LIKELIHOODS,
    VAE,
    GaussianMixture,
    GMMConfig,
    NonlinearConfig,
    NonlinearLVM,
    VAEConfig,
    build_nonlinear,
    exact_log_likelihood,
)
from lvmkit.runs import build_vae

__all__ = [
    "LIKELIHOODS",
    "OBJECTIVES",
    "VAE",
    "CategoricalEncoder",
    "CategoricalEncoderConfig",
    "CheckpointError",
    "Dataset",
    "EvaluationSummary",
    "FitResult",
    "GMMConfig",
    "GaussianEncoder",
    "GaussianEncoderConfig",
    "GaussianMixture",
    "NonFiniteLossError",
    "NonlinearConfig",
    "NonlinearLVM",
    "VAEConfig",
    "__version__",
    "binarize",
    "build_nonlinear",
    "build_vae",
    "datasets",
    "evaluate",
    "exact_log_likelihood",
    "fit",
    "load_mnist",
    "log_weights",
    "summarize",
]
