"""What the VAE suites share: the :class:`Protocol` a profile fixes (data, training budget,
optimizer and schedule, evaluation), every suite's profiles in one table (:data:`PROFILES`), the
MNIST data, and the skeleton that trains every contender in every setting and scores it
(:func:`run_settings`, :func:`train_density`, :func:`reference_density`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch

from lvmkit.benchmarks import contenders as cs, references
from lvmkit.benchmarks.contenders import Contender, Curve, Task
from lvmkit.data import binarize, load_mnist
from lvmkit.guides import GaussianEncoder, GaussianEncoderConfig
from lvmkit.inference import (
    Callback,
    EarlyStopping,
    active_units,
    evaluate,
    summarize,
)
from lvmkit.models import (
    VAE,
    VAEConfig,
)

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


# What each suite's paper fixes, for every profile (Protocol's fields).
SUITE_SETTINGS: dict[str, dict[str, Any]] = {
    "latent": dict(optimizer=torch.optim.Adagrad, lr=0.02, weight_decay_prior=True),  # AEVB §5
    "iwae": dict(  # Burda et al. 2016, §5
        batch_size=20, lr=1e-3, optimizer_args={"betas": (0.9, 0.999), "eps": 1e-4}, schedule="iwae"
    ),
    "m2": dict(batch_size=200, lr=3e-4, optimizer_args={"betas": (0.9, 0.999)}),  # Kingma et al.
    "cvae": dict(early_stopping=3),  # Pyro's CVAE example
    "variants": {},
}
# What each profile sizes, one row per (suite, profile): training images (None: all 50,000),
# test images, of them scored by IS, epochs, K of the IS estimate, the per-epoch IS curve's points
# and K (0 points: no IS curve), the settings with a hand-written PyTorch row, M1's epochs (m2).
_SIZES: list[tuple[Any, ...]] = [
    # suite, profile, n_train, n_test, n_is, epochs, K, curve points, curve K, reference, M1 epochs
    ("latent", "quick", 1000, 200, 50, 2, 50, 20, 20, ("latent 3",), 0),
    ("latent", "full", None, 10_000, 1000, 20, 1000, 200, 200, ("latent 20",), 0),
    ("latent", "paper", None, 10_000, 10_000, 2000, 5000, 1000, 1000, ("latent 20",), 0),
    ("iwae", "quick", 500, 100, 20, 2, 100, 20, 20, ("VAE k=1",), 0),
    ("iwae", "full", None, 10_000, 1000, 100, 5000, 200, 500, ("VAE k=1",), 0),
    ("iwae", "paper", None, 10_000, 10_000, 3280, 5000, 1000, 5000, ("VAE k=1", "IWAE k=5"), 0),
    ("m2", "quick", 2000, 500, 0, 2, 1, 0, 100, ("100 labels",), 1),
    ("m2", "full", None, 10_000, 0, 50, 1, 0, 100, ("100 labels",), 50),
    ("m2", "paper", None, 10_000, 0, 1000, 1, 0, 100, ("100 labels", "3000 labels"), 1000),
    ("cvae", "quick", 1000, 200, 50, 2, 50, 0, 100, (), 0),
    ("cvae", "full", None, 10_000, 1000, 10, 1000, 0, 100, (), 0),
    ("cvae", "paper", None, 10_000, 10_000, 50, 5000, 0, 100, (), 0),
    ("variants", "quick", 1000, 300, 50, 1, 50, 0, 100, (), 0),
    ("variants", "full", None, 10_000, 1000, 5, 1000, 0, 100, (), 0),
    ("variants", "paper", None, 10_000, 10_000, 500, 5000, 0, 100, (), 0),
]  # fmt: skip
_COLUMNS = ("n_train", "n_test", "n_is", "epochs", "num_samples", "curve_points", "curve_samples",
            "reference", "pretrain_epochs")  # fmt: skip
PROFILES: dict[str, dict[str, Protocol]] = {}
for _suite, _profile, *_row in _SIZES:
    _fields: dict[str, Any] = dict(zip(_COLUMNS, _row, strict=True))
    PROFILES.setdefault(_suite, {})[_profile] = Protocol(**_fields, **SUITE_SETTINGS[_suite])


def mnist(p: Protocol) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grey-level train images and labels, and statically binarized test images and labels."""
    train = load_mnist("train", limit=p.n_train)
    test = load_mnist("test", binarization="static", seed=p.seed, limit=p.n_test)
    return train.x, train.y, test.x, test.y


BINARY_IMAGES = "binarized MNIST images x of shape (N, 784) in {0, 1} (called as model(x=x))"


def vae_pair(cfg: VAEConfig, enc_hidden: tuple[int, ...] | None = None):
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


def builtin_vae(task: Task) -> tuple[Any, Any]:
    assert task.latent_dim is not None and task.hidden_dims is not None
    cfg = VAEConfig(
        task.data_dim,
        latent_dim=task.latent_dim,
        hidden_dims=task.hidden_dims,
        activation=task.activation or "relu",
    )
    return vae_pair(cfg)


def optional(fn: Callable[..., Any], *args: Any) -> Any:
    """A metric that needs a guide site ``z`` (active units, codes): None where there is none."""
    try:
        return fn(*args)
    except (ValueError, KeyError):
        return None


def count_units(units: Any) -> float:
    return units.count if units is not None else math.nan


def density_scores(model, guide, x_test, p: Protocol, seed: int) -> dict[str, float]:
    elbo = summarize(evaluate(model, guide, x_test, 1, seed=seed)).elbo
    return {
        "test_elbo": elbo,
        **cs.is_scores(model, guide, x_test[: p.n_is], p.num_samples, seed),
        "active_units": count_units(optional(active_units, guide, x_test)),
    }


def density_curve(model, guide, x_test, p: Protocol, seed: int) -> Curve:
    """The bound on 1,000 test images every epoch; the IS NLL on ``curve_points`` at
    :func:`curve_epochs`."""
    metrics = {}
    if p.curve_points:
        part = x_test[: p.curve_points]
        metrics["test NLL (IS)"] = lambda: (
            -summarize(evaluate(model, guide, part, p.curve_samples, seed=seed)).log_likelihood
        )
    return Curve(metrics, at=cs.curve_epochs(p.epochs), from_history={"val_elbo:test ELBO": float})


def train_density(
    name: str, contender: Contender, task: Task, p: Protocol, x_train, x_test, device, seed
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Fit one contender on one setting; its row and its curves."""
    model, guide = contender.model, contender.guide
    curve = density_curve(model, guide, x_test, p, seed)
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
        **density_scores(model, guide, x_test, p, seed),
        "seconds_per_epoch": per_epoch,
    }
    return row, curve.frame(setting=task.setting, contender=name, seed=seed)


def reference_density(
    task: Task, p: Protocol, x_train, x_test, seed
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The built-in networks, from the same seed, trained by the hand-written loop."""
    cs.say(task, REFERENCE)
    pyro.set_rng_seed(seed)
    model, guide = builtin_vae(task)
    curve = density_curve(model, guide, x_test, p, seed)

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
        **density_scores(model, guide, x_test, p, seed),
        "seconds_per_epoch": per_epoch,
    }
    return row, curve.frame(setting=task.setting, contender=REFERENCE, seed=seed)


def run_settings(
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
                row, curve = train_density(
                    name, contender, task_s, p, x_train, x_test, device, seed
                )
                rows.append(row)
                curves.append(curve)
            if run_reference and task.setting in p.reference:
                row, curve = reference_density(task_s, p, x_train, x_test, seed)
                rows.append(row)
                curves.append(curve)
    return rows, curves


def with_trend(frame: pd.DataFrame, curves: pd.DataFrame, metric: str, column: str):
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


def finish(frame: pd.DataFrame, curves: list[pd.DataFrame], protocol_text: str) -> pd.DataFrame:
    frame.attrs["curves"] = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    frame.attrs["protocol"] = protocol_text
    return frame


def chosen(tasks: list[Task], settings) -> list[Task]:
    if settings is None:
        return tasks
    names = [t.setting for t in tasks]
    unknown = [s for s in settings if s not in names]
    if unknown:
        raise ValueError(f"settings {unknown} are not among this profile's settings {names}")
    return [t for t in tasks if t.setting in settings]


def label_of_run(run: pd.Series) -> str:
    seed = f" (seed {run['seed']})" if run.get("seed") else ""
    return f"{run['setting']} — {run['contender']}{seed}"


def stopping(p: Protocol) -> list[Callback]:
    if not p.early_stopping:
        return []
    return [EarlyStopping("val_elbo", patience=p.early_stopping)]


def history_curve(history: pd.DataFrame, setting: str, name: str) -> pd.DataFrame:
    part = history[["epoch", "val_elbo"]].rename(columns={"val_elbo": "value"})
    return part.assign(metric="test ELBO", setting=setting, contender=name, seed=0)
