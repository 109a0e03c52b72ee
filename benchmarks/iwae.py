"""``lvmkit bench vae iwae``: IWAE Table 1 (Burda, Grosse & Salakhutdinov 2016) — VAE and IWAE at
k = 1, 5, 50 on 784-200-200-50, test NLL with K = 5000, beside the paper's numbers."""

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

IWAE_PAPER = {  # Burda, Grosse & Salakhutdinov (ICLR 2016), Table 1, MNIST, one stochastic layer
    ("vae", 1): 86.76,
    ("vae", 5): 86.47,
    ("vae", 50): 86.35,
    ("iwae", 5): 85.54,
    ("iwae", 50): 84.78,
}


IWAE_SOURCE = "Burda et al. 2016, Table 1"


IWAE_RUNS = {
    "quick": (("vae", 1), ("iwae", 5)),
    "full": (("vae", 1), ("iwae", 5)),
    "paper": (("vae", 1), ("vae", 5), ("vae", 50), ("iwae", 5), ("iwae", 50)),
}


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
    """VAE and IWAE of Burda et al. with k samples in training: 784-200-200-50, tanh."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    p = scale or PROFILES["iwae"][profile]
    x_train, _, x_test, _ = mnist(p)
    tasks = [
        Task(
            "vae-iwae",
            f"{objective.upper()} k={k}",
            784,
            ("x",),
            BINARY_IMAGES,
            latent_dim=50,
            hidden_dims=(200, 200),
            activation="tanh",
            num_particles=k,
            objective="iwae" if objective == "iwae" else "elbo",
            num_train=len(x_train),
        )
        for objective, k in IWAE_RUNS[profile]
    ]
    tasks = chosen(tasks, settings)
    rows, curves = run_settings(
        "vae-iwae",
        tasks,
        {BUILTIN: builtin_vae},
        p,
        x_train,
        x_test,
        device,
        contenders,
        only,
        (REFERENCE, IWAE_SOURCE),
    )
    for task in tasks:
        objective, k = task.setting.split()[0].lower(), task.num_particles
        rows.append(
            {
                "setting": task.setting,
                "contender": IWAE_SOURCE,
                "epochs": 3280,
                "test_nll": IWAE_PAPER[(objective, k)],
            }
        )
    frame = pd.DataFrame(rows)
    paper = frame.setting.map(
        {t.setting: IWAE_PAPER[(t.setting.split()[0].lower(), t.num_particles)] for t in tasks}
    )
    frame.insert(
        frame.columns.get_loc("test_nll") + 1,
        "minus_paper",
        (frame.test_nll - paper).where(frame.contender != IWAE_SOURCE),
    )
    frame["K"], frame["n_is"] = p.num_samples, min(p.n_is, len(x_test))
    frame.loc[frame.contender == IWAE_SOURCE, ["K", "n_is"]] = [5000, 10_000]
    curves_frame = pd.concat(curves, ignore_index=True)
    frame = with_trend(frame, curves_frame, "test NLL (IS)", "nll_change_per_epoch_late")
    if figures_dir is not None:
        lines = {
            f"{IWAE_SOURCE}: {t.setting}, 3280 epochs": float(
                paper[frame.setting == t.setting].iloc[0]
            )
            for t in tasks
        }
        cs.curve_figure(
            curves_frame,
            "test NLL (IS)",
            label_of=label_of_run,
            lines=lines,
            ylabel=f"test NLL, IS K={p.curve_samples} ({p.curve_points} images)",
            title="IWAE Table 1 protocol: test NLL per epoch",
            path=Path(figures_dir) / "vae-iwae-nll.png",
        )
        cs.curve_figure(
            curves_frame,
            "test ELBO",
            label_of=label_of_run,
            ylabel="test ELBO",
            path=Path(figures_dir) / "vae-iwae-bound.png",
        )
    return finish(frame, curves, p.describe(len(x_train)))
