"""Objectives, the one training loop, the importance-weight kernel, evaluation and checkpoints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lvmkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from lvmkit.inference._data import Interleaved, Source
from lvmkit.inference.ais import bdmc, gap_split
from lvmkit.inference.annealing import KLSchedule
from lvmkit.inference.callbacks import (
    Callback,
    EarlyStopping,
    FitInfo,
    MLflowLogger,
    TensorBoardLogger,
)
from lvmkit.inference.evaluate import (
    ActiveUnits,
    EvaluationSummary,
    active_units,
    evaluate,
    log_weights,
    posterior_means,
    reconstruction_error,
    summarize,
)
from lvmkit.inference.objectives import (
    IWAE,
    OBJECTIVES,
    ReweightedWakeSleep,
    TraceELBO,
    TraceMeanFieldELBO,
)
from lvmkit.inference.posterior import to_inference_data
from lvmkit.inference.train import FitResult, NonFiniteLossError, fit

__all__ = [
    "IWAE",
    "OBJECTIVES",
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
