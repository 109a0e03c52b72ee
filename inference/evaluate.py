"""Evaluation from one primitive: per-data-point importance log-weights.

``log_weights(model, guide, data, K)`` returns ``log p(x_n, z_nk) − log q(z_nk | x_n)`` for
``z_nk ~ q(z | x_n)``, shape ``(K, N)``, from the kernel of :mod:`lvmkit.inference.weights`
(vectorised over the K samples where the model broadcasts, sequential passes where it does not)
and chunked so that one pass never sees more than ``max_pairs`` (sample, data point) pairs.
Everything else is a reduction over its first axis:

- ELBO: the mean over k (a K-sample estimate of the bound);
- importance-sampled log-likelihood (the IWAE bound): logsumexp over k − log K, which rises to
  log p(x) as K grows (K = 5000 is the standard for published tables);
- Pareto k̂ of the importance weights (ArviZ's PSIS): above 0.7 the estimate is not to be trusted;
- effective sample size of the normalized weights, 1 / Σ w̃².

Weights use the distributions' unscaled log-densities (masks are honoured, ``poutine.scale`` is
not), so KL annealing, auxiliary-loss weights or subsampling factors never leak into reported
likelihoods. For a model with sites outside the data plate (global latents θ: a mixture's weights
and means, say), the weights are per point given θ drawn from the guide: with point-mass guides on
θ (``AutoDelta``, a ``Delta`` site) the estimate is log p(x_n | θ̂); otherwise it is the
posterior predictive density log E_q(θ)[p(x_n | θ)]. Which one a table holds is its
``attrs["likelihood"]`` (and :attr:`EvaluationSummary.likelihood`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from lvmkit.inference import _memory
from lvmkit.inference._data import (
    Data,
    as_data,
    check_signature,
    check_with_model,
    cuda_devices,
    from_transform,
)
from lvmkit.inference._device import Placement, pair_placement
from lvmkit.inference._params import eval_mode, param_scope
from lvmkit.inference._rundir import rng_state, set_rng_state
from lvmkit.inference.callbacks import check_callbacks, notify
from lvmkit.inference.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lvmkit.inference.threads import resumed as resumed_threads
from lvmkit.inference.threads import using as using_threads
from lvmkit.inference.weights import (
    PARTICLE_PLATE,
    Layout,
    find_layout,
    is_deterministic,
    is_sample,
    log_density_pass,
    site_log_prob,
    subsample_chunks,
    subsample_indices,
)
from lvmkit.models._checks import check_choice, check_float, check_int

DEFAULT_MAX_PAIRS = {  # (sample, point) pairs per forward pass, by device type
    # ≈ 13 MB per 784-wide tensor; fastest on the 2-core CPU of 1,024…65,536 (the max_pairs rows
    # of benchmarks/results/speed-cpu-full.md)
    "cpu": 4096,
    # ≈ 200 MB per 784-wide tensor: enough work per kernel; not yet measured (no GPU so far):
    # `lvmkit bench speed --device cuda` sweeps 16,384…1,048,576
    "cuda": 65536,
}
METHODS = ("is", "ais", "ais-prior")  # evaluate's estimators of log p(x)
PARETO_K_THRESHOLD = 0.7  # Vehtari et al. (2024): above it, importance sampling is unreliable
MIN_SAMPLES_FOR_PSIS = 20  # PSIS fits a Pareto tail to the largest ~20 % of weights
_SCORE_BATCH = 1 << 20  # log-weights reduced at once (8 MB in float64)
_log = logging.getLogger("lvmkit")


@dataclass(frozen=True)
class EvaluationSummary:
    """Means over data points of an :func:`evaluate` table; log-densities in nats per point."""

    num_points: int  # data points evaluated
    num_samples: int  # importance samples per point (K)
    elbo: float  # mean ELBO
    log_likelihood: float  # mean importance-sampled log-likelihood (see ``likelihood``)
    log_likelihood_se: float  # standard error of that mean over data points
    gap: float  # log_likelihood − elbo: the posterior gap the guide leaves
    pareto_k_mean: float  # mean k̂ (NaN when K is too small for PSIS)
    frac_pareto_k_above_0_7: float  # fraction of points whose estimate is unreliable
    ess_mean: float  # mean effective sample size of the normalized weights
    likelihood: str = "log p(x)"  # what log_likelihood estimates (see lvmkit.evaluate)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(self)])


def log_weights(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    data: Any,
    num_samples: int = 1,
    *,
    max_pairs: int | None = None,
    device: str | torch.device | None = None,
    memory_budget: int | str | None = None,
    data_plate: str | None = None,
    transform: Callable[[Any], Any] | None = None,
    vectorize_particles: bool | None = None,
) -> torch.Tensor:
    """Importance log-weights ``log p(x, z_k) − log q(z_k | x)``, shape ``(num_samples, N)``.

    ``data``, ``data_plate``, ``transform`` and ``vectorize_particles`` as in :func:`evaluate`.
    For large ``num_samples × N`` prefer :func:`evaluate`, which reduces each chunk instead of
    holding all weights.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> lvmkit.log_weights(model, guide, torch.ones(3, 4), 10).shape
        torch.Size([10, 3])
    """
    values = as_data(data, model)
    num_samples = check_int("num_samples", num_samples)
    placement = pair_placement(model, guide, device)
    dev = placement.device
    budget, what = _memory.budget_for(memory_budget, dev)
    n = values.num_points or 0
    size = num_samples * n * 4
    if budget is not None and size > budget:
        raise ValueError(
            f"log_weights returns a ({num_samples}, {n}) tensor of "
            f"{_memory.fmt(size)}, more than {what} ({_memory.fmt(budget)}): use "
            "lvmkit.evaluate, which reduces the weights chunk by chunk, or fewer num_samples"
        )
    stream = WeightStream(
        model, guide, values, num_samples, max_pairs=max_pairs, device=placement,
        memory_budget=memory_budget, plate=data_plate, transform=transform,
        vectorize=vectorize_particles,
    )  # fmt: skip
    return torch.cat([lw for _, lw in stream], dim=1)


def evaluate(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    data: Any,
    num_samples: int = 1000,
    *,
    max_pairs: int | None = None,
    seed: int | None = 0,
    device: str | torch.device | None = None,
    memory_budget: int | str | None = None,
    data_plate: str | None = None,
    transform: Callable[[Any], Any] | None = None,
    vectorize_particles: bool | None = None,
    progress: bool = False,
    callbacks: list[Any] | None = None,
    label: str = "test",
    threads: int | str | None = "auto",
    checkpoint: str | Path | None = None,
    method: str = "is",
    num_steps: int = 1000,
) -> pd.DataFrame:
    """Score each data point: ELBO, importance-sampled log-likelihood, Pareto k̂ and ESS.

    Returns a DataFrame with one row per data point and columns ``elbo``, ``log_likelihood``,
    ``pareto_k`` and ``ess`` (nats; k̂ is NaN for ``num_samples < 20``). :func:`summarize` turns
    it into an :class:`EvaluationSummary`.

    Args:
        model, guide: any Pyro pair, called with ``data`` as :func:`lvmkit.fit` calls it.
        data: a tensor (passed as ``x`` when the model has a parameter of that name, else
            first), a tuple of positional or a dict of keyword arguments; per-point tensors are
            cut into chunks along their first dimension, other values passed to every call. A
            model that subsamples its plate itself (``pyro.plate(..., subsample_size=)``) gets
            the whole data, with its plate's indices set to each chunk's points.
        num_samples: K, importance samples per point.
        max_pairs: (sample, point) pairs per pass (default: by device,
            :data:`DEFAULT_MAX_PAIRS`, lowered if need be to fit ``memory_budget``: bytes or a
            size such as ``"2GiB"``; ``None``: 90 % of the memory free on the device; what a
            pair needs is measured on a probe pass, and a ``max_pairs`` that cannot fit is
            refused at once with the largest one that can).
        seed: fixes the samples without disturbing the caller's random state (``None``: use it).
        data_plate: the name of the plate over the data points (default: ``"data"`` where the
            model has one, else the outermost plate around every observed site whose size is the
            number of points).
        transform: applied to each chunk before the model sees it (as in ``fit``); it must keep
            the order of the points.
        vectorize_particles: ``None`` (default) draws the K samples in one vectorised pass where
            the model broadcasts over an extra leftmost dimension, and in sequential passes where
            it does not (boolean-mask selection, fancy indexing, BatchNorm), saying so once;
            ``True``/``False`` imposes one or the other.
        callbacks: e.g. an :class:`lvmkit.MLflowLogger` that logged the training; each gets the
            :func:`summarize` of the table through ``on_evaluation(summary, label)``.
        threads: CPU threads for torch during the evaluation, as in :func:`lvmkit.fit`.
        checkpoint: a file where the rows scored so far are kept, written atomically after each
            block of points with the random state reached; an evaluation interrupted (Ctrl-C, a
            kill) and run again with the same arguments continues from it, to the same numbers
            as one that was never interrupted. A file of another evaluation (other data, K,
            seed) is started over. Removed once every point is scored.
        method: ``"is"`` (importance sampling from the guide, ``num_samples`` draws) or
            ``"ais"``: annealed importance sampling (:mod:`lvmkit.inference.ais`) with
            ``num_samples`` chains started from the guide (``"ais-prior"``: from the model's
            prior, for models without discrete latents) and ``num_steps`` intermediate
            distributions, HMC on the model's continuous local latents — a stochastic lower
            bound of log p(x) that, unlike IS, approaches it when the guide is poor. The same
            columns: ``log_likelihood`` from the AIS weights, ``elbo`` from the chains' starts,
            ``ess`` and ``pareto_k`` of the final weights.
        num_steps: AIS's intermediate distributions (``method="ais"``).

    Modules run in eval mode (no dropout, BatchNorm's running statistics), the pair's own and
    those a plain-function pair registers with ``pyro.module``. Sites outside the data plate
    (global latents θ) are drawn from the guide and conditioned on: the table's
    ``log_likelihood`` is then log p(x_n | θ̂) when the guide's global sites are point masses
    (``AutoDelta``), and the posterior predictive density log E_q(θ)[p(x_n | θ)] otherwise; the
    table's ``attrs["likelihood"]`` says which.

    Example::

        >>> import torch, lvmkit
        >>> cfg = lvmkit.VAEConfig(data_dim=4, latent_dim=2, hidden_dims=(8,))
        >>> model, guide = lvmkit.build_vae(cfg)
        >>> scores = lvmkit.evaluate(model, guide, torch.bernoulli(torch.full((5, 4), 0.5)), 100)
        >>> list(scores.columns)
        ['elbo', 'log_likelihood', 'pareto_k', 'ess']
    """
    check_int("num_samples", num_samples)
    callbacks = check_callbacks(callbacks)
    if not isinstance(label, str) or not label:
        raise TypeError(f"label must be a non-empty str naming the data set; got {label!r}")
    check_choice("method", method, METHODS)
    values = as_data(data, model)
    if method != "is":
        if checkpoint is not None:
            raise ValueError("checkpoint= is for method='is'; an AIS evaluation runs through")
        return _evaluate_ais(
            model, guide, values, num_samples, check_int("num_steps", num_steps),
            seed=seed, device=device, max_pairs=max_pairs, memory_budget=memory_budget,
            plate=data_plate, transform=transform, threads=threads, callbacks=callbacks,
            label=label, progress=progress, from_prior=method == "ais-prior",
        )  # fmt: skip
    rows: list[np.ndarray] = []
    partial = _Partial(checkpoint, values, num_samples, seed, max_pairs) if checkpoint else None
    start, rng = partial.resume(rows) if partial is not None else (0, None)
    if partial is not None and start:  # the thread count it started with: the same bits
        threads = resumed_threads(threads, partial.threads, f"the evaluation in {checkpoint}")
    with torch.random.fork_rng(devices=cuda_devices()), using_threads(threads) as used:
        if rng is not None:  # where the interrupted evaluation stood
            set_rng_state(rng, pair_placement(model, guide, device).device)
        elif seed is not None:
            pyro.set_rng_seed(check_int("seed", seed, minimum=0))
        rest = values.take(slice(start, None)) if start else values
        stream = WeightStream(
            model, guide, rest, num_samples, max_pairs=max_pairs, device=device,
            memory_budget=memory_budget, plate=data_plate, transform=transform,
            vectorize=vectorize_particles,
        )  # fmt: skip
        pending: list[torch.Tensor] = []  # scored together: ArviZ's psislw costs ~10 ms a call
        total = start + stream.total
        with tqdm(total=total, initial=start, desc="evaluate", unit="pt",
                  disable=not progress) as bar:  # fmt: skip
            for stop, lw in stream:
                pending.append(lw)
                if sum(p.numel() for p in pending) >= _SCORE_BATCH or stop == stream.total:
                    rows.append(_score_chunk(torch.cat(pending, dim=1)))
                    pending.clear()
                    if partial is not None and stop < stream.total:
                        count = used.threads if used is not None else torch.get_num_threads()
                        partial.save(start + stop, rows, rng_state(stream.dev), count)
                bar.update(start + stop - bar.n)
    if partial is not None:
        partial.done()
    scores = pd.DataFrame(
        np.concatenate(rows), columns=["elbo", "log_likelihood", "pareto_k", "ess"]
    )
    scores.attrs["num_samples"] = num_samples
    scores.attrs["likelihood"] = describe_likelihood(stream.layout)
    if callbacks:
        notify(callbacks, "on_evaluation", summarize(scores), label)
    return scores


def _evaluate_ais(
    model, guide, values: Data, chains: int, steps: int, *, seed, device, max_pairs,
    memory_budget, plate, transform, threads, callbacks, label, progress, from_prior=False,
) -> pd.DataFrame:  # fmt: skip
    """``evaluate(method="ais")``: AIS per chunk of points, on the weight stream's layout."""
    from lvmkit.inference import ais

    rows: list[np.ndarray] = []
    with torch.random.fork_rng(devices=cuda_devices()), using_threads(threads):
        if seed is not None:
            pyro.set_rng_seed(check_int("seed", seed, minimum=0))
        stream = WeightStream(
            model, guide, values, chains, max_pairs=max_pairs, device=device,
            memory_budget=memory_budget, plate=plate, transform=transform,
        )  # fmt: skip
        layout = stream.layout
        if layout.subsampled or not layout.vectorized:
            raise ValueError(
                "method='ais' runs its chains as one batch: it needs a model that broadcasts over "
                "a leftmost particle dimension and takes its points in chunks; use method='is'"
            )
        if layout.global_sites and not layout.point_masses:
            raise ValueError(
                f"method='ais' holds global sites fixed, so they must be point masses in the "
                f"guide (AutoDelta); {list(layout.global_sites)} are not: use method='is'"
            )
        points = max(1, min(stream.total, stream.max_pairs // chains))
        with (
            param_scope(model, guide, publish=False),
            eval_mode(model, guide),
            pyro.validation_enabled(False),
            stream.placement.scope(),
            tqdm(total=stream.total, desc="evaluate (AIS)", unit="pt", disable=not progress) as bar,
        ):
            for start in range(0, stream.total, points):
                stop = min(stream.total, start + points)
                chunk = stream._prepare(values.take(slice(start, stop)).to(stream.dev))
                chains_from = ais.prior_guide(model) if from_prior else guide
                log_w, elbo = ais.anneal(model, chains_from, chunk, layout, chains, steps)
                scored = _score_chunk(log_w)  # the IS reductions, of the AIS weights
                scored[:, 0] = elbo.double().mean(dim=0).cpu().numpy()  # ELBO: the starts'
                rows.append(scored)
                bar.update(stop - start)
    scores = pd.DataFrame(
        np.concatenate(rows), columns=["elbo", "log_likelihood", "pareto_k", "ess"]
    )
    scores.attrs.update(
        num_samples=chains, num_steps=steps, method="ais-prior" if from_prior else "ais",
        likelihood=describe_likelihood(layout),
    )  # fmt: skip
    notify(callbacks, "on_evaluation", summarize(scores), label)
    return scores


class _Partial:
    """An evaluation's scored rows so far, kept in a checkpoint file (see ``evaluate``)."""

    def __init__(self, path, data: Data, num_samples: int, seed, max_pairs) -> None:
        self.path = Path(path)
        n = data.check_sliceable()
        digest = hashlib.sha256()
        for tensor in data.tensors():
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.threads: int | None = None  # the thread count the evaluation started with
        self.key = {
            "num_samples": num_samples,
            "seed": seed,
            "max_pairs": max_pairs,
            "points": n,
            "data": digest.hexdigest(),
        }

    def resume(self, rows: list[np.ndarray]) -> tuple[int, Any]:
        """Where to start (and the random state there); the rows kept go into ``rows``."""
        if not self.path.exists():
            return 0, None
        try:
            state = load_checkpoint(self.path)
        except (CheckpointError, OSError) as err:
            _log.warning("lvmkit: %s is not a readable evaluation checkpoint (%s); starting over",
                         self.path, err)  # fmt: skip
            return 0, None
        if state.get("kind") != "evaluation" or state.get("key") != self.key:
            _log.warning("lvmkit: %s holds another evaluation's scores; starting over", self.path)
            return 0, None
        rows.append(state["rows"].numpy())
        self.threads = state.get("threads")
        return int(state["stop"]), state["rng"]

    def save(self, stop: int, rows: list[np.ndarray], rng: dict[str, Any], threads: int) -> None:
        scored = torch.from_numpy(np.concatenate(rows))
        state = {"kind": "evaluation", "key": self.key, "stop": stop, "rows": scored, "rng": rng,
                 "threads": threads}  # fmt: skip
        save_checkpoint(self.path, state, keep_previous=False)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def describe_likelihood(layout: Layout) -> str:
    """What the per-point log-likelihood of a pair with this layout estimates."""
    if not layout.global_sites:
        return "log p(x)"
    # the model's own global latents (an autoguide's internal sites are not what the user named)
    names = ", ".join(layout.model_global_sites or layout.global_sites)
    if layout.point_masses:
        return f"log p(x | θ̂), θ̂ = point estimates of {names}"
    return f"log E_q(θ)[p(x | θ)], θ = {names} drawn from the guide"


def summarize(scores: pd.DataFrame) -> EvaluationSummary:
    """Reduce an :func:`evaluate` table to means over data points.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> summary = lvmkit.summarize(lvmkit.evaluate(model, guide, torch.ones(6, 4), 50))
        >>> summary.num_points, summary.num_samples, summary.log_likelihood >= summary.elbo
        (6, 50, True)
    """
    needed = {"elbo", "log_likelihood", "pareto_k", "ess"}
    if not isinstance(scores, pd.DataFrame) or not needed <= set(scores.columns):
        raise ValueError(
            f"scores must be a DataFrame from lvmkit.evaluate with columns {sorted(needed)}"
        )
    if len(scores) == 0:
        raise ValueError("scores is empty: expected at least one evaluated data point")
    k = scores["pareto_k"]
    has_k = bool(k.notna().all())  # k̂ is NaN when K was too small for PSIS
    ll = scores["log_likelihood"]
    return EvaluationSummary(
        num_points=len(scores),
        num_samples=int(scores.attrs.get("num_samples", -1)),
        elbo=float(scores["elbo"].mean()),
        log_likelihood=float(ll.mean()),
        log_likelihood_se=float(ll.std(ddof=1) / math.sqrt(len(ll)))
        if len(ll) > 1
        else float("nan"),
        gap=float((ll - scores["elbo"]).mean()),
        pareto_k_mean=float(k.mean()) if has_k else float("nan"),
        frac_pareto_k_above_0_7=float((k > PARETO_K_THRESHOLD).mean()) if has_k else float("nan"),
        ess_mean=float(scores["ess"].mean()),
        likelihood=str(scores.attrs.get("likelihood", "log p(x)")),
    )


def mean_elbo(
    model, guide, data: Data, *, plate: str | None = None, transform=None, placement=None
) -> torch.Tensor:
    """One-sample ELBO averaged over ``data``, as a device scalar (``fit``'s validation, on
    the fit's ``placement``)."""
    stream = WeightStream(model, guide, data, 1, plate=plate, transform=transform, device=placement)
    sums = [lw.sum() for _, lw in stream]
    return torch.stack(sums).sum() / stream.total


# -- codes: posterior means, active units, reconstructions ------------------------------------

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): unit u is active if Cov_x(E_q[z_u]) > 0.01


@dataclass(frozen=True)
class ActiveUnits:
    """Which latent units the guide uses (Burda, Grosse & Salakhutdinov, "Importance Weighted
    Autoencoders", ICLR 2016, section 5.2): a unit is *active* when the variance over data points
    of its posterior mean E_q[z_u | x] exceeds ``threshold``. Units that are not active carry no
    information about x — the signature of posterior collapse."""

    count: int  # active units
    total: int  # latent units
    variances: np.ndarray  # Cov_x(E_q[z_u | x]) per unit, shape (total,)
    threshold: float


def posterior_means(
    guide: Callable[..., Any],
    data: Any,
    *,
    site: str = "z",
    num_samples: int = 64,
    max_pairs: int | None = None,
    seed: int | None = 0,
) -> torch.Tensor:
    """E_q[z | x] for every data point, shape ``(N, *event_shape)`` (the codes of an encoder).

    Exact when ``site`` is the guide's only sample site and its distribution has a mean (a
    Gaussian's loc, a Delta's value); otherwise the average of ``num_samples`` draws (e.g. M2's
    z, whose distribution depends on a drawn label). ``seed`` as in :func:`evaluate`.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> x = torch.ones(3, 4)
        >>> torch.equal(lvmkit.posterior_means(guide, x), guide.encode(x)[0].detach())
        True
    """
    values = as_data(data, guide)
    total = values.check_sliceable()
    num_samples = check_int("num_samples", num_samples)
    _check_site(site)
    placement = pair_placement(guide, guide, None)
    dev = placement.device
    pairs = check_int("max_pairs", max_pairs) if max_pairs is not None else default_max_pairs(dev)
    out: list[torch.Tensor] = []
    with scoring(guide, guide, seed), pyro.validation_enabled(False), placement.scope():
        chunk = max(1, pairs // num_samples)
        for start in range(0, total, chunk):
            part = values.take(slice(start, start + chunk)).to(dev)
            trace = poutine.trace(guide).get_trace(*part.args, **part.kwargs)
            sites = [name for name, s in trace.nodes.items() if is_sample(s)]
            if site not in sites:
                raise ValueError(
                    f"the guide has no sample site {site!r} (its sample sites: {sites}); pass "
                    "site= the name of the continuous latent"
                )
            mean = _site_mean(trace.nodes[site]) if sites == [site] else None
            if mean is None:
                dim = -(_plate_nesting(trace) + 1)
                with pyro.plate(PARTICLE_PLATE, num_samples, dim=dim):
                    particles = poutine.trace(guide).get_trace(*part.args, **part.kwargs)
                draws = torch.as_tensor(particles.nodes[site]["value"])
                mean = draws.mean(dim=0)
                shape = torch.as_tensor(trace.nodes[site]["value"]).shape
                if mean.numel() != shape.numel():
                    raise ValueError(
                        f"cannot average the draws of site {site!r}: shape {tuple(draws.shape)} "
                        f"does not reduce to {tuple(shape)}"
                    )
                mean = mean.reshape(shape)
            out.append(mean)
    return torch.cat(out)


def active_units(
    guide: Callable[..., Any],
    data: Any,
    *,
    site: str = "z",
    threshold: float = ACTIVE_UNIT_THRESHOLD,
    num_samples: int = 64,
) -> ActiveUnits:
    """Count the active latent units of ``guide`` on ``data`` (see :class:`ActiveUnits`).

    Example::

        >>> import torch, lvmkit
        >>> cfg = lvmkit.VAEConfig(data_dim=4, latent_dim=3, hidden_dims=(8,))
        >>> model, guide = lvmkit.build_vae(cfg)
        >>> lvmkit.active_units(guide, torch.rand(50, 4)).total
        3
    """
    threshold = check_float("threshold", threshold, nonnegative=True)
    means = posterior_means(guide, data, site=site, num_samples=num_samples)
    means = means.reshape(means.shape[0], -1).double()
    if means.shape[0] < 2:
        raise ValueError(f"active units need at least 2 data points; got {means.shape[0]}")
    variances = means.var(dim=0, unbiased=False).cpu().numpy()
    return ActiveUnits(int((variances > threshold).sum()), len(variances), variances, threshold)


def reconstruction_error(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    data: Any,
    *,
    site: str = "z",
    max_pairs: int | None = None,
    seed: int | None = 0,
    data_plate: str | None = None,
) -> torch.Tensor:
    """−log p(x | ẑ) per data point, with ẑ = E_q[z | x] the guide's mean code: the
    reconstruction error in nats (the binary cross-entropy summed over pixels for a Bernoulli
    decoder; ½‖x − x̂‖² + const for a unit-variance Gaussian one). Other guide sites keep a draw.
    Returns a CPU tensor of shape ``(N,)``.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> lvmkit.reconstruction_error(model, guide, torch.ones(3, 4)).shape
        torch.Size([3])
    """
    values = as_data(data, model)
    total = values.check_sliceable()
    check_with_model(model, values)
    _check_site(site)
    placement = pair_placement(model, guide, None)
    dev = placement.device
    pairs = check_int("max_pairs", max_pairs) if max_pairs is not None else default_max_pairs(dev)
    out: list[torch.Tensor] = []
    with scoring(model, guide, seed), pyro.validation_enabled(False), placement.scope():
        layout = find_layout(model, guide, values.to(dev), plate=data_plate, vectorize=True)
        for start in range(0, total, pairs):
            part = values.take(slice(start, start + pairs)).to(dev)
            out.append(-_reconstruction_pass(model, guide, part, site, layout).cpu())
    return torch.cat(out)


def _reconstruction_pass(model, guide, chunk: Data, site: str, layout: Layout) -> torch.Tensor:
    n = chunk.num_points or 0
    dim = layout.particle_dim
    with pyro.plate(PARTICLE_PLATE, 1, dim=dim):
        guide_trace = poutine.trace(guide).get_trace(*chunk.args, **chunk.kwargs)
        if site not in guide_trace.nodes:
            raise ValueError(f"the guide has no sample site {site!r}; pass site= its latent")
        node = guide_trace.nodes[site]
        mean = _site_mean(node)
        if mean is None:
            raise ValueError(f"the guide's site {site!r} has no mean ({type(node['fn']).__name__})")
        node["value"] = mean.expand(node["value"].shape)
        replayed = poutine.replay(
            poutine.enum(model, first_available_dim=dim - 1), trace=guide_trace
        )
        model_trace = poutine.trace(replayed).get_trace(*chunk.args, **chunk.kwargs)
    log_p = torch.zeros(1, n, device=chunk.tensors()[0].device)
    for _, s in model_trace.nodes.items():
        if is_sample(s) and s["is_observed"] and not is_deterministic(s):
            log_p = log_p + site_log_prob(s, layout, 1, n)
    if log_p.dim() > 2:
        log_p = log_p.reshape(-1, 1, n).logsumexp(dim=0)
    return log_p[0]


@contextlib.contextmanager
def scoring(model, guide, seed: int | None) -> Iterator[None]:
    """No gradients, the pair's parameters in scope, modules in eval mode, and (with ``seed``)
    a seeded random stream that leaves the caller's random state as it was."""
    with (
        torch.no_grad(),
        torch.random.fork_rng(devices=cuda_devices()),
        param_scope(model, guide, publish=False),
        eval_mode(model, guide),
    ):
        if seed is not None:
            pyro.set_rng_seed(check_int("seed", seed, minimum=0))
        yield


def _site_mean(site: Any) -> torch.Tensor | None:
    fn = site["fn"]
    while hasattr(fn, "base_dist") and isinstance(fn, pyro.distributions.Independent):
        fn = fn.base_dist
    if isinstance(fn, pyro.distributions.Delta):
        return fn.v
    if isinstance(fn, (pyro.distributions.Normal, pyro.distributions.LogNormal)):
        return fn.mean
    return None


def _plate_nesting(trace) -> int:
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if is_sample(site)
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def _check_site(site: Any) -> None:
    if not isinstance(site, str):
        raise TypeError(f"site must be the name of a sample site (a str); got {site!r}")


def default_max_pairs(dev: torch.device) -> int:
    return DEFAULT_MAX_PAIRS.get(dev.type, DEFAULT_MAX_PAIRS["cpu"])


# -- the stream of weights ---------------------------------------------------------------------


class WeightStream:
    """The ``(K, n)`` log-weights of ``data``'s points, chunk by chunk: iterate for
    ``(stop, weights of points [start, stop))``. The pair's layout is found on a probe when the
    stream is made (``layout``), and ``total`` is the number of points."""

    def __init__(
        self,
        model,
        guide,
        data: Data,
        num_samples: int,
        *,
        max_pairs: int | None = None,
        device=None,
        memory_budget: Any = None,
        plate: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        vectorize: bool | None = None,
    ) -> None:
        self.model, self.guide, self.num_samples = (
            model,
            guide,
            check_int("num_samples", num_samples),
        )
        if max_pairs is not None:
            max_pairs = check_int("max_pairs", max_pairs)
        _memory.parse_budget(memory_budget)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None; got {type(transform).__name__}")
        if plate is not None and not isinstance(plate, str):
            raise TypeError(f"data_plate must be a plate's name (a str) or None; got {plate!r}")
        if vectorize is not None and not isinstance(vectorize, bool):
            raise TypeError(f"vectorize_particles must be True, False or None; got {vectorize!r}")
        self.placement = (
            device if isinstance(device, Placement) else pair_placement(model, guide, device)
        )
        self.dev = self.placement.device
        self.transform = transform
        check_with_model(model, data)
        self.data = data
        ragged = data.lengths and data.num_points is None
        if not ragged:
            sample = data.take(slice(0, 1)) if data.num_points else data
            check_signature(model, self._prepare(sample))
        with (
            torch.no_grad(),
            param_scope(model, guide, publish=False),
            eval_mode(model, guide),
            self.placement.first_use(),
        ):
            try:
                self.layout = find_layout(
                    model, guide, data.to(self.dev), plate=plate, vectorize=vectorize,
                    prepare=self._prepare, placement=self.placement,
                )  # fmt: skip
            except (ValueError, TypeError) as err:
                if ragged:  # only a model that subsamples itself takes such data whole
                    data.check_sliceable()
                raise err
            with pyro.validation_enabled(False):
                self.max_pairs = self._pairs_in_budget(max_pairs, memory_budget)
        self.placement.say("evaluate")
        self.total = (
            self.layout.num_points if self.layout.subsampled else data.check_sliceable()
        ) or 0

    def _prepare(self, data: Data) -> Data:
        if self.transform is None:
            return data
        with self.placement.scope():
            return from_transform(self.transform(data.user_form()), data)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        k, layout = self.num_samples, self.layout
        width = 1 if not layout.vectorized else k  # particles in one pass, at most
        points = max(1, min(self.total, self.max_pairs // width))  # data points per chunk
        samples = max(1, min(k, self.max_pairs // points)) if layout.vectorized else 1
        model, guide = self.model, self.guide
        with (
            torch.no_grad(),
            param_scope(model, guide, publish=False),
            eval_mode(model, guide),
            pyro.validation_enabled(False),
            self.placement.scope(),
        ):
            if layout.subsampled:  # chunks of the model's own subsample size (or of ours)
                whole = self._prepare(self.data.to(self.dev))
                if layout.subsample_size is None:  # the plate takes any number of indices
                    layout = replace(layout, subsample_size=points)
                samples = max(1, min(k, self.max_pairs // (layout.subsample_size or 1)))
                samples = samples if layout.vectorized else 1
                for stop, keep, subsample in subsample_chunks(layout):
                    subsample = {p: i.to(self.dev) for p, i in subsample.items()}
                    yield stop, self._pass(whole, samples, subsample)[:, :keep]
                return
            for start in range(0, self.total, points):
                stop = min(self.total, start + points)
                chunk = self._prepare(self.data.take(slice(start, stop)).to(self.dev))
                yield stop, self._pass(chunk, samples, None)

    def _pass(self, call: Data, samples: int, subsample) -> torch.Tensor:
        parts = []
        for k0 in range(0, self.num_samples, samples):
            log_p, log_q = log_density_pass(
                self.model, self.guide, call, min(samples, self.num_samples - k0), self.layout,
                subsample=subsample,
            )  # fmt: skip
            parts.append(log_p - log_q)
        return torch.cat(parts, dim=0)

    def _pairs_in_budget(self, max_pairs: int | None, memory_budget: Any) -> int:
        """``max_pairs`` (default: by device), checked against the memory budget: one probe pass
        of a single (sample, point) pair is run with autograd on to measure what a pair holds."""
        dev = self.dev
        budget, what = _memory.budget_for(memory_budget, dev)
        default = default_max_pairs(dev)
        if budget is None:
            return max_pairs or default
        layout = self.layout
        if layout.subsampled:
            call = self._prepare(self.data.to(dev))
            subsample = {layout.plate: subsample_indices(layout, 0).to(dev)}
        else:
            call, subsample = self._prepare(self.data.take(slice(0, 1)).to(dev)), None
        # (under fork_rng: measuring must not shift the samples the evaluation draws)
        with torch.enable_grad(), torch.random.fork_rng(devices=cuda_devices()):
            _, saved = _memory.measure_saved(
                lambda: log_density_pass(
                    self.model, self.guide, call, 1, layout, subsample=subsample
                )
            )
        params = [value for _, value in pyro.get_param_store().named_parameters()]
        for obj in (self.model, self.guide):
            if isinstance(obj, torch.nn.Module):
                params += list(obj.parameters())
        points = layout.subsample_size if layout.subsampled else 1
        per_pair = max(1, _memory.activation_bytes(saved, params) // (points or 1))
        fits = budget // per_pair
        if fits < 1:
            raise ValueError(
                f"one (sample, data point) pair needs about {_memory.fmt(per_pair)} on {dev} "
                f"(measured), more than {what} ({_memory.fmt(budget)}): evaluate on a device "
                "with more memory, or give a larger memory_budget"
            )
        if max_pairs is not None and max_pairs > fits:
            raise ValueError(
                f"max_pairs={max_pairs} needs about {_memory.fmt(max_pairs * per_pair)} on {dev} "
                f"({_memory.fmt(per_pair)} a pair, measured), more than {what} "
                f"({_memory.fmt(budget)}): use max_pairs <= {fits}, or give a larger memory_budget"
            )
        return max_pairs or min(default, fits)


def _score_chunk(lw: torch.Tensor) -> np.ndarray:
    """Reduce ``(K, n)`` log-weights to rows ``(elbo, log_likelihood, pareto_k, ess)``."""
    k = lw.shape[0]
    lw64 = lw.double()
    lse = torch.logsumexp(lw64, dim=0)
    normalized = torch.exp(lw64 - lse)
    ess = 1.0 / (normalized**2).sum(dim=0)
    columns = [lw64.mean(dim=0), lse - math.log(k), torch.full_like(lse, math.nan), ess]
    out = torch.stack(columns, dim=1).cpu().numpy()
    if k >= MIN_SAMPLES_FOR_PSIS:
        out[:, 2] = pareto_k(lw64.T.cpu().numpy())  # ArviZ wants samples last: (n, K)
    return out


def pareto_k(log_weights: np.ndarray) -> np.ndarray:
    """ArviZ's PSIS k̂ of each row of ``log_weights`` (samples last)."""
    az = import_arviz()
    with warnings.catch_warnings():
        # psislw warns when a tail is too short or constant; k̂ is still what we report.
        warnings.simplefilter("ignore", RuntimeWarning)
        _, k_hat = az.psislw(log_weights)
    return np.asarray(k_hat, dtype=np.float64)


def import_arviz():
    """ArviZ, without its import-time announcement of the 1.x refactor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
        import arviz

    return arviz
