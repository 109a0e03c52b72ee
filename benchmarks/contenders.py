"""Contenders: the model/guide pairs a benchmark suite trains and scores — the built-in ones and
yours, on the same footing.

A suite is a protocol: the data and their preprocessing, the training budget (epochs, batch
size, optimizer, schedule), the evaluation (K, test points, metrics) and the published rows. A
*contender* is a factory: called once per setting of the suite (a latent size, a number of
particles, a number of labels, …) with a :class:`Task` that says what the data are, it returns
``(model, guide)`` — a Pyro pair taking the data as the task's ``arguments`` say — or a
:class:`Contender` record holding the pair and its own fit options (objective, particles,
optimizer, a classifier for the suites that score one). Every contender is trained by
:func:`lvmkit.fit` under the suite's protocol and scored by :func:`lvmkit.evaluate`, and its row
sits in the same table, CSV and figures as the built-in rows and the papers'.

Example (a plain-function pair, the built-in rows beside it)::

    def mine(task):
        decoder = torch.nn.Sequential(torch.nn.Linear(task.latent_dim, 256), torch.nn.ReLU(),
                                      torch.nn.Linear(256, task.data_dim))
        encoder = torch.nn.Sequential(...)  # x → (loc, log scale) of z

        def model(x):
            pyro.module("decoder", decoder)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(0., 1.).expand([task.latent_dim]).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

        def guide(x):
            ...
        return model, guide

    lvmkit.benchmarks.run("vae-iwae", profile="quick", contenders={"mine": mine})

From the command line: ``lvmkit bench vae iwae --contender mine=my_models:mine`` (a module on
the Python path, or ``path/to/file.py:mine``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch

from lvmkit import plots
from lvmkit.inference import Callback, evaluate, fit, summarize
from lvmkit.inference.calls import cuda_devices
from lvmkit.inference.params import eval_mode, param_scope

Factory = Callable[["Task"], Any]
log = logging.getLogger("lvmkit.benchmarks")  # progress: one line per contender and setting


def say(task: Task, name: str) -> None:
    """Log that ``name`` starts on ``task``'s setting (the CLI shows it; long runs need it)."""
    log.info("%s %s · %s · seed %d · %s", time.strftime("%H:%M:%S"), task.suite, task.setting,
             task.seed, name)  # fmt: skip


@dataclass(frozen=True)
class Task:
    """What a contender's factory is told about one setting of a suite.

    ``arguments`` are the keyword arguments the model and guide are called with (their per-point
    tensors cut into minibatches), ``data`` says what they hold. The architecture fields
    (``latent_dim``, ``hidden_dims``, ``activation``) are the setting's — what the built-in
    contender uses, and what a fair comparison keeps — but a contender may build what it likes.
    """

    suite: str
    setting: str  # e.g. "IWAE k=5", "latent 20", "100 labels", "2 quadrants", "iris"
    data_dim: int
    arguments: tuple[str, ...]  # the data's keyword arguments, e.g. ("x",), ("x", "y")
    data: str  # what they hold, in words
    latent_dim: int | None = None
    hidden_dims: tuple[int, ...] | None = None
    activation: str | None = None
    num_classes: int | None = None  # semi-supervised and mixture tasks: classes / components
    condition_dim: int | None = None  # conditional tasks: the size of the condition c
    objective: Any = "elbo"  # the setting's objective (a name or a Pyro ELBO), unless the
    # contender brings its own
    num_particles: int = 1
    num_train: int | None = None
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)  # suite-specific facts


@dataclass
class Contender:
    """A contender's pair with its own fit options, overriding the suite's where given.

    ``classify(x) → labels`` scores classification where a suite does (M2's accuracy, the
    mixtures' adjusted Rand index); without it the guide's label site (``task.extra["label_site"]``,
    ``"y"``) is read: its distribution's most probable value.
    """

    model: Any
    guide: Any
    objective: Any = None  # "elbo", "iwae", …, or a Pyro ELBO; None: the setting's
    num_particles: int | None = None
    fit_options: dict[str, Any] = field(default_factory=dict)  # any other lvmkit.fit keyword
    classify: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        for role in ("model", "guide"):
            if not callable(getattr(self, role)):
                raise TypeError(
                    f"Contender.{role} must be callable (a Pyro {role}); "
                    f"got {type(getattr(self, role)).__name__}"
                )
        if not isinstance(self.fit_options, dict):
            raise TypeError(
                f"Contender.fit_options must be a dict of lvmkit.fit keywords; "
                f"got {type(self.fit_options).__name__}"
            )
        fixed = {"epochs", "batch_size", "seed", "device", "validation_data", "callbacks"}
        clash = sorted(fixed & set(self.fit_options))
        if clash:
            raise ValueError(
                f"Contender.fit_options may not set {clash}: the suite's protocol fixes them "
                "for every contender (choose the optimizer, objective, particles, schedule…)"
            )
        if self.classify is not None and not callable(self.classify):
            raise TypeError(
                f"Contender.classify must be callable (x → labels); "
                f"got {type(self.classify).__name__}"
            )


# -- which contenders a suite runs -----------------------------------------------------------


def select(
    suite: str,
    builtin: Mapping[str, Factory],
    user: Mapping[str, Factory] | None,
    only: str | None,
    reserved: tuple[str, ...] = (),
) -> dict[str, Factory]:
    """The built-in contenders and the user's, checked; just ``only`` when given."""
    if user is None:
        user = {}
    if not isinstance(user, Mapping):
        raise TypeError(f"contenders must be a dict {{name: factory}}; got {type(user).__name__}")
    out = dict(builtin)
    for name, factory in user.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"contender names must be non-empty strings; got {name!r}")
        if name in out or name in reserved:
            taken = sorted([*builtin, *reserved])
            raise ValueError(
                f"contender name {name!r} clashes with a row of {suite} ({', '.join(taken)}); "
                "give yours another name"
            )
        if not callable(factory):
            raise TypeError(
                f"contender {name!r} must be a factory: a function of the task returning "
                f"(model, guide); got {type(factory).__name__}"
            )
        out[name] = factory
    if only is not None:
        if only in reserved:  # a row the suite makes itself (a baseline, a paper): no contender
            return {}
        if only not in out:
            raise ValueError(
                f"only={only!r} names no contender of {suite}; the contenders are {sorted(out)}"
            )
        out = {only: out[only]}
    return out


def build(name: str, factory: Factory, task: Task, probe: list[dict[str, Any]]) -> Contender:
    """Call the factory and check what it returns fits the task's data (``probe``: a few
    points of each kind of call the suite makes)."""
    pyro.clear_param_store()  # a function pair's pyro.module names start afresh per setting
    say(task, name)
    made = factory(task)
    title = getattr(factory, "__qualname__", type(factory).__name__)
    if isinstance(made, Contender):
        contender = made
    elif isinstance(made, (tuple, list)) and len(made) == 2:
        if not all(callable(part) for part in made):
            kinds = ", ".join(type(part).__name__ for part in made)
            raise TypeError(
                f"contender {name!r}: its factory {title} returned a pair that is not "
                f"(model, guide) callables ({kinds})"
            )
        contender = Contender(*made)
    else:
        raise TypeError(
            f"contender {name!r}: its factory {title} returned {type(made).__name__}; expected "
            "(model, guide) or lvmkit.benchmarks.Contender(model, guide, ...)"
        )
    for call in probe:
        _probe(name, contender, task, call)
    return contender


def _probe(name: str, contender: Contender, task: Task, call: dict[str, Any]) -> None:
    """Run the guide and the model replayed on it once: a clear error where they do not take
    the task's data, or score none of it."""
    model, guide = contender.model, contender.guide
    shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in call.items())
    where = f"contender {name!r} does not fit {task.suite} ({task.setting}; data {shapes}"
    where += f" — {task.data})"
    try:
        with (
            param_scope(model, guide, publish=False),
            torch.random.fork_rng(devices=cuda_devices(*call.values())),
            pyro.validation_enabled(False),
            eval_mode(model, guide),
            torch.no_grad(),
        ):
            guide_trace = poutine.trace(guide).get_trace(**call)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**call)
            model_trace.log_prob_sum()
    except Exception as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise ValueError(f"{where}: {type(err).__name__}: {first}") from err
    observed = [
        site["name"]
        for site in model_trace.nodes.values()
        if site["type"] == "sample" and site["is_observed"] and not site["name"].startswith("_")
    ]
    if not observed:
        raise ValueError(
            f"{where}: the model observes nothing (no pyro.sample(..., obs=...) of the data)"
        )


# -- training and scoring -------------------------------------------------------------------


def train(
    contender: Contender, task: Task, data: Any, *, protocol: dict[str, Any], **kwargs: Any
) -> tuple[Any, float]:
    """``fit`` under the suite's ``protocol`` (epochs, batch size, optimizer, …), the
    contender's own options on top; returns the result and the seconds per epoch trained."""
    options = {**protocol, **kwargs}
    if contender.objective is not None or task.objective != "elbo":
        options["objective"] = (
            contender.objective if contender.objective is not None else task.objective
        )
    particles = contender.num_particles or task.num_particles
    if particles != 1:
        options["num_particles"] = particles
    options.update(contender.fit_options)
    tic = time.perf_counter()
    result = fit(contender.model, contender.guide, data, progress=False, **options)
    epochs = max(1, len(result.history))  # (fewer than asked where early stopping ended it)
    return result, (time.perf_counter() - tic) / epochs


def classify(contender: Contender, task: Task, x: torch.Tensor) -> torch.Tensor:
    """The labels the contender gives ``x``: its ``classify``, else the guide's label site's
    most probable value."""
    model, guide = contender.model, contender.guide
    x = x.to(_device_of(model, guide))
    with torch.no_grad(), eval_mode(model, guide):
        if contender.classify is not None:
            labels = contender.classify(x)
        elif callable(getattr(guide, "classify", None)):
            labels = guide.classify(x)
        else:
            site = task.extra.get("label_site", "y")
            with (
                param_scope(model, guide, publish=False),
                pyro.validation_enabled(False),
                poutine.block(),
            ):
                trace = poutine.trace(guide).get_trace(x=x)
            node = trace.nodes.get(site)
            fn = node["fn"] if node is not None else None
            probs = getattr(fn, "probs", None) if fn is not None else None
            if probs is None:
                raise ValueError(
                    f"{task.suite} scores classification, but the guide has no site {site!r} "
                    "with a categorical distribution: return lvmkit.benchmarks.Contender(model, "
                    "guide, classify=fn) with fn(x) → labels"
                )
            labels = probs.argmax(-1)
    labels = torch.as_tensor(labels)
    if labels.dim() == 2:  # one-hot (Pyro's ss_vae example's classifier)
        labels = labels.argmax(-1)
    return labels.reshape(-1).cpu()


def _device_of(*modules: Any) -> torch.device:
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for param in module.parameters():
                return param.device
    return torch.device("cpu")


def is_scores(model, guide, data, num_samples: int, seed: int) -> dict[str, float]:
    """Importance-sampled NLL with its standard error and the share of k̂ > 0.7, and the ELBO."""
    s = summarize(evaluate(model, guide, data, num_samples, seed=seed))
    return {
        "test_nll": -s.log_likelihood,
        "nll_se": s.log_likelihood_se,
        "frac_k_above_0_7": s.frac_pareto_k_above_0_7,
    }


# -- learning curves ------------------------------------------------------------------------


def curve_epochs(epochs: int, points: int = 20) -> set[int]:
    """The epochs at which a costly curve is measured: 1, 2, 4, 8, … and about ``points``
    evenly spaced ones, and the last."""
    out = {2**i for i in range(int(math.log2(max(1, epochs))) + 1)}
    step = max(1, epochs // points)
    out |= set(range(step, epochs + 1, step)) | {epochs}
    return {e for e in out if 1 <= e <= epochs}


class Curve(Callback):
    """Records ``metrics`` — name → fn() → float — at the epochs of ``at`` (every epoch when
    None), besides fit's own per-epoch metrics named in ``from_history`` (e.g. ``val_elbo``)."""

    def __init__(
        self,
        metrics: Mapping[str, Callable[[], float]] | None = None,
        *,
        at: set[int] | None = None,
        from_history: Mapping[str, Callable[[float], float]] | None = None,
    ) -> None:
        self.metrics = dict(metrics or {})
        self.at = at
        self.from_history = dict(from_history or {})
        self.rows: list[dict[str, Any]] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        for name, fn in self.from_history.items():
            source = name.split(":")[0]
            if source in metrics:
                self.rows.append(
                    {"epoch": epoch, "metric": name.split(":")[-1], "value": fn(metrics[source])}
                )
        if self.at is None or epoch in self.at:
            for name, metric in self.metrics.items():
                self.rows.append({"epoch": epoch, "metric": name, "value": float(metric())})

    def frame(self, **labels: Any) -> pd.DataFrame:
        return pd.DataFrame([{**labels, **row} for row in self.rows])


def trend(curves: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Where each curve ends and how fast it still moves: its last value and its change per
    epoch over the last quarter of training (least squares)."""
    rows = []
    for key, part in curves.groupby([*keys, "metric"], sort=False):
        part = part.sort_values("epoch")
        last_epoch = part.epoch.max()
        tail = part[part.epoch >= last_epoch - max(1, last_epoch // 4)]
        slope = float(np.polyfit(tail.epoch, tail.value, 1)[0]) if len(tail) > 1 else math.nan
        rows.append(
            {
                **dict(zip([*keys, "metric"], key, strict=True)),
                "last": float(part.value.iloc[-1]),
                "per_epoch_late": slope,
            }
        )
    return pd.DataFrame(rows)


def curve_figure(
    curves: pd.DataFrame,
    metric: str,
    *,
    label_of: Callable[[pd.Series], str],
    ylabel: str,
    lines: Mapping[str, float] | None = None,
    title: str | None = None,
    path: Path,
) -> Any:
    """One metric against epochs, a line per run, the published finals as dashed lines."""
    part = curves[curves.metric == metric]
    if part.empty:
        return None
    keys = [c for c in part.columns if c not in ("epoch", "value")]
    runs = {}
    for _, rows in part.groupby(keys, sort=False, dropna=False):
        rows = rows.sort_values("epoch")
        runs[label_of(rows.iloc[0])] = (rows.epoch, rows.value)
    return plots.line_plot(
        runs, xlabel="epoch", ylabel=ylabel, lines=dict(lines or {}), title=title, path=path
    )


# -- contenders named on the command line -----------------------------------------------------


def load(spec: str) -> tuple[str, Factory]:
    """``NAME=MODULE:FUNCTION`` (or ``NAME=path/to/file.py:FUNCTION``) → (name, factory)."""
    name, eq, target = spec.partition("=")
    where, colon, function = target.rpartition(":")
    if not eq or not name.strip() or not colon or not where or not function:
        raise ValueError(
            f"--contender must be NAME=MODULE:FUNCTION (e.g. mine=my_models:make_pair, or "
            f"mine=path/to/models.py:make_pair); got {spec!r}"
        )
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--contender {name}: no file {where}")
        module_name = f"lvmkit_contender_{path.stem}_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = _import_from_here(where)
        except ModuleNotFoundError as err:
            raise ValueError(
                f"--contender {name}: cannot import {where!r} ({err}); give a module on the "
                "Python path or a path to a .py file"
            ) from err
    factory = getattr(module, function, None)
    if factory is None:
        raise ValueError(f"--contender {name}: {where} has no {function!r}")
    if not callable(factory):
        raise ValueError(
            f"--contender {name}: {where}:{function} is a {type(factory).__name__}, not a "
            "function of the task"
        )
    return name.strip(), factory


def _import_from_here(name: str) -> Any:
    """Import ``name`` as ``python -m`` would, with the working directory on the path: the
    ``lvmkit`` console script's own path holds only its folder, and a user's models module sits
    in the folder they run it from."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        here = os.getcwd()
        if here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(here)


__all__ = ["Contender", "Curve", "Task", "build", "classify", "load", "select", "train"]
