"""Objectives, the one training loop, evaluation and checkpoints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lvmkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from lvmkit.inference.evaluate import (
    EvaluationSummary,
    evaluate,
    log_weights,
    summarize,
)
from lvmkit.inference.objectives import OBJECTIVES, TraceELBO, TraceMeanFieldELBO
from lvmkit.inference.train import FitResult, NonFiniteLossError, fit

__all__ = [
    "OBJECTIVES",
    "EvaluationSummary",
    "FitResult",
    "NonFiniteLossError",
    "TraceELBO",
    "TraceMeanFieldELBO",
    "evaluate",
    "fit",
    "log_weights",
    "summarize",
]
