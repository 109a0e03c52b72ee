"""lvmkit results as ArviZ ``InferenceData``: the guide's posterior, the posterior predictive,
the observed data and the importance weights with their Pareto k̂, in the groups and with the
dims ArviZ expects, so that ``az.summary``, ``az.plot_posterior``, ``az.plot_ppc`` and
``az.plot_khat`` work on them.

One pass of ``num_samples`` draws per data point, vectorised with a particle plate like
:func:`lvmkit.evaluate`, and chunked over the draws so that one pass holds about ``max_pairs``
(draw, point) pairs (at least one draw of every point):

- **posterior**: every sample site of the guide — per-point latents with dims
  ``(chain, draw, point, <site>_dim_0, …)``, global latents (outside the ``"data"`` plate, e.g.
  the means of a Bayesian mixture) with ``(chain, draw, <site>_dim_0, …)`` — and the model's
  enumerated discrete latents, drawn from their exact conditional posterior given the guide's
  draws (a Gaussian mixture's component labels);
- **posterior_predictive**: each observed site drawn again from the model given those latents;
- **observed_data**: the observed sites' values;
- **sample_stats**: ``log_weight`` = log p(x, z) − log q(z | x) per draw (and per point, when
  every site lies in the data plate; otherwise one joint weight per draw for the whole data set:
  the global latents tie the points together) and ``pareto_k``, ArviZ's PSIS k̂ of those weights
  (per point, or one), NaN for fewer than 20 draws.

There is one chain (the draws are independent, not a Markov chain).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask

from lvmkit.inference import __version__
from lvmkit.inference._data import (
    Batch,
    as_batch,
    check_with_model,
    model_failures_as_data_errors,
    num_points,
    to_device,
)
from lvmkit.inference.evaluate import (
    _MIN_SAMPLES_FOR_PSIS,
    DATA_PLATE,
    _default_max_pairs,
    _eval_device,
    _import_arviz,
    _in_data_plate,
    _is_enumerated,
    _is_sample,
    _paired_traces,
    _pareto_k,
    _plate_nesting,
    _scored_sites,
    enumerated_log_joint,
    log_densities,
    scoring,
)
from lvmkit.models._checks import check_int

_PARTICLES = "_lvmkit_particles"
POINT_DIM = "point"  # the name of the data-point dimension in every group


def to_inference_data(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    data: Any,
    *,
    num_samples: int = 100,
    seed: int | None = 0,
    max_pairs: int | None = None,
    device: str | torch.device | None = None,
    posterior_predictive: bool = True,
    max_bytes: int = 2 << 30,
):
    """Draw from the guide and the model on ``data`` into an ArviZ ``InferenceData``.

    Args:
        model, guide: a pair as for :func:`lvmkit.fit`; sites per data point inside
            ``pyro.plate("data", N)``, global ones outside it.
        data: a tensor passed as ``x``, or a dict of equal-length tensors passed as keywords.
        num_samples: draws per data point (the ``draw`` dimension).
        seed: fixes the draws without disturbing the caller's random state (``None``: use it).
        max_pairs: (draw, point) pairs per forward pass (default: by device, as ``evaluate``);
            a pass always holds at least one draw for every point, since global latents tie the
            points of a draw together.
        device: where to compute (default: where the pair's parameters are).
        posterior_predictive: also draw replicated data (set False to save memory).
        max_bytes: refuse, before drawing, a result larger than this (default 2 GiB): the
            posterior predictive of MNIST is ``num_samples × N × 784`` numbers.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> idata = lvmkit.to_inference_data(model, guide, torch.rand(5, 4).round(),
        ...                                  num_samples=30)
        >>> dict(idata.posterior["z"].sizes)
        {'chain': 1, 'draw': 30, 'point': 5, 'z_dim_0': 2}
        >>> dict(idata.sample_stats["pareto_k"].sizes)
        {'point': 5}
    """
    az = _import_arviz()
    num_samples = check_int("num_samples", num_samples)
    if max_pairs is not None:
        max_pairs = check_int("max_pairs", max_pairs)
    if not isinstance(posterior_predictive, bool):
        raise TypeError(f"posterior_predictive must be True or False; got {posterior_predictive!r}")
    batch = as_batch(data)
    check_with_model(model, batch)
    n = num_points(batch)
    dev = _eval_device(model, guide, device)
    pairs = max_pairs or _default_max_pairs(dev)
    per_pass = max(1, min(num_samples, pairs // n))
    batch = to_device(batch, dev)
    with scoring(model, guide, seed):
        with model_failures_as_data_errors("the data", batch), pyro.validation_enabled(True):
            probe_guide, probe_model, _ = _paired_traces(model, guide, batch)
        particle_dim = -(_plate_nesting(probe_guide, probe_model) + 1)
        _check_size(probe_guide, probe_model, num_samples, n, posterior_predictive, max_bytes)
        draws: dict[str, dict[str, list[np.ndarray]]] = {"posterior": {}, "ppc": {}}
        weights: list[np.ndarray] = []
        global_model = False
        dims: dict[str, list[str]] = {}
        observed: dict[str, np.ndarray] = {}
        with pyro.validation_enabled(False):
            for k0 in range(0, num_samples, per_pass):
                k = min(per_pass, num_samples - k0)
                out = _one_pass(model, guide, batch, k, n, particle_dim, posterior_predictive)
                for group in ("posterior", "ppc"):
                    for name, (value, site_dims) in out[group].items():
                        draws[group].setdefault(name, []).append(value)
                        dims[name] = site_dims
                for name, (value, site_dims) in out["observed"].items():
                    observed[name] = value
                    dims[name] = site_dims
                weights.append(out["log_weight"])
                global_model = out["global"]
    log_weight = np.concatenate(weights, axis=0)  # (K, n) or (K,)

    def stacked(group: str) -> dict[str, np.ndarray]:
        return {name: np.concatenate(v, axis=0)[None] for name, v in draws[group].items()}

    weight_dims = [] if global_model else [POINT_DIM]
    all_dims = {**dims, "log_weight": weight_dims}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (ArviZ: "more chains than draws")
        idata = az.from_dict(
            posterior=stacked("posterior"),
            posterior_predictive=stacked("ppc") if posterior_predictive else None,
            observed_data=observed,
            sample_stats={"log_weight": log_weight[None]},
            coords={POINT_DIM: np.arange(n)},
            dims=all_dims,
        )
    k_hat = _k_hat(log_weight, global_model)
    idata.sample_stats["pareto_k"] = (weight_dims, k_hat)
    for group in idata.groups():
        idata[group].attrs.update(
            inference_library="lvmkit",
            inference_library_version=__version__,
            num_samples=num_samples,
        )
    return idata


def _one_pass(model, guide, batch: Batch, k: int, n: int, particle_dim: int, ppc: bool):
    """k draws per point: posterior values, replicated data, observed data and log weights."""
    with pyro.plate(_PARTICLES, k, dim=particle_dim):
        guide_trace, model_trace, latents = _paired_traces(
            model, guide, batch, enum_dim=particle_dim - 1
        )
        enumerated = [
            name
            for name, site in model_trace.nodes.items()
            if _is_sample(site) and _is_enumerated(site)
        ]
        device = next(iter(batch.values())).device
        discrete = _sample_enumerated(model_trace, latents, enumerated, particle_dim, k, n, device)
        replicated = None
        if ppc:
            only_latents = guide_trace.copy()
            for name, site in list(only_latents.nodes.items()):
                if site["type"] == "sample" and site["is_observed"]:
                    only_latents.remove_node(name)
            rerun = poutine.condition(
                poutine.replay(poutine.uncondition(model), trace=only_latents), data=discrete
            )
            replicated = poutine.trace(rerun).get_trace(**batch)
    out: dict[str, Any] = {"posterior": {}, "ppc": {}, "observed": {}}
    for name, site in guide_trace.nodes.items():
        if _is_sample(site):
            out["posterior"][name] = _values(name, site, particle_dim, k)
    for name, drawn in discrete.items():
        site = {**model_trace.nodes[name], "value": drawn}
        out["posterior"][name] = _values(name, site, particle_dim, k)
    observed_names = [
        name for name, site in model_trace.nodes.items() if _is_sample(site) and site["is_observed"]
    ]
    for name in observed_names:
        array, site_dims = _values(name, model_trace.nodes[name], particle_dim, 1)
        out["observed"][name] = (array[0], site_dims)
        if replicated is not None:
            out["ppc"][name] = _values(name, replicated.nodes[name], particle_dim, k)
    scored = dict(_scored_sites(model_trace, latents))
    global_sites = [
        name
        for name, site in [*scored.items(), *((m, guide_trace.nodes[m]) for m in latents)]
        if not _in_data_plate(site)
    ]
    out["global"] = bool(global_sites)
    if global_sites:
        out["log_weight"] = _joint_log_weight(
            guide_trace, model_trace, latents, particle_dim, k, n, device
        )
    else:
        log_p, log_q, _ = log_densities(
            guide_trace, model_trace, latents, particle_dim, k, n, device
        )
        out["log_weight"] = (log_p - log_q).double().cpu().numpy()
    return out


def _sample_enumerated(
    model_trace, latents, names: list[str], particle_dim: int, k: int, n: int, device
) -> dict[str, torch.Tensor]:
    """Draw the model's enumerated sites from their exact posterior given the guide's draws,
    one joint draw per (particle, point): a categorical over the enumerated configurations,
    whose logits are log p(x, z, y) with y at each configuration. (Pyro's ``infer_discrete``
    would share one draw across the particles, which its factors do not depend on.)"""
    if not names:
        return {}
    log_joint, _ = enumerated_log_joint(
        model_trace, latents, particle_dim, k, n, device, local_only=True
    )
    enum_shape = tuple(log_joint.shape[:-2])
    index = torch.distributions.Categorical(logits=log_joint.reshape(-1, k, n).permute(1, 2, 0))
    flat = index.sample()  # (k, n) indices into the enumerated configurations
    width = -particle_dim
    out: dict[str, torch.Tensor] = {}
    for name in names:
        site = model_trace.nodes[name]
        dim = site["infer"]["_enumerate_dim"]  # negative, left of the particle dim
        axis = len(enum_shape) - (-dim - width)  # its position in enum_shape
        stride = math.prod(enum_shape[axis + 1 :])
        choice = (flat // stride) % enum_shape[axis]
        event_shape = site["fn"].event_shape
        support = site["value"].reshape(enum_shape[axis], -1, *event_shape)[:, 0]  # its values
        out[name] = support[choice]
    return out


def _values(name: str, site: Any, particle_dim: int, k: int) -> tuple[np.ndarray, list[str]]:
    """A site's value as ``(k, [point], [other plates], *event)`` with its dim names."""
    value = torch.as_tensor(site["value"])
    event_dim = site["fn"].event_dim if hasattr(site["fn"], "event_dim") else 0
    event_shape = tuple(value.shape[value.dim() - event_dim :])
    batch_shape = tuple(value.shape[: value.dim() - event_dim])
    width = -particle_dim
    if len(batch_shape) > width:
        raise ValueError(
            f"site {name!r} has batch dims {batch_shape} outside any plate; put them in a plate "
            "or in the event with .to_event()"
        )
    batch_shape = (1,) * (width - len(batch_shape)) + batch_shape
    value = value.reshape(batch_shape + event_shape)
    plates = {width + f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}
    keep, names = [0], []
    if DATA_PLATE in plates.values():
        axis = next(a for a, p in plates.items() if p == DATA_PLATE)
        keep.append(axis)
        names.append(POINT_DIM)
    for axis in range(1, width):
        name_of = plates.get(axis)
        if name_of in (DATA_PLATE, _PARTICLES):
            continue
        if name_of is not None or batch_shape[axis] > 1:
            keep.append(axis)
            names.append(name_of or f"{name}_batch_{axis}")
    squeezed = [a for a in range(1, width) if a not in keep]
    value = value.permute(*keep, *squeezed, *range(width, value.dim()))
    value = value.reshape(value.shape[: len(keep)] + event_shape)
    value = value.expand(k, *value.shape[1:])
    names += [f"{name}_dim_{i}" for i in range(len(event_shape))]
    return value.cpu().numpy(), names


def _joint_log_weight(
    guide_trace, model_trace, latents, particle_dim: int, k: int, n: int, device
) -> np.ndarray:
    """log p(X, Z, θ) − log q(Z, θ | X) per draw, for pairs with global latents θ: the per-point
    weights (enumerated sites summed out per point) summed over the points, plus the global
    sites' log-densities."""
    log_p, log_q, _ = log_densities(
        guide_trace, model_trace, latents, particle_dim, k, n, device, local_only=True
    )
    total = (log_p - log_q).double().sum(dim=1)
    width = -particle_dim
    guide_sites = [(name, guide_trace.nodes[name]) for name in latents if name in model_trace.nodes]
    for sign, sites in ((1, _scored_sites(model_trace, latents)), (-1, guide_sites)):
        for name, site in sites:
            if _in_data_plate(site):
                continue
            if _is_enumerated(site):
                raise ValueError(f"cannot weight the enumerated global site {name!r}")
            log_prob = scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"])
            log_prob = log_prob.reshape((1,) * max(0, width - log_prob.dim()) + log_prob.shape)
            axis = log_prob.dim() - width  # the particle axis
            other = [a for a in range(log_prob.dim()) if a != axis]
            summed = log_prob.sum(dim=other) if other else log_prob
            total = total + sign * summed.double().expand(k)
    return total.cpu().numpy()


def _k_hat(log_weight: np.ndarray, joint: bool) -> np.ndarray | float:
    """PSIS k̂ per point (or of the joint weights); NaN when there are too few draws."""
    draws = log_weight.shape[0]
    if joint:
        return float(_pareto_k(log_weight[None])[0]) if draws >= _MIN_SAMPLES_FOR_PSIS else math.nan
    if draws < _MIN_SAMPLES_FOR_PSIS:
        return np.full(log_weight.shape[1], math.nan)
    return _pareto_k(log_weight.T)


def _check_size(guide_trace, model_trace, k: int, n: int, ppc: bool, max_bytes: int) -> None:
    """Refuse before drawing when the arrays would exceed ``max_bytes`` (sizes read from one
    draw: the guide's sites, and the observed sites again for the posterior predictive)."""

    def size(trace, observed: bool) -> int:
        return sum(
            torch.as_tensor(site["value"]).numel() * torch.as_tensor(site["value"]).element_size()
            for site in trace.nodes.values()
            if _is_sample(site) and site["is_observed"] == observed
        )

    need = k * (size(guide_trace, False) + (size(model_trace, True) if ppc else 0) + 8 * n)
    if need > max_bytes:
        raise ValueError(
            f"to_inference_data would hold about {need / 2**30:.2f} GiB of draws "
            f"(num_samples={k} × {n} points), more than max_bytes={max_bytes / 2**30:.2f} GiB: "
            "use fewer num_samples or points, posterior_predictive=False, or raise max_bytes"
        )
