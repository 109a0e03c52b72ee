"""``lvmkit bench vae latent``: AEVB Fig. 2 (Kingma & Welling 2014) — one VAE per latent dim,
500 tanh hidden units, Adagrad; the test bound against training examples seen."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lvmkit.base import check_choice
from lvmkit.benchmarks import contenders as cs
from lvmkit.benchmarks.contenders import Task
from lvmkit.benchmarks.protocol import (
    BINARY_IMAGES,
    BUILTIN,
    PROFILE_NAMES,
    PROFILES,
    REFERENCE,
    builtin_vae,
    chosen,
    finish,
    label_of_run,
    mnist,
    run_settings,
    with_trend,
)

LATENT_DIMS = {"quick": (3, 20), "full": (3, 5, 10, 20, 200), "paper": (3, 5, 10, 20, 200)}


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
    """AEVB (Kingma & Welling 2014, Fig. 2): one VAE per latent dim, 500 tanh hidden units,
    Bernoulli decoder, dynamic binarization; the bound on a test set against examples seen."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    p = scale or PROFILES["latent"][profile]
    x_train, _, x_test, _ = mnist(p)
    tasks = [
        Task(
            "vae-latent",
            f"latent {d}",
            784,
            ("x",),
            BINARY_IMAGES,
            latent_dim=d,
            hidden_dims=(500,),
            activation="tanh",
            num_train=len(x_train),
        )
        for d in LATENT_DIMS[profile]
    ]
    tasks = chosen(tasks, settings)
    rows, curves = run_settings(
        "vae-latent",
        tasks,
        {BUILTIN: builtin_vae},
        p,
        x_train,
        x_test,
        device,
        contenders,
        only,
        (REFERENCE,),
    )
    frame = pd.DataFrame(rows)
    frame.insert(1, "latent_dim", frame.setting.str.split().str[-1].astype(int))
    frame["K"], frame["n_is"] = p.num_samples, min(p.n_is, len(x_test))
    curves_frame = pd.concat(curves, ignore_index=True)
    frame = with_trend(frame, curves_frame, "test ELBO", "elbo_change_per_epoch_late")
    if figures_dir is not None:
        seen = curves_frame.assign(epoch=curves_frame.epoch * len(x_train))
        cs.curve_figure(
            seen,
            "test ELBO",
            label_of=label_of_run,
            ylabel="test ELBO (1000 images)",
            title="AEVB Fig. 2 protocol: the bound against training examples seen "
            "(x axis: examples)",
            path=Path(figures_dir) / "vae-latent-bound.png",
        )
    return finish(frame, curves, p.describe(len(x_train)))
