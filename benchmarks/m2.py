"""``lvmkit bench vae m2``: Kingma et al. (2014) M2 and M1+M2 with 100 / 600 / 1000 / 3000 labels,
beside the same classifier on the labels alone, the paper's and Pyro's example's numbers."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import replace
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
from lvmkit.base import check_choice
from lvmkit.benchmarks import contenders as cs, references
from lvmkit.benchmarks.contenders import Contender, Curve, Task
from lvmkit.benchmarks.protocol import (
    BUILTIN,
    PROFILE_NAMES,
    PROFILES,
    REFERENCE,
    Protocol,
    finish,
    label_of_run,
    vae_pair,
    with_trend,
)
from lvmkit.data import load_mnist
from lvmkit.guides import GaussianEncoder
from lvmkit.inference import (
    Callback,
    fit,
    posterior_means,
)
from lvmkit.models import (
    VAE,
    M2Config,
    VAEConfig,
    empty_guide,
    kingma_aux_weight,
)
from lvmkit.pairs import build_m1_m2, build_m2

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


def builtin_m2(task: Task) -> Contender:
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
            model, guide = vae_pair(M1_CONFIG)
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


def builtin_m1_m2(task: Task) -> Contender:
    m1_model, m1_guide = task.extra["pretrained_m1"]()
    model, guide = build_m1_m2(_m2_config(task, M1_CONFIG.latent_dim), m1_model, m1_guide)
    return Contender(model, guide, objective=_m2_objective())


class _Accuracy(Curve):
    def __init__(self, classify: Callable[[], torch.Tensor], y: torch.Tensor) -> None:
        super().__init__({"test accuracy": lambda: 100 * float((classify() == y).float().mean())})


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
    """M2 (y summed out for unlabelled images, α log q(y | x) on labelled ones) per label count,
    beside the same classifier trained on the labelled images alone."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    p = scale or PROFILES["m2"][profile]
    train = load_mnist("train", binarization="static", seed=p.seed, limit=p.n_train)
    test = load_mnist("test", binarization="static", seed=p.seed, limit=p.n_test)
    reserved = (REFERENCE, SUPERVISED, SUPERVISED_M1, M2_SOURCE, M1_M2_SOURCE, PYRO_M2_SOURCE)
    m1_of = _PretrainedM1(train.x, p, device)
    builtin = {BUILTIN: builtin_m2, STACKED: builtin_m1_m2}
    chosen = cs.select("vae-m2", builtin, contenders, only, reserved=reserved)
    labels_run = [n for n in M2_LABELS[profile] if settings is None or f"{n} labels" in settings]
    if settings is not None:
        chosen([m2_task(n, len(train.x)) for n in M2_LABELS[profile]], settings)
    rows, curves = [], []
    for labels in labels_run:
        for seed in p.seeds:
            task = m2_task(labels, len(train.x))
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
    frame = with_trend(frame, curves_frame, "test accuracy", "accuracy_change_per_epoch_late")
    if figures_dir is not None:
        m2_figure(frame, Path(figures_dir) / "vae-m2-accuracy.png")
        m2_curve_figures(curves_frame, p.describe(len(train.x)), Path(figures_dir))
    text = p.describe(len(train.x))
    if m1_of.trained:
        text += f"; M1 first: {m1_of.describe()}"
    return finish(frame, curves, text)


def _minus(frame: pd.DataFrame, baseline: str) -> np.ndarray:
    """Each row's accuracy minus ``baseline``'s in the same setting and seed (NaN without one)."""
    rows = frame[frame.contender == baseline].groupby(["setting", "seed"]).accuracy.mean()
    base = frame.set_index(["setting", "seed"]).index.map(rows.to_dict())
    return frame.accuracy.to_numpy() - np.asarray(base, dtype=float)


def m2_task(labels: int, n_train: int) -> Task:
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
    contender = builtin_m2(task)
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


def contender_label(run: pd.Series, setting: str) -> str:
    return label_of_run(run).removeprefix(f"{setting} — ")


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
            label_of=partial(contender_label, setting=setting),
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
