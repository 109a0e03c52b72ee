"""``lvmkit bench vae cvae``: Sohn et al. (2015) quadrant completion as Pyro's CVAE example does it
— the baseline first, the CVAE given its guess, early stopping, the best epoch's weights."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch

from lvmkit import datasets, plots
from lvmkit.base import check_choice
from lvmkit.benchmarks import contenders as cs
from lvmkit.benchmarks.contenders import Task
from lvmkit.benchmarks.protocol import (
    BUILTIN,
    PROFILE_NAMES,
    PROFILES,
    Protocol,
    finish,
    history_curve,
    label_of_run,
    stopping,
)
from lvmkit.data import MNIST_IMAGE_SHAPE, load_mnist
from lvmkit.inference import (
    Callback,
    evaluate,
    fit,
    summarize,
)
from lvmkit.models import (
    ConditionalBaseline,
    CVAEConfig,
    empty_guide,
)
from lvmkit.pairs import build_cvae

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
    """CVAE vs the deterministic baseline for 1, 2 and 3 given quadrants, Pyro's protocol."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    p = scale or PROFILES["cvae"][profile]
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
        baseline, row, history = _baseline(p, small, options, data_train, data_valid, data_test)
        rows.append({"setting": setting, **row})
        curves.append(history_curve(history, setting, BASELINE))
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
            row, result = _train_contender(
                contender, task, p, options, cond_train, cond_valid, cond_test
            )
            rows.append({"setting": setting, "contender": name, **row})
            model = contender.model
            curves.append(history_curve(result.history, setting, name))
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
            label_of=label_of_run,
            lines=lines,
            ylabel="validation −ELBO (hidden pixels)",
            path=out / "vae-cvae-curves.png",
        )
    return finish(frame, curves, p.describe(len(train.x)))


def _baseline(p: Protocol, small, options, data_train, data_valid, data_test):
    """The deterministic baseline, trained with early stopping (its best epoch kept) and scored:
    the network, its row and its history."""
    pyro.set_rng_seed(p.seed)
    baseline = ConditionalBaseline(CVAEConfig(784, 784, **small))
    keep = _KeepBest(baseline)
    tic = time.perf_counter()
    history = fit(
        baseline, empty_guide, data_train, validation_data=data_valid,
        callbacks=[*stopping(p), keep], progress=False, **options,
    ).history  # fmt: skip
    keep.restore()
    seconds = (time.perf_counter() - tic) / len(history)
    base = summarize(evaluate(baseline, empty_guide, data_test, 1, seed=p.seed))
    row = {
        "contender": BASELINE,
        "epochs": len(history),
        "nll_is": -base.log_likelihood,
        "neg_elbo": -base.elbo,
        "seconds_per_epoch": seconds,
    }
    return baseline, row, history


def _train_contender(contender, task: Task, p: Protocol, options, train, valid, test):
    """One contender on one setting, the best validation epoch kept: its row and fit's result."""
    keep = _KeepBest(contender.model, contender.guide)
    result, per_epoch = cs.train(
        contender, task, train, validation_data=valid, callbacks=[*stopping(p), keep],
        protocol=options,
    )  # fmt: skip
    keep.restore()
    model, guide = contender.model, contender.guide
    elbo = summarize(evaluate(model, guide, test, 1, seed=p.seed)).elbo
    is_part = {k: v[: p.n_is] for k, v in test.items()}
    scores = cs.is_scores(model, guide, is_part, p.num_samples, p.seed)
    row = {
        "epochs": len(result.history),
        "nll_is": scores["test_nll"],
        "nll_se": scores["nll_se"],
        "neg_elbo": -elbo,
        "K": p.num_samples,
        "n_is": len(is_part["x"]),
        "frac_k_above_0_7": scores["frac_k_above_0_7"],
        "seconds_per_epoch": per_epoch,
    }
    return row, result


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
