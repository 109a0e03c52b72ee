"""The importance-weight kernel: per-point log p(x, z) and log q(z | x) of a model/guide pair.

Everything lvmkit reports (:mod:`lvmkit.inference.evaluate`, :mod:`~lvmkit.inference.posterior`)
and the K-sample objectives (:mod:`~lvmkit.inference.objectives`) reduce from one pass here: the
guide traced on a call, the model replayed on its draws, and each sample site's *unscaled*
log-density (masks honoured, ``poutine.scale`` not: KL annealing or an auxiliary loss weight never
leaks into a likelihood) summed to one number per (particle, data point).

- The model is replayed as Pyro's ``TraceEnum_ELBO`` does it, ``replay(enum(model))``: discrete
  model sites marked ``infer={"enumerate": "parallel"}`` that the guide does not propose take their
  whole support in dims left of the particles and are summed out exactly, and ``pyro.markov``
  loops work (the other nesting order loses track of the markov frames).
- The pair's *layout* is found once, on a probe (:func:`find_layout`): which plate runs over the
  data points (named ``data_plate=``, else the plate ``"data"`` where there is one, else the
  outermost plate around every observed site whose size is the number of points), its
  subsampling factor, how deep the plates nest, which latent sites lie outside it (global sites,
  conditioned on in per-point weights), and whether the model broadcasts over an extra leftmost
  particle dimension. Models that do not (boolean-mask selection, fancy indexing, BatchNorm) get
  their particles as sequential passes instead: the same numbers in distribution.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.util import site_is_subsample

from lvmkit.inference.calls import Data

PARTICLE_PLATE = "_lvmkit_particles"
DEFAULT_PLATE = "data"  # the plate lvmkit's own models use, taken first wherever it exists


@dataclass(frozen=True)
class Layout:
    """How a model/guide pair lays out its data points and particles (see the module docstring)."""

    plate: str  # the data plate's name
    nesting: int  # plate dims the pair's sample sites use
    full_size: int | None = None  # the size the plate declares, where it scales its subsample
    subsampled: bool = False  # the model draws its own subsample: chunks condition its index
    subsample_size: int | None = None  # ... of this many points (its plate's subsample_size)
    global_sites: tuple[str, ...] = ()  # latent sites outside the data plate (model or guide)
    model_global_sites: tuple[str, ...] = ()  # ... those among the model's latent sites
    point_masses: bool = True  # every global site is a point mass in the guide (Delta)
    vectorized: bool = True  # particles as a plate left of every plate, else one pass each

    @property
    def particle_dim(self) -> int:
        """The dim of the particle plate: left of every plate the pair uses."""
        return -(self.nesting + 1)

    @property
    def num_points(self) -> int | None:
        """The points of a model that subsamples them itself (its plate's full size)."""
        return self.full_size if self.subsampled else None

    def represented(self, n: int) -> float:
        """The data points a call's loss stands for, when the call's plate holds ``n``: the
        declared full size where the plate scales its subsample up to it, else ``n``."""
        return float(self.full_size) if self.full_size is not None else float(n)


class Traces(NamedTuple):
    """A guide trace, the model replayed on it, and the names of the guide's latent sites: its
    sample sites less the observed ones (a guide's ``pyro.sample(..., obs=t)``, as Pyro's CEVAE
    writes its auxiliary classifiers, scores data, not a latent: it has no place in log q)."""

    guide: Any
    model: Any
    latents: tuple[str, ...]


def is_sample(site: Any) -> bool:
    return site["type"] == "sample" and not site_is_subsample(site)  # plates record sites too


def is_enumerated(site: Any) -> bool:
    return site["infer"].get("_enumerate_dim") is not None


def is_deterministic(site: Any) -> bool:
    """A ``pyro.deterministic`` record: an observed site that is not data and has no density."""
    return bool((site.get("infer") or {}).get("_deterministic", False))


def paired_traces(
    model,
    guide,
    call: Data,
    *,
    enum_dim: int | None = None,
    detach: bool = False,
    subsample: dict[str, torch.Tensor] | None = None,
) -> Traces:
    """Trace the guide on ``call``, replay the model on its draws.

    ``enum_dim``: enumerate the model's parallel-enumerated sites the guide does not propose, from
    that dim leftwards. ``detach``: cut the guide's draws from the graph before the model sees
    them (wake-sleep). ``subsample``: plate name → indices, for models that subsample themselves
    (their plates' index sites are conditioned on these, in guide and model alike).
    """
    if subsample:
        model = poutine.condition(model, data=subsample)
        guide = poutine.condition(guide, data=subsample)
    guide_trace = poutine.trace(guide).get_trace(*call.args, **call.kwargs)
    if detach:
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and torch.is_tensor(site["value"]):
                site["value"] = site["value"].detach()
    inner = poutine.enum(model, first_available_dim=enum_dim) if enum_dim is not None else model
    model_trace = poutine.trace(poutine.replay(inner, trace=guide_trace)).get_trace(
        *call.args, **call.kwargs
    )
    latents = tuple(
        name
        for name, site in guide_trace.nodes.items()
        if is_sample(site) and not site["is_observed"]
    )  # in the guide's order, so every pass visits the sites alike
    return Traces(guide_trace, model_trace, latents)


def scored_sites(traces: Traces) -> Iterator[tuple[str, Any]]:
    """The model sites in a weight: observed ones, latents the guide proposes, and enumerated
    discrete latents (summed out). Other model latents the guide does not propose are drawn from
    their prior, so they cancel."""
    for name, site in traces.model.nodes.items():
        if is_deterministic(site):
            continue
        if is_sample(site) and (
            site["is_observed"] or name in traces.latents or is_enumerated(site)
        ):
            yield name, site


def in_plate(site: Any, plate: str) -> bool:
    return any(frame.name == plate for frame in site["cond_indep_stack"])


# -- densities -----------------------------------------------------------------------------------


def site_log_prob(site: Any, layout: Layout, k: int, n: int) -> torch.Tensor:
    """A site's unscaled log-density summed to ``(k, n)``: particles × data points (``(*enum, k,
    n)`` when enumerated values give it dims left of the particle dim)."""
    frames = [f for f in site["cond_indep_stack"] if f.name == layout.plate]
    if not frames:
        raise ValueError(
            f"site {site['name']!r} is outside the data plate {layout.plate!r}; "
            "it cannot be scored per point"
        )
    log_prob = scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"])
    ndim = -layout.particle_dim
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


def log_joint(traces: Traces, layout: Layout, k: int, n: int, device) -> torch.Tensor:
    """log p(x, z | θ) of the sites in the data plate, per particle and point, shape ``(*enum, k,
    n)`` (one dim per value of the model's enumerated sites, left of the particle dim); sites
    outside the data plate (global ones, conditioned on) are left out."""
    total = torch.zeros(k, n, device=device)
    for _, site in scored_sites(traces):
        if in_plate(site, layout.plate):
            total = total + site_log_prob(site, layout, k, n)
    return total


def log_guide(traces: Traces, layout: Layout, k: int, n: int, device) -> torch.Tensor:
    """log q(z | x, θ) of the guide's latents in the data plate that the model has, ``(k, n)``
    (auxiliary guide sites are not part of the weight)."""
    total = torch.zeros(k, n, device=device)
    for name in traces.latents:
        site = traces.guide.nodes[name]
        if name in traces.model.nodes and in_plate(site, layout.plate):
            total = total + site_log_prob(site, layout, k, n)
    return total


def log_densities(
    traces: Traces, layout: Layout, k: int, n: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(x, z | θ), log q(z | x, θ))`` per particle and point, each ``(k, n)``,
    enumerated sites summed out of the first (:func:`contracted_log_joint`)."""
    sites = [site for _, site in scored_sites(traces) if in_plate(site, layout.plate)]
    if any(is_enumerated(site) for site in sites):
        log_p = contracted_log_joint(traces, layout, k, n, sites)
    else:
        log_p = log_joint(traces, layout, k, n, device)
    return log_p, log_guide(traces, layout, k, n, device)


def contracted_log_joint(traces: Traces, layout: Layout, k: int, n: int, sites) -> torch.Tensor:
    """The summed log-densities of ``sites`` (model sites in the data plate) per particle and
    point, ``(k, n)``, with the model's enumerated sites among them summed out exactly as Pyro's
    ``TraceEnum_ELBO`` contracts them: variable elimination over the sites' packed log-densities,
    aware of the plates (a plate nested in the data plate is product-contracted per point) and
    of ``pyro.markov``, which reuses an enumeration dim along a chain (x_t and x_{t+2} share
    one): Pyro tells such variables apart by their enumeration ids, so each gets its own symbol
    here too, and a chain's states are summed along the chain (the forward algorithm), not as
    one joint over the shared dims."""
    trace = traces.model
    wanted = {site["name"] for site in sites}
    trace.compute_log_prob(site_filter=lambda name, site: name in wanted)
    trace.pack_tensors()
    plates = set(trace.plate_to_symbol.values())
    tree: OrderedDict[frozenset[str], list[Any]] = OrderedDict()  # packed: tensors with dims
    sum_dims: set[str] = set()
    for site in sites:
        to_symbol = site["infer"]["_dim_to_symbol"]
        ordinal = frozenset(to_symbol[f.dim] for f in site["cond_indep_stack"] if f.vectorized)
        term: Any = packed.scale_and_mask(
            site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"]
        )
        tree.setdefault(ordinal, []).append(term)
        sum_dims.update(set(term._pyro_dims) - plates)
    particle = trace.plate_to_symbol.get(PARTICLE_PLATE)
    point = trace.plate_to_symbol[layout.plate]
    present = {d for terms in tree.values() for term in terms for d in term._pyro_dims}
    target = frozenset(d for d in (particle, point) if d in present)  # (size-1 dims: packed away)
    total: Any = contract_to_tensor(tree, sum_dims, target_ordinal=target, ring=LogRing())
    dims = total._pyro_dims
    order = [d for d in (particle, point) if d is not None and d in dims]
    out = total.permute([dims.index(d) for d in order]) if order else total
    if particle is None or particle not in dims:
        out = out.unsqueeze(0)
    if point not in dims:
        out = out.unsqueeze(-1)
    return out.expand(k, n)


def log_density_pass(
    model,
    guide,
    call: Data,
    k: int,
    layout: Layout,
    *,
    detach: bool = False,
    subsample: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` guide draws per point: ``(log p(x, z | θ), log q(z | x, θ))``, each ``(k, n)``.

    Vectorised with a particle plate when the layout says the model broadcasts, else ``k``
    sequential passes. Differentiable unless called under ``no_grad``; ``detach`` as in
    :func:`paired_traces`. Sites outside the data plate (global ones) are conditioned on: their
    draws enter the model, their densities do not enter the weight.
    """
    n = points_in(call, layout, subsample)
    device = device_of(call)
    enum_dim = layout.particle_dim - 1
    if layout.vectorized:
        with pyro.plate(PARTICLE_PLATE, k, dim=layout.particle_dim):
            traces = paired_traces(
                model, guide, call, enum_dim=enum_dim, detach=detach, subsample=subsample
            )
        return log_densities(traces, layout, k, n, device)
    parts = [
        log_densities(
            paired_traces(
                model, guide, call, enum_dim=enum_dim, detach=detach, subsample=subsample
            ),
            layout,
            1,
            n,
            device,
        )
        for _ in range(k)
    ]
    return torch.cat([p for p, _ in parts]), torch.cat([q for _, q in parts])


def log_density_pass_split(
    model, guide, call: Data, k: int, layout: Layout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`log_density_pass`, plus log p(x, z | θ) at the same draws cut from the graph,
    ``(k, n)`` each: its gradient reaches the model's parameters only (an objective that trains
    the model and the guide by different bounds, as PIWAE, subtracts one from the other)."""
    n = points_in(call, layout, None)
    device = device_of(call)
    enum_dim = layout.particle_dim - 1

    def one(particles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        traces = paired_traces(model, guide, call, enum_dim=enum_dim)
        cut = traces.guide.copy()
        for name in traces.latents:
            node = dict(cut.nodes[name])
            node["value"] = node["value"].detach()
            cut.nodes[name] = node
        inner = poutine.enum(model, first_available_dim=enum_dim)
        replayed = poutine.trace(poutine.replay(inner, trace=cut)).get_trace(
            *call.args, **call.kwargs
        )
        log_p, log_q = log_densities(traces, layout, particles, n, device)
        log_p_cut, _ = log_densities(Traces(cut, replayed, traces.latents), layout, particles, n,
                                     device)  # fmt: skip
        return log_p, log_q, log_p_cut

    if layout.vectorized:
        with pyro.plate(PARTICLE_PLATE, k, dim=layout.particle_dim):
            return one(k)
    parts = [one(1) for _ in range(k)]
    return tuple(torch.cat([part[i] for part in parts]) for i in range(3))  # type: ignore[return-value]


def points_in(call: Data, layout: Layout, subsample: dict[str, torch.Tensor] | None) -> int:
    if subsample and layout.plate in subsample:
        return len(subsample[layout.plate])
    n = call.num_points
    if n is None:
        raise ValueError("cannot tell how many data points this call holds")
    return n


def device_of(call: Data) -> torch.device:
    tensors = call.tensors()
    return tensors[0].device if tensors else torch.device("cpu")


# -- the layout --------------------------------------------------------------------------------
