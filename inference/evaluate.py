"""Evaluation from one primitive: per-data-point importance log-weights.

``log_weights(model, guide, data, K)`` returns ``log p(x_n, z_nk) − log q(z_nk | x_n)`` for
``z_nk ~ q(z | x_n)``, shape ``(K, N)``, vectorised over the K samples with a particle plate and
chunked so that one forward pass never sees more than ``max_pairs`` (sample, data point) pairs.
Everything else is a reduction over its first axis:

- ELBO: the mean over k (a K-sample estimate of the bound);
- importance-sampled log-likelihood (the IWAE bound): logsumexp over k − log K, which rises to
  log p(x) as K grows (K = 5000 is the standard for published tables);
- Pareto k̂ of the importance weights (ArviZ's PSIS): above 0.7 the estimate is not to be trusted;
- effective sample size of the normalized weights, 1 / Σ w̃².

Weights use the distributions' unscaled log-densities (masks are honoured, ``poutine.scale`` is
not), so KL annealing or subsampling scale factors never leak into reported likelihoods.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from lvmkit.inference import _memory
from lvmkit.inference._data import (
    Batch,
    as_batch,
    check_with_model,
    cuda_devices,
    model_failures_as_data_errors,
    num_points,
    resolve_device,
    take,
    to_device,
)
from lvmkit.inference._params import eval_mode, param_scope
from lvmkit.inference.callbacks import check_callbacks, notify
from lvmkit.models._checks import check_float, check_int

DATA_PLATE = "data"
DEFAULT_MAX_PAIRS = {  # (sample, point) pairs per forward pass, by device type
    # ≈ 13 MB per 784-wide tensor; fastest on the 2-core CPU of 1,024…65,536 (the max_pairs rows
    # of benchmarks/results/speed-cpu-full.md)
    "cpu": 4096,
    # ≈ 200 MB per 784-wide tensor: enough work per kernel; not yet measured (no GPU so far):
    # `lvmkit bench speed --device cuda` sweeps 16,384…1,048,576
    "cuda": 65536,
}
PARETO_K_THRESHOLD = 0.7  # Vehtari et al. (2024): above it, importance sampling is unreliable
_SCORE_BATCH = 1 << 20  # log-weights reduced at once (8 MB in float64)
_MIN_SAMPLES_FOR_PSIS = 20  # PSIS fits a Pareto tail to the largest ~20 % of weights


@dataclass(frozen=True)
class EvaluationSummary:
    """Means over data points of an :func:`evaluate` table; log-densities in nats per point."""

    num_points: int  # data points evaluated
    num_samples: int  # importance samples per point (K)
    elbo: float  # mean ELBO
    log_likelihood: float  # mean importance-sampled log p(x)
    log_likelihood_se: float  # standard error of that mean over data points
    gap: float  # log_likelihood − elbo: the posterior gap the guide leaves
    pareto_k_mean: float  # mean k̂ (NaN when K is too small for PSIS)
    frac_pareto_k_above_0_7: float  # fraction of points whose estimate is unreliable
    ess_mean: float  # mean effective sample size of the normalized weights

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
) -> torch.Tensor:
    """Importance log-weights ``log p(x, z_k) − log q(z_k | x)``, shape ``(num_samples, N)``.

    ``model`` and ``guide`` must put every latent and observed site under a plate named
    ``"data"`` over the data points. For large ``num_samples × N`` prefer :func:`evaluate`, which
    reduces each chunk instead of holding all weights.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> lvmkit.log_weights(model, guide, torch.ones(3, 4), 10).shape
        torch.Size([10, 3])
    """
    batch = as_batch(data)
    num_samples = check_int("num_samples", num_samples)
    dev = _eval_device(model, guide, device)
    budget, what = _memory.budget_for(memory_budget, dev)
    size = num_samples * num_points(batch) * 4
    if budget is not None and size > budget:
        raise ValueError(
            f"log_weights returns a ({num_samples}, {num_points(batch)}) tensor of "
            f"{_memory.fmt(size)}, more than {what} ({_memory.fmt(budget)}): use "
            "lvmkit.evaluate, which reduces the weights chunk by chunk, or fewer num_samples"
        )
    chunks = _iter_log_weights(model, guide, batch, num_samples, max_pairs, dev, memory_budget)
    return torch.cat([lw for _, lw in chunks], dim=1)


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
    progress: bool = False,
    callbacks: list[Any] | None = None,
    label: str = "test",
) -> pd.DataFrame:
    """Score each data point: ELBO, importance-sampled log-likelihood, Pareto k̂ and ESS.

    Returns a DataFrame with one row per data point and columns ``elbo``, ``log_likelihood``,
    ``pareto_k`` and ``ess`` (nats; k̂ is NaN for ``num_samples < 20``). :func:`summarize` turns
    it into an :class:`EvaluationSummary`. Memory is bounded by ``max_pairs`` (sample, point)
    pairs per forward pass, whatever K and N are (default: by device, :data:`DEFAULT_MAX_PAIRS`,
    lowered if need be to fit ``memory_budget``: bytes or a size such as ``"2GiB"``; ``None``:
    90 % of the memory free on the device; what a pair needs is measured on a probe pass, and
    a ``max_pairs`` that cannot fit is refused at once with the largest one that can).
    ``seed`` fixes the samples without disturbing the caller's random state (``None``: use it).
    ``callbacks`` (e.g. an :class:`lvmkit.MLflowLogger` that logged the training) get the
    :func:`summarize` of the table through ``on_evaluation(summary, label)``.

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
    batch = as_batch(data)
    check_with_model(model, batch)
    total = num_points(batch)
    rows: list[np.ndarray] = []
    with torch.random.fork_rng(devices=cuda_devices()):
        if seed is not None:
            pyro.set_rng_seed(check_int("seed", seed, minimum=0))
        chunks = _iter_log_weights(
            model, guide, batch, num_samples, max_pairs, device, memory_budget
        )
        pending: list[torch.Tensor] = []  # scored together: ArviZ's psislw costs ~10 ms a call
        with tqdm(total=total, desc="evaluate", unit="pt", disable=not progress) as bar:
            for stop, lw in chunks:
                pending.append(lw)
                if sum(p.numel() for p in pending) >= _SCORE_BATCH or stop == total:
                    rows.append(_score_chunk(torch.cat(pending, dim=1)))
                    pending.clear()
                bar.update(stop - bar.n)
    scores = pd.DataFrame(
        np.concatenate(rows), columns=["elbo", "log_likelihood", "pareto_k", "ess"]
    )
    scores.attrs["num_samples"] = num_samples
    if callbacks:
        notify(callbacks, "on_evaluation", summarize(scores), label)
    return scores


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
    )


def mean_elbo(model, guide, batch: Batch, *, max_pairs: int | None = None) -> torch.Tensor:
    """One-sample ELBO averaged over ``batch``, as a device scalar (used by ``fit`` per epoch)."""
    sums = [lw.sum() for _, lw in _iter_log_weights(model, guide, batch, 1, max_pairs, None)]
    return torch.stack(sums).sum() / num_points(batch)


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
    batch = as_batch(data)
    num_samples = check_int("num_samples", num_samples)
    _check_site(site)
    dev = _eval_device(guide, guide, None)
    pairs = check_int("max_pairs", max_pairs) if max_pairs is not None else _default_max_pairs(dev)
    out: list[torch.Tensor] = []
    with scoring(guide, guide, seed), pyro.validation_enabled(False):
        chunk = max(1, pairs // num_samples)
        for start in range(0, num_points(batch), chunk):
            part = to_device(take(batch, slice(start, start + chunk)), dev)
            trace = poutine.trace(guide).get_trace(**part)
            sites = [name for name, s in trace.nodes.items() if _is_sample(s)]
            if site not in sites:
                raise ValueError(
                    f"the guide has no sample site {site!r} (its sample sites: {sites}); pass "
                    "site= the name of the continuous latent"
                )
            mean = _site_mean(trace.nodes[site]) if sites == [site] else None
            if mean is None:
                dim = -(_plate_nesting(trace) + 1)
                with pyro.plate("_lvmkit_particles", num_samples, dim=dim):
                    particles = poutine.trace(guide).get_trace(**part)
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
    batch = as_batch(data)
    check_with_model(model, batch)
    _check_site(site)
    dev = _eval_device(model, guide, None)
    pairs = check_int("max_pairs", max_pairs) if max_pairs is not None else _default_max_pairs(dev)
    out: list[torch.Tensor] = []
    with scoring(model, guide, seed), pyro.validation_enabled(False):
        dim = particle_dim(model, guide, to_device(take(batch, slice(0, 1)), dev))
        for start in range(0, num_points(batch), pairs):
            part = to_device(take(batch, slice(start, start + pairs)), dev)
            out.append(-_reconstruction_pass(model, guide, part, site, dim).cpu())
    return torch.cat(out)


def _reconstruction_pass(model, guide, chunk: Batch, site: str, dim: int) -> torch.Tensor:
    n = num_points(chunk)
    with pyro.plate("_lvmkit_particles", 1, dim=dim):
        guide_trace = poutine.trace(guide).get_trace(**chunk)
        if site not in guide_trace.nodes:
            raise ValueError(f"the guide has no sample site {site!r}; pass site= its latent")
        node = guide_trace.nodes[site]
        mean = _site_mean(node)
        if mean is None:
            raise ValueError(f"the guide's site {site!r} has no mean ({type(node['fn']).__name__})")
        node["value"] = mean.expand(node["value"].shape)
        replayed = poutine.enum(
            poutine.replay(model, trace=guide_trace), first_available_dim=dim - 1
        )
        model_trace = poutine.trace(replayed).get_trace(**chunk)
    log_p = torch.zeros(1, n, device=next(iter(chunk.values())).device)
    for name, s in model_trace.nodes.items():
        if _is_sample(s) and s["is_observed"]:
            log_p = log_p + _per_point_log_prob(name, s, dim, 1, n)
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


def _plate_nesting(*traces) -> int:
    """How many vectorized plate dims the traces' sample sites use, at most."""
    dims = [
        -frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if _is_sample(site)
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def _check_site(site: Any) -> None:
    if not isinstance(site, str):
        raise TypeError(f"site must be the name of a sample site (a str); got {site!r}")


def _default_max_pairs(dev: torch.device) -> int:
    return DEFAULT_MAX_PAIRS.get(dev.type, DEFAULT_MAX_PAIRS["cpu"])


# -- the primitive ---------------------------------------------------------------------------


def _iter_log_weights(
    model,
    guide,
    batch: Batch,
    num_samples: int,
    max_pairs: int | None,
    device,
    memory_budget: Any = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(stop, log_weights of points [start, stop))`` chunk by chunk, each ``(K, n)``."""
    check_int("num_samples", num_samples)
    if max_pairs is not None:
        max_pairs = check_int("max_pairs", max_pairs)
    _memory.parse_budget(memory_budget)
    dev = _eval_device(model, guide, device)
    total = num_points(batch)
    with torch.no_grad(), param_scope(model, guide, publish=False), eval_mode(model, guide):
        probe = to_device(take(batch, slice(0, 1)), dev)
        with pyro.validation_enabled(True):  # one checked pass, then Pyro's checks stay off
            particle_dim = -(_probe(model, guide, probe, dev) + 1)
        with pyro.validation_enabled(False):
            max_pairs = _pairs_in_budget(
                model, guide, probe, particle_dim, max_pairs, memory_budget, dev
            )
        points = max(1, min(total, max_pairs // num_samples))  # data points per chunk
        samples = max(1, min(num_samples, max_pairs // points))  # samples per forward pass
        for start in range(0, total, points):
            stop = min(total, start + points)
            chunk = to_device(take(batch, slice(start, stop)), dev)
            with pyro.validation_enabled(False):
                parts = [
                    _log_weights_pass(
                        model, guide, chunk, min(samples, num_samples - k0), particle_dim
                    )
                    for k0 in range(0, num_samples, samples)
                ]
            yield stop, torch.cat(parts, dim=0)


def _pairs_in_budget(
    model, guide, probe: Batch, particle_dim: int, max_pairs, memory_budget, dev
) -> int:
    """``max_pairs`` (default: by device), checked against the memory budget: one probe pass of
    a single (sample, point) pair is run with autograd on to measure what a pair holds."""
    budget, what = _memory.budget_for(memory_budget, dev)
    default = _default_max_pairs(dev)
    if budget is None:
        return max_pairs or default
    # (under fork_rng: measuring must not shift the samples the evaluation draws)
    with torch.enable_grad(), torch.random.fork_rng(devices=cuda_devices()):
        _, saved = _memory.measure_saved(
            lambda: _log_weights_pass(model, guide, probe, 1, particle_dim)
        )
    params = [value for _, value in pyro.get_param_store().named_parameters()]  # unconstrained
    for obj in (model, guide):
        if isinstance(obj, torch.nn.Module):
            params += list(obj.parameters())
    per_pair = max(1, _memory.activation_bytes(saved, params))
    fits = budget // per_pair
    if fits < 1:
        raise ValueError(
            f"one (sample, data point) pair needs about {_memory.fmt(per_pair)} on {dev} "
            f"(measured), more than {what} ({_memory.fmt(budget)}): evaluate on a device with "
            "more memory, or give a larger memory_budget"
        )
    if max_pairs is not None and max_pairs > fits:
        raise ValueError(
            f"max_pairs={max_pairs} needs about {_memory.fmt(max_pairs * per_pair)} on {dev} "
            f"({_memory.fmt(per_pair)} a pair, measured), more than {what} "
            f"({_memory.fmt(budget)}): use max_pairs <= {fits}, or give a larger memory_budget"
        )
    return max_pairs or min(default, fits)


def _paired_traces(model, guide, batch: Batch, enum_dim: int | None = None, detach: bool = False):
    """Trace the guide, replay the model on its draws; return both traces and its latents.

    With ``enum_dim``, model sites marked ``infer={"enumerate": "parallel"}`` that the guide does
    not propose are enumerated (their whole support, in dims left of ``enum_dim`` + 1) instead of
    sampled, so that the weights can sum them out exactly. With ``detach``, the guide's draws are
    cut from the graph before the model sees them (no gradient through the samples: wake-sleep).
    """
    guide_trace = poutine.trace(guide).get_trace(**batch)
    if detach:
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and torch.is_tensor(site["value"]):
                site["value"] = site["value"].detach()
    replayed = poutine.replay(model, trace=guide_trace)
    if enum_dim is not None:
        replayed = poutine.enum(replayed, first_available_dim=enum_dim)
    model_trace = poutine.trace(replayed).get_trace(**batch)
    latents = {name for name, site in guide_trace.nodes.items() if _is_sample(site)}
    return guide_trace, model_trace, latents


def _is_enumerated(site: Any) -> bool:
    return site["infer"].get("_enumerate_dim") is not None


def _scored_sites(model_trace, latents: set[str]) -> Iterator[tuple[str, Any]]:
    """The model sites in the weight: observed ones, latents the guide proposes, and enumerated
    discrete latents (summed out). Other model latents the guide does not propose are drawn from
    their prior, so they cancel."""
    for name, site in model_trace.nodes.items():
        if _is_sample(site) and (site["is_observed"] or name in latents or _is_enumerated(site)):
            yield name, site


def _log_weights_pass(model, guide, chunk: Batch, k: int, particle_dim: int) -> torch.Tensor:
    log_p, log_q, _ = log_density_pass(model, guide, chunk, k, particle_dim)
    return log_p - log_q


def log_density_pass(
    model, guide, chunk: Batch, k: int, particle_dim: int, *, detach: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One vectorised pass of ``k`` guide draws per point: ``(log p(x, z), log q(z | x), scale)``.

    The first two are ``(k, n)`` (enumerated model sites summed out of log p); ``scale`` is the
    factor the model applies to its observed sites (``N / n`` for a subsampling data plate, else
    1), for objectives that sum the points of a minibatch. Differentiable unless called under
    ``no_grad``; ``detach`` cuts the draws from the graph (see :func:`_paired_traces`). The
    training objectives of :mod:`lvmkit.inference.objectives` and :func:`evaluate` share it.
    """
    with pyro.plate("_lvmkit_particles", k, dim=particle_dim):
        guide_trace, model_trace, latents = _paired_traces(
            model, guide, chunk, enum_dim=particle_dim - 1, detach=detach
        )
    device = next(iter(chunk.values())).device
    return log_densities(
        guide_trace, model_trace, latents, particle_dim, k, num_points(chunk), device
    )


def log_densities(
    guide_trace,
    model_trace,
    latents: set[str],
    particle_dim: int,
    k: int,
    n: int,
    device: torch.device,
    *,
    local_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(log p(x, z), log q(z | x), scale)`` per particle and point from a guide trace and the
    model replayed on it (see :func:`log_density_pass`); ``local_only`` as in
    :func:`enumerated_log_joint`, for the guide's sites too."""
    log_p, scale = enumerated_log_joint(
        model_trace, latents, particle_dim, k, n, device, local_only=local_only
    )
    if log_p.dim() > 2:  # enumerated sites: sum them out, exactly
        log_p = log_p.reshape(-1, k, n).logsumexp(dim=0)
    log_q = torch.zeros_like(log_p)
    for name in latents:
        site = guide_trace.nodes[name]
        if name not in model_trace.nodes:  # auxiliary guide sites are not part of the weight
            continue
        if local_only and not _in_data_plate(site):
            continue
        log_q = log_q + _per_point_log_prob(name, site, particle_dim, k, n)
    return log_p, log_q, scale


def enumerated_log_joint(
    model_trace,
    latents: set[str],
    particle_dim: int,
    k: int,
    n: int,
    device: torch.device,
    *,
    local_only: bool = False,
) -> tuple[torch.Tensor, float]:
    """log p(x, z) per particle and point, shape ``(*enum, k, n)`` (one dim per value of the
    model's enumerated sites, left of the particle dim), and the observed sites' scale.
    ``local_only``: leave out sites outside the data plate (global latents, which are then
    conditioned on)."""
    log_p = torch.zeros(k, n, device=device)
    scale = 1.0
    for name, site in _scored_sites(model_trace, latents):
        if local_only and not _in_data_plate(site):
            continue
        log_p = log_p + _per_point_log_prob(name, site, particle_dim, k, n)
        if site["is_observed"]:
            scale = max(scale, float(site["scale"]))
    return log_p, scale


def _in_data_plate(site: Any) -> bool:
    return any(frame.name == DATA_PLATE for frame in site["cond_indep_stack"])


def _is_sample(site: Any) -> bool:
    return site["type"] == "sample" and not site_is_subsample(site)  # plates record sites too


def _per_point_log_prob(name: str, site: dict, particle_dim: int, k: int, n: int) -> torch.Tensor:
    """The site's unscaled log-density summed to shape ``(k, n)``: particles × data points
    (``(*enum, k, n)`` when enumerated values give it dims left of the particle dim)."""
    frames = [f for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
    assert frames, f"site {name} left the data plate after the probe"
    log_prob = scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"])
    ndim = -particle_dim
    if log_prob.dim() < ndim:
        log_prob = log_prob.reshape((1,) * (ndim - log_prob.dim()) + tuple(log_prob.shape))
    enum_shape = tuple(log_prob.shape[:-ndim])
    data_axis = log_prob.dim() + frames[0].dim  # plate dims count from the right
    particle_axis = log_prob.dim() - ndim
    other = [axis for axis in range(particle_axis + 1, log_prob.dim()) if axis != data_axis]
    if other:
        log_prob = log_prob.sum(dim=other, keepdim=True)
    shape = (*enum_shape, log_prob.shape[particle_axis], log_prob.shape[data_axis])
    return log_prob.reshape(shape).expand(*enum_shape, k, n)


def particle_dim(model, guide, batch: Batch) -> int:
    """The plate dim left of every plate the pair uses (checked on the batch's first point)."""
    probe = take(batch, slice(0, 1))
    dev = next(iter(batch.values())).device
    with (
        torch.no_grad(),
        pyro.validation_enabled(False),
        poutine.block(),
        torch.random.fork_rng(devices=cuda_devices()),
    ):
        return -(_probe(model, guide, probe, dev) + 1)


def _probe(model, guide, probe: Batch, dev: torch.device) -> int:
    """:func:`_max_plate_nesting` on one data point, a failure there reported as a mismatch."""
    with model_failures_as_data_errors("the first data point", probe):
        return _max_plate_nesting(model, guide, probe, dev)


def _max_plate_nesting(model, guide, probe: Batch, dev: torch.device) -> int:
    """Run the pair once on one point: check its plates and return how deep they nest."""
    guide_trace, model_trace, latents = _paired_traces(model, guide, to_device(probe, dev))
    scored = {
        name: [frame.name for frame in site["cond_indep_stack"]]
        for name, site in _scored_sites(model_trace, latents)
    }
    if not any(DATA_PLATE in plates for plates in scored.values()):
        raise ValueError(
            f'the model has no plate named "{DATA_PLATE}": wrap its per-data-point sites in '
            f'`with pyro.plate("{DATA_PLATE}", N):` so that evaluation can score each point'
        )
    for name, plates in scored.items():
        if DATA_PLATE not in plates:
            raise ValueError(
                f'site "{name}" is outside the data plate: per-point importance weights need every '
                f'latent and observed site inside pyro.plate("{DATA_PLATE}", N); its plates are '
                f"{plates}"
            )
    return _plate_nesting(guide_trace, model_trace)


def _score_chunk(lw: torch.Tensor) -> np.ndarray:
    """Reduce ``(K, n)`` log-weights to rows ``(elbo, log_likelihood, pareto_k, ess)``."""
    k = lw.shape[0]
    lw64 = lw.double()
    lse = torch.logsumexp(lw64, dim=0)
    normalized = torch.exp(lw64 - lse)
    ess = 1.0 / (normalized**2).sum(dim=0)
    columns = [lw64.mean(dim=0), lse - math.log(k), torch.full_like(lse, math.nan), ess]
    out = torch.stack(columns, dim=1).cpu().numpy()
    if k >= _MIN_SAMPLES_FOR_PSIS:
        out[:, 2] = _pareto_k(lw64.T.cpu().numpy())  # ArviZ wants samples last: (n, K)
    return out


def _pareto_k(log_weights: np.ndarray) -> np.ndarray:
    az = _import_arviz()
    with warnings.catch_warnings():
        # psislw warns when a tail is too short or constant; k̂ is still what we report.
        warnings.simplefilter("ignore", RuntimeWarning)
        _, k_hat = az.psislw(log_weights)
    return np.asarray(k_hat, dtype=np.float64)


def _import_arviz():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
        import arviz

    return arviz


def _eval_device(model, guide, device) -> torch.device:
    if device is not None:
        return resolve_device(device)
    for obj in (model, guide):
        if isinstance(obj, torch.nn.Module):
            for param in obj.parameters():
                return param.device
    # Plain-function pairs keep their parameters in Pyro's param store (fit puts them there).
    for _, value in pyro.get_param_store().items():
        return value.device
    return torch.device("cpu")
