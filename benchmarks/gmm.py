"""``lvmkit bench gmm``: Gaussian mixtures fitted three ways, against scikit-learn's EM.

For each data set (synthetic mixtures with known components; iris; digits on 10 principal
components), on the same train/held-out split:

- **EM** — ``sklearn.mixture.GaussianMixture`` with ``n_init`` starts (the reference);
- **SVI, y enumerated** — :class:`lvmkit.GaussianMixture`: the assignment summed out by
  ``TraceEnum_ELBO``, so the objective is the exact log-likelihood; k-means++ starts, best of
  ``n_init``;
- **SVI, amortized q(y | x)** — the same model, trained with ``Trace_ELBO`` and a categorical
  encoder, so the gradient through y is the score-function estimator: what enumeration buys.

Columns: held-out log-likelihood per point (exact: y summed out, for every method's fitted
parameters), the held-out ELBO of the method's own guide (equal to the log-likelihood when y is
enumerated; below it for the amortized guide), the difference to EM, the adjusted Rand index of
the held-out assignments against the true labels, BIC on the training data, and seconds to fit.
Figures (``figures_dir``): held-out points coloured by lvmkit's assignment with each component's
2σ ellipse (lvmkit solid, EM dashed), and the log-likelihood per method.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch

from lvmkit import datasets
from lvmkit.base import check_choice
from lvmkit.benchmarks import contenders as cs
from lvmkit.estimators import GaussianMixture
from lvmkit.guides import CategoricalEncoder, CategoricalEncoderConfig
from lvmkit.inference import evaluate, fit, summarize
from lvmkit.models import empty_guide

EM = "EM (scikit-learn)"
ENUMERATED = "SVI, y enumerated (lvmkit)"
AMORTIZED = "SVI, amortized q(y|x), score function (lvmkit)"


@dataclass(frozen=True)
class GMMBenchConfig:
    data_sets: tuple[str, ...]
    n_init: int  # starts for EM and for enumerated SVI
    max_iter: int  # full-batch Adam steps per enumerated start
    amortized_epochs: int
    amortized_samples: int  # K for the amortized guide's held-out ELBO / IS estimate
    seed: int = 0


PROFILES = {
    "quick": GMMBenchConfig(
        ("blobs2d",), n_init=2, max_iter=150, amortized_epochs=10, amortized_samples=50
    ),
    "full": GMMBenchConfig(
        ("blobs2d", "blobs5d-diag", "iris", "digits"),
        n_init=10,
        max_iter=600,
        amortized_epochs=200,
        amortized_samples=1000,
    ),
}


def _data_set(name: str, seed: int) -> tuple[datasets.Labelled, int, str]:
    """(data, n_components, covariance_type)."""
    if name == "blobs2d":
        data = datasets.make_mixture(
            2000,
            [0.5, 0.3, 0.2],
            [[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]],
            [[[1.0, 0.6], [0.6, 1.0]], [[1.0, -0.4], [-0.4, 0.5]], [[0.3, 0.0], [0.0, 1.5]]],
            seed=seed,
            name="blobs2d",
        )
        return data, 3, "full"
    if name == "blobs5d-diag":
        rng = np.random.default_rng(seed + 1)
        means = rng.normal(0.0, 4.0, (5, 5))
        variances = rng.uniform(0.3, 1.5, (5, 5))
        data = datasets.make_mixture(
            2500, np.full(5, 0.2), means, variances, seed=seed, name="blobs5d-diag"
        )
        return data, 5, "diag"
    if name == "iris":
        return datasets.load_iris(), 3, "full"
    if name == "digits":
        return datasets.load_digits(10), 10, "full"
    raise ValueError(f"unknown data set {name!r}")


def run(
    profile: str = "full",
    *,
    device: str = "cpu",
    config: GMMBenchConfig | None = None,
    figures_dir: str | Path | None = None,
    contenders: dict[str, cs.Factory] | None = None,
    only: str | None = None,
    settings: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """Fit every method on every data set; one row per (data set, method).

    ``contenders``: your own mixtures, ``{name: factory}`` — ``factory(task)`` gets the data
    set's :class:`~lvmkit.benchmarks.contenders.Task` (``data_dim``, ``num_classes`` = the
    number of components, ``extra["covariance"]``) and returns ``(model, guide)`` or a
    ``Contender``; each is trained by ``fit`` as the amortized mixture is (minibatches of 128,
    Adam, lr 0.01 unless it brings its own options) and scored on the held-out points by
    importance sampling (exact where the guide or model enumerates the assignment); the
    adjusted Rand index needs a label site ``"y"`` in the guide or ``Contender.classify``.
    ``only`` runs one method (EM, the reference, always runs).
    """
    cfg = config or PROFILES[check_choice("profile", profile, PROFILES)]
    users = cs.select("gmm", {}, contenders, None, reserved=(EM, ENUMERATED, AMORTIZED))
    if only is not None and only not in (EM, ENUMERATED, AMORTIZED, *users):
        raise ValueError(
            f"only={only!r} names no method of gmm; the methods are "
            f"{[EM, ENUMERATED, AMORTIZED, *users]}"
        )
    runs = {name for name in (ENUMERATED, AMORTIZED, *users) if only in (None, EM, name)}
    data_sets = cfg.data_sets if settings is None else tuple(settings)
    unknown = [d for d in data_sets if d not in cfg.data_sets]
    if unknown:
        raise ValueError(
            f"settings {unknown} are not among this profile's data sets {cfg.data_sets}"
        )
    rows: list[dict[str, object]] = []
    fitted: dict[str, tuple] = {}
    curves: list[pd.DataFrame] = []
    for name in data_sets:
        data, k, cov_type = _data_set(name, cfg.seed)
        train, test = data.split(0.5 if len(data.x) > 500 else 2 / 3, seed=cfg.seed)
        base = {
            "data_set": name,
            "components": k,
            "covariance": cov_type,
            "dim": train.x.shape[1],
            "n_train": len(train.x),
            "n_test": len(test.x),
        }

        em_row, em = _em(cfg, train, test, k, cov_type)
        rows.append({**base, **em_row})
        if ENUMERATED not in runs:
            order = [*users, AMORTIZED]
        else:
            gm_row, gm = _enumerated(cfg, train, test, k, cov_type, device)
            rows.append({**base, **gm_row})
            fitted[name] = (test, gm, em)
            order = [AMORTIZED, *users]
        for method in order:
            if method not in runs:
                continue
            if method == AMORTIZED:
                amortized = _amortized(cfg, train, test, k, cov_type, curves, name)
                rows.append({**base, "method": AMORTIZED, **amortized})
            else:
                row, curve = _user(cfg, name, method, users[method], train, test, k, cov_type)
                rows.append({**base, **row})
                curves.append(curve)
    frame = pd.DataFrame(rows)
    em_ll = frame[frame.method == EM].set_index("data_set").heldout_log_lik
    frame["minus_em"] = frame.heldout_log_lik - frame.data_set.map(em_ll)
    columns = [
        "data_set",
        "method",
        "covariance",
        "components",
        "dim",
        "n_train",
        "n_test",
        "heldout_log_lik",
        "minus_em",
        "heldout_elbo",
        "ari",
        "bic",
        "seconds",
    ]
    frame = frame[columns]
    frame.attrs["curves"] = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    if figures_dir is not None:
        _figures(frame, fitted, Path(figures_dir))
        if curves:
            em_lines = {f"EM, {d}": float(em_ll[d]) for d in data_sets}
            both = frame.attrs["curves"]
            cs.curve_figure(
                both,
                "held-out ELBO",
                label_of=lambda r: f"{r['setting']} — {r['contender']}",
                lines=em_lines,
                ylabel="held-out ELBO per point (EM: log-likelihood)",
                path=Path(figures_dir) / "gmm-curves.png",
            )
    return frame


def _em(cfg: GMMBenchConfig, train, test, k: int, cov_type: str) -> tuple[dict[str, Any], Any]:
    """scikit-learn's EM, the reference: its row and the fitted mixture."""
    from sklearn.metrics import adjusted_rand_score
    from sklearn.mixture import GaussianMixture as SklearnGMM

    tic = time.perf_counter()
    em = SklearnGMM(k, covariance_type=cov_type, n_init=cfg.n_init, random_state=cfg.seed)
    em.fit(train.x.astype(np.float64))
    seconds = time.perf_counter() - tic
    ll = float(em.score(test.x.astype(np.float64)))
    row = {
        "method": EM,
        "heldout_log_lik": ll,
        "heldout_elbo": ll,
        "ari": adjusted_rand_score(test.y, em.predict(test.x.astype(np.float64))),
        "bic": float(em.bic(train.x.astype(np.float64))),
        "seconds": seconds,
    }
    return row, em


def _enumerated(
    cfg: GMMBenchConfig, train, test, k: int, cov_type: str, device: str
) -> tuple[dict[str, Any], GaussianMixture]:
    """lvmkit's GaussianMixture (y enumerated): its row and the fitted mixture."""
    from sklearn.metrics import adjusted_rand_score

    tic = time.perf_counter()
    gm = GaussianMixture(
        k, covariance_type=cov_type, n_init=cfg.n_init, max_iter=cfg.max_iter, seed=cfg.seed,
        device=device,
    ).fit(train.x)  # fmt: skip
    seconds = time.perf_counter() - tic
    ll = gm.score(test.x)
    row = {
        "method": ENUMERATED,
        "heldout_log_lik": ll,
        "heldout_elbo": ll,
        "ari": adjusted_rand_score(test.y, gm.predict(test.x)),
        "bic": gm.bic(train.x),
        "seconds": seconds,
    }
    return row, gm


def _user(cfg: GMMBenchConfig, data_set: str, name: str, factory, train, test, k, cov_type):
    """A user's mixture, trained as the amortized one is and scored by importance sampling."""
    from sklearn.metrics import adjusted_rand_score

    x_train, x_test = torch.as_tensor(train.x), torch.as_tensor(test.x)
    task = cs.Task(
        "gmm",
        data_set,
        x_train.shape[1],
        ("x",),
        "points x of shape (N, D), float32 (called as model(x=x))",
        num_classes=k,
        num_train=len(x_train),
        seed=cfg.seed,
        extra={"covariance": cov_type, "label_site": "y"},
    )
    pyro.set_rng_seed(cfg.seed)
    contender = cs.build(name, factory, task, [{"x": x_test[:4]}])
    curve = cs.Curve(from_history={"val_elbo:held-out ELBO": float})
    protocol = dict(
        epochs=cfg.amortized_epochs, batch_size=128, lr=0.01, seed=cfg.seed, device="cpu"
    )
    tic = time.perf_counter()
    cs.train(contender, task, x_train, protocol=protocol, validation_data=x_test, callbacks=[curve])
    seconds = time.perf_counter() - tic
    scores = summarize(
        evaluate(contender.model, contender.guide, x_test, cfg.amortized_samples, seed=cfg.seed)
    )
    try:
        ari = adjusted_rand_score(test.y, cs.classify(contender, task, x_test).numpy())
    except ValueError:
        ari = math.nan  # no label site: the assignment is not the guide's to say
    row = {
        "method": name,
        "heldout_log_lik": scores.log_likelihood,
        "heldout_elbo": scores.elbo,
        "ari": ari,
        "bic": math.nan,
        "seconds": seconds,
    }
    return row, curve.frame(setting=data_set, contender=name, seed=cfg.seed)


def _amortized(
    cfg: GMMBenchConfig, train, test, k: int, cov_type: str, curves: list, data_set: str
) -> dict[str, object]:
    """The same mixture, but y proposed by an encoder and trained with Trace_ELBO."""
    from sklearn.metrics import adjusted_rand_score

    x_train, x_test = torch.as_tensor(train.x), torch.as_tensor(test.x)
    tic = time.perf_counter()
    starter = GaussianMixture(k, covariance_type=cov_type, seed=cfg.seed)
    model = starter._initial_model(x_train, cfg.seed)  # the same k-means++ start
    pyro.set_rng_seed(cfg.seed)
    guide = CategoricalEncoder(
        CategoricalEncoderConfig(x_train.shape[1], k, hidden_dims=(32,), num_data=len(x_train))
    )
    curve = cs.Curve(from_history={"val_elbo:held-out ELBO": float})
    fit(
        model,
        guide,
        x_train,
        validation_data=x_test,
        callbacks=[curve],
        epochs=cfg.amortized_epochs,
        batch_size=128,
        lr=0.01,
        seed=cfg.seed,
        device="cpu",
        progress=False,
    )
    seconds = time.perf_counter() - tic
    exact = evaluate(model, empty_guide, x_test, num_samples=1)["log_likelihood"].mean()
    with torch.no_grad():
        labels = guide.probs(x_test).argmax(dim=1).numpy()
    bound = evaluate(model, guide, x_test, num_samples=cfg.amortized_samples)["elbo"].mean()
    starter.model_ = model.cpu()
    curves.append(curve.frame(setting=data_set, contender=AMORTIZED, seed=cfg.seed))
    return {
        "heldout_log_lik": float(exact),
        "heldout_elbo": float(bound),
        "ari": adjusted_rand_score(test.y, labels),
        "bic": starter.bic(train.x),
        "seconds": seconds,
    }


def _figures(frame: pd.DataFrame, fitted: dict[str, tuple], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for name, (test, gm, em) in fitted.items():
        fig, ax = plt.subplots(figsize=(5, 4.2))
        ax.scatter(test.x[:, 0], test.x[:, 1], c=gm.predict(test.x), s=6, cmap="tab10", alpha=0.6)
        for means, covs, style in (
            (gm.means_, gm.covariances_, "-"),
            (em.means_, em.covariances_, "--"),
        ):
            for mean, cov in zip(means, covs, strict=True):
                cov2 = np.diag(cov[:2]) if cov.ndim == 1 else cov[:2, :2]
                _ellipse(ax, mean[:2], cov2, style)
        ax.set_title(
            f"{name}: held-out points by lvmkit's assignment\n"
            "2σ ellipses: lvmkit (solid), EM (dashed); first two dims",
            fontsize=8,
        )
        fig.tight_layout()
        fig.savefig(out / f"gmm-{name}.png", dpi=100)
        plt.close(fig)
    pivot = frame.pivot(index="data_set", columns="method", values="heldout_log_lik")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    pivot.plot.bar(ax=ax, rot=0)
    ax.set_ylabel("held-out log-likelihood per point")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gmm-log-likelihood.png", dpi=100)
    plt.close(fig)


def _ellipse(ax, mean: np.ndarray, cov: np.ndarray, style: str) -> None:
    values, vectors = np.linalg.eigh(cov)
    angle = np.linspace(0, 2 * math.pi, 100)
    circle = np.stack([np.cos(angle), np.sin(angle)])
    points = mean[:, None] + vectors @ (2 * np.sqrt(np.maximum(values, 0))[:, None] * circle)
    ax.plot(points[0], points[1], style, color="black", linewidth=1)
