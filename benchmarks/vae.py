"""``lvmkit bench vae <suite>``: the VAE family on binarized MNIST, on the papers' protocols, with
your own model beside the built-in ones and the published numbers.

Each suite is a protocol (:class:`Protocol`: data, training budget, optimizer and schedule,
evaluation) and a set of settings; every *contender* — the built-in model, the hand-written
PyTorch reference where there is one, and any pair you bring (:mod:`lvmkit.benchmarks.contenders`)
— is trained in every setting under the same protocol and scored the same way, and the papers'
numbers are rows of the same table. Every run records learning curves (the metric per epoch),
drawn with the paper's final number as a dashed line; the table says where each curve ends and
how fast it still moved over the last quarter of training.

Suites (``run(profile, device=..., figures_dir=..., contenders=..., only=..., settings=...)``):

- ``latent``: AEVB Fig. 2 (Kingma & Welling 2014) — latent dims 3, 5, 10, 20, 200, one hidden
  layer of 500 tanh units, trained with Adagrad (lr 0.02, from the paper's {0.01, 0.02, 0.1}),
  minibatches of 100 and the N(0, I) prior on the parameters as weight decay; the test bound
  against training examples seen;
- ``iwae``: IWAE Table 1 (Burda, Grosse & Salakhutdinov 2016) — 784-200-200-50 tanh, dynamic
  binarization, Adam (β = 0.9, 0.999, ε = 1e-4), minibatches of 20, the learning rate
  0.001 · 10^(−i/7) for 3^i epochs, i = 0…7 (3,280 epochs; ``full`` keeps the 8 stages in the same
  proportions over its own length), VAE (k = 1, 5, 50) and IWAE (k = 5, 50), test NLL with
  K = 5000;
- ``m2``: Kingma et al. (2014) M2 with 100 / 600 / 1000 / 3000 labels — each image once an epoch
  (the labelled ones spread over the unlabelled minibatches), α = 0.1 · N over the labelled
  images' mean, Adam (lr 3e-4, β = 0.9, 0.999: the paper's "decays 0.1 and 0.001"), batch 200
  (Pyro's example: the paper does not say); test accuracy of q(y | x) beside the same classifier
  trained on the labelled images alone — the column that says whether the unlabelled images
  helped — and beside the paper's and Pyro's example's numbers;
- ``cvae``: Sohn et al. (2015) quadrant completion as Pyro's CVAE example does it — the
  baseline trained first, the CVAE's condition given the baseline's guess in the hidden pixels,
  early stopping (patience 3 on the validation split, the best epoch's weights kept);
- ``variants``: VAE (three likelihoods), β-VAE, KL warm-up, IWAE, RWS, AE, DAE, CAE and AAE on the
  same data and network.

Profiles: ``quick`` (seconds; the tests), ``full`` (what a 2-core CPU does in its hours: the
papers' optimizers and schedules, shorter), ``paper`` (the papers' lengths; GPU days).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.util import get_rng_state, set_rng_state

from lvmkit import datasets, plots
from lvmkit.benchmarks import contenders as cs
from lvmkit.benchmarks import references
from lvmkit.benchmarks.contenders import Contender, Curve, Task
from lvmkit.data import MNIST_IMAGE_SHAPE, binarize, load_mnist
from lvmkit.guides import GaussianEncoder, GaussianEncoderConfig
from lvmkit.inference import (
    Callback,
    EarlyStopping,
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
    build_m1_m2,
    build_m2,
    empty_guide,
    kingma_aux_weight,
)
from lvmkit.models._checks import check_choice

PROFILE_NAMES = ("quick", "full", "paper")
BUILTIN = "lvmkit"  # the built-in model, trained by lvmkit.fit
REFERENCE = "hand-written PyTorch"  # the same networks trained by a textbook loop
VALIDATION = 1000  # test images of the per-epoch bound


class StagedDecay:
    """Burda et al.'s schedule as a per-step learning-rate factor: 10^(−i/7) for the i-th of 8
    stages lasting 3^i/3280 of training (i = 0…7), so 1, 3, 9, … 2187 epochs of the paper's 3,280,
    and the same proportions of a shorter run."""

    STAGES = 8

    def __init__(self, total_steps: int) -> None:
        self.total_steps = max(1, total_steps)
        lengths = [3**i for i in range(self.STAGES)]
        self.ends = np.cumsum(lengths) / sum(lengths)

    def __call__(self, step: int) -> float:
        stage = int(np.searchsorted(self.ends, step / self.total_steps, side="right"))
        return 10 ** (-min(stage, self.STAGES - 1) / 7)

    def __repr__(self) -> str:
        return f"StagedDecay(3^i stages over {self.total_steps} steps)"


@dataclass(frozen=True)
class Protocol:
    """One profile of a suite: how much data, how it is trained, how it is scored."""

    n_train: int | None  # training images (None: all 50,000)
    n_test: int  # test images scored by the ELBO and the probes
    n_is: int  # test images scored by importance sampling (K samples each)
    epochs: int
    num_samples: int  # K of the final IS estimate
    batch_size: int = 100
    lr: float = 1e-3
    optimizer: Any = None  # None: Adam; else a torch.optim class
    optimizer_args: Mapping[str, Any] = field(default_factory=dict)
    schedule: str | None = None  # "iwae": Burda et al.'s staged decay, per step
    weight_decay_prior: bool = False  # AEVB: p(θ) = N(0, I) as weight decay batch / N
    early_stopping: int | None = None  # patience on the validation split (the CVAE's)
    seeds: tuple[int, ...] = (0,)
    curve_points: int = 0  # test images of the per-epoch IS curve (0: no IS curve)
    curve_samples: int = 100  # its K
    reference: tuple[str, ...] = ()  # settings that get a hand-written PyTorch row
    pretrain_epochs: int = 0  # the m2 suite's M1 (a VAE on all images) before M1+M2

    @property
    def seed(self) -> int:
        return self.seeds[0]

    def steps_per_epoch(self, n_train: int) -> int:
        return -(-n_train // self.batch_size)

    def optimizer_settings(self, n_train: int) -> tuple[Any, dict[str, Any]]:
        args = {"lr": self.lr, **self.optimizer_args}
        if self.weight_decay_prior:
            args["weight_decay"] = self.batch_size / n_train
        return self.optimizer or torch.optim.Adam, args

    def fit_options(self, n_train: int, seed: int, device: str) -> dict[str, Any]:
        """``lvmkit.fit``'s keywords for this protocol."""
        optimizer, args = self.optimizer_settings(n_train)
        lr = args.pop("lr")
        out: dict[str, Any] = dict(
            epochs=self.epochs, batch_size=self.batch_size, lr=lr, seed=seed, device=device
        )
        if self.optimizer is not None:
            out["optimizer"] = optimizer
        if args:
            out["optimizer_args"] = args
        if self.schedule == "iwae":
            total = self.epochs * self.steps_per_epoch(n_train)
            out["scheduler"] = partial(
                torch.optim.lr_scheduler.LambdaLR, lr_lambda=StagedDecay(total)
            )
            out["scheduler_interval"] = "step"
        return out

    def make_optimizer(self, n_train: int) -> Callable[[list[Any]], torch.optim.Optimizer]:
        optimizer, args = self.optimizer_settings(n_train)
        return lambda params: optimizer(params, **args)

    def step_schedule(self, n_train: int) -> Callable[[int], float] | None:
        if self.schedule == "iwae":
            return StagedDecay(self.epochs * self.steps_per_epoch(n_train))
        return None

    def describe(self, n_train: int) -> str:
        optimizer, args = self.optimizer_settings(n_train)
        words = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in args.items()
        )
        out = f"{optimizer.__name__}({words}), batch {self.batch_size}, {self.epochs} epochs"
        if self.schedule == "iwae":
            out += ", lr × 10^(−i/7) over 8 stages of 3^i/3280 of the steps"
        if self.early_stopping:
            out += f", early stopping (patience {self.early_stopping})"
        return out


Scale = Protocol  # the name of earlier releases


def _profiles(quick: Protocol, full: Protocol, paper: Protocol) -> dict[str, Protocol]:
    return {"quick": quick, "full": full, "paper": paper}


# -- data --------------------------------------------------------------------------------------


def _mnist(p: Protocol) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grey-level train images and labels, and statically binarized test images and labels."""
    train = load_mnist("train", limit=p.n_train)
    test = load_mnist("test", binarization="static", seed=p.seed, limit=p.n_test)
    return train.x, train.y, test.x, test.y


BINARY_IMAGES = "binarized MNIST images x of shape (N, 784) in {0, 1} (called as model(x=x))"


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


def _builtin_vae(task: Task) -> tuple[Any, Any]:
    assert task.latent_dim is not None and task.hidden_dims is not None
    cfg = VAEConfig(
        task.data_dim,
        latent_dim=task.latent_dim,
        hidden_dims=task.hidden_dims,
        activation=task.activation or "relu",
    )
    return _vae_pair(cfg)


def _optional(fn: Callable[..., Any], *args: Any) -> Any:
    """A metric that needs a guide site ``z`` (active units, codes): None where there is none."""
    try:
        return fn(*args)
    except (ValueError, KeyError):
        return None


def _count(units: Any) -> float:
    return units.count if units is not None else math.nan


def _density_scores(model, guide, x_test, p: Protocol, seed: int) -> dict[str, float]:
    elbo = summarize(evaluate(model, guide, x_test, 1, seed=seed)).elbo
    return {
        "test_elbo": elbo,
        **cs.is_scores(model, guide, x_test[: p.n_is], p.num_samples, seed),
        "active_units": _count(_optional(active_units, guide, x_test)),
    }


def _density_curve(model, guide, x_test, p: Protocol, seed: int) -> Curve:
    """The bound on 1,000 test images every epoch; the IS NLL on ``curve_points`` at
    :func:`curve_epochs`."""
    metrics = {}
    if p.curve_points:
        part = x_test[: p.curve_points]
        metrics["test NLL (IS)"] = lambda: (
            -summarize(evaluate(model, guide, part, p.curve_samples, seed=seed)).log_likelihood
        )
    return Curve(metrics, at=cs.curve_epochs(p.epochs), from_history={"val_elbo:test ELBO": float})


def _train_density(
    name: str, contender: Contender, task: Task, p: Protocol, x_train, x_test, device, seed
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Fit one contender on one setting; its row and its curves."""
    model, guide = contender.model, contender.guide
    curve = _density_curve(model, guide, x_test, p, seed)
    _, per_epoch = cs.train(
        contender,
        task,
        x_train,
        protocol=p.fit_options(len(x_train), seed, device),
        transform=binarize,
        validation_data=x_test[:VALIDATION],
        callbacks=[curve],
    )
    row = {
        "setting": task.setting,
        "contender": name,
        "seed": seed,
        "epochs": p.epochs,
        **_density_scores(model, guide, x_test, p, seed),
        "seconds_per_epoch": per_epoch,
    }
    return row, curve.frame(setting=task.setting, contender=name, seed=seed)


def _reference_density(
    task: Task, p: Protocol, x_train, x_test, seed
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The built-in networks, from the same seed, trained by the hand-written loop."""
    cs.say(task, REFERENCE)
    pyro.set_rng_seed(seed)
    model, guide = _builtin_vae(task)
    curve = _density_curve(model, guide, x_test, p, seed)

    def on_epoch(epoch: int) -> None:
        val = summarize(evaluate(model, guide, x_test[:VALIDATION], 1, seed=seed)).elbo
        curve.on_epoch_end(epoch, {"val_elbo": val})

    tic = time.perf_counter()
    references.train_vae(
        model.decoder,
        guide.net,
        x_train,
        epochs=p.epochs,
        batch_size=p.batch_size,
        optimizer=p.make_optimizer(len(x_train)),
        schedule=p.step_schedule(len(x_train)),
        objective="iwae" if task.objective == "iwae" else "elbo",
        k=task.num_particles,
        seed=seed,
        on_epoch=on_epoch,
    )
    per_epoch = (time.perf_counter() - tic) / p.epochs
    row = {
        "setting": task.setting,
        "contender": REFERENCE,
        "seed": seed,
        "epochs": p.epochs,
        **_density_scores(model, guide, x_test, p, seed),
        "seconds_per_epoch": per_epoch,
    }
    return row, curve.frame(setting=task.setting, contender=REFERENCE, seed=seed)


def _run_settings(
    suite: str,
    tasks: list[Task],
    builtin: Mapping[str, cs.Factory],
    p: Protocol,
    x_train,
    x_test,
    device,
    contenders,
    only,
    reserved: tuple[str, ...],
) -> tuple[list[dict[str, Any]], list[pd.DataFrame]]:
    """Every contender (and the reference where the protocol asks) on every setting."""
    chosen = cs.select(suite, builtin, contenders, only, reserved=reserved)
    run_reference = only is None or only == REFERENCE
    rows, curves = [], []
    for task in tasks:
        for seed in p.seeds:
            task_s = replace(task, seed=seed)
            for name, factory in chosen.items():
                pyro.set_rng_seed(seed)
                contender = cs.build(name, factory, task_s, [{"x": x_test[:4]}])
                row, curve = _train_density(
                    name, contender, task_s, p, x_train, x_test, device, seed
                )
                rows.append(row)
                curves.append(curve)
            if run_reference and task.setting in p.reference:
                row, curve = _reference_density(task_s, p, x_train, x_test, seed)
                rows.append(row)
                curves.append(curve)
    return rows, curves


def _with_trend(frame: pd.DataFrame, curves: pd.DataFrame, metric: str, column: str):
    """The late slope of ``metric``'s curve as ``column`` of each row."""
    if curves.empty or frame.empty:
        frame[column] = math.nan
        return frame
    keys = ["setting", "contender", "seed"]
    slopes = cs.trend(curves[curves.metric == metric], keys)
    if slopes.empty:
        frame[column] = math.nan
        return frame
    slopes = slopes.rename(columns={"per_epoch_late": column})[[*keys, column]]
    return frame.merge(slopes, on=keys, how="left")


def _finish(frame: pd.DataFrame, curves: list[pd.DataFrame], protocol_text: str) -> pd.DataFrame:
    frame.attrs["curves"] = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    frame.attrs["protocol"] = protocol_text
    return frame


# -- latent-dimension sweep (AEVB Fig. 2) ---------------------------------------------------------

_ADAGRAD: dict[str, Any] = dict(optimizer=torch.optim.Adagrad, lr=0.02, weight_decay_prior=True)
LATENT_PROFILES = _profiles(
    Protocol(
        n_train=1000,
        n_test=200,
        n_is=50,
        epochs=2,
        num_samples=50,
        curve_points=20,
        curve_samples=20,
        reference=("latent 3",),
        **_ADAGRAD,
    ),
    Protocol(
        n_train=None,
        n_test=10_000,
        n_is=1000,
        epochs=20,
        num_samples=1000,
        curve_points=200,
        curve_samples=200,
        reference=("latent 20",),
        **_ADAGRAD,
    ),
    Protocol(
        n_train=None,
        n_test=10_000,
        n_is=10_000,
        epochs=2000,
        num_samples=5000,
        curve_points=1000,
        curve_samples=1000,
        reference=("latent 20",),
        **_ADAGRAD,
    ),
)
LATENT_DIMS = {"quick": (3, 20), "full": (3, 5, 10, 20, 200), "paper": (3, 5, 10, 20, 200)}


def run_latent(
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
    p = scale or LATENT_PROFILES[profile]
    x_train, _, x_test, _ = _mnist(p)
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
    tasks = _chosen(tasks, settings)
    rows, curves = _run_settings(
        "vae-latent",
        tasks,
        {BUILTIN: _builtin_vae},
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
    frame = _with_trend(frame, curves_frame, "test ELBO", "elbo_change_per_epoch_late")
    if figures_dir is not None:
        seen = curves_frame.assign(epoch=curves_frame.epoch * len(x_train))
        cs.curve_figure(
            seen,
            "test ELBO",
            label_of=_label,
            ylabel="test ELBO (1000 images)",
            title="AEVB Fig. 2 protocol: the bound against training examples seen "
            "(x axis: examples)",
            path=Path(figures_dir) / "vae-latent-bound.png",
        )
    return _finish(frame, curves, p.describe(len(x_train)))


def _chosen(tasks: list[Task], settings) -> list[Task]:
    if settings is None:
        return tasks
    names = [t.setting for t in tasks]
    unknown = [s for s in settings if s not in names]
    if unknown:
        raise ValueError(f"settings {unknown} are not among this profile's settings {names}")
    return [t for t in tasks if t.setting in settings]


def _label(run: pd.Series) -> str:
    seed = f" (seed {run['seed']})" if run.get("seed") else ""
    return f"{run['setting']} — {run['contender']}{seed}"


# -- IWAE Table 1 -----------------------------------------------------------------------------

_BURDA: dict[str, Any] = dict(
    batch_size=20, lr=1e-3, optimizer_args={"betas": (0.9, 0.999), "eps": 1e-4}, schedule="iwae"
)
IWAE_PROFILES = _profiles(
    Protocol(
        n_train=500,
        n_test=100,
        n_is=20,
        epochs=2,
        num_samples=100,
        curve_points=20,
        curve_samples=20,
        reference=("VAE k=1",),
        **_BURDA,
    ),
    Protocol(
        n_train=None,
        n_test=10_000,
        n_is=1000,
        epochs=100,
        num_samples=5000,
        curve_points=200,
        curve_samples=500,
        reference=("VAE k=1",),
        **_BURDA,
    ),
    Protocol(
        n_train=None,
        n_test=10_000,
        n_is=10_000,
        epochs=3280,
        num_samples=5000,
        curve_points=1000,
        curve_samples=5000,
        reference=("VAE k=1", "IWAE k=5"),
        **_BURDA,
    ),
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


def run_iwae(
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
    p = scale or IWAE_PROFILES[profile]
    x_train, _, x_test, _ = _mnist(p)
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
    tasks = _chosen(tasks, settings)
    rows, curves = _run_settings(
        "vae-iwae",
        tasks,
        {BUILTIN: _builtin_vae},
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
    frame = _with_trend(frame, curves_frame, "test NLL (IS)", "nll_change_per_epoch_late")
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
            label_of=_label,
            lines=lines,
            ylabel=f"test NLL, IS K={p.curve_samples} ({p.curve_points} images)",
            title="IWAE Table 1 protocol: test NLL per epoch",
            path=Path(figures_dir) / "vae-iwae-nll.png",
        )
        cs.curve_figure(
            curves_frame,
            "test ELBO",
            label_of=_label,
            ylabel="test ELBO",
            path=Path(figures_dir) / "vae-iwae-bound.png",
        )
    return _finish(frame, curves, p.describe(len(x_train)))


# -- M2 label counts --------------------------------------------------------------------------

_KINGMA: dict[str, Any] = dict(batch_size=200, lr=3e-4, optimizer_args={"betas": (0.9, 0.999)})
M2_PROFILES = _profiles(
    Protocol(
        n_train=2000,
        n_test=500,
        n_is=0,
        epochs=2,
        num_samples=1,
        reference=("100 labels",),
        pretrain_epochs=1,
        **_KINGMA,
    ),
    Protocol(
        n_train=None,
        n_test=10_000,
        n_is=0,
        epochs=50,
        num_samples=1,
        reference=("100 labels",),
        pretrain_epochs=50,
        **_KINGMA,
    ),
    Protocol(
        n_train=None,
        n_test=10_000,
        n_is=0,
        epochs=1000,
        num_samples=1,
        reference=("100 labels", "3000 labels"),
        pretrain_epochs=1000,
        **_KINGMA,
    ),
)
M2_LABELS = {"quick": (100,), "full": (100, 600, 1000, 3000), "paper": (100, 600, 1000, 3000)}
M2_PAPER_ERROR = {100: 11.97, 600: 4.94, 1000: 3.60, 3000: 3.92}  # Kingma et al. 2014, Table 1
PYRO_M2_ACCURACY = {100: 93.19, 600: 94.37, 1000: 94.87, 3000: 95.82}  # Pyro's SS-VAE README
M2_SOURCE = "Kingma et al. 2014, Table 1 (M2)"
M1_M2_PAPER_ERROR = {100: 3.33, 600: 2.59, 1000: 2.40, 3000: 2.18}  # the same table, M1+M2
M1_M2_SOURCE = "Kingma et al. 2014, Table 1 (M1+M2)"
PYRO_M2_SOURCE = "Pyro's ss_vae_M2 example (README)"
SUPERVISED = "classifier on the labels alone"
STACKED = "lvmkit M1+M2"  # M2 on the code of a VAE trained first on all images (Kingma's §3.2)
SUPERVISED_M1 = "classifier on M1's code, labels alone"
M1_CONFIG = VAEConfig(784, latent_dim=50, hidden_dims=(600, 600), activation="softplus")
M2_DATA = (
    "binarized MNIST: unlabelled images called as model(x=x), labelled ones as model(x=x, y=y) "
    "with y (N,) int64 in 0..9; x (N, 784) in {0, 1}"
)


def _m2_objective() -> TraceEnum_ELBO:
    # labelled calls have no enumerated site: that is expected, not worth Pyro's warning
    return TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)


def _m2_config(task: Task, data_dim: int) -> M2Config:
    """M2's sizes and α for ``task``, on ``data_dim`` inputs (the pixels, or M1's code)."""
    return M2Config(
        data_dim,
        num_classes=task.num_classes or 10,
        latent_dim=task.latent_dim or 50,
        hidden_dims=task.hidden_dims or (500,),
        aux_weight=task.extra["aux_weight"],
    )


def _builtin_m2(task: Task) -> Contender:
    model, guide = build_m2(_m2_config(task, task.data_dim))
    return Contender(model, guide, objective=_m2_objective())


class _PretrainedM1:
    """M1 of M1+M2, trained once per seed on all the training images (labels unused) and
    shared by every label count: a VAE 784-600-600-50 (softplus, Bernoulli), Kingma et al.'s
    MNIST M1, under the suite's optimizer for ``pretrain_epochs`` epochs."""

    def __init__(self, x: torch.Tensor, p: Protocol, device: str) -> None:
        self.x, self.p, self.device = x, p, device
        self.pairs: dict[int, tuple[VAE, GaussianEncoder]] = {}
        self.seconds = 0.0
        self.final_loss = math.nan

    @property
    def trained(self) -> bool:
        return bool(self.pairs)

    def __call__(self, seed: int) -> tuple[VAE, GaussianEncoder]:
        if seed not in self.pairs:
            print(f"[vae-m2] M1: {self.describe()}, seed {seed}", flush=True)
            state = get_rng_state()  # M1 leaves the run's random stream as it was,
            pyro.clear_param_store()  # so a contender's draws do not depend on whether M1
            pyro.set_rng_seed(seed)  # was trained just now or for an earlier setting
            model, guide = _vae_pair(M1_CONFIG)
            options = self.p.fit_options(len(self.x), seed, self.device)
            options["epochs"] = max(1, self.p.pretrain_epochs)
            tic = time.perf_counter()
            result = fit(model, guide, {"x": self.x}, progress=False, **options)
            self.seconds = time.perf_counter() - tic
            self.final_loss = float(result.history.train_loss.iloc[-1])
            self.pairs[seed] = (model.eval(), guide.eval())
            set_rng_state(state)
        return self.pairs[seed]

    def describe(self) -> str:
        n = max(1, self.p.pretrain_epochs)
        text = f"VAE 784-600-600-50 softplus on all training images, {n} epoch{'s' * (n != 1)}"
        if self.seconds:
            text += f" ({self.seconds / 60:.1f} min, final −ELBO {self.final_loss:.1f} nats)"
        return text


def _copies(m1_of: _PretrainedM1, seed: int) -> tuple[VAE, GaussianEncoder]:
    """Copies of the seed's trained M1 (model, guide), for one contender to hold."""
    model, guide = m1_of(seed)
    return copy.deepcopy(model), copy.deepcopy(guide)


def _builtin_m1_m2(task: Task) -> Contender:
    m1_model, m1_guide = task.extra["pretrained_m1"]()
    model, guide = build_m1_m2(_m2_config(task, M1_CONFIG.latent_dim), m1_model, m1_guide)
    return Contender(model, guide, objective=_m2_objective())


class _Accuracy(Curve):
    def __init__(self, classify: Callable[[], torch.Tensor], y: torch.Tensor) -> None:
        super().__init__({"test accuracy": lambda: 100 * float((classify() == y).float().mean())})


def run_m2(
    profile="full",
    *,
    device="cpu",
    figures_dir=None,
    scale=None,
    contenders=None,
    only=None,
    settings=None,
) -> pd.DataFrame:
    """M2 (y summed out for unlabelled images, α log q(y | x) on labelled ones) per label count,
    beside the same classifier trained on the labelled images alone."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    p = scale or M2_PROFILES[profile]
    train = load_mnist("train", binarization="static", seed=p.seed, limit=p.n_train)
    test = load_mnist("test", binarization="static", seed=p.seed, limit=p.n_test)
    reserved = (REFERENCE, SUPERVISED, SUPERVISED_M1, M2_SOURCE, M1_M2_SOURCE, PYRO_M2_SOURCE)
    m1_of = _PretrainedM1(train.x, p, device)
    builtin = {BUILTIN: _builtin_m2, STACKED: _builtin_m1_m2}
    chosen = cs.select("vae-m2", builtin, contenders, only, reserved=reserved)
    labels_run = [n for n in M2_LABELS[profile] if settings is None or f"{n} labels" in settings]
    if settings is not None:
        _chosen([_m2_task(n, len(train.x)) for n in M2_LABELS[profile]], settings)
    rows, curves = [], []
    for labels in labels_run:
        for seed in p.seeds:
            task = _m2_task(labels, len(train.x))
            m1 = partial(_copies, m1_of, seed)  # M1 is trained when a contender first asks
            task = replace(task, seed=seed, extra={**task.extra, "pretrained_m1": m1})
            sources = datasets.semi_supervised(train.x, train.y, labels, seed=seed)
            labelled = sources[1].data
            probe = [
                {"x": sources[0].data["x"][:4]},
                {"x": labelled["x"][:4], "y": labelled["y"][:4]},
            ]
            for name, factory in chosen.items():
                pyro.set_rng_seed(seed)
                contender = cs.build(name, factory, task, probe)
                curve = _Accuracy(partial(cs.classify, contender, task, test.x), test.y)
                _, per_epoch = cs.train(
                    contender,
                    task,
                    sources,
                    callbacks=[curve],
                    protocol=p.fit_options(len(train.x), seed, device),
                )
                rows.append(_m2_row(task, name, seed, p.epochs, curve, per_epoch))
                curves.append(curve.frame(setting=task.setting, contender=name, seed=seed))
            supervised = [(SUPERVISED, None)] if only in (None, SUPERVISED) else []
            if only in (None, STACKED, SUPERVISED_M1):
                supervised.append((SUPERVISED_M1, m1_of(seed)[1]))
            for name, m1_encoder in supervised:
                row, curve = _supervised_only(
                    task, labelled, test, p, seed, device, len(train.x), name, m1_encoder
                )
                rows.append(row)
                curves.append(curve)
            if only in (None, REFERENCE) and task.setting in p.reference:
                row, curve = _reference_m2(task, sources, test, p, seed)
                rows.append(row)
                curves.append(curve)
        for source, values in (
            (M2_SOURCE, 100 - M2_PAPER_ERROR[labels]),
            (M1_M2_SOURCE, 100 - M1_M2_PAPER_ERROR[labels]),
            (PYRO_M2_SOURCE, PYRO_M2_ACCURACY[labels]),
        ):
            rows.append({"setting": f"{labels} labels", "contender": source, "accuracy": values})
    frame = pd.DataFrame(rows)
    frame.insert(1, "labels", frame.setting.str.split().str[0].astype(int))
    frame["error"] = 100 - frame.accuracy
    frame["minus_supervised_only"] = _minus(frame, SUPERVISED)
    frame.loc[frame.contender == SUPERVISED, "minus_supervised_only"] = math.nan
    frame["minus_m1_code_only"] = _minus(frame, SUPERVISED_M1)  # what M2 adds to M1's features
    frame.loc[frame.contender != STACKED, "minus_m1_code_only"] = math.nan
    frame["n_test"] = len(test.x)
    curves_frame = pd.concat(curves, ignore_index=True)
    frame = _with_trend(frame, curves_frame, "test accuracy", "accuracy_change_per_epoch_late")
    if figures_dir is not None:
        m2_figure(frame, Path(figures_dir) / "vae-m2-accuracy.png")
        m2_curve_figures(curves_frame, p.describe(len(train.x)), Path(figures_dir))
    text = p.describe(len(train.x))
    if m1_of.trained:
        text += f"; M1 first: {m1_of.describe()}"
    return _finish(frame, curves, text)


def _minus(frame: pd.DataFrame, baseline: str) -> np.ndarray:
    """Each row's accuracy minus ``baseline``'s in the same setting and seed (NaN without one)."""
    rows = frame[frame.contender == baseline].groupby(["setting", "seed"]).accuracy.mean()
    base = frame.set_index(["setting", "seed"]).index.map(rows.to_dict())
    return frame.accuracy.to_numpy() - np.asarray(base, dtype=float)


def _m2_task(labels: int, n_train: int) -> Task:
    return Task(
        "vae-m2",
        f"{labels} labels",
        784,
        ("x", "y"),
        M2_DATA,
        latent_dim=50,
        hidden_dims=(500,),
        activation="softplus",
        num_classes=10,
        objective=_m2_objective(),
        num_train=n_train,
        extra={
            "aux_weight": kingma_aux_weight(n_train, labels),
            "num_labelled": labels,
            "label_site": "y",
        },
    )


def _m2_row(task, name, seed, epochs, curve: Curve, per_epoch: float) -> dict[str, Any]:
    accuracy = [r["value"] for r in curve.rows if r["metric"] == "test accuracy"]
    return {
        "setting": task.setting,
        "contender": name,
        "seed": seed,
        "epochs": epochs,
        "accuracy": accuracy[-1],
        "best_epoch_accuracy": max(accuracy),
        "seconds_per_epoch": per_epoch,
    }


def _supervised_only(
    task, labelled, test, p: Protocol, seed, device, n_train, name=SUPERVISED, m1_encoder=None
):
    """The M2 guide's classifier network trained on the labelled images alone (maximum
    likelihood through ``fit``), for as many optimizer steps as M2 takes; its accuracy is
    recorded at the M2-epochs those steps correspond to. With ``m1_encoder`` it reads M1's
    posterior mean instead of the pixels (M1+M2's classifier, without M2)."""
    cs.say(task, name)
    pyro.set_rng_seed(seed)
    features = (lambda x: x) if m1_encoder is None else partial(posterior_means, m1_encoder)
    dim = 784 if m1_encoder is None else M1_CONFIG.latent_dim
    _, guide = build_m2(M2Config(dim, latent_dim=task.latent_dim, hidden_dims=task.hidden_dims))
    classifier = guide.classifier
    pyro.clear_param_store()  # a contender's plain functions may have used the same names
    labelled = {"x": features(labelled["x"]), "y": labelled["y"]}
    test_x = features(test.x)

    def model(x, y):
        pyro.module("supervised_classifier", classifier)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=classifier(x)), obs=y)

    n_l = len(labelled["x"])
    batch = min(p.batch_size, n_l)
    per_m2_epoch = p.steps_per_epoch(n_train - n_l) / -(-n_l // batch)  # its epochs per M2 epoch
    epochs = max(1, round(p.epochs * per_m2_epoch))
    at = {max(1, round(e * per_m2_epoch)): e for e in range(1, p.epochs + 1)}
    curve = Curve()

    class Record(Callback):
        def on_epoch_end(self, epoch, metrics):
            if epoch in at:
                with torch.no_grad():
                    classifier.eval()
                    x = test_x.to(next(classifier.parameters()).device)
                    acc = (classifier(x).argmax(-1).cpu() == test.y).float().mean()
                    classifier.train()
                curve.rows.append(
                    {"epoch": at[epoch], "metric": "test accuracy", "value": 100 * float(acc)}
                )

    options = p.fit_options(n_train, seed, device)
    options.update(epochs=epochs, batch_size=batch)
    tic = time.perf_counter()
    fit(model, empty_guide, dict(labelled), progress=False, callbacks=[Record()], **options)
    per_epoch = (time.perf_counter() - tic) / p.epochs
    row = _m2_row(task, name, seed, p.epochs, curve, per_epoch)
    return row, curve.frame(setting=task.setting, contender=name, seed=seed)


def _reference_m2(task, sources, test, p: Protocol, seed):
    """The built-in M2 networks, from the same seed, trained by the hand-written loop."""
    cs.say(task, REFERENCE)
    pyro.set_rng_seed(seed)
    contender = _builtin_m2(task)
    model, guide = contender.model, contender.guide
    curve = _Accuracy(lambda: cs.classify(contender, task, test.x), test.y)
    labelled = sources[1].data
    tic = time.perf_counter()
    references.train_m2(
        model.decoder,
        guide.encoder,
        guide.classifier,
        sources[0].data["x"],
        labelled["x"],
        labelled["y"],
        classes=task.num_classes,
        alpha=task.extra["aux_weight"],
        epochs=p.epochs,
        batch_size=p.batch_size,
        optimizer=p.make_optimizer(task.num_train),
        seed=seed,
        on_epoch=lambda epoch: curve.on_epoch_end(epoch, {}),
    )
    per_epoch = (time.perf_counter() - tic) / p.epochs
    row = _m2_row(task, REFERENCE, seed, p.epochs, curve, per_epoch)
    return row, curve.frame(setting=task.setting, contender=REFERENCE, seed=seed)


def _contender_label(run: pd.Series, setting: str) -> str:
    return _label(run).removeprefix(f"{setting} — ")


def m2_curve_figures(curves: pd.DataFrame, protocol: str, out: Path) -> None:
    """Test accuracy per epoch, one figure per label count (``vae-m2-curves-100-labels.png``, …),
    the papers' final accuracies as dashed lines (M1+M2's where M1+M2 ran)."""
    for setting, part in curves.groupby("setting", sort=False):
        n = int(str(setting).split()[0])
        lines = {M2_SOURCE: 100 - M2_PAPER_ERROR[n]}
        if STACKED in set(part.contender):
            lines[M1_M2_SOURCE] = 100 - M1_M2_PAPER_ERROR[n]
        cs.curve_figure(
            part,
            "test accuracy",
            label_of=partial(_contender_label, setting=setting),
            lines=lines,
            ylabel="test accuracy of q(y | x) (%)",
            title=f"M2, {setting}: {protocol}",
            path=out / f"vae-m2-curves-{n}-labels.png",
        )


def m2_figure(frame: pd.DataFrame, path: Path):
    """Final test accuracy against the number of labelled images, one line per contender."""
    curves = {}
    for name, part in frame.groupby("contender", sort=False):
        mean = part.groupby("labels").accuracy.mean()
        curves[name] = (mean.index.to_numpy(), mean.to_numpy())
    return plots.line_plot(
        curves,
        xlabel="labelled training images",
        ylabel="test accuracy (%)",
        title="M2 on MNIST: classification accuracy",
        path=path,
    )


# -- CVAE quadrants -----------------------------------------------------------------------------

CVAE_PROFILES = _profiles(
    Protocol(n_train=1000, n_test=200, n_is=50, epochs=2, num_samples=50, early_stopping=3),
    Protocol(n_train=None, n_test=10_000, n_is=1000, epochs=10, num_samples=1000, early_stopping=3),
    Protocol(
        n_train=None, n_test=10_000, n_is=10_000, epochs=50, num_samples=5000, early_stopping=3
    ),
)
PYRO_CVAE = {1: (71.8, 100.4), 2: (51.0, 61.9), 3: (24.2, 25.4)}  # (CVAE, baseline), −ELBO-based
PYRO_CVAE_SOURCE = "Pyro's CVAE example (README)"
BASELINE = "lvmkit baseline (no z)"
CVAE_DATA = (
    "MNIST quadrant completion: x (N, 784) the binary image, c (N, 784) the image with the hidden "
    "quadrants set to −1 (or, under this protocol, filled with the baseline's guess), mask (N, "
    "784) bool True on the hidden pixels — score x where mask is True; called as model(x=x, c=c, "
    "mask=mask)"
)


class _KeepBest(Callback):
    """Pyro's CVAE example keeps the weights of the best validation epoch: so do we."""

    def __init__(self, *modules: Any) -> None:
        self.modules = [m for m in modules if isinstance(m, torch.nn.Module)]
        self.best = -math.inf
        self.state: list[dict[str, Any]] | None = None

    def on_epoch_end(self, epoch, metrics):
        if metrics.get("val_elbo", -math.inf) > self.best:
            self.best = metrics["val_elbo"]
            self.state = [copy.deepcopy(m.state_dict()) for m in self.modules]

    def restore(self) -> None:
        if self.state is not None:
            for module, state in zip(self.modules, self.state, strict=True):
                module.load_state_dict(state)


def _filled(data: dict[str, torch.Tensor], baseline) -> dict[str, torch.Tensor]:
    """The condition with the baseline's guess in the hidden pixels (Pyro's CVAE example feeds
    its prior network this, from a frozen pre-trained baseline)."""
    dev = next(baseline.parameters()).device
    with torch.no_grad():
        baseline.eval()
        guess = torch.sigmoid(baseline.net(data["c"].to(dev))).cpu()
    return {**data, "c": torch.where(data["mask"], guess, data["c"])}


def run_cvae(
    profile="full",
    *,
    device="cpu",
    figures_dir=None,
    scale=None,
    contenders=None,
    only=None,
    settings=None,
) -> pd.DataFrame:
    """CVAE vs the deterministic baseline for 1, 2 and 3 given quadrants, Pyro's protocol."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    p = scale or CVAE_PROFILES[profile]
    train = load_mnist("train", binarization="static", seed=p.seed, limit=p.n_train)
    valid = load_mnist("valid", binarization="static", seed=p.seed, limit=p.n_test)
    test = load_mnist("test", binarization="static", seed=p.seed, limit=p.n_test)
    small = {"quick": dict(latent_dim=20, hidden_dims=(200,))}.get(profile, {})
    reserved = (BASELINE, PYRO_CVAE_SOURCE)

    def builtin(task: Task):
        return build_cvae(CVAEConfig(784, 784, **small))

    chosen = cs.select("vae-cvae", {BUILTIN: builtin}, contenders, only, reserved=reserved)
    given_run = [g for g in (1, 2, 3) if settings is None or f"{g} quadrants" in settings]
    rows, curves, completions = [], [], {}
    for given in given_run:
        setting = f"{given} quadrants"
        data_train, data_valid, data_test = (
            datasets.quadrants(d.x, given) for d in (train, valid, test)
        )
        options = p.fit_options(len(train.x), p.seed, device)
        # the baseline first: its own row, and its guess fills the CVAE's condition
        pyro.set_rng_seed(p.seed)
        baseline = ConditionalBaseline(CVAEConfig(784, 784, **small))
        keep = _KeepBest(baseline)
        tic = time.perf_counter()
        history = fit(
            baseline,
            empty_guide,
            data_train,
            validation_data=data_valid,
            callbacks=[*_stopping(p), keep],
            progress=False,
            **options,
        ).history
        keep.restore()
        base_seconds = (time.perf_counter() - tic) / len(history)
        base = summarize(evaluate(baseline, empty_guide, data_test, 1, seed=p.seed))
        rows.append(
            {
                "setting": setting,
                "contender": BASELINE,
                "epochs": len(history),
                "nll_is": -base.log_likelihood,
                "neg_elbo": -base.elbo,
                "seconds_per_epoch": base_seconds,
            }
        )
        curves.append(_history_curve(history, setting, BASELINE))
        cond_train, cond_valid, cond_test = (
            _filled(d, baseline) for d in (data_train, data_valid, data_test)
        )
        task = Task(
            "vae-cvae",
            setting,
            784,
            ("x", "c", "mask"),
            CVAE_DATA,
            latent_dim=200,
            hidden_dims=(500, 500),
            activation="relu",
            condition_dim=784,
            num_train=len(train.x),
            extra={"quadrants_given": given},
        )
        probe = [{k: v[:4] for k, v in cond_test.items()}]
        for name, factory in chosen.items():
            pyro.set_rng_seed(p.seed)
            contender = cs.build(name, factory, task, probe)
            keep = _KeepBest(contender.model, contender.guide)
            result, per_epoch = cs.train(
                contender,
                task,
                cond_train,
                validation_data=cond_valid,
                callbacks=[*_stopping(p), keep],
                protocol=options,
            )
            keep.restore()
            model, guide = contender.model, contender.guide
            elbo = summarize(evaluate(model, guide, cond_test, 1, seed=p.seed)).elbo
            is_part = {k: v[: p.n_is] for k, v in cond_test.items()}
            scores = cs.is_scores(model, guide, is_part, p.num_samples, p.seed)
            rows.append(
                {
                    "setting": setting,
                    "contender": name,
                    "epochs": len(result.history),
                    "nll_is": scores["test_nll"],
                    "nll_se": scores["nll_se"],
                    "neg_elbo": -elbo,
                    "K": p.num_samples,
                    "n_is": len(is_part["x"]),
                    "frac_k_above_0_7": scores["frac_k_above_0_7"],
                    "seconds_per_epoch": per_epoch,
                }
            )
            curves.append(_history_curve(result.history, setting, name))
            if name == BUILTIN:
                completions[given] = (cond_test, model, baseline)
        pyro_cvae, pyro_base = PYRO_CVAE[given]
        rows.append(
            {"setting": setting, "contender": f"{PYRO_CVAE_SOURCE}: CVAE", "neg_elbo": pyro_cvae}
        )
        rows.append(
            {"setting": setting, "contender": f"{PYRO_CVAE_SOURCE}: baseline", "nll_is": pyro_base}
        )
    frame = pd.DataFrame(rows)
    frame.insert(1, "quadrants_given", frame.setting.str.split().str[0].astype(int))
    curves_frame = pd.concat(curves, ignore_index=True)
    if figures_dir is not None:
        out = Path(figures_dir)
        if completions:
            _quadrant_figure(completions, out / "vae-cvae-completions.png")
        lines = {f"{PYRO_CVAE_SOURCE}: CVAE, {g} given": PYRO_CVAE[g][0] for g in given_run}
        cs.curve_figure(
            curves_frame.assign(value=-curves_frame.value),
            "test ELBO",
            label_of=_label,
            lines=lines,
            ylabel="validation −ELBO (hidden pixels)",
            path=out / "vae-cvae-curves.png",
        )
    return _finish(frame, curves, p.describe(len(train.x)))


def _stopping(p: Protocol) -> list[Callback]:
    if not p.early_stopping:
        return []
    return [EarlyStopping("val_elbo", patience=p.early_stopping)]


def _history_curve(history: pd.DataFrame, setting: str, name: str) -> pd.DataFrame:
    part = history[["epoch", "val_elbo"]].rename(columns={"val_elbo": "value"})
    return part.assign(metric="test ELBO", setting=setting, contender=name, seed=0)


# -- variants side by side -----------------------------------------------------------------------

VARIANT_PROFILES = _profiles(
    Protocol(n_train=1000, n_test=300, n_is=50, epochs=1, num_samples=50),
    Protocol(n_train=None, n_test=10_000, n_is=1000, epochs=5, num_samples=1000),
    Protocol(n_train=None, n_test=10_000, n_is=10_000, epochs=500, num_samples=5000),
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


def run_variants(
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
    p = scale or VARIANT_PROFILES[profile]
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
            curves.append(_history_curve(result.history, task.setting, name))
        else:
            row.update(
                test_elbo=math.nan, test_nll=math.nan, nll_se=math.nan, frac_k_above_0_7=math.nan
            )
        recon = _optional(reconstruction_error, model, guide, x_te)
        row["recon_error"] = float(recon.mean()) if recon is not None else math.nan
        row["active_units"] = _count(_optional(active_units, guide, x_te))
        probe = _optional(
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
                scatter[name] = (codes.cpu().numpy(), test_grey.y[:2000].numpy())
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
    return _finish(pd.DataFrame(rows), curves, p.describe(len(x_bin)))


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

    codes_train = posterior_means(guide, x_train).cpu().numpy()
    codes_test = posterior_means(guide, x_test).cpu().numpy()
    scaler = StandardScaler().fit(codes_train)
    probe = LogisticRegression(max_iter=500, random_state=seed)
    probe.fit(scaler.transform(codes_train), y_train.numpy())
    return float(probe.score(scaler.transform(codes_test), y_test.numpy()))


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
            mask = part["mask"].cpu().numpy()
            truth = part["x"].cpu().numpy()
            cond = np.where(mask, 0.5, truth)
            base = part["c"].cpu().numpy()  # the baseline's guess fills the hidden pixels
            draws = [model(c=part["c"], mask=part["mask"]).cpu().numpy() for _ in range(3)]
        for i in range(4):
            shown = [cond[i], truth[i], np.where(mask[i], base[i], truth[i])]
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
__all__ = ["SUITES", "Protocol", "Scale", "StagedDecay", "replace"]
