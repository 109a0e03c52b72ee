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

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.util import site_is_subsample

from lvmkit.inference._data import Data, cuda_devices, model_failures_as_data_errors

PARTICLE_PLATE = "_lvmkit_particles"
DEFAULT_PLATE = "data"  # the plate lvmkit's own models use, taken first wherever it exists
_PROBE_POINTS = 2  # points in a probe: two, so that a plate over the points shows its size
_PROBE_PARTICLES = 3  # particles in the probe of broadcasting: not the probe's points, so that
# a model confusing the two (``expand([len(x), ...])`` on a particle-batched value) is caught
_log = logging.getLogger("lvmkit")
_noted: set[tuple[int, int]] = set()  # pairs told once that their particles run one by one


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
    """A guide trace, the model replayed on it, and the names of the guide's latent sites."""

    guide: Any
    model: Any
    latents: set[str]


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
    latents = {name for name, site in guide_trace.nodes.items() if is_sample(site)}
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
    n = _points_in(call, layout, subsample)
    device = _device_of(call)
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


def _points_in(call: Data, layout: Layout, subsample: dict[str, torch.Tensor] | None) -> int:
    if subsample and layout.plate in subsample:
        return len(subsample[layout.plate])
    n = call.num_points
    if n is None:
        raise ValueError("cannot tell how many data points this call holds")
    return n


def _device_of(call: Data) -> torch.device:
    tensors = call.tensors()
    return tensors[0].device if tensors else torch.device("cpu")


# -- the layout --------------------------------------------------------------------------------


def plate_nesting(*traces: Any) -> int:
    """How many vectorized plate dims the traces' sample sites use, at most."""
    dims = [
        -frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if is_sample(site)
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def _plate_size(frame: Any, site: Any) -> int | None:
    """The number of points a plate frame holds at a site (read from the site when the plate was
    declared without a size, as ``pyro.plate("data")``)."""
    if isinstance(frame.size, int) and frame.size > 0:
        return frame.size
    shape = site["fn"].batch_shape
    return int(shape[frame.dim]) if frame.dim is not None and len(shape) >= -frame.dim else None


def _candidates(traces: Traces) -> list[tuple[Any, Any]]:
    """Plates around every observed site of the model, outermost first: ``(frame, site)``."""
    observed = [site for _, site in scored_sites(traces) if site["is_observed"] and is_sample(site)]
    if not observed:
        return []
    names = [{f.name for f in s["cond_indep_stack"] if f.vectorized} for s in observed]
    common = set.intersection(*names)
    first = observed[0]
    return [(f, first) for f in first["cond_indep_stack"] if f.name in common]


def _describe_plates(traces: Traces) -> str:
    seen: dict[str, Any] = {}
    for _, site in scored_sites(traces):
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.name != PARTICLE_PLATE:
                seen.setdefault(frame.name, _plate_size(frame, site))
    return ", ".join(f"{name!r} (size {size})" for name, size in seen.items()) or "none"


def layout_of(
    traces: Traces, n: int | None, *, plate: str | None = None, whole: bool = False
) -> Layout | None:
    """The layout a call of ``n`` points shows, or None when no plate over the points is found.

    ``whole``: the call was given the whole data (``n`` = its length), so a plate that draws its
    own subsample of it is the data plate too.
    """
    candidates = _candidates(traces)
    chosen = None
    if plate is not None:
        chosen = next(((f, s) for f, s in candidates if f.name == plate), None)
        if chosen is None:
            raise ValueError(
                f"data_plate={plate!r}, but the model's observed sites are not all inside a plate "
                f"of that name; its plates: {_describe_plates(traces)}"
            )
    else:
        chosen = next(((f, s) for f, s in candidates if f.name == DEFAULT_PLATE), None)
        if chosen is None:
            for frame, site in candidates:
                size = _plate_size(frame, site)
                full = frame.full_size
                if size == n or (whole and full is not None and size is not None and size < full):
                    chosen = (frame, site)
                    break
    if chosen is None:
        return None
    frame, site = chosen
    if not whole and _draws_subsample(traces, frame.name):
        return None  # it subsamples what it is given: probe it on the whole data instead
    size = _plate_size(frame, site)
    full = frame.full_size if isinstance(frame.full_size, int) and frame.full_size > 0 else size
    declared = full if full is not None and size is not None and full != size else None
    return _layout_around(
        traces, frame.name,
        full_size=declared,
        subsampled=bool(whole and declared is not None),
        subsample_size=size if whole and declared is not None else None,
    )  # fmt: skip


def whole_layout(traces: Traces, plate: str | None) -> Layout | None:
    """The layout of a pair given its whole data, whose points lie along a plate that does not
    subsample itself and need not follow the data's first dimension (Pyro's LDA lays its words
    out as (words, documents)): ``plate`` if named, else ``"data"``, else the outermost plate
    around every observed site. Its points are then scored by conditioning the plate's
    subsample indices (``subsample_size`` None: any number of points a call), or all at once
    (set by :func:`find_layout` where indices cannot be driven)."""
    candidates = _candidates(traces)
    names = [plate] if plate is not None else [DEFAULT_PLATE]
    chosen = next(((f, s) for name in names for f, s in candidates if f.name == name), None)
    if chosen is None and plate is None and candidates:
        chosen = next(((f, s) for f, s in candidates if f.name != PARTICLE_PLATE), None)
    if chosen is None:
        return None
    frame, site = chosen
    size = _plate_size(frame, site)
    full = frame.full_size if isinstance(frame.full_size, int) and frame.full_size > 0 else size
    if full is None:
        return None
    return _layout_around(traces, frame.name, full_size=full, subsampled=True, subsample_size=None)


def _layout_around(
    traces: Traces,
    plate: str,
    *,
    full_size: int | None,
    subsampled: bool,
    subsample_size: int | None,
) -> Layout:
    scored = list(scored_sites(traces))
    for name, s in scored:
        if not in_plate(s, plate) and is_enumerated(s):
            raise ValueError(
                f"site {name!r} is enumerated outside the data plate {plate!r}: a discrete "
                "global latent ties the points together, so they cannot be scored one by one"
            )
    model_globals = sorted(
        m for m, s in traces.model.nodes.items()
        if is_sample(s) and not s["is_observed"] and not in_plate(s, plate)
    )  # fmt: skip
    guide_globals = [m for m in traces.latents if not in_plate(traces.guide.nodes[m], plate)]
    global_sites = tuple(sorted({*model_globals, *guide_globals}))
    masses = all(
        m in traces.latents and _is_point_mass(traces.guide.nodes[m]["fn"]) for m in global_sites
    )
    return Layout(
        plate=plate,
        nesting=plate_nesting(traces.guide, traces.model),
        full_size=full_size,
        subsampled=subsampled,
        subsample_size=subsample_size,
        global_sites=global_sites,
        model_global_sites=tuple(model_globals),
        point_masses=masses,
    )


def _draws_subsample(traces: Traces, plate: str) -> bool:
    """Whether the plate draws a random subsample (``subsample_size=``) of what it is given."""
    for trace in (traces.guide, traces.model):
        site = trace.nodes.get(plate)
        if site is not None and site_is_subsample(site):
            return getattr(site["fn"], "subsample_size", None) is not None
    return False


def _is_point_mass(fn: Any) -> bool:
    while isinstance(fn, (pyro.distributions.Independent, pyro.distributions.MaskedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, pyro.distributions.Delta)


def no_plate_error(traces: Traces, n: int | None, plate: str | None) -> ValueError:
    return ValueError(
        f"found no plate over the {n} data points: per-point weights need every observed site "
        f'inside one plate over them, e.g. `with pyro.plate("data", N):` (the model\'s plates: '
        f"{_describe_plates(traces)}). If the plate over the points has another name, pass it "
        "as data_plate=NAME"
        if plate is None
        else f"data_plate={plate!r} is not a plate over the data points"
    )


def find_layout(
    model,
    guide,
    data: Data,
    *,
    plate: str | None = None,
    vectorize: bool | None = None,
    prepare=None,
    placement=None,
) -> Layout:
    """Probe the pair on a few points (or, for models that subsample themselves, on the whole
    data) and return its :class:`Layout`. Runs with Pyro's validation on and leaves the random
    state as it was. ``prepare`` maps a slice of ``data`` to the call (a transform);
    ``vectorize``: None detects whether particles broadcast, True/False imposes it;
    ``placement`` (where the evaluation runs) lets a device mismatch be explained."""
    prepare = prepare or (lambda d: d)
    failure: Exception | None = None
    n = data.num_points
    with (
        torch.random.fork_rng(devices=cuda_devices()),
        pyro.validation_enabled(True),
        poutine.block(),
    ):
        layout = None
        probe = data
        if n is not None:
            probe = prepare(data.take(slice(0, min(n, _PROBE_POINTS))))
            m = probe.num_points
            try:
                with model_failures_as_data_errors(
                    "the first data points", probe, placement, "evaluate"
                ):
                    traces = paired_traces(model, guide, probe)
                layout = layout_of(traces, m, plate=plate)
            except (ValueError, TypeError) as err:
                failure = err
        if layout is None:
            whole = prepare(data)
            try:
                with model_failures_as_data_errors("the data", whole, placement, "evaluate"):
                    traces = paired_traces(model, guide, whole)
            except (ValueError, TypeError):
                if failure is not None:
                    raise failure from None
                raise
            layout = layout_of(traces, whole.num_points, plate=plate, whole=True)
            if layout is None or not layout.subsampled:
                # points along a plate of the whole data that the model does not subsample
                # itself (another dimension than the first, per-point parameters)
                layout = whole_layout(traces, plate)
                if layout is None:
                    if failure is not None:
                        raise failure
                    raise no_plate_error(traces, n, plate)
                layout = _drive_or_whole(model, guide, whole, layout)
            probe = whole  # probed below on a subsample of its own plate
        vectorized = broadcasts(model, guide, probe, layout, vectorize)
    return replace(layout, vectorized=vectorized)


def _drive_or_whole(model, guide, whole: Data, layout: Layout) -> Layout:
    """A whole-data layout whose points can be taken a few at a time by conditioning the data
    plate's subsample indices (``pyro.plate`` hands them to the model, which indexes its data
    and per-point parameters with them), or else all at once: tried on two indices."""
    full = layout.full_size or 1
    if full > 1:
        two = {layout.plate: torch.arange(2, device=_device_of(whole))}
        try:
            traces = paired_traces(model, guide, whole, subsample=two)
            observed = [s for _, s in scored_sites(traces) if s["is_observed"]]
            frames = [
                next(f for f in s["cond_indep_stack"] if f.name == layout.plate) for s in observed
            ]
            sizes = [_plate_size(f, s) for f, s in zip(frames, observed, strict=True)]
            if sizes and all(size == 2 for size in sizes):
                return layout
        except Exception:  # e.g. per-point parameters made for every point, indexed by nothing
            pass
    return replace(layout, subsample_size=full)


def broadcasts(model, guide, probe: Data, layout: Layout, vectorize: bool | None = None) -> bool:
    """Whether the pair runs with an extra leftmost particle dimension (tried on the probe, with
    no gradients, Pyro's checks on, the random state left as it was, modules as they are)."""
    if vectorize is not None:
        return vectorize
    subsample = None
    if layout.subsampled:
        subsample = {layout.plate: subsample_indices(layout, 0)}
    try:  # with Pyro's checks on: a value that broadcasts wrongly fails them
        k = _PROBE_PARTICLES
        n = _points_in(probe, layout, subsample)
        with (
            torch.no_grad(),
            pyro.validation_enabled(True),
            torch.random.fork_rng(devices=cuda_devices()),
            poutine.block(),
        ):
            with pyro.plate(PARTICLE_PLATE, k, dim=layout.particle_dim):
                traces = paired_traces(
                    model, guide, probe, enum_dim=layout.particle_dim - 1, subsample=subsample
                )
            why = _misshapen(traces, layout, k, n)
            if why is None:
                log_p, log_q = log_densities(traces, layout, k, n, _device_of(probe))
                if tuple(log_p.shape) != (k, n) or log_q.shape != log_p.shape:
                    why = f"log-densities of shape {tuple(log_p.shape)}"
        ok = why is None
    except Exception as err:  # any failure means: not with an extra leftmost dimension
        ok, why = False, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"
    if not ok:
        note_sequential(model, guide, why or "")
    return ok


def _misshapen(traces: Traces, layout: Layout, k: int, n: int) -> str | None:
    """Why the sites of a vectorised trace do not have the shapes a broadcasting model gives
    them (None if they do): batch dims beyond the plates only where enumeration put them, the
    particle dim of size k (or 1), the data plate's of size n (or 1). A model that indexes a
    particle-batched value (``locs[assignment]``) can produce values of a plausible but wrong
    shape that Pyro's own checks let through."""
    width = -layout.particle_dim
    enum_dims = {
        site["infer"]["_enumerate_dim"]
        for site in traces.model.nodes.values()
        if is_sample(site) and is_enumerated(site)
    }
    sites = [(f"model site {m!r}", s) for m, s in scored_sites(traces)]
    sites += [(f"guide site {m!r}", traces.guide.nodes[m]) for m in traces.latents]
    for label, site in sites:
        shape = tuple(site["fn"].batch_shape)
        for position, size in enumerate(shape):
            dim = position - len(shape)
            if dim < -width and size > 1 and dim not in enum_dims:
                return f"{label} has a batch dim {dim} of size {size} outside its plates"
        if len(shape) >= width and shape[-width] not in (1, k):
            return f"{label} has {shape[-width]} particles, not {k}"
        frame = next((f for f in site["cond_indep_stack"] if f.name == layout.plate), None)
        if frame is not None and len(shape) >= -frame.dim and shape[frame.dim] not in (1, n):
            return f"{label} has {shape[frame.dim]} points in the data plate, not {n}"
    return None


def note_sequential(model, guide, why: str) -> None:
    """Say once per pair (a log line, not a warning: nothing is wrong) that its particles run
    one pass each."""
    key = (id(model), id(guide))
    if key not in _noted:
        _noted.add(key)
        _log.warning(
            "lvmkit: this model does not broadcast over a leftmost particle dimension (%s); "
            "its particles run as sequential passes",
            why,
        )


def subsample_indices(layout: Layout, start: int) -> torch.Tensor:
    """The indices of the subsample starting at point ``start`` of a model given its whole data:
    as many as its plate draws (Pyro refuses any other number; one where any number will do),
    wrapping around at the end of the data."""
    total, size = layout.full_size or 1, layout.subsample_size or 1
    return torch.arange(start, start + size) % total


def subsample_chunks(layout: Layout) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """For a model that subsamples itself: ``(stop, keep, {plate: indices})`` covering its
    points, where the first ``keep`` of each subsample's points are new."""
    total, size = layout.full_size or 0, layout.subsample_size or 1
    for start in range(0, total, size):
        stop = min(total, start + size)
        yield stop, stop - start, {layout.plate: subsample_indices(layout, start)}
