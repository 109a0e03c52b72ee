"""An evaluation's summary: the per-point table reduced to the numbers a results table shows
(:func:`summarize`), the record callbacks receive (``on_evaluation``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pandas as pd

PARETO_K_THRESHOLD = 0.7  # Vehtari et al. (2024): above it, importance sampling is unreliable


@dataclass(frozen=True)
class EvaluationSummary:
    """Means over data points of an :func:`evaluate` table; log-densities in nats per point."""

    num_points: int  # data points evaluated
    num_samples: int  # importance samples per point (K)
    elbo: float  # mean ELBO
    log_likelihood: float  # mean importance-sampled log-likelihood (see ``likelihood``)
    log_likelihood_se: float  # standard error of that mean over data points
    gap: float  # log_likelihood − elbo: the posterior gap the guide leaves
    pareto_k_mean: float  # mean k̂ (NaN when K is too small for PSIS)
    frac_pareto_k_above_0_7: float  # fraction of points whose estimate is unreliable
    ess_mean: float  # mean effective sample size of the normalized weights
    likelihood: str = "log p(x)"  # what log_likelihood estimates (see lvmkit.evaluate)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(self)])


def summarize(scores: pd.DataFrame) -> EvaluationSummary:
    """Reduce an :func:`evaluate` table to means over data points.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> summary = lvmkit.summarize(lvmkit.evaluate(model, guide, torch.ones(6, 4), 50))
        >>> summary.num_points, summary.num_samples, summary.log_likelihood >= summary.elbo
        (6, 50, True)
    """
    needed = {"elbo", "log_likelihood", "pareto_k", "ess"}
    if not isinstance(scores, pd.DataFrame) or not needed <= set(scores.columns):
        raise ValueError(
            f"scores must be a DataFrame from lvmkit.evaluate with columns {sorted(needed)}"
        )
    if len(scores) == 0:
        raise ValueError("scores is empty: expected at least one evaluated data point")
    k = scores["pareto_k"]
    has_k = bool(k.notna().all())  # k̂ is NaN when K was too small for PSIS
    ll = scores["log_likelihood"]
    return EvaluationSummary(
        num_points=len(scores),
        num_samples=int(scores.attrs.get("num_samples", -1)),
        elbo=float(scores["elbo"].mean()),
        log_likelihood=float(ll.mean()),
        log_likelihood_se=float(ll.std(ddof=1) / math.sqrt(len(ll)))
        if len(ll) > 1
        else float("nan"),
        gap=float((ll - scores["elbo"]).mean()),
        pareto_k_mean=float(k.mean()) if has_k else float("nan"),
        frac_pareto_k_above_0_7=float((k > PARETO_K_THRESHOLD).mean()) if has_k else float("nan"),
        ess_mean=float(scores["ess"].mean()),
        likelihood=str(scores.attrs.get("likelihood", "log p(x)")),
    )
