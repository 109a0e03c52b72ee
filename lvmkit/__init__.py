"""lvmkit: latent-variable models on Pyro.

Write a model p(x, z) and a guide q(z | x) as a Pyro model/guide pair — or bring the pair you
already have — train it with :func:`fit`, and score it with :func:`evaluate` (ELBO,
importance-sampled log-likelihood, Pareto k̂).

The names below are imported when first used (PEP 562), so that ``import lvmkit`` and the
``lvmkit`` command's ``--help`` do not wait for torch and Pyro to load.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("lvmkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_WHERE = {  # public name → the module that defines it
    "active_units": "lvmkit.inference",
    "ActiveUnits": "lvmkit.inference",
    "Autoencoder": "lvmkit.models",
    "AutoencoderConfig": "lvmkit.models",
    "binarize": "lvmkit.data",
    "build_autoencoder": "lvmkit.models",
    "build_cvae": "lvmkit.models",
    "build_m2": "lvmkit.models",
    "build_m1_m2": "lvmkit.models",
    "kingma_aux_weight": "lvmkit.models",
    "build_nonlinear": "lvmkit.models",
    "build_dmm": "lvmkit.models",
    "build_recurrent_vae": "lvmkit.models",
    "DeepMarkovModel": "lvmkit.models",
    "DMMConfig": "lvmkit.models",
    "MarkovGuide": "lvmkit.guides",
    "RecurrentEncoder": "lvmkit.guides",
    "RecurrentVAE": "lvmkit.models",
    "RecurrentVAEConfig": "lvmkit.models",
    "build_vae": "lvmkit.runs",
    "Callback": "lvmkit.inference",
    "CategoricalEncoder": "lvmkit.guides",
    "CategoricalEncoderConfig": "lvmkit.guides",
    "CheckpointError": "lvmkit.inference.checkpoint",
    "ConditionalBaseline": "lvmkit.models",
    "ConditionalEncoder": "lvmkit.guides",
    "CVAE": "lvmkit.models",
    "CVAEConfig": "lvmkit.models",
    "Dataset": "lvmkit.data",
    "DeterministicEncoder": "lvmkit.guides",
    "EarlyStopping": "lvmkit.inference",
    "evaluate": "lvmkit.inference",
    "EvaluationSummary": "lvmkit.inference",
    "exact_log_likelihood": "lvmkit.models",
    "fit": "lvmkit.inference",
    "FitInfo": "lvmkit.inference",
    "FitResult": "lvmkit.inference",
    "GaussianEncoder": "lvmkit.guides",
    "GaussianEncoderConfig": "lvmkit.guides",
    "GaussianMixture": "lvmkit.models",
    "GMMConfig": "lvmkit.models",
    "IWAE": "lvmkit.inference",
    "KLSchedule": "lvmkit.inference",
    "LIKELIHOODS": "lvmkit.models",
    "load_mnist": "lvmkit.data",
    "log_weights": "lvmkit.inference",
    "M2": "lvmkit.models",
    "M2Config": "lvmkit.models",
    "MLflowLogger": "lvmkit.inference",
    "NonFiniteLossError": "lvmkit.inference",
    "NonlinearConfig": "lvmkit.models",
    "NonlinearLVM": "lvmkit.models",
    "OBJECTIVES": "lvmkit.inference",
    "posterior_means": "lvmkit.inference",
    "reconstruction_error": "lvmkit.inference",
    "ReweightedWakeSleep": "lvmkit.inference",
    "SemiSupervisedEncoder": "lvmkit.guides",
    "StackedM2": "lvmkit.models",
    "StackedSemiSupervisedEncoder": "lvmkit.guides",
    "Source": "lvmkit.inference",
    "bdmc": "lvmkit.inference",
    "gap_split": "lvmkit.inference",
    "Interleaved": "lvmkit.inference",
    "summarize": "lvmkit.inference",
    "TensorBoardLogger": "lvmkit.inference",
    "to_inference_data": "lvmkit.inference",
    "VAE": "lvmkit.models",
    "VAEConfig": "lvmkit.models",
}
_SUBMODULES = ("datasets", "plots", "runs", "cli", "data", "models", "guides", "inference",
               "benchmarks", "music")  # fmt: skip

if TYPE_CHECKING:  # the real imports, for type checkers and editors
    from lvmkit import datasets
    from lvmkit.data import (
        Dataset,
        binarize,
        load_mnist,
    )
    from lvmkit.guides import (
        CategoricalEncoder,
        CategoricalEncoderConfig,
        ConditionalEncoder,
        DeterministicEncoder,
        GaussianEncoder,
        GaussianEncoderConfig,
        MarkovGuide,
        RecurrentEncoder,
        SemiSupervisedEncoder,
        StackedSemiSupervisedEncoder,
    )
    from lvmkit.inference import (
        IWAE,
        OBJECTIVES,
        ActiveUnits,
        Callback,
        EarlyStopping,
        EvaluationSummary,
        FitInfo,
        FitResult,
        Interleaved,
        KLSchedule,
        MLflowLogger,
        NonFiniteLossError,
        ReweightedWakeSleep,
        Source,
        TensorBoardLogger,
        active_units,
        bdmc,
        evaluate,
        fit,
        gap_split,
        log_weights,
        posterior_means,
        reconstruction_error,
        summarize,
        to_inference_data,
    )
    from lvmkit.inference.checkpoint import (
        CheckpointError,
    )
    from lvmkit.models import (
        CVAE,
        LIKELIHOODS,
        M2,
        VAE,
        Autoencoder,
        AutoencoderConfig,
        ConditionalBaseline,
        CVAEConfig,
        DeepMarkovModel,
        DMMConfig,
        GaussianMixture,
        GMMConfig,
        M2Config,
        NonlinearConfig,
        NonlinearLVM,
        RecurrentVAE,
        RecurrentVAEConfig,
        StackedM2,
        VAEConfig,
        build_autoencoder,
        build_cvae,
        build_dmm,
        build_m1_m2,
        build_m2,
        build_nonlinear,
        build_recurrent_vae,
        exact_log_likelihood,
        kingma_aux_weight,
    )
    from lvmkit.runs import (
        build_vae,
    )


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"lvmkit.{name}")
    raise AttributeError(f"module 'lvmkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE, *_SUBMODULES])


__all__ = [
    "CVAE",
    "IWAE",
    "LIKELIHOODS",
    "M2",
    "OBJECTIVES",
    "VAE",
    "ActiveUnits",
    "Autoencoder",
    "AutoencoderConfig",
    "CVAEConfig",
    "Callback",
    "CategoricalEncoder",
    "CategoricalEncoderConfig",
    "CheckpointError",
    "ConditionalBaseline",
    "ConditionalEncoder",
    "DMMConfig",
    "Dataset",
    "DeepMarkovModel",
    "DeterministicEncoder",
    "EarlyStopping",
    "EvaluationSummary",
    "FitInfo",
    "FitResult",
    "GMMConfig",
    "GaussianEncoder",
    "GaussianEncoderConfig",
    "GaussianMixture",
    "Interleaved",
    "KLSchedule",
    "M2Config",
    "MLflowLogger",
    "MarkovGuide",
    "NonFiniteLossError",
    "NonlinearConfig",
    "NonlinearLVM",
    "RecurrentEncoder",
    "RecurrentVAE",
    "RecurrentVAEConfig",
    "ReweightedWakeSleep",
    "SemiSupervisedEncoder",
    "Source",
    "StackedM2",
    "StackedSemiSupervisedEncoder",
    "TensorBoardLogger",
    "VAEConfig",
    "__version__",
    "active_units",
    "bdmc",
    "binarize",
    "build_autoencoder",
    "build_cvae",
    "build_dmm",
    "build_m1_m2",
    "build_m2",
    "build_nonlinear",
    "build_recurrent_vae",
    "build_vae",
    "datasets",
    "evaluate",
    "exact_log_likelihood",
    "fit",
    "gap_split",
    "kingma_aux_weight",
    "load_mnist",
    "log_weights",
    "posterior_means",
    "reconstruction_error",
    "summarize",
    "to_inference_data",
]
