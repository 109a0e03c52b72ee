"""The pair's *layout*, found once on a probe (:func:`find_layout`): which plate runs over the
data points (named ``data_plate=``, else the plate ``"data"`` where there is one, else the
outermost plate around every observed site whose size is the number of points), its subsampling
factor, how deep the plates nest, which latent sites lie outside it (global sites, conditioned on
in per-point weights), and whether the model broadcasts over an extra leftmost particle
dimension. Models that do not (boolean-mask selection, fancy indexing, BatchNorm) get their
particles as sequential passes instead: the same numbers in distribution. A pair that cannot be
scored on a few points cut from its data gets its whole data with the data plate's subsample
indices set per chunk, or all its points in one pass (:func:`whole_layout`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from lvmkit.inference.calls import Data, cuda_devices, model_failures_as_data_errors
from lvmkit.inference.kernel import (
    DEFAULT_PLATE,
    PARTICLE_PLATE,
    Layout,
    Traces,
    device_of,
    in_plate,
    is_enumerated,
    is_sample,
    log_densities,
    paired_traces,
    points_in,
    scored_sites,
)

_PROBE_POINTS = 2  # points in a probe: two, so that a plate over the points shows its size


_PROBE_PARTICLES = 3  # particles in the probe of broadcasting: not the probe's points, so that


# a model confusing the two (``expand([len(x), ...])`` on a particle-batched value) is caught
_log = logging.getLogger("lvmkit")


_noted: set[tuple[int, int]] = set()  # pairs told once that their particles run one by one


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
        torch.random.fork_rng(devices=cuda_devices(data, placement)),
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
        two = {layout.plate: torch.arange(2, device=device_of(whole))}
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
        n = points_in(probe, layout, subsample)
        with (
            torch.no_grad(),
            pyro.validation_enabled(True),
            torch.random.fork_rng(devices=cuda_devices(probe)),
            poutine.block(),
        ):
            with pyro.plate(PARTICLE_PLATE, k, dim=layout.particle_dim):
                traces = paired_traces(
                    model, guide, probe, enum_dim=layout.particle_dim - 1, subsample=subsample
                )
            why = _misshapen(traces, layout, k, n)
            if why is None:
                log_p, log_q = log_densities(traces, layout, k, n, device_of(probe))
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
