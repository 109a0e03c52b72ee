"""``lvmkit bench vae variants``: VAE (three likelihoods), β-VAE, KL warm-up, IWAE, the VampPrior,
an IAF posterior, the Hamiltonian VAE, RWS, AE, DAE, CAE, AAE and VQ-VAE (codebook by its loss or
by moving averages) on the same data and network. The VQ-VAE rows add the codes used and their
perplexity on the test images, and the test ELBO again once a learned prior over the codes is
fitted (as many epochs as the autoencoder's); the HVAE's active units count z's coordinates, not
its momentum's."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch

from lvmkit import plots
from lvmkit.base import check_choice
from lvmkit.benchmarks import contenders as cs
from lvmkit.benchmarks.contenders import Contender, Task
from lvmkit.benchmarks.protocol import (
    BINARY_IMAGES,
    PROFILE_NAMES,
    PROFILES,
    VALIDATION,
    count_units,
    finish,
    history_curve,
    optional,
    vae_pair,
)
from lvmkit.data import MNIST_IMAGE_SHAPE, load_mnist
from lvmkit.guides import HamiltonianEncoder, VQEncoder
from lvmkit.inference import (
    KLSchedule,
    active_units,
    evaluate,
    posterior_means,
    reconstruction_error,
    summarize,
)
from lvmkit.models import (
    VAE,
    VQVAE,
    AutoencoderConfig,
    VAEConfig,
    VQVAEConfig,
)
from lvmkit.pairs import (
    build_autoencoder,
    build_hvae,
    build_iaf_vae,
    build_vamp_vae,
    build_vqvae,
    fit_code_prior,
)


def _variants(latent: int, hidden: tuple[int, ...]) -> dict[str, Callable[[], dict[str, Any]]]:
    """Name → a builder of (model, guide, fit keywords, data kind, has a density)."""

    def vae(likelihood: str, **fit_kw):
        def build():
            cfg = VAEConfig(784, latent_dim=latent, hidden_dims=hidden, likelihood=likelihood)
            model, guide = vae_pair(cfg)
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

    def vq(ema: bool):
        def build():
            cfg = VQVAEConfig(VAEConfig(784, latent_dim=latent, hidden_dims=hidden),
                              positions=VQ_POSITIONS, num_codes=VQ_CODES, ema=ema)  # fmt: skip
            model, guide = build_vqvae(cfg)
            return dict(model=model, guide=guide, fit={}, binary=True, density=True)

        return build

    def built(builder, **options):
        def build():
            model, guide = builder(VAEConfig(784, latent_dim=latent, hidden_dims=hidden), **options)
            return dict(model=model, guide=guide, fit={}, binary=True, density=True)

        return build

    return {
        "VAE (Bernoulli)": vae("bernoulli"),
        "VAE (Gaussian)": vae("gaussian"),
        "VAE (Gaussian, σ=1)": vae("gaussian_fixed"),
        "β-VAE (β=4)": vae("bernoulli", kl_schedule=KLSchedule(beta=4.0)),
        "VAE + KL warm-up": vae("bernoulli", kl_schedule=KLSchedule(warmup_epochs=5)),
        "IWAE (k=5)": vae("bernoulli", objective="iwae", num_particles=5),
        "VampPrior (K=500)": built(build_vamp_vae, num_pseudo=500),
        "IAF posterior (2 flows)": built(build_iaf_vae, num_flows=2),
        "HVAE (4 leapfrog steps)": built(build_hvae, num_steps=4),
        "RWS (k=5)": vae("bernoulli", objective="rws", num_particles=5),
        "AE": ae("ae"),
        "DAE": ae("dae"),
        "CAE": ae("cae"),
        "AAE": ae("aae"),
        "VQ-VAE (K=256)": vq(False),
        "VQ-VAE (K=256, EMA)": vq(True),
    }


VQ_POSITIONS = 4  # the 20 outputs of the 784-400-20 encoder as 4 codes of 5 dimensions
VQ_CODES = 256  # pythae's MNIST codebook: −log p(c) under the uniform prior, 4 log 256 = 22.2


def run(
    profile="full",
    *,
    device="cpu",
    figures_dir=None,
    scale=None,
    contenders=None,
    only=None,
    settings=None,
) -> pd.DataFrame:
    """Every variant on the same images (binary for Bernoulli decoders, grey levels for the
    Gaussian ones), the same network (784-400-20, ReLU) and the same number of epochs; your
    contenders get the binary images and the suite's ELBO."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    p = scale or PROFILES["variants"][profile]
    train = load_mnist("train", limit=p.n_train)
    test_grey = load_mnist("test", limit=p.n_test)
    x_bin = binarize_static(train.x, p.seed)
    test_bin = binarize_static(test_grey.x, p.seed + 1)
    specs: dict[str, dict[str, Any]] = {}  # what each built-in variant is (data, density)
    builtin = {
        name: partial(_variant_contender, build, specs, name)
        for name, build in _variants(20, (400,)).items()
    }
    chosen = cs.select("vae-variants", builtin, contenders, only)
    if settings is not None:
        raise ValueError("vae-variants has one setting; choose contenders with only=")
    task = Task(
        "vae-variants",
        "784-400-20",
        784,
        ("x",),
        BINARY_IMAGES,
        latent_dim=20,
        hidden_dims=(400,),
        activation="relu",
        num_train=len(x_bin),
    )
    rows: list[dict[str, Any]] = []
    curves: list[pd.DataFrame] = []
    samples: dict[str, np.ndarray] = {}
    reconstructions: dict[str, np.ndarray] = {}  # 8 test images, then their reconstructions
    scatter: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # mean codes and labels
    for name, factory in chosen.items():
        pyro.set_rng_seed(p.seed)
        contender = cs.build(name, factory, task, [{"x": test_bin[:4]}])
        spec = specs.get(name, dict(binary=True, density=True))
        model, guide = contender.model, contender.guide
        x_tr, x_te = (x_bin, test_bin) if spec["binary"] else (train.x, test_grey.x)
        validation = x_te[:VALIDATION] if spec["density"] else None
        result, per_epoch = cs.train(
            contender,
            task,
            x_tr,
            validation_data=validation,
            protocol=p.fit_options(len(x_tr), p.seed, device),
        )
        row: dict[str, Any] = {
            "variant": name,
            "epochs": p.epochs,
            "data": "binarized" if spec["binary"] else "grey levels",
        }
        if spec["density"]:
            elbo = summarize(evaluate(model, guide, x_te, 1, seed=p.seed)).elbo
            row.update(
                test_elbo=elbo, **cs.is_scores(model, guide, x_te[: p.n_is], p.num_samples, p.seed)
            )
            curves.append(history_curve(result.history, task.setting, name))
        else:
            row.update(
                test_elbo=math.nan, test_nll=math.nan, nll_se=math.nan, frac_k_above_0_7=math.nan
            )
        if isinstance(guide, VQEncoder):  # the codebook: its use, and the learned prior's bound
            usage = guide.usage(x_te)
            row.update(codes_used=usage.used, code_perplexity=usage.perplexity)
            fit_code_prior(model, guide, x_tr, epochs=p.epochs, batch_size=256, lr=3e-3,
                           seed=p.seed, device=device, progress=False)  # fmt: skip
            scored = evaluate(model, guide, x_te, 1, seed=p.seed)
            row["test_elbo_learned_prior"] = summarize(scored).elbo
        recon = optional(reconstruction_error, model, guide, x_te)
        row["recon_error"] = float(recon.mean()) if recon is not None else math.nan
        units = optional(active_units, guide, x_te)
        if units is not None and isinstance(guide, HamiltonianEncoder):  # z's, not ρ's
            kept = units.variances[: guide.config.latent_dim]
            units = replace(units, count=int((kept > units.threshold).sum()), total=len(kept),
                            variances=kept)  # fmt: skip
        row["active_units"] = count_units(units)
        probe = optional(
            _probe_accuracy, guide, x_tr[:10_000], train.y[:10_000], x_te, test_grey.y, p.seed
        )
        row["probe_accuracy"] = probe if probe is not None else math.nan
        row["seconds_per_epoch"] = per_epoch
        rows.append(row)
        if isinstance(model, VAE) or hasattr(model, "likelihood"):
            with torch.no_grad(), pyro.validation_enabled(False):
                pyro.set_rng_seed(1)
                samples[name] = _mean_images(model, 8)
                codes = posterior_means(guide, x_te[:2000])
                model.eval()
                recons = model.likelihood(codes[:8]).base_dist.mean.cpu().numpy()
                reconstructions[name] = np.concatenate([x_te[:8].cpu().numpy(), recons])
                scatter[name] = (codes.flatten(1).cpu().numpy(), test_grey.y[:2000].numpy())
    if figures_dir is not None:
        out = Path(figures_dir)
        plots.image_rows(samples, MNIST_IMAGE_SHAPE, path=out / "vae-variants-samples.png")
        plots.image_rows(
            reconstructions, MNIST_IMAGE_SHAPE, path=out / "vae-variants-reconstructions.png"
        )
        _scatter_figure(scatter, out / "vae-variants-latent-2d.png")
        if curves:
            both = pd.concat(curves, ignore_index=True)
            cs.curve_figure(
                both,
                "test ELBO",
                label_of=lambda r: r["contender"],
                ylabel="test ELBO (1000 images)",
                path=out / "vae-variants-curves.png",
            )
    return finish(pd.DataFrame(rows), curves, p.describe(len(x_bin)))


def _variant_contender(build, specs: dict[str, Any], name: str, task: Task) -> Contender:
    specs[name] = spec = build()
    fit_kw = dict(spec["fit"])
    return Contender(
        spec["model"],
        spec["guide"],
        objective=fit_kw.pop("objective", None),
        num_particles=fit_kw.pop("num_particles", None),
        fit_options=fit_kw,
    )


def _probe_accuracy(guide, x_train, y_train, x_test, y_test, seed: int) -> float:
    """Logistic regression on the guide's mean codes: train codes → test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    codes_train = posterior_means(guide, x_train).flatten(1).cpu().numpy()  # (a VQ-VAE's: L × D)
    codes_test = posterior_means(guide, x_test).flatten(1).cpu().numpy()
    scaler = StandardScaler().fit(codes_train)
    probe = LogisticRegression(max_iter=500, random_state=seed)
    probe.fit(scaler.transform(codes_train), y_train.numpy())
    return float(probe.score(scaler.transform(codes_test), y_test.numpy()))


def binarize_static(x: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))


def _mean_images(model, n: int) -> np.ndarray:
    """Decoder means at n prior draws (pictures of what the model generates; a VQ-VAE's codes
    from its learned prior where it has one)."""
    model.eval()
    if isinstance(model, VQVAE):
        z = model.prior().sample((n,))
    else:
        z = torch.randn(n, model.config.latent_dim, device=model.prior_loc.device)
    return model.likelihood(z).base_dist.mean.cpu().numpy()


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
