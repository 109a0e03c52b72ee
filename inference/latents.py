"""The latent code of a trained pair: posterior means, active units (Burda et al. 2016), and the
reconstruction error at the posterior mean — the diagnostics of posterior collapse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch

from lvmkit.base import check_float, check_int
from lvmkit.inference.calls import Data, as_data, check_with_model
from lvmkit.inference.devices import pair_placement
from lvmkit.inference.kernel import (
    PARTICLE_PLATE,
    Layout,
    is_deterministic,
    is_sample,
    site_log_prob,
)
from lvmkit.inference.layout import find_layout
from lvmkit.inference.weights import default_max_pairs, scoring

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
