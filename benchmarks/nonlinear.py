"""``lvmkit bench nonlinear``: the seeds' nonlinear latent model against its exact likelihood.

For each data set (the seeds' ring x = z/10 + z/‖z‖ + ε with a 2-D z; a spiral and two moons,
curves that a 1-D z can trace), a :class:`lvmkit.models.NonlinearLVM` (MLP f, learned σ) is
trained with the ELBO and the Gaussian encoder, and on held-out points three numbers are set side
by side: the ELBO, lvmkit's importance-sampled log-likelihood (K samples from the encoder), and
the exact log p(x) of the trained model by quadrature over z. The IS estimate should sit within
a few hundredths of a nat of the exact value, the ELBO below both by the posterior gap.
Figures (``figures_dir``): held-out data beside samples from the model, and the exact learned
density (quadrature) as contours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch

from lvmkit import datasets
from lvmkit.base import check_choice
from lvmkit.inference import evaluate, fit, summarize
from lvmkit.models import NonlinearConfig, exact_log_likelihood
from lvmkit.pairs import build_nonlinear


@dataclass(frozen=True)
class NonlinearBenchConfig:
    data_sets: tuple[str, ...]
    n: int  # points drawn; half train, half held out
    eval_points: int  # held-out points scored
    epochs: int
    num_samples: int  # K for the IS estimate
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0


PROFILES = {
    "quick": NonlinearBenchConfig(("spiral",), n=600, eval_points=100, epochs=5, num_samples=200),
    "full": NonlinearBenchConfig(
        ("ring", "spiral", "moons"), n=4000, eval_points=1000, epochs=500, num_samples=5000
    ),
}

_LATENT_DIM = {"ring": 2, "spiral": 1, "moons": 1}


def _data_set(name: str, n: int, seed: int) -> datasets.Labelled:
    if name == "ring":
        return datasets.make_ring(n, noise=0.05, seed=seed)
    if name == "spiral":
        return datasets.make_spiral(n, noise=0.05, seed=seed)
    if name == "moons":
        return datasets.make_moons(n, noise=0.05, seed=seed)
    raise ValueError(f"unknown data set {name!r}")


def run(
    profile: str = "full",
    *,
    device: str = "cpu",
    config: NonlinearBenchConfig | None = None,
    figures_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Train and score one model per data set; one row per data set."""
    cfg = config or PROFILES[check_choice("profile", profile, PROFILES)]
    rows = []
    for name in cfg.data_sets:
        data = _data_set(name, cfg.n, cfg.seed)
        train, test = data.split(0.5, seed=cfg.seed)
        held_out = torch.as_tensor(test.x[: cfg.eval_points])
        pyro.set_rng_seed(cfg.seed)
        model_config = NonlinearConfig(data_dim=2, latent_dim=_LATENT_DIM[name])
        model, guide = build_nonlinear(model_config)
        tic = time.perf_counter()
        fit(
            model,
            guide,
            train.x,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed,
            device=device,
            progress=False,
        )
        train_seconds = time.perf_counter() - tic
        summary = summarize(evaluate(model, guide, held_out, cfg.num_samples, seed=cfg.seed))
        model, guide = model.cpu(), guide.cpu()
        tic = time.perf_counter()
        exact = float(exact_log_likelihood(model, held_out).mean())
        quad_seconds = time.perf_counter() - tic
        rows.append(
            {
                "data_set": name,
                "latent_dim": model_config.latent_dim,
                "n_train": len(train.x),
                "n_eval": len(held_out),
                "epochs": cfg.epochs,
                "sigma": float(model.sigma().detach()),
                "heldout_elbo": summary.elbo,
                "heldout_is": summary.log_likelihood,
                "is_se": summary.log_likelihood_se,
                "exact_quadrature": exact,
                "is_minus_exact": summary.log_likelihood - exact,
                "elbo_minus_exact": summary.elbo - exact,
                "frac_k_above_0_7": summary.frac_pareto_k_above_0_7,
                "K": cfg.num_samples,
                "train_seconds": train_seconds,
                "quadrature_seconds": quad_seconds,
            }
        )
        if figures_dir is not None:
            _figure(name, test.x, model, Path(figures_dir))
    return pd.DataFrame(rows)


def _figure(name: str, x: np.ndarray, model, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), pyro.validation_enabled(False):
        pyro.set_rng_seed(1)
        samples = model(batch_size=len(x)).numpy()
    lo, hi = x.min(0) - 0.3, x.max(0) + 0.3
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 90), np.linspace(lo[1], hi[1], 90))
    grid = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    coarse = 2001 if model.config.latent_dim == 1 else 241
    density = exact_log_likelihood(model, grid, grid=coarse).numpy().reshape(gx.shape)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True, sharey=True)
    axes[0].scatter(x[:, 0], x[:, 1], s=3, alpha=0.5, label="held-out data")
    axes[0].scatter(samples[:, 0], samples[:, 1], s=3, alpha=0.5, label="model samples")
    axes[0].legend(fontsize=7, markerscale=3)
    axes[0].set_title(f"{name}: data and x ~ p(x) (ancestral)", fontsize=9)
    levels = np.linspace(max(density.max() - 8, density.min()), density.max(), 12)
    axes[1].contourf(gx, gy, density, levels=levels, cmap="viridis")
    axes[1].set_title("exact log p(x) of the trained model (quadrature)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"nonlinear-{name}.png", dpi=100)
    plt.close(fig)
