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

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from tqdm.auto import tqdm

from lvmkit.base import check_choice, check_int
from lvmkit.inference.callbacks import check_callbacks, notify
from lvmkit.inference.calls import Data, as_data, cuda_devices
from lvmkit.inference.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lvmkit.inference.devices import pair_device, pair_placement
from lvmkit.inference.kernel import Layout
from lvmkit.inference.params import eval_mode, param_scope
from lvmkit.inference.rundir import rng_state, set_rng_state
from lvmkit.inference.summary import summarize
from lvmkit.inference.threads import resumed as resumed_threads, using as using_threads
from lvmkit.inference.weights import WeightStream, score_chunk

METHODS = ("is", "ais", "ais-prior")  # evaluate's estimators of log p(x)
_SCORE_BATCH = 1 << 20  # log-weights reduced at once (8 MB in float64)
_log = logging.getLogger("lvmkit")


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
    compile: bool | None = None,
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
        compile: ``method="is"``'s pass (K draws per point of a chunk, their log-weights)
            captured and compiled as ``fit`` compiles its step (:mod:`lvmkit.inference.compiled`):
            ``None`` (default) where the evaluation is long enough to repay it (the MNIST VAE at
            K = 5000: from ~600 test images; :data:`lvmkit.inference.weights.AUTO_COMPILE_WORK`),
            ``True`` always, ``False`` never. A compiled pass draws what the eager one would and
            its weights agree to float precision (checked on the first chunk; a pair that cannot
            be captured runs eagerly, said in one log line); the table's ``attrs["compiled"]``
            says whether it ran compiled, ``attrs["compile_s"]`` what capture, check and
            compilation took. Pairs whose particles run as sequential passes stay
            eager.

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
    forked = cuda_devices(values, pair_device(model, guide, device))
    with torch.random.fork_rng(devices=forked), using_threads(threads) as used:
        if rng is not None:  # where the interrupted evaluation stood
            set_rng_state(rng, pair_placement(model, guide, device).device)
        elif seed is not None:
            pyro.set_rng_seed(check_int("seed", seed, minimum=0))
        rest = values.take(slice(start, None)) if start else values
        stream = WeightStream(
            model, guide, rest, num_samples, max_pairs=max_pairs, device=device,
            memory_budget=memory_budget, plate=data_plate, transform=transform,
            vectorize=vectorize_particles, compile=compile, done=start,
        )  # fmt: skip
        pending: list[torch.Tensor] = []  # scored together: ArviZ's psislw costs ~10 ms a call
        total = start + stream.total
        with tqdm(total=total, initial=start, desc="evaluate", unit="pt",
                  disable=not progress) as bar:  # fmt: skip
            for stop, lw in stream:
                pending.append(lw)
                if sum(p.numel() for p in pending) >= _SCORE_BATCH or stop == stream.total:
                    rows.append(score_chunk(torch.cat(pending, dim=1)))
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
    scores.attrs["compiled"] = stream.kernel is not None and stream.kernel.ran
    scores.attrs["compile_s"] = stream.kernel.setup_s if stream.kernel is not None else 0.0
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
    forked = cuda_devices(values, pair_device(model, guide, device))
    with torch.random.fork_rng(devices=forked), using_threads(threads):
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
                chunk = stream.prepare(values.take(slice(start, stop)).to(stream.dev))
                chains_from = ais.prior_guide(model) if from_prior else guide
                log_w, elbo = ais.anneal(model, chains_from, chunk, layout, chains, steps)
                scored = score_chunk(log_w)  # the IS reductions, of the AIS weights
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


def mean_elbo(
    model, guide, data: Data, *, plate: str | None = None, transform=None, placement=None
) -> torch.Tensor:
    """One-sample ELBO averaged over ``data``, as a device scalar (``fit``'s validation, on
    the fit's ``placement``)."""
    stream = WeightStream(model, guide, data, 1, plate=plate, transform=transform, device=placement)
    sums = [lw.sum() for _, lw in stream]
    return torch.stack(sums).sum() / stream.total


# -- codes: posterior means, active units, reconstructions ------------------------------------


# -- the stream of weights ---------------------------------------------------------------------
