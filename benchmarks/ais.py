"""``lvmkit bench ais``: how far the importance-sampled log-likelihood is from log p(x).

The default MNIST VAE (784-400-20, Bernoulli, dynamic binarization; ``lvmkit train``'s model) and
the same network trained by the IWAE bound (k = 5, the IWAE suite's model) are trained, then
their test images are scored four ways (:mod:`lvmkit.inference.ais`):

- importance sampling from the guide with K draws (the number every table reports);
- annealed importance sampling, C chains from the guide, at each number of steps of the profile
  (a stochastic lower bound that approaches log p(x) as the steps grow, whatever the guide);
- BDMC on points simulated from the trained model: forward and reverse AIS bracket their
  log p(x), and the bracket's width says how many steps are enough on data like MNIST;
- the gap split: log p(x) − ELBO = approximation gap (a per-point Gaussian q* cannot reach the
  posterior) + amortization gap (the encoder misses q*), with the AIS estimate as log p(x).

One row per (model, estimate): mean over the points, its standard error, seconds; the
``attrs["points"]`` frame holds the per-image numbers (which images move most from IS to AIS).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyro

from lvmkit.base import check_choice
from lvmkit.data import binarize, load_mnist
from lvmkit.inference import bdmc, evaluate, fit, gap_split
from lvmkit.models import VAEConfig
from lvmkit.pairs import build_vae


@dataclass(frozen=True)
class AISBenchConfig:
    hidden_dims: tuple[int, ...]
    latent_dim: int
    epochs: int
    train_points: int | None  # None: the whole 50,000-image training split
    eval_points: int  # test images scored
    is_samples: int  # K of importance sampling
    chains: int  # AIS chains per image
    steps: tuple[int, ...]  # AIS's numbers of distributions
    bdmc_points: int  # simulated points of the sandwich
    bdmc_chains: int
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    models: tuple[str, ...] = ("VAE", "IWAE k=5")  # of MODELS
    bdmc_steps: tuple[int, ...] | None = None  # BDMC's numbers of distributions (None: steps)


# what fits the 2-core CPU in about half an hour on one thread; the larger profiles differ from it
# only where they say
_FULL = AISBenchConfig(
    (400,),
    20,
    epochs=10,
    train_points=None,
    eval_points=50,
    is_samples=5000,
    chains=8,
    steps=(1000,),
    bdmc_points=20,
    bdmc_chains=4,
)

PROFILES = {
    "quick": AISBenchConfig(
        (32,),
        4,
        epochs=1,
        train_points=300,
        eval_points=4,
        is_samples=100,
        chains=4,
        steps=(10,),
        bdmc_points=3,
        bdmc_chains=2,
        models=("VAE",),  # (the IWAE model differs in fit's objective only)
    ),
    "full": _FULL,
    # the 10,000-step AIS row on the CPU: a few images, about 10 minutes on one thread
    "long": replace(
        _FULL,
        eval_points=5,
        steps=(1000, 10_000),
        bdmc_points=5,
        models=("VAE",),
        bdmc_steps=(1000,),
    ),
    # Wu et al.'s 1,000 test images at the 1,000-step row, the default VAE alone: 25 minutes on
    # the 2-core CPU (both threads)
    "wide": replace(_FULL, eval_points=1000, models=("VAE",)),
    # Wu et al. (2017)'s scale: the GPU's job (not run here)
    "paper": replace(
        _FULL, eval_points=1000, chains=16, steps=(1000, 10_000), bdmc_points=100, bdmc_chains=16
    ),
}


MODELS = (  # (name, fit objective, particles): the default VAE, and the IWAE suite's k = 5 model
    ("VAE", "elbo", 1),
    ("IWAE k=5", "iwae", 5),
)


def run(
    profile: str = "full", *, device: str = "cpu", figures_dir: str | Path | None = None
) -> pd.DataFrame:
    """Train the default VAE (and the same network by the IWAE bound, k = 5) and score its test
    images by IS, AIS, BDMC and the gap split: one row per (model, estimate)."""
    cfg = PROFILES[check_choice("profile", profile, PROFILES)]
    train = load_mnist("train", limit=cfg.train_points).x
    test = load_mnist("test", binarization="static", seed=cfg.seed, limit=cfg.eval_points).x
    rows, points = [], []
    for name, objective, particles in (m for m in MODELS if m[0] in cfg.models):
        model_rows, model_points = _one_model(cfg, train, test, device, objective, particles)
        rows += [{"model": name, **row} for row in model_rows]
        points.append(model_points.assign(model=name))
    frame = pd.DataFrame(rows)
    frame.attrs["points"] = pd.concat(points).reset_index(names="image")
    return frame


def _one_model(cfg: AISBenchConfig, train, test, device, objective: str, particles: int):
    pyro.set_rng_seed(cfg.seed)
    config = VAEConfig(data_dim=784, latent_dim=cfg.latent_dim, hidden_dims=cfg.hidden_dims)
    model, guide = build_vae(config)
    tic = time.perf_counter()
    fit(
        model, guide, train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        seed=cfg.seed, device=device, transform=binarize, progress=False,
        objective=objective, num_particles=particles,
    )  # fmt: skip
    rows = [_row("training", None, None, len(train), np.array([np.nan]), tic)]
    tic = time.perf_counter()
    scores = evaluate(model, guide, test, cfg.is_samples, seed=cfg.seed)
    rows.append(_row("ELBO", None, None, len(test), scores.elbo.to_numpy(), tic))
    rows.append(_row("IS", cfg.is_samples, None, len(test), scores.log_likelihood.to_numpy(), tic))
    points = pd.DataFrame({"elbo": scores.elbo, "is": scores.log_likelihood,
                           "is_pareto_k": scores.pareto_k})  # fmt: skip
    best = scores.log_likelihood.to_numpy()
    for steps in cfg.steps:
        tic = time.perf_counter()
        ais = evaluate(model, guide, test, cfg.chains, method="ais", num_steps=steps,
                       seed=cfg.seed)  # fmt: skip
        best = ais.log_likelihood.to_numpy()
        points[f"ais_{steps}"] = best
        rows.append(_row("AIS", cfg.chains, steps, len(test), best, tic))
    for steps in cfg.bdmc_steps or cfg.steps:
        tic = time.perf_counter()
        sandwich = bdmc(model, guide, num_points=cfg.bdmc_points, num_samples=cfg.bdmc_chains,
                        num_steps=steps, seed=cfg.seed)  # fmt: skip
        for side in ("lower", "upper"):
            values = sandwich[side].to_numpy()
            rows.append(_row(f"BDMC {side} (simulated)", cfg.bdmc_chains, steps,
                             cfg.bdmc_points, values, tic))  # fmt: skip
    tic = time.perf_counter()
    split = gap_split(model, guide, test, log_likelihood=best, seed=cfg.seed)
    for column in ("elbo_qstar", "approximation_gap", "amortization_gap"):
        rows.append(_row(column, None, None, len(test), split[column].to_numpy(), tic))
        points[column] = split[column].to_numpy()
    return rows, points


def _row(estimate, samples, steps, points, values: np.ndarray, tic: float) -> dict:
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else np.nan
    return {
        "estimate": estimate,
        "samples_or_chains": samples,
        "steps": steps,
        "points": points,
        "mean": float(np.mean(values)),
        "se": se,
        "seconds": round(time.perf_counter() - tic, 1),
    }


def moved(frame: pd.DataFrame, top: int = 5) -> pd.DataFrame:
    """The images whose estimate moves most from IS to the AIS with the most steps."""
    points = frame.attrs["points"]
    last = [c for c in points.columns if c.startswith("ais_")][-1]
    out = points.assign(moved=points[last] - points["is"])
    return out.sort_values("moved", ascending=False).head(top)
