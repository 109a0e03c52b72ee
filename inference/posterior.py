"""lvmkit results as ArviZ ``InferenceData``: the guide's posterior, the posterior predictive,
the observed data and the importance weights with their Pareto k̂, in the groups and with the
dims ArviZ expects, so that ``az.summary``, ``az.plot_posterior``, ``az.plot_ppc`` and
``az.plot_khat`` work on them.

One pass of ``num_samples`` draws per data point, vectorised with a particle plate like
:func:`lvmkit.evaluate` (or one draw per pass for models that do not broadcast over particles),
and chunked over the draws so that one pass holds about ``max_pairs`` (draw, point) pairs (at
least one draw of every point). The plate over the data points is found as ``evaluate`` finds it
(``data_plate=`` names it):

- **posterior**: every sample site of the guide — per-point latents with dims
  ``(chain, draw, point, <site>_dim_0, …)``, global latents (outside the data plate, e.g.
  the means of a Bayesian mixture) with ``(chain, draw, <site>_dim_0, …)`` — and the model's
  enumerated discrete latents, drawn from their exact conditional posterior given the guide's
  draws (a Gaussian mixture's component labels);
- **posterior_predictive**: each observed site drawn again from the model given those latents;
- **observed_data**: the observed sites' values;
- **log_likelihood**: per observed site, log p(x_n | z_n, θ) of each point at each draw, with
  the model's enumerated discrete sites summed out (for a mixture, log p(x_n | θ) exactly), so
  that ``az.loo`` and ``az.waic`` work on it. The draws come from the guide, not from an exact
  posterior: read LOO's k̂ with that in mind;
- **sample_stats**: ``log_weight`` = log p(x, z) − log q(z | x) per draw (and per point, when
  every site lies in the data plate; otherwise one joint weight per draw for the whole data set:
  the global latents tie the points together) and ``pareto_k``, ArviZ's PSIS k̂ of those weights
  (per point, or one), NaN for fewer than 20 draws.

There is one chain (the draws are independent, not a Markov chain).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask

from lvmkit.base import __version__, check_int
from lvmkit.inference.calls import (
    Data,
    as_data,
    check_with_model,
    from_transform,
    model_failures_as_data_errors,
)
from lvmkit.inference.devices import pair_placement
from lvmkit.inference.kernel import (
    PARTICLE_PLATE,
    Layout,
    Traces,
    contracted_log_joint,
    in_plate,
    is_deterministic,
    is_enumerated,
    is_sample,
    log_densities,
    log_joint,
    paired_traces,
    scored_sites,
    site_log_prob,
)
from lvmkit.inference.layout import find_layout
from lvmkit.inference.threads import using as using_threads
from lvmkit.inference.weights import (
    MIN_SAMPLES_FOR_PSIS,
    default_max_pairs,
    import_arviz,
    pareto_k,
    scoring,
)

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
    log_likelihood: bool = True,
    max_bytes: int = 2 << 30,
    data_plate: str | None = None,
    transform: Callable[[Any], Any] | None = None,
    vectorize_particles: bool | None = None,
    threads: int | str | None = "auto",
):
    """Draw from the guide and the model on ``data`` into an ArviZ ``InferenceData``.

    Args:
        model, guide: a pair as for :func:`lvmkit.fit`; sites per data point inside the data
            plate, global ones outside it.
        data: the model's arguments, as for :func:`lvmkit.evaluate`.
        num_samples: draws per data point (the ``draw`` dimension).
        seed: fixes the draws without disturbing the caller's random state (``None``: use it).
        max_pairs: (draw, point) pairs per forward pass (default: by device, as ``evaluate``);
            a pass always holds at least one draw for every point, since global latents tie the
            points of a draw together.
        device: where to compute (default: where the pair's parameters are).
        posterior_predictive: also draw replicated data (set False to save memory).
        log_likelihood: also write the ``log_likelihood`` group (for ``az.loo``/``az.waic``).
        max_bytes: refuse, before drawing, a result larger than this (default 2 GiB): the
            posterior predictive of MNIST is ``num_samples × N × 784`` numbers.
        data_plate, transform, vectorize_particles, threads: as for :func:`lvmkit.evaluate`.

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
    az = import_arviz()
    num_samples = check_int("num_samples", num_samples)
    if max_pairs is not None:
        max_pairs = check_int("max_pairs", max_pairs)
    for flag, value in (
        ("posterior_predictive", posterior_predictive),
        ("log_likelihood", log_likelihood),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False; got {value!r}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None; got {type(transform).__name__}")
    values = as_data(data, model)
    check_with_model(model, values)
    placement = pair_placement(model, guide, device)
    dev = placement.device

    def prepare(part: Data) -> Data:
        return part if transform is None else from_transform(transform(part.user_form()), part)

    with scoring(model, guide, seed), using_threads(threads), placement.scope():
        with placement.first_use():
            layout = find_layout(
                model, guide, values.to(dev), plate=data_plate, vectorize=vectorize_particles,
                prepare=prepare, placement=placement,
            )  # fmt: skip
        placement.say("to_inference_data")
        call = prepare(values.to(dev))
        n = layout.num_points if layout.subsampled else values.check_sliceable()
        assert n is not None
        if layout.subsampled:
            raise ValueError(
                "to_inference_data draws every point in one pass, but this model subsamples "
                f"its plate {layout.plate!r} itself ({layout.subsample_size} of {n} points a "
                "call); use lvmkit.evaluate, which scores it subsample by subsample"
            )
        subsample = None
        with (
            model_failures_as_data_errors("the data", call, placement, "to_inference_data"),
            pyro.validation_enabled(True),
        ):
            probe = paired_traces(model, guide, call, subsample=subsample)
        _check_size(probe, num_samples, n, posterior_predictive, max_bytes)
        pairs = max_pairs or default_max_pairs(dev)
        per_pass = max(1, min(num_samples, pairs // n)) if layout.vectorized else 1
        draws: dict[str, dict[str, list[np.ndarray]]] = {"posterior": {}, "ppc": {}, "ll": {}}
        weights: list[np.ndarray] = []
        dims: dict[str, list[str]] = {}
        observed: dict[str, np.ndarray] = {}
        with pyro.validation_enabled(False):
            for k0 in range(0, num_samples, per_pass):
                k = min(per_pass, num_samples - k0)
                out = _one_pass(
                    model, guide, call, k, n, layout, posterior_predictive, log_likelihood,
                    subsample,
                )  # fmt: skip
                for group in ("posterior", "ppc", "ll"):
                    for name, (value, site_dims) in out[group].items():
                        draws[group].setdefault(name, []).append(value)
                        dims[name] = site_dims
                for name, (value, site_dims) in out["observed"].items():
                    observed[name] = value
                    dims[name] = site_dims
                weights.append(out["log_weight"])
    log_weight = np.concatenate(weights, axis=0)  # (K, n) or (K,)
    global_model = bool(layout.global_sites)

    def stacked(group: str) -> dict[str, np.ndarray]:
        return {name: np.concatenate(v, axis=0)[None] for name, v in draws[group].items()}

    weight_dims = [] if global_model else [POINT_DIM]
    all_dims = {**dims, "log_weight": weight_dims}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (ArviZ: "more chains than draws")
        idata = az.from_dict(
            posterior=stacked("posterior"),
            posterior_predictive=stacked("ppc") if posterior_predictive else None,
            log_likelihood=stacked("ll") if log_likelihood else None,
            observed_data=observed,
            sample_stats={"log_weight": log_weight[None]},
            coords={POINT_DIM: np.arange(n)},
            dims=all_dims,
        )
    k_hat = _k_hat(log_weight, global_model)
    idata.sample_stats["pareto_k"] = (weight_dims, k_hat)
    point_mass = global_model and layout.point_masses
    for group in idata.groups():
        idata[group].attrs.update(
            inference_library="lvmkit",
            inference_library_version=__version__,
            num_samples=num_samples,
            point_mass_guide=int(point_mass),  # (netCDF attributes hold no bools)
        )
    if log_likelihood and point_mass and num_samples > 1:
        _warn_degenerate_loo(stacked("ll"), layout)
    return idata


def _warn_degenerate_loo(log_lik: dict[str, np.ndarray], layout: Layout) -> None:
    """LOO and WAIC weigh each point's log-likelihood across draws of the globals; under a
    point-mass guide with nothing local drawn, every draw gives the same value, and p_loo is 0
    and k̂ infinite on every point: numbers that look like results and mean nothing."""
    if not log_lik or any(np.ptp(v, axis=1).max() > 0 for v in log_lik.values()):
        return
    warnings.warn(
        "the log_likelihood group holds the same value in every draw: the guide is a point "
        f"mass over the global sites {list(layout.global_sites)} (AutoDelta, a Delta), so every "
        "draw is the same θ̂. az.loo / az.waic on it are degenerate (p_loo 0, k̂ infinite). LOO "
        "needs a guide with spread over the globals: AutoNormal or AutoDiagonalNormal, say",
        RuntimeWarning,
        stacklevel=3,
    )


def _one_pass(
    model, guide, call: Data, k: int, n: int, layout: Layout, ppc: bool, ll: bool, subsample
):
    """k draws per point: posterior values, replicated data, log-likelihoods, observed data and
    log weights (k = 1 without a particle plate where the model does not broadcast)."""
    device = call.tensors()[0].device if call.tensors() else torch.device("cpu")
    plate = (
        pyro.plate(PARTICLE_PLATE, k, dim=layout.particle_dim)
        if layout.vectorized
        else contextlib.nullcontext()
    )
    with plate:
        traces = paired_traces(
            model, guide, call, enum_dim=layout.particle_dim - 1, subsample=subsample
        )
        enumerated = [
            name
            for name, site in traces.model.nodes.items()
            if is_sample(site) and is_enumerated(site)
        ]
        discrete = _sample_enumerated(traces, layout, enumerated, k, n, device)
        replicated = None
        if ppc:
            only_latents = traces.guide.copy()
            for name, site in list(only_latents.nodes.items()):
                if site["type"] == "sample" and site["is_observed"]:
                    only_latents.remove_node(name)
            rerun = poutine.condition(
                poutine.replay(poutine.uncondition(model), trace=only_latents), data=discrete
            )
            if subsample:
                rerun = poutine.condition(rerun, data=subsample)
            replicated = poutine.trace(rerun).get_trace(*call.args, **call.kwargs)
    out: dict[str, Any] = {"posterior": {}, "ppc": {}, "ll": {}, "observed": {}}
    for name in traces.latents:  # (a guide's observed sites are data, not posterior draws)
        out["posterior"][name] = _values(name, traces.guide.nodes[name], layout, k)
    for name, drawn in discrete.items():
        site = {**traces.model.nodes[name], "value": drawn}
        out["posterior"][name] = _values(name, site, layout, k)
    observed_names = [
        name
        for name, site in traces.model.nodes.items()
        if is_sample(site) and site["is_observed"] and not is_deterministic(site)
    ]
    for name in observed_names:
        site = traces.model.nodes[name]
        array, site_dims = _values(name, site, layout, 1)
        out["observed"][name] = (array[0], site_dims)
        if replicated is not None:
            out["ppc"][name] = _values(name, replicated.nodes[name], layout, k)
        if ll and in_plate(site, layout.plate):
            out["ll"][name] = (
                _site_log_likelihood(traces, site, layout, k, n, device),
                [POINT_DIM],
            )
    if layout.global_sites:
        out["log_weight"] = _joint_log_weight(traces, layout, k, n, device)
    else:
        log_p, log_q = log_densities(traces, layout, k, n, device)
        out["log_weight"] = (log_p - log_q).double().cpu().numpy()
    return out


def _site_log_likelihood(traces: Traces, site: Any, layout: Layout, k: int, n: int, device):
    """log p(x_n | z_n, θ) of one observed site per draw and point, ``(k, n)``: the model's
    enumerated sites in the data plate summed out with it (their prior included), contracted as
    the kernel contracts them (``pyro.markov`` chains included)."""
    enumerated = [
        other
        for _, other in scored_sites(traces)
        if is_enumerated(other) and in_plate(other, layout.plate)
    ]
    if enumerated:
        total = contracted_log_joint(traces, layout, k, n, [site, *enumerated])
    else:
        total = site_log_prob(site, layout, k, n)
    return total.double().cpu().numpy()


def _sample_enumerated(
    traces: Traces, layout: Layout, names: list[str], k: int, n: int, device
) -> dict[str, torch.Tensor]:
    """Draw the model's enumerated sites from their exact posterior given the guide's draws,
    one joint draw per (particle, point): a categorical over the enumerated configurations,
    whose logits are log p(x, z, y) with y at each configuration. (Pyro's ``infer_discrete``
    would share one draw across the particles, which its factors do not depend on.)"""
    if not names:
        return {}
    _refuse_shared_enum_dims(traces, names)
    joint = log_joint(traces, layout, k, n, device)
    enum_shape = tuple(joint.shape[:-2])
    index = torch.distributions.Categorical(logits=joint.reshape(-1, k, n).permute(1, 2, 0))
    flat = index.sample()  # (k, n) indices into the enumerated configurations
    width = -layout.particle_dim
    out: dict[str, torch.Tensor] = {}
    for name in names:
        site = traces.model.nodes[name]
        dim = site["infer"]["_enumerate_dim"]  # negative, left of the particle dim
        axis = len(enum_shape) - (-dim - width)  # its position in enum_shape
        stride = math.prod(enum_shape[axis + 1 :])
        choice = (flat // stride) % enum_shape[axis]
        event_shape = site["fn"].event_shape
        support = site["value"].reshape(enum_shape[axis], -1, *event_shape)[:, 0]  # its values
        out[name] = support[choice]
    return out


def _refuse_shared_enum_dims(traces: Traces, names: list[str]) -> None:
    """Drawing enumerated sites from one joint categorical needs a dim of their own each;
    ``pyro.markov`` reuses dims along a chain (its states need forward filtering, backward
    sampling)."""
    seen: dict[int, str] = {}
    for name in names:
        dim = traces.model.nodes[name]["infer"]["_enumerate_dim"]
        if dim in seen:
            raise ValueError(
                f"to_inference_data cannot draw the enumerated sites {seen[dim]!r} and {name!r}: "
                "they share an enumeration dim (a pyro.markov chain reuses dims along it), and "
                "drawing a chain's states needs forward filtering, backward sampling. Score the "
                "pair with lvmkit.evaluate (it sums the chain out exactly), or draw the states "
                "with pyro.infer.infer_discrete"
            )
        seen[dim] = name


def _values(name: str, site: Any, layout: Layout, k: int) -> tuple[np.ndarray, list[str]]:
    """A site's value as ``(k, [point], [other plates], *event)`` with its dim names."""
    value = torch.as_tensor(site["value"])
    event_dim = site["fn"].event_dim if hasattr(site["fn"], "event_dim") else 0
    event_shape = tuple(value.shape[value.dim() - event_dim :])
    batch_shape = tuple(value.shape[: value.dim() - event_dim])
    width = -layout.particle_dim
    if len(batch_shape) > width:
        raise ValueError(
            f"site {name!r} has batch dims {batch_shape} outside any plate; put them in a plate "
            "or in the event with .to_event()"
        )
    batch_shape = (1,) * (width - len(batch_shape)) + batch_shape
    value = value.reshape(batch_shape + event_shape)
    plates = {width + f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}
    keep, names = [0], []
    if layout.plate in plates.values():
        axis = next(a for a, p in plates.items() if p == layout.plate)
        keep.append(axis)
        names.append(POINT_DIM)
    for axis in range(1, width):
        name_of = plates.get(axis)
        if name_of in (layout.plate, PARTICLE_PLATE):
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


def _joint_log_weight(traces: Traces, layout: Layout, k: int, n: int, device) -> np.ndarray:
    """log p(X, Z, θ) − log q(Z, θ | X) per draw, for pairs with global latents θ: the per-point
    weights (enumerated sites summed out per point) summed over the points, plus the global
    sites' log-densities."""
    log_p, log_q = log_densities(traces, layout, k, n, device)
    total = (log_p - log_q).double().sum(dim=1)
    width = -layout.particle_dim
    guide_sites = [
        (name, traces.guide.nodes[name]) for name in traces.latents if name in traces.model.nodes
    ]
    for sign, sites in ((1, list(scored_sites(traces))), (-1, guide_sites)):
        for _, site in sites:
            if in_plate(site, layout.plate):
                continue
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
        return float(pareto_k(log_weight[None])[0]) if draws >= MIN_SAMPLES_FOR_PSIS else math.nan
    if draws < MIN_SAMPLES_FOR_PSIS:
        return np.full(log_weight.shape[1], math.nan)
    return pareto_k(log_weight.T)


def _check_size(traces: Traces, k: int, n: int, ppc: bool, max_bytes: int) -> None:
    """Refuse before drawing when the arrays would exceed ``max_bytes`` (sizes read from one
    draw: the guide's sites, and the observed sites again for the posterior predictive)."""

    def size(trace, observed: bool) -> int:
        return sum(
            torch.as_tensor(site["value"]).numel() * torch.as_tensor(site["value"]).element_size()
            for site in trace.nodes.values()
            if is_sample(site) and site["is_observed"] == observed
        )

    need = k * (size(traces.guide, False) + (size(traces.model, True) if ppc else 0) + 8 * n)
    if need > max_bytes:
        raise ValueError(
            f"to_inference_data would hold about {need / 2**30:.2f} GiB of draws "
            f"(num_samples={k} × {n} points), more than max_bytes={max_bytes / 2**30:.2f} GiB: "
            "use fewer num_samples or points, posterior_predictive=False, or raise max_bytes"
        )
