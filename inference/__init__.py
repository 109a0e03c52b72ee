"""Objectives, the one training loop, the importance-weight kernel, evaluation and checkpoints."""

from lvmkit.inference.annealing import KLSchedule
from lvmkit.inference.callbacks import (
    Callback,
    EarlyStopping,
    FitInfo,
    MLflowLogger,
    TensorBoardLogger,
)
from lvmkit.inference.evaluate import evaluate
from lvmkit.inference.feeds import Interleaved, Source
from lvmkit.inference.gaps import bdmc, gap_split
from lvmkit.inference.latents import (
    ActiveUnits,
    active_units,
    posterior_means,
    reconstruction_error,
)
from lvmkit.inference.objectives import (
    CIWAE,
    IWAE,
    MIWAE,
    OBJECTIVES,
    PIWAE,
    ReweightedWakeSleep,
    TraceELBO,
    TraceMeanFieldELBO,
)
from lvmkit.inference.posterior import to_inference_data
from lvmkit.inference.summary import EvaluationSummary, summarize
from lvmkit.inference.train import FitResult, NonFiniteLossError, fit
from lvmkit.inference.weights import log_weights

__all__ = [
    "CIWAE",
    "IWAE",
    "MIWAE",
    "OBJECTIVES",
    "PIWAE",
    "ActiveUnits",
    "Callback",
    "EarlyStopping",
    "EvaluationSummary",
    "FitInfo",
    "FitResult",
    "Interleaved",
    "KLSchedule",
    "MLflowLogger",
    "NonFiniteLossError",
    "ReweightedWakeSleep",
    "Source",
    "TensorBoardLogger",
    "TraceELBO",
    "TraceMeanFieldELBO",
    "active_units",
    "bdmc",
    "evaluate",
    "fit",
    "gap_split",
    "log_weights",
    "posterior_means",
    "reconstruction_error",
    "summarize",
    "to_inference_data",
]
