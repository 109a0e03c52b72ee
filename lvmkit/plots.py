"""Figures of latent-variable models, drawn headless with matplotlib.

Every function returns the matplotlib ``Figure`` and, given ``path``, also saves it there as a
PNG (folders created). Models follow lvmkit's contract: run with ``x=None`` and
``batch_size=n`` they generate, and their observed site (``"x"``) has a distribution with a
``mean`` — the decoder mean is drawn rather than a noisy sample.

- :func:`image_grid` / :func:`image_rows`: pictures in a grid / in labelled rows;
- :func:`sample_grid`: decoder means at draws from the prior;
- :func:`reconstructions`: data above the decoder mean at their posterior-mean codes;
- :func:`latent_scatter`: posterior-mean codes in 2-D (first two principal components when the
  latent space is larger), coloured by label;
- :func:`latent_traversal`: one latent unit swept at a time, the others at zero;
- :func:`interpolation`: decoder means along the line between two data points' codes;
- :func:`elbo_curve`: training and validation ELBO per epoch (a ``fit`` history);
- :func:`bound_vs_latent_dim`: a bound against the latent dimension (a benchmark table);
- :func:`khat_plot`: Pareto k̂ per data point, with ArviZ's ``plot_khat``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch

from lvmkit.base import check_int
from lvmkit.inference import posterior_means
from lvmkit.inference.weights import scoring

MNIST_SHAPE = (28, 28)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend unless one was chosen."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path | None, *, dpi: int = 100):
    """Save ``fig`` as ``path`` (if given), closing it; return the figure."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        pyplot().close(fig)
    return fig


# -- decoding -------------------------------------------------------------------------------


def decoder_means(
    model: Callable[..., Any], z: torch.Tensor, *, latent: str = "z", site: str = "x", **kwargs
) -> torch.Tensor:
    """E[x | z] for each row of ``z``: the model run with its latent ``latent`` fixed to ``z``,
    reading the mean of the distribution at ``site``. ``kwargs`` go to the model."""
    if not torch.is_tensor(z) or z.dim() < 1:
        raise TypeError(f"z must be a tensor of codes, one row per image; got {type(z).__name__}")
    with scoring(model, model, seed=None), pyro.validation_enabled(False):
        conditioned = poutine.condition(model, data={latent: z})
        trace = poutine.trace(conditioned).get_trace(batch_size=z.shape[0], **kwargs)
    if site not in trace.nodes:
        raise ValueError(f"the model has no site {site!r}; pass site= its observed site")
    fn: Any = trace.nodes[site]["fn"]
    return fn.mean


def _device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _latent_dim(model: Any, latent_dim: int | None) -> int:
    if latent_dim is not None:
        return check_int("latent_dim", latent_dim)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "latent_dim"):
        return int(config.latent_dim)
    raise ValueError("pass latent_dim=: the model has no config.latent_dim")


def _pictures(images: Any, image_shape: Sequence[int]) -> np.ndarray:
    array = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    size = int(np.prod(image_shape))
    if array.size % size:
        raise ValueError(
            f"images of shape {array.shape} do not split into pictures of image_shape "
            f"{tuple(image_shape)}"
        )
    return np.clip(array.reshape(-1, *image_shape), 0.0, 1.0)


# -- image figures --------------------------------------------------------------------------


def image_grid(
    images: Any,
    image_shape: Sequence[int] = MNIST_SHAPE,
    *,
    columns: int = 8,
    title: str | None = None,
    path: str | Path | None = None,
):
    """Pictures (rows of ``images``, values in [0, 1]) in a grid of ``columns``."""
    plt = pyplot()
    pictures = _pictures(images, image_shape)
    columns = check_int("columns", columns)
    rows = -(-len(pictures) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(columns * 0.9, rows * 0.9 + (0.4 if title else 0)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, picture in zip(axes.flat, pictures, strict=False):
        ax.imshow(picture, cmap="gray", vmin=0, vmax=1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def image_rows(
    rows: dict[str, Any],
    image_shape: Sequence[int] = MNIST_SHAPE,
    *,
    title: str | None = None,
    path: str | Path | None = None,
):
    """One labelled row of pictures per entry of ``rows``."""
    plt = pyplot()
    pictures = {name: _pictures(images, image_shape) for name, images in rows.items()}
    cols = max(len(p) for p in pictures.values())
    height = len(pictures) * 1.05 + (0.3 if title else 0)
    fig, axes = plt.subplots(len(pictures), cols, figsize=(cols * 0.9, height), squeeze=False)
    for r, (name, batch) in enumerate(pictures.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(batch):
                ax.imshow(batch[c], cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_title(name, fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def sample_grid(
    model: Callable[..., Any],
    n: int = 64,
    *,
    latent_dim: int | None = None,
    image_shape: Sequence[int] = MNIST_SHAPE,
    seed: int = 0,
    path: str | Path | None = None,
):
    """Decoder means at ``n`` draws z ~ N(0, I) (the standard-normal prior of lvmkit's VAEs)."""
    n = check_int("n", n)
    dim = _latent_dim(model, latent_dim)
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).to(_device(model))
    means = decoder_means(model, z)
    return image_grid(means, image_shape, title=f"{n} samples: E[x | z], z ~ p(z)", path=path)


def reconstructions(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: torch.Tensor,
    *,
    image_shape: Sequence[int] = MNIST_SHAPE,
    path: str | Path | None = None,
):
    """Data (top row) above the decoder mean at their posterior-mean codes E_q[z | x]."""
    x = x[:16]
    codes = posterior_means(guide, x).to(_device(model))
    recon = decoder_means(model, codes)
    return image_rows(
        {"data": x, "E[x | z = E_q[z | x]]": recon},
        image_shape,
        title="reconstructions",
        path=path,
    )


def latent_traversal(
    model: Callable[..., Any],
    *,
    latent_dim: int | None = None,
    units: Sequence[int] | None = None,
    values: Sequence[float] = tuple(np.linspace(-3, 3, 9)),
    image_shape: Sequence[int] = MNIST_SHAPE,
    path: str | Path | None = None,
):
    """One row per latent unit: the decoder mean as that unit sweeps ``values`` (the others at
    the prior mean, zero)."""
    dim = _latent_dim(model, latent_dim)
    units = list(range(min(dim, 10))) if units is None else list(units)
    bad = [u for u in units if not 0 <= u < dim]
    if bad:
        raise ValueError(f"units must be latent units in [0, {dim}); got {bad}")
    values_t = torch.as_tensor(list(values), dtype=torch.float32)
    rows = {}
    for u in units:
        z = torch.zeros(len(values_t), dim)
        z[:, u] = values_t
        rows[f"z[{u}]"] = decoder_means(model, z.to(_device(model)))
    title = f"latent traversal: each unit from {values_t[0]:.1f} to {values_t[-1]:.1f}"
    return image_rows(rows, image_shape, title=title, path=path)


def interpolation(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x_from: torch.Tensor,
    x_to: torch.Tensor,
    *,
    steps: int = 9,
    image_shape: Sequence[int] = MNIST_SHAPE,
    path: str | Path | None = None,
):
    """For each pair (rows of ``x_from``, ``x_to``): the decoder mean along the straight line
    between their posterior-mean codes, ``steps`` points including both ends."""
    steps = check_int("steps", steps, minimum=2)
    if x_from.shape != x_to.shape:
        raise ValueError(
            f"x_from and x_to must have the same shape; got {tuple(x_from.shape)} and "
            f"{tuple(x_to.shape)}"
        )
    a = posterior_means(guide, x_from).to(_device(model))
    b = posterior_means(guide, x_to).to(_device(model))
    t = torch.linspace(0, 1, steps, device=a.device)
    rows = {}
    for i in range(len(a)):
        z = a[i] + t[:, None] * (b[i] - a[i])
        rows[f"pair {i + 1}"] = decoder_means(model, z)
    return image_rows(rows, image_shape, title="interpolation between codes", path=path)


# -- codes and curves -----------------------------------------------------------------------


def latent_scatter(
    guide: Callable[..., Any],
    x: torch.Tensor,
    labels: Any = None,
    *,
    site: str = "z",
    ax=None,
    title: str | None = None,
    path: str | Path | None = None,
):
    """Posterior-mean codes E_q[z | x] in 2-D, coloured by ``labels`` (principal components 1
    and 2 when the latent space has more than two dimensions)."""
    codes = posterior_means(guide, x, site=site).reshape(len(x), -1).cpu().numpy()
    return scatter_codes(codes, labels, ax=ax, title=title, path=path)


def scatter_codes(codes: np.ndarray, labels: Any = None, *, ax=None, title=None, path=None):
    """Codes ``(N, d)`` in 2-D, coloured by label (see :func:`latent_scatter`)."""
    plt = pyplot()
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (N, d); got shape {codes.shape}")
    xlabel, ylabel = "z[0]", "z[1]"
    if codes.shape[1] > 2:
        from sklearn.decomposition import PCA

        codes = PCA(n_components=2).fit_transform(codes)
        xlabel, ylabel = "principal component 1", "principal component 2"
    elif codes.shape[1] == 1:
        codes = np.column_stack([codes[:, 0], np.zeros(len(codes))])
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.2, 4))
    if labels is None:
        points = ax.scatter(codes[:, 0], codes[:, 1], s=3)
    else:
        c = np.asarray(labels)
        if c.shape != (len(codes),):
            raise ValueError(f"labels must have one entry per code ({len(codes)}); got {c.shape}")
        points = ax.scatter(codes[:, 0], codes[:, 1], c=c, cmap="tab10", s=3)
    if labels is not None and fig is not None:
        fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title or "E_q[z | x]", fontsize=9)
    if fig is None:
        return ax.figure
    fig.tight_layout()
    return save(fig, path)


def elbo_curve(history: pd.DataFrame, *, path: str | Path | None = None):
    """Training ELBO (−train_loss) and validation ELBO per epoch, from a ``fit`` history."""
    if not isinstance(history, pd.DataFrame) or not {"epoch", "train_loss"} <= set(history):
        raise ValueError("history must be a fit history with columns 'epoch' and 'train_loss'")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(history["epoch"], -history["train_loss"], marker="o", label="train ELBO")
    if "val_elbo" in history:
        ax.plot(history["epoch"], history["val_elbo"], marker="s", label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per data point)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save(fig, path)


def line_plot(
    curves: dict[Any, tuple[Any, Any]],
    *,
    xlabel: str,
    ylabel: str,
    legend: str = "",
    lines: dict[str, float] | None = None,
    title: str | None = None,
    path: str | Path | None = None,
):
    """Named curves ``{label: (xs, ys)}`` on one axis; ``lines`` ``{label: y}`` are drawn as
    dashed horizontal reference lines (a published number, say)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", ms=3, label=f"{legend} {label}".strip())
    for i, (label, y) in enumerate((lines or {}).items(), start=len(curves)):
        ax.axhline(y, ls="--", lw=1, color=f"C{i % 10}", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def bound_vs_latent_dim(
    frame: pd.DataFrame,
    *,
    x: str = "latent_dim",
    columns: Sequence[str] = ("test_elbo", "test_log_likelihood"),
    path: str | Path | None = None,
):
    """Bounds (columns of a benchmark table) against the latent dimension."""
    missing = [c for c in (x, *columns) if c not in frame]
    if missing:
        raise ValueError(f"frame has no columns {missing} (it has {list(frame.columns)})")
    ordered = frame.sort_values(x)
    curves = {c: (ordered[x].to_numpy(), ordered[c].to_numpy()) for c in columns}
    return line_plot(curves, xlabel="latent dimension", ylabel="nats per test image", path=path)


def khat_plot(pareto_k: Any, *, title: str | None = None, path: str | Path | None = None):
    """Pareto k̂ of each data point's importance weights, with the 0.7 threshold (ArviZ's
    ``plot_khat``); ``pareto_k`` from ``evaluate`` (a column) or ``to_inference_data``."""
    import xarray as xr

    from lvmkit.inference.weights import import_arviz

    az = import_arviz()
    plt = pyplot()
    if isinstance(pareto_k, pd.Series):
        pareto_k = pareto_k.to_numpy()
    if not isinstance(pareto_k, xr.DataArray):
        values = np.asarray(pareto_k, dtype=float).reshape(-1)
        pareto_k = xr.DataArray(values, dims=["point"], coords={"point": np.arange(len(values))})
    infinite = ~np.isfinite(pareto_k.values)
    note = ""
    if infinite.any():  # k̂ = ∞ (or NaN: too few draws) has no place on the axis: mark the top
        finite = pareto_k.values[~infinite]
        top = max(2.0, float(finite.max()) + 0.25) if finite.size else 2.0
        pareto_k = pareto_k.where(~infinite, top)
        note = f" ({int(infinite.sum())} not finite, drawn at {top:.2f})"
    fig, ax = plt.subplots(figsize=(6, 3.2))
    with warnings.catch_warnings():
        # ArviZ 0.23 announces it will want LOO's ELPDData; importance weights have none
        warnings.filterwarnings("ignore", "support for DataArrays", FutureWarning)
        # ... and calls a matplotlib helper that matplotlib 3.11 deprecates (ArviZ's to fix)
        warnings.filterwarnings("ignore", "Passing a dict or None as alias_mapping")
        az.plot_khat(pareto_k, ax=ax, show_hlines=True, show_bins=True, markersize=4)
    ax.set_title((title or "Pareto k̂ of the importance weights per data point") + note, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def piano_rolls(rolls: dict[str, Any], *, title: str | None = None, path: str | Path | None = None):
    """Piano rolls ``{label: (T, 88) frames}`` one above the other: time across, keys up (MIDI
    21–108), a dark cell where a key sounds.

    Example::

        >>> import torch
        >>> fig = piano_rolls({"a chord": torch.eye(88)[[39, 43, 46]].sum(0).expand(8, -1)})
        >>> len(fig.axes)
        1
    """
    if not rolls:
        raise ValueError("rolls is empty: give {label: (T, 88) frames}")
    plt = pyplot()
    fig, axes = plt.subplots(len(rolls), 1, figsize=(8, 1.6 * len(rolls) + 0.4), squeeze=False)
    for ax, (label, roll) in zip(axes[:, 0], rolls.items(), strict=True):
        values = np.asarray(torch.as_tensor(roll).detach().cpu().float())
        if values.ndim != 2:
            raise ValueError(f"{label!r}: a piano roll is (T, keys); got shape {values.shape}")
        keys = np.flatnonzero(values.any(0)) if values.any() else np.array([0, values.shape[1] - 1])
        lo, hi = max(0, keys.min() - 2), min(values.shape[1], keys.max() + 3)
        ax.imshow(
            values[:, lo:hi].T,
            aspect="auto",
            origin="lower",
            cmap="Greys",
            interpolation="nearest",
            extent=(0, len(values), 21 + lo - 0.5, 21 + hi - 0.5),
        )
        ax.set_ylabel("MIDI", fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("frame (quarter note)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)
