"""``lvmkit bench vae <suite>``: the VAE family on binarized MNIST, beside the published tables.

Five suites, each ``run(profile, device=..., figures_dir=...)`` → DataFrame, each with a
``quick`` profile (seconds; run by the tests), a ``full`` profile (what a 2-core CPU can do in
minutes: fewer epochs, and importance sampling on a test subset, as each table's columns say) and
a ``paper`` profile (the papers' training lengths; GPU hours — the README gives the commands):

- ``latent``: AEVB Fig. 2 — test ELBO and IS log-likelihood for latent dims 3, 5, 10, 20, 200,
  and the figure of the bound against training examples seen;
- ``iwae``: IWAE Table 1 — 784-200-200-50 tanh, dynamic binarization, VAE (k = 1, 5, 50) and
  IWAE (k = 5, 50), test NLL with K = 5000, active units, beside Burda et al.'s numbers;
- ``m2``: Kingma et al. (2014) M2 with 100 / 600 / 1000 / 3000 labels, test accuracy of q(y | x)
  beside the paper's and Pyro's example's;
- ``cvae``: Sohn et al. (2015) quadrant completion — negative conditional log-likelihood of the
  hidden quadrants by importance sampling (and the −ELBO) for CVAE and the deterministic
  baseline, beside Pyro's example's;
- ``variants``: VAE (three likelihoods), β-VAE, KL warm-up, IWAE, RWS, AE, DAE, CAE and AAE on the
  same data: test ELBO / IS NLL where defined, reconstruction error, active units, a logistic-
  regression probe's accuracy on the codes, seconds per epoch.

Every model trains through :func:`lvmkit.fit` and is scored by :func:`lvmkit.evaluate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer import TraceEnum_ELBO

from lvmkit import datasets, plots
from lvmkit.data import MNIST_IMAGE_SHAPE, binarize, load_mnist
from lvmkit.guides import GaussianEncoder, GaussianEncoderConfig
from lvmkit.inference import (
    KLSchedule,
    active_units,
    evaluate,
    fit,
    posterior_means,
    reconstruction_error,
    summarize,
)
from lvmkit.models import (
    VAE,
    AutoencoderConfig,
    ConditionalBaseline,
    CVAEConfig,
    M2Config,
    VAEConfig,
    build_autoencoder,
    build_cvae,
    build_m2,
    empty_guide,
)
from lvmkit.models._checks import check_choice

PROFILE_NAMES = ("quick", "full", "paper")


@dataclass(frozen=True)
class Scale:
    """How much data and training one profile of a suite gets."""

    n_train: int | None  # training images (None: all 50,000)
    n_test: int  # test images scored by the ELBO and the probes
    n_is: int  # test images scored by importance sampling (K samples each)
    epochs: int
    num_samples: int  # K of the IS estimate
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0


def _scales(quick: Scale, full: Scale, paper: Scale) -> dict[str, Scale]:
    return {"quick": quick, "full": full, "paper": paper}


# -- data --------------------------------------------------------------------------------------


def _mnist(scale: Scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grey-level train images and labels, and statically binarized test images and labels."""
    train = load_mnist("train", limit=scale.n_train)
    test = load_mnist("test", binarization="static", seed=scale.seed, limit=scale.n_test)
    return train.x, train.y, test.x, test.y


def _vae_pair(cfg: VAEConfig, enc_hidden: tuple[int, ...] | None = None):
    model = VAE(cfg)
    guide = GaussianEncoder(
        GaussianEncoderConfig(
            data_dim=cfg.data_dim,
            latent_dim=cfg.latent_dim,
            hidden_dims=enc_hidden or cfg.hidden_dims,
            activation=cfg.activation,
        )
    )
    return model, guide


def _train(model, guide, data, scale: Scale, device: str, **kwargs: Any):
    tic = time.perf_counter()
    result = fit(
        model,
        guide,
        data,
        epochs=scale.epochs,
        batch_size=scale.batch_size,
        lr=scale.lr,
        seed=scale.seed,
        device=device,
        progress=False,
        **kwargs,
    )
    return result, (time.perf_counter() - tic) / scale.epochs


def _scores(model, guide, x_test: torch.Tensor, scale: Scale) -> dict[str, float]:
    elbo = summarize(evaluate(model, guide, x_test, 1, seed=scale.seed)).elbo
    ll = summarize(evaluate(model, guide, x_test[: scale.n_is], scale.num_samples, seed=scale.seed))
    return {
        "test_elbo": elbo,
        "test_nll": -ll.log_likelihood,
        "nll_se": ll.log_likelihood_se,
        "frac_k_above_0_7": ll.frac_pareto_k_above_0_7,
    }


def _probe_accuracy(guide, x_train, y_train, x_test, y_test, seed: int) -> float:
    """Logistic regression on the guide's mean codes: train codes → test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    codes_train = posterior_means(guide, x_train).cpu().numpy()
    codes_test = posterior_means(guide, x_test).cpu().numpy()
    scaler = StandardScaler().fit(codes_train)
    probe = LogisticRegression(max_iter=500, random_state=seed)
    probe.fit(scaler.transform(codes_train), y_train.numpy())
    return float(probe.score(scaler.transform(codes_test), y_test.numpy()))


# -- latent-dimension sweep (AEVB Fig. 2) ---------------------------------------------------------

LATENT_PROFILES = _scales(
    Scale(n_train=1000, n_test=200, n_is=50, epochs=1, num_samples=50),
    Scale(n_train=None, n_test=10_000, n_is=1000, epochs=5, num_samples=1000),
    Scale(n_train=None, n_test=10_000, n_is=10_000, epochs=1000, num_samples=5000),
)
LATENT_DIMS = {"quick": (3, 20), "full": (3, 5, 10, 20, 200), "paper": (3, 5, 10, 20, 200)}


def run_latent(profile="full", *, device="cpu", figures_dir=None, scale=None) -> pd.DataFrame:
    """AEVB (Kingma & Welling 2014, Fig. 2): one VAE per latent dim, 500 tanh hidden units,
    Bernoulli decoder, dynamic binarization; the bound on a test set against examples seen."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    scale = scale or LATENT_PROFILES[profile]
    x_train, _, x_test, _ = _mnist(scale)
    rows, curves = [], {}
    for latent in LATENT_DIMS[profile]:
        pyro.set_rng_seed(scale.seed)
        cfg = VAEConfig(784, latent_dim=latent, hidden_dims=(500,), activation="tanh")
        model, guide = _vae_pair(cfg)
        result, per_epoch = _train(
            model,
            guide,
            x_train,
            scale,
            device,
            transform=binarize,
            validation_data=x_test[: min(1000, len(x_test))],
        )
        n = len(x_train)
        curves[latent] = (result.history.epoch.to_numpy() * n, result.history.val_elbo.to_numpy())
        au = active_units(guide, x_test)
        rows.append(
            {
                "latent_dim": latent,
                "epochs": scale.epochs,
                "n_train": n,
                **_scores(model, guide, x_test, scale),
                "K": scale.num_samples,
                "n_is": min(scale.n_is, len(x_test)),
                "active_units": au.count,
                "seconds_per_epoch": per_epoch,
            }
        )
    if figures_dir is not None:
        plots.line_plot(
            curves,
            xlabel="training examples seen",
            ylabel="test ELBO (1000 images, nats)",
            legend="latent dim",
            path=Path(figures_dir) / "vae-latent-bound.png",
        )
    return pd.DataFrame(rows)


# -- IWAE Table 1 -----------------------------------------------------------------------------

IWAE_PROFILES = _scales(
    Scale(n_train=500, n_test=100, n_is=20, epochs=1, num_samples=100),
    Scale(n_train=None, n_test=10_000, n_is=1000, epochs=10, num_samples=5000),
    Scale(n_train=None, n_test=10_000, n_is=10_000, epochs=3280, num_samples=5000),
)
IWAE_PAPER = {  # Burda, Grosse & Salakhutdinov (ICLR 2016), Table 1, MNIST, one stochastic layer
    ("vae", 1): 86.76,
    ("vae", 5): 86.47,
    ("vae", 50): 86.35,
    ("iwae", 5): 85.54,
    ("iwae", 50): 84.78,
}


def run_iwae(profile="full", *, device="cpu", figures_dir=None, scale=None) -> pd.DataFrame:
    """VAE and IWAE of Burda et al. with k samples in training: 784-200-200-50, tanh."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    scale = scale or IWAE_PROFILES[profile]
    x_train, _, x_test, _ = _mnist(scale)
    rows, curves = [], {}
    runs = [("vae", 1), ("vae", 5), ("vae", 50), ("iwae", 5), ("iwae", 50)]
    if profile == "quick":
        runs = [("vae", 1), ("iwae", 5)]
    for objective, k in runs:
        pyro.set_rng_seed(scale.seed)
        cfg = VAEConfig(784, latent_dim=50, hidden_dims=(200, 200), activation="tanh")
        model, guide = _vae_pair(cfg)
        name = "iwae" if objective == "iwae" else "elbo"
        result, per_epoch = _train(
            model,
            guide,
            x_train,
            scale,
            device,
            transform=binarize,
            objective=name,
            num_particles=k,
            validation_data=x_test[: min(1000, len(x_test))],
        )
        curves[f"{objective.upper()} k={k}"] = (
            result.history.epoch.to_numpy(),
            result.history.val_elbo.to_numpy(),
        )
        scores = _scores(model, guide, x_test, scale)
        paper = IWAE_PAPER[(objective, k)]
        rows.append(
            {
                "model": objective.upper(),
                "k": k,
                "epochs": scale.epochs,
                "test_nll": scores["test_nll"],
                "nll_se": scores["nll_se"],
                "paper_nll": paper,
                "minus_paper": scores["test_nll"] - paper,
                "paper_epochs": 3280,
                "test_elbo": scores["test_elbo"],
                "active_units": active_units(guide, x_test).count,
                "K": scale.num_samples,
                "n_is": min(scale.n_is, len(x_test)),
                "frac_k_above_0_7": scores["frac_k_above_0_7"],
                "seconds_per_epoch": per_epoch,
            }
        )
    if figures_dir is not None:
        plots.line_plot(
            curves,
            xlabel="epoch",
            ylabel="test ELBO (1000 images, nats)",
            path=Path(figures_dir) / "vae-iwae-bound.png",
        )
    return pd.DataFrame(rows)


# -- M2 label counts --------------------------------------------------------------------------

M2_PROFILES = _scales(
    Scale(n_train=2000, n_test=500, n_is=0, epochs=1, num_samples=1, batch_size=100, lr=1e-3),
    Scale(n_train=None, n_test=10_000, n_is=0, epochs=5, num_samples=1, batch_size=100, lr=1e-3),
    Scale(n_train=None, n_test=10_000, n_is=0, epochs=100, num_samples=1, lr=1e-3),
)
M2_LABELS = {"quick": (100,), "full": (100, 600, 1000, 3000), "paper": (100, 600, 1000, 3000)}
M2_PAPER_ERROR = {100: 11.97, 600: 4.94, 1000: 3.60, 3000: 3.92}  # Kingma et al. 2014, Table 1
PYRO_M2_ACCURACY = {100: 93.19, 600: 94.37, 1000: 94.87, 3000: 95.82}  # Pyro's SS-VAE example


def run_m2(profile="full", *, device="cpu", figures_dir=None, scale=None) -> pd.DataFrame:
    """M2 trained with TraceEnum_ELBO (y summed out for unlabelled images) and α log q(y | x)."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    scale = scale or M2_PROFILES[profile]
    train = load_mnist("train", binarization="static", seed=scale.seed, limit=scale.n_train)
    test = load_mnist("test", binarization="static", seed=scale.seed, limit=scale.n_test)
    rows = []
    for labels in M2_LABELS[profile]:
        pyro.set_rng_seed(scale.seed)
        data = datasets.semi_supervised(train.x, train.y, labels, seed=scale.seed)
        model, guide = build_m2(M2Config(784))
        _, per_epoch = _train(
            model, guide, data, scale, device, objective=TraceEnum_ELBO(max_plate_nesting=1)
        )
        with torch.no_grad():
            guide.eval()
            predicted = guide.classify(test.x.to(next(guide.parameters()).device)).cpu()
        accuracy = 100 * float((predicted == test.y).float().mean())
        rows.append(
            {
                "labels": labels,
                "epochs": scale.epochs,
                "accuracy": accuracy,
                "error": 100 - accuracy,
                "paper_error": M2_PAPER_ERROR[labels],
                "pyro_example_accuracy": PYRO_M2_ACCURACY[labels],
                "n_test": len(test.x),
                "seconds_per_epoch": per_epoch,
            }
        )
    frame = pd.DataFrame(rows)
    if figures_dir is not None:
        m2_figure(frame, Path(figures_dir) / "vae-m2-accuracy.png")
    return frame


def m2_figure(frame: pd.DataFrame, path: Path):
    """Test accuracy against the number of labelled images: ours beside the published ones."""
    labels = frame["labels"].to_numpy()
    epochs = int(frame["epochs"].iloc[0])
    curves = {
        f"lvmkit ({epochs} epochs)": (labels, frame["accuracy"].to_numpy()),
        "Kingma et al. 2014, Table 1": (labels, 100 - frame["paper_error"].to_numpy()),
        "Pyro's SS-VAE example": (labels, frame["pyro_example_accuracy"].to_numpy()),
    }
    return plots.line_plot(
        curves,
        xlabel="labelled training images",
        ylabel="test accuracy (%)",
        title="M2 on MNIST: classification accuracy",
        path=path,
    )


# -- CVAE quadrants -----------------------------------------------------------------------------

CVAE_PROFILES = _scales(
    Scale(n_train=1000, n_test=200, n_is=50, epochs=1, num_samples=50),
    Scale(n_train=None, n_test=10_000, n_is=1000, epochs=5, num_samples=1000),
    Scale(n_train=None, n_test=10_000, n_is=10_000, epochs=50, num_samples=5000),
)
PYRO_CVAE = {1: (71.8, 100.4), 2: (51.0, 61.9), 3: (24.2, 25.4)}  # (CVAE, baseline), −ELBO-based


def run_cvae(profile="full", *, device="cpu", figures_dir=None, scale=None) -> pd.DataFrame:
    """CVAE vs the deterministic baseline for 1, 2 and 3 given quadrants."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    scale = scale or CVAE_PROFILES[profile]
    train = load_mnist("train", binarization="static", seed=scale.seed, limit=scale.n_train)
    test = load_mnist("test", binarization="static", seed=scale.seed, limit=scale.n_test)
    small = {"quick": dict(latent_dim=20, hidden_dims=(200,))}.get(profile, {})
    rows, completions = [], {}
    for given in (1, 2, 3):
        data_train = datasets.quadrants(train.x, given)
        data_test = datasets.quadrants(test.x, given)
        cfg = CVAEConfig(784, 784, **small)
        pyro.set_rng_seed(scale.seed)
        baseline = ConditionalBaseline(cfg)
        _, base_seconds = _train(baseline, empty_guide, data_train, scale, device)
        base = summarize(evaluate(baseline, empty_guide, data_test, 1, seed=scale.seed))
        pyro.set_rng_seed(scale.seed)
        model, guide = build_cvae(cfg)
        _, cvae_seconds = _train(model, guide, data_train, scale, device)
        elbo = summarize(evaluate(model, guide, data_test, 1, seed=scale.seed)).elbo
        is_part = {k: v[: scale.n_is] for k, v in data_test.items()}
        ll = summarize(evaluate(model, guide, is_part, scale.num_samples, seed=scale.seed))
        pyro_cvae, pyro_base = PYRO_CVAE[given]
        rows.append(
            {
                "quadrants_given": given,
                "epochs": scale.epochs,
                "cvae_nll_is": -ll.log_likelihood,
                "cvae_nll_se": ll.log_likelihood_se,
                "cvae_neg_elbo": -elbo,
                "baseline_nll": -base.log_likelihood,
                "pyro_cvae_neg_elbo": pyro_cvae,
                "pyro_baseline": pyro_base,
                "K": scale.num_samples,
                "n_is": min(scale.n_is, len(test.x)),
                "frac_k_above_0_7": ll.frac_pareto_k_above_0_7,
                "seconds_per_epoch": (base_seconds + cvae_seconds) / 2,
            }
        )
        completions[given] = (data_test, model, baseline)
    if figures_dir is not None:
        _quadrant_figure(completions, Path(figures_dir) / "vae-cvae-completions.png")
    return pd.DataFrame(rows)


# -- variants side by side -----------------------------------------------------------------------

VARIANT_PROFILES = _scales(
    Scale(n_train=1000, n_test=300, n_is=50, epochs=1, num_samples=50),
    Scale(n_train=None, n_test=10_000, n_is=1000, epochs=5, num_samples=1000),
    Scale(n_train=None, n_test=10_000, n_is=10_000, epochs=500, num_samples=5000),
)


def _variants(latent: int, hidden: tuple[int, ...]) -> dict[str, Callable[[], dict[str, Any]]]:
    """Name → a builder of (model, guide, fit keywords, data kind, has a density)."""

    def vae(likelihood: str, **fit_kw):
        def build():
            cfg = VAEConfig(784, latent_dim=latent, hidden_dims=hidden, likelihood=likelihood)
            model, guide = _vae_pair(cfg)
            binary = likelihood == "bernoulli"
            return dict(model=model, guide=guide, fit=fit_kw, binary=binary, density=True)

        return build

    def ae(kind: str):
        def build():
            cfg = AutoencoderConfig(
                VAEConfig(784, latent_dim=latent, hidden_dims=hidden), kind=kind
            )
            model, guide = build_autoencoder(cfg)
            return dict(model=model, guide=guide, fit={}, binary=True, density=False)

        return build

    return {
        "VAE (Bernoulli)": vae("bernoulli"),
        "VAE (Gaussian)": vae("gaussian"),
        "VAE (Gaussian, σ=1)": vae("gaussian_fixed"),
        "β-VAE (β=4)": vae("bernoulli", kl_schedule=KLSchedule(beta=4.0)),
        "VAE + KL warm-up": vae("bernoulli", kl_schedule=KLSchedule(warmup_epochs=5)),
        "IWAE (k=5)": vae("bernoulli", objective="iwae", num_particles=5),
        "RWS (k=5)": vae("bernoulli", objective="rws", num_particles=5),
        "AE": ae("ae"),
        "DAE": ae("dae"),
        "CAE": ae("cae"),
        "AAE": ae("aae"),
    }


def run_variants(profile="full", *, device="cpu", figures_dir=None, scale=None) -> pd.DataFrame:
    """Every variant on the same images (binary for Bernoulli decoders, grey levels for the
    Gaussian ones), the same network (784-400-20, ReLU) and the same number of epochs."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    scale = scale or VARIANT_PROFILES[profile]
    train = load_mnist("train", limit=scale.n_train)
    test_grey = load_mnist("test", limit=scale.n_test)
    x_bin = binarize_static(train.x, scale.seed)
    test_bin = binarize_static(test_grey.x, scale.seed + 1)
    rows: list[dict[str, Any]] = []
    samples: dict[str, np.ndarray] = {}
    reconstructions: dict[str, np.ndarray] = {}  # 8 test images, then their reconstructions
    scatter: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # mean codes and labels
    for name, build in _variants(20, (400,)).items():
        pyro.set_rng_seed(scale.seed)
        spec = build()
        model, guide = spec["model"], spec["guide"]
        x_tr, x_te = (x_bin, test_bin) if spec["binary"] else (train.x, test_grey.x)
        _, per_epoch = _train(model, guide, x_tr, scale, device, **spec["fit"])
        row: dict[str, Any] = {
            "variant": name,
            "epochs": scale.epochs,
            "data": "binarized" if spec["binary"] else "grey levels",
        }
        if spec["density"]:
            row.update(_scores(model, guide, x_te, scale))
        else:
            row.update(
                test_elbo=math.nan, test_nll=math.nan, nll_se=math.nan, frac_k_above_0_7=math.nan
            )
        row["recon_error"] = float(reconstruction_error(model, guide, x_te).mean())
        row["active_units"] = active_units(guide, x_te).count
        row["probe_accuracy"] = _probe_accuracy(
            guide, x_tr[:10_000], train.y[:10_000], x_te, test_grey.y, scale.seed
        )
        row["seconds_per_epoch"] = per_epoch
        rows.append(row)
        with torch.no_grad(), pyro.validation_enabled(False):
            pyro.set_rng_seed(1)
            samples[name] = _mean_images(model, 8)
            codes = posterior_means(guide, x_te[:2000])
            model.eval()
            recons = model.likelihood(codes[:8]).base_dist.mean.cpu().numpy()
            reconstructions[name] = np.concatenate([x_te[:8].cpu().numpy(), recons])
            scatter[name] = (codes.cpu().numpy(), test_grey.y[:2000].numpy())
    if figures_dir is not None:
        out = Path(figures_dir)
        plots.image_rows(samples, MNIST_IMAGE_SHAPE, path=out / "vae-variants-samples.png")
        plots.image_rows(
            reconstructions, MNIST_IMAGE_SHAPE, path=out / "vae-variants-reconstructions.png"
        )
        _scatter_figure(scatter, out / "vae-variants-latent-2d.png")
    return pd.DataFrame(rows)


def binarize_static(x: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))


def _mean_images(model, n: int) -> np.ndarray:
    """Decoder means at n prior draws (pictures of what the model generates)."""
    model.eval()
    dev = model.prior_loc.device
    z = torch.randn(n, model.config.latent_dim, device=dev)
    return model.likelihood(z).base_dist.mean.cpu().numpy()


# -- figures ------------------------------------------------------------------------------------


def _scatter_figure(codes: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Mean codes of test images on their first two principal components, coloured by digit."""
    plt = plots.pyplot()
    cols = 4
    rows = -(-len(codes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, (z, labels)) in zip(axes.flat, codes.items(), strict=False):
        ax.axis("on")
        plots.scatter_codes(z, labels, ax=ax, title=name)
    fig.suptitle("E_q[z | x] of 2,000 test images, first two principal components", fontsize=9)
    fig.tight_layout()
    plots.save(fig, path)


def _quadrant_figure(completions: dict, path: Path) -> None:
    """For each number of given quadrants: the condition, the truth, the baseline's mean and
    three CVAE samples, for four test images."""
    images: dict[str, np.ndarray] = {}
    for given, (data, model, baseline) in completions.items():
        part = {k: v[:4] for k, v in data.items()}
        dev = next(model.parameters()).device
        part = {k: v.to(dev) for k, v in part.items()}
        with torch.no_grad(), pyro.validation_enabled(False):
            model.eval()
            baseline.eval()
            pyro.set_rng_seed(2)
            cond = part["c"].clamp(min=0).cpu().numpy()
            mask = part["mask"].cpu().numpy()
            truth = part["x"].cpu().numpy()
            base = torch.sigmoid(baseline.net(part["c"])).cpu().numpy()
            draws = [model(c=part["c"], mask=part["mask"]).cpu().numpy() for _ in range(3)]
        for i in range(4):
            shown = [
                cond[i] * ~mask[i] + 0.5 * mask[i],
                truth[i],
                np.where(mask[i], base[i], truth[i]),
            ]
            shown += [np.where(mask[i], d[i], truth[i]) for d in draws]
            images[f"{given} given, image {i}: input | truth | baseline | CVAE ×3"] = np.stack(
                shown
            )
    plots.image_rows(images, MNIST_IMAGE_SHAPE, path=path)


SUITES = {
    "latent": run_latent,
    "iwae": run_iwae,
    "m2": run_m2,
    "cvae": run_cvae,
    "variants": run_variants,
}
__all__ = ["SUITES", "Scale", "replace"]
