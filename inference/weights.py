"""The one evaluation primitive: per-data-point importance log-weights, as a stream.

:class:`WeightStream` yields ``log p(x_n, z_nk) − log q(z_nk | x_n)`` for ``z_nk ~ q(z | x_n)``,
shape ``(K, n)``, chunk by chunk, from one pass of the kernel (:mod:`lvmkit.inference.kernel`,
vectorised over the K samples where the model broadcasts, sequential passes where it does not),
so that one pass never sees more than ``max_pairs`` (sample, data point) pairs — measured against
the memory budget on a probe. :func:`log_weights` is the whole ``(K, N)`` tensor;
:func:`score_chunk` the reductions every report takes (ELBO, IS log-likelihood, Pareto k̂, ESS);
:func:`scoring` the state every evaluation runs in.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pyro
import torch

from lvmkit.base import check_int
from lvmkit.inference import _memory
from lvmkit.inference.calls import (
    Data,
    as_data,
    check_signature,
    check_with_model,
    cuda_devices,
    from_transform,
)
from lvmkit.inference.compiled import CompiledPass
from lvmkit.inference.devices import Placement, pair_device, pair_placement
from lvmkit.inference.kernel import log_density_pass
from lvmkit.inference.layout import find_layout, subsample_chunks, subsample_indices
from lvmkit.inference.params import eval_mode, param_scope

DEFAULT_MAX_PAIRS = {  # (sample, point) pairs per forward pass, by device type
    # ≈ 13 MB per 784-wide tensor; fastest on the 2-core CPU of 1,024…65,536 (the max_pairs rows
    # of benchmarks/results/speed-cpu-full.md)
    "cpu": 4096,
    # ≈ 200 MB per 784-wide tensor: enough work per kernel; not yet measured (no GPU so far):
    # `lvmkit bench speed --device cuda` sweeps 16,384…1,048,576
    "cuda": 65536,
}


# evaluate(compile=None) compiles the pass where passes × (sample, point) pairs × parameters
# reach this: capture and compilation take ~3 s (warm cache) to ~5 s (cold) on 2 CPU cores and a
# compiled pass of the MNIST VAE takes ~30 % less time (K = 5000: 2 passes of 2,500 draws per
# image, 650,000 parameters: 3.3e9 a point, ~22 ms eager on 2 threads), so ~600 test images
# repay it
AUTO_COMPILE_WORK = 2 * 10**12

MIN_SAMPLES_FOR_PSIS = 20  # PSIS fits a Pareto tail to the largest ~20 % of weights


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


@contextlib.contextmanager
def scoring(model, guide, seed: int | None) -> Iterator[None]:
    """No gradients, the pair's parameters in scope, modules in eval mode, and (with ``seed``)
    a seeded random stream that leaves the caller's random state as it was."""
    with (
        torch.no_grad(),
        torch.random.fork_rng(devices=cuda_devices(pair_device(model, guide))),
        param_scope(model, guide, publish=False),
        eval_mode(model, guide),
    ):
        if seed is not None:
            pyro.set_rng_seed(check_int("seed", seed, minimum=0))
        yield


def default_max_pairs(dev: torch.device) -> int:
    return DEFAULT_MAX_PAIRS.get(dev.type, DEFAULT_MAX_PAIRS["cpu"])


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
        compile: bool | None = False,
        done: int = 0,
    ) -> None:
        if compile not in (None, True, False):
            raise TypeError(f"compile must be None, True or False; got {compile!r}")
        self.compile, self.done = compile, done
        self.kernel: CompiledPass | None = None
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
            check_signature(model, self.prepare(sample))
        with (
            torch.no_grad(),
            param_scope(model, guide, publish=False),
            eval_mode(model, guide),
            self.placement.first_use(),
        ):
            try:
                self.layout = find_layout(
                    model, guide, data.to(self.dev), plate=plate, vectorize=vectorize,
                    prepare=self.prepare, placement=self.placement,
                )  # fmt: skip
            except (ValueError, TypeError) as err:
                if ragged:  # only a model that subsamples itself takes such data whole
                    data.check_sliceable()
                raise err
            with pyro.validation_enabled(False):
                self.pair_bytes: int | None = None  # what one (sample, point) pair holds
                self.max_pairs = self._pairs_in_budget(max_pairs, memory_budget)
        self.placement.say("evaluate")
        self.total = (
            self.layout.num_points if self.layout.subsampled else data.check_sliceable()
        ) or 0

    def prepare(self, data: Data) -> Data:
        if self.transform is None:
            return data
        with self.placement.scope():
            return from_transform(self.transform(data.user_form()), data)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        k, layout = self.num_samples, self.layout
        width = 1 if not layout.vectorized else k  # particles in one pass, at most
        points = max(1, min(self.total, self.max_pairs // width))  # data points per chunk
        samples = max(1, min(k, self.max_pairs // points)) if layout.vectorized else 1
        samples = math.ceil(k / math.ceil(k / samples))  # equal passes: one shape to compile
        model, guide = self.model, self.guide
        # on the CPU, the host heap's retention kept out of the peak: twice a pass's need allowed
        heap = (
            _memory.HeapGuard(2 * self.max_pairs * (self.pair_bytes or 0))
            if self.dev.type == "cpu"
            else None
        )
        with (
            torch.no_grad(),
            param_scope(model, guide, publish=False),
            eval_mode(model, guide),
            pyro.validation_enabled(False),
            self.placement.scope(),
        ):
            if layout.subsampled:  # chunks of the model's own subsample size (or of ours)
                whole = self.prepare(self.data.to(self.dev))
                if layout.subsample_size is None:  # the plate takes any number of indices
                    layout = replace(layout, subsample_size=points)
                samples = max(1, min(k, self.max_pairs // (layout.subsample_size or 1)))
                samples = samples if layout.vectorized else 1
                for stop, keep, subsample in subsample_chunks(layout):
                    subsample = {p: i.to(self.dev) for p, i in subsample.items()}
                    yield stop, self._pass(whole, samples, subsample, heap)[:, :keep]
                return
            self.kernel = self._kernel(points, samples)
            for start in range(0, self.total, points):
                stop = min(self.total, start + points)
                chunk = self.prepare(self.data.take(slice(start, stop)).to(self.dev))
                yield stop, self._pass(chunk, samples, None, heap)

    def _pass(
        self, call: Data, samples: int, subsample, heap: _memory.HeapGuard | None
    ) -> torch.Tensor:
        parts = []
        for k0 in range(0, self.num_samples, samples):
            draws = min(samples, self.num_samples - k0)
            if self.kernel is not None:
                parts.append(self.kernel(call, draws))
            else:
                parts.append(self._weights(call, draws, subsample))
            if heap is not None:
                heap.check()
        return torch.cat(parts, dim=0)

    def _kernel(self, points: int, samples: int) -> CompiledPass | None:
        """The compiled pass for chunks of ``points`` points and ``samples`` draws, where
        compilation is asked for (``compile=True``), or where it repays itself (``None``: an
        evaluation of at least :data:`AUTO_COMPILE_WORK` passes × pairs × parameters, counted
        over the whole evaluation — a resumed one decides as it did before it was stopped).
        Pairs whose particles run as sequential passes run eagerly."""
        if self.compile is False or not self.layout.vectorized:
            return None
        static: list[torch.Tensor] = []
        for obj in (self.model, self.guide):
            if isinstance(obj, torch.nn.Module):
                static += [*obj.parameters(), *obj.buffers()]
        passes = math.ceil((self.done + self.total) / points) * math.ceil(
            self.num_samples / samples
        )

        def worth(params: list[torch.Tensor]) -> bool:
            return passes * samples * points * sum(p.numel() for p in params) >= AUTO_COMPILE_WORK

        return CompiledPass(self._weights, static, auto=self.compile is None, worth=worth)

    def _weights(self, call: Data, draws: int, subsample=None) -> torch.Tensor:
        """One eager pass: ``draws`` log-weights of each of ``call``'s points, ``(draws, n)``."""
        log_p, log_q = log_density_pass(
            self.model, self.guide, call, draws, self.layout, subsample=subsample
        )
        return log_p - log_q

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
            call = self.prepare(self.data.to(dev))
            subsample = {layout.plate: subsample_indices(layout, 0).to(dev)}
        else:
            call, subsample = self.prepare(self.data.take(slice(0, 1)).to(dev)), None
        # (under fork_rng: measuring must not shift the samples the evaluation draws)
        with torch.enable_grad(), torch.random.fork_rng(devices=cuda_devices(call, dev)):
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
        self.pair_bytes = per_pair
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


def score_chunk(lw: torch.Tensor) -> np.ndarray:
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
