"""How far to trust a log-likelihood estimate: BDMC's sandwich and the gap split.

- :func:`bdmc` (bidirectional Monte Carlo; Grosse, Ghahramani & Adams 2015; Wu et al. 2017):
  data simulated from the trained model, AIS forward from the guide (a stochastic lower bound of
  log p(x)) and backward from the exact simulated latents (an upper bound); the gap between them
  says how many annealing steps the real data need.
- :func:`gap_split` (Cremer, Li & Duvenaud 2018): a Gaussian q* optimised per data point splits
  the variational gap log p(x) − ELBO(q) into the approximation gap log p(x) − ELBO(q*) and the
  amortization gap ELBO(q*) − ELBO(q).

Both run on :mod:`lvmkit.inference.ais`'s annealing target; docs/ais.md has the math.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch

from lvmkit.base import check_int
from lvmkit.inference.ais import Target, anneal, exact_start, is_sampled_latent
from lvmkit.inference.calls import Data, as_data
from lvmkit.inference.evaluate import evaluate
from lvmkit.inference.kernel import is_deterministic, is_sample
from lvmkit.inference.layout import find_layout
from lvmkit.inference.params import eval_mode, param_scope
from lvmkit.inference.weights import scoring

GAP_SAMPLES = 64  # draws per point and iteration of q*'s ELBO


GAP_FINAL_SAMPLES = 1000  # draws per point of the final ELBO estimates


GAP_MAX_ITERATIONS = 2000


GAP_PATIENCE = 100  # iterations without the mean ELBO rising by GAP_TOLERANCE: stop


GAP_TOLERANCE = 1e-3


GAP_MAX_PAIRS = 65_536  # (draw, point) pairs per pass of the final estimates: points go in chunks
# of GAP_MAX_PAIRS // GAP_FINAL_SAMPLES (65). All in one pass, 300 MNIST test images peaked at
# 4.8 GiB and 1,000 took `bench ais --profile wide` to 18.6 GB (the 784-400-20 VAE); in chunks,
# 300 peak at 1.6 GiB (and run faster: 20 s against 29 s for 20 iterations of q*)


def bdmc(
    model,
    guide,
    data: Any = None,
    *,
    num_points: int | None = None,
    num_samples: int = 4,
    num_steps: int = 1000,
    seed: int | None = 0,
    data_site: str | None = None,
):
    """Bidirectional Monte Carlo: how far AIS is from log p(x), on data simulated from the model.

    Simulates data and their latents from the model, then runs AIS with ``num_samples`` chains
    and ``num_steps`` distributions forwards from the guide (a stochastic *lower* bound of each
    point's log p(x)) and backwards from the exact latents the point was simulated with (a
    stochastic *upper* bound). Their gap bounds AIS's error on such data, and says how many
    steps real data need (Grosse et al. 2015).

    Args:
        model, guide: any Pyro pair, called with ``data`` as :func:`lvmkit.fit` calls it.
        data: a template of the data, as ``fit`` takes it (a tensor, a tuple, a dict): the model
            is run on it with its observed sites unconditioned (``poutine.uncondition``, as
            Pyro's ``Predictive`` simulates), and each argument an observed site reads is
            replaced by the values simulated there, for the guide and the model alike. Every
            observed site must read an argument (or a view of one, ``obs=x.reshape(...)``).
            ``None``: lvmkit's generating convention, ``model(x=None, batch_size=num_points)``.
        num_points: points simulated: the first ``num_points`` of ``data`` (default: all), or
            50 with the generating convention.
        data_site: with the generating convention, the site holding the data (default ``"x"``).

    Returns a DataFrame with columns ``lower`` and ``upper`` per point; ``attrs["data"]`` holds
    the simulated data (a tensor with the generating convention, else as ``data`` was given).

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> sandwich = lvmkit.bdmc(model, guide, torch.zeros(3, 4), num_samples=2, num_steps=5)
        >>> list(sandwich.columns), len(sandwich)
        (['lower', 'upper'], 3)
    """
    num_samples = check_int("num_samples", num_samples)
    num_steps = check_int("num_steps", num_steps)
    if data is not None and data_site is not None:
        raise ValueError(
            "data_site= names the data of lvmkit's generating convention (data=None); with "
            "data given, every observed site of the model is simulated"
        )
    template = None
    if data is not None:
        template = as_data(data, model)
        total = template.check_sliceable()
        count = total if num_points is None else check_int("num_points", num_points)
        template = template.take(slice(0, min(count, total)))
    with scoring(model, guide, seed), param_scope(model, guide, publish=False):
        with torch.no_grad(), eval_mode(model, guide), pyro.validation_enabled(False):
            if template is None:
                count = check_int("num_points", 50 if num_points is None else num_points)
                call, latents, kept = _generate(model, count, data_site or "x")
            else:
                call, latents = _simulate(model, template)
                kept = call.user_form()
        with eval_mode(model, guide), pyro.validation_enabled(False):
            with torch.no_grad():
                layout = find_layout(model, guide, call, vectorize=True)
            lower, _ = anneal(model, guide, call, layout, num_samples, num_steps)
            start = exact_start(model, guide, call, layout, num_samples, latents)
            backward, _ = anneal(
                model, guide, call, layout, num_samples, num_steps, start=start, reverse=True
            )
    log_c = math.log(num_samples)
    frame = pd.DataFrame(
        {
            "lower": (torch.logsumexp(lower.double(), 0) - log_c).cpu().numpy(),
            "upper": (-(torch.logsumexp(backward.double(), 0) - log_c)).cpu().numpy(),
        }
    )
    frame.attrs.update(data=kept, num_samples=num_samples, num_steps=num_steps)
    return frame


def _generate(model, n: int, data_site: str) -> tuple[Data, dict[str, torch.Tensor], Any]:
    """lvmkit's generating convention: ``model(x=None, batch_size=n)``."""
    try:
        simulated = poutine.trace(model).get_trace(x=None, batch_size=n)
    except TypeError as err:
        raise TypeError(
            "bdmc without data simulates from the model as model(x=None, batch_size=n), "
            f"lvmkit's convention for generating; this model cannot be called so ({err}). Pass "
            "the data (or a few points of it) as a template: bdmc(model, guide, data, ...)"
        ) from None
    if data_site not in simulated.nodes:
        raise ValueError(f"the simulated trace has no site {data_site!r} (data_site=)")
    x = simulated.nodes[data_site]["value"].detach()
    latents = {
        name: site["value"].detach()
        for name, site in simulated.nodes.items()
        if is_sampled_latent(site) and name != data_site
    }
    return as_data(x, model), latents, x.cpu()


def _simulate(model, template: Data) -> tuple[Data, dict[str, torch.Tensor]]:
    """The model run on ``template`` with its observed sites unconditioned: the template with
    each argument an observed site reads replaced by the simulated values, and the latents."""
    simulated = poutine.trace(poutine.uncondition(model)).get_trace(
        *template.args, **template.kwargs
    )
    replaced: dict[int, torch.Tensor] = {}
    arguments = _tensors_in(template.values())
    latents = {}
    for name, site in simulated.nodes.items():
        if not is_sample(site) or is_deterministic(site):
            continue
        if not site["infer"].get("was_observed"):
            latents[name] = site["value"].detach()
            continue
        observed = site["infer"]["obs"]
        argument = next((a for a in arguments if _reads(observed, a)), None)
        if argument is None:
            raise ValueError(
                f"bdmc replaces the data each observed site reads by the values simulated there, "
                f"but site {name!r} observes a tensor that is none of the data's arguments (nor a "
                "view of one): computed inside the model, it cannot be replaced. Observe the "
                "argument itself (obs=x), or pass data the model observes as it is given"
            )
        replaced[id(argument)] = site["value"].detach().reshape(argument.shape).to(argument.dtype)
    if not replaced:
        raise ValueError("bdmc found no observed site in the model run on the data")
    return _replace(template, replaced), latents


def _tensors_in(values: list[Any]) -> list[torch.Tensor]:
    """Every tensor among the arguments, inside dicts, lists and tuples too."""
    out: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, Mapping):
            out.extend(_tensors_in(list(value.values())))
        elif isinstance(value, (list, tuple)):
            out.extend(_tensors_in(list(value)))
    return out


def _reads(observed: Any, argument: torch.Tensor) -> bool:
    """Whether an observed value is ``argument`` or a view of all of it (a reshape)."""
    if observed is argument:
        return True
    return (
        isinstance(observed, torch.Tensor)
        and observed.numel() == argument.numel()
        and observed.device == argument.device
        and observed.untyped_storage().data_ptr() == argument.untyped_storage().data_ptr()
        and observed.storage_offset() == argument.storage_offset()
        and observed.is_contiguous() == argument.is_contiguous()
    )


def _replace(template: Data, replaced: dict[int, torch.Tensor]) -> Data:
    def swap(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return replaced.get(id(value), value)
        if isinstance(value, Mapping):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, tuple):
            return tuple(swap(v) for v in value)
        return value

    args = tuple(swap(v) for v in template.args)
    kwargs = {k: swap(v) for k, v in template.kwargs.items()}
    return template.with_arguments(args, kwargs)


def gap_split(
    model,
    guide,
    data: Any,
    *,
    log_likelihood: Any = None,
    lr: float = 0.02,
    seed: int | None = 0,
    max_pairs: int = GAP_MAX_PAIRS,
):
    """Split the variational gap log p(x) − ELBO(q) of each point into its **approximation**
    part, log p(x) − ELBO(q*), and its **amortization** part, ELBO(q*) − ELBO(q), where q* is a
    Gaussian (diagonal, on each latent's unconstrained space) optimised for that point alone
    (Adam on a 64-sample ELBO, stopped when it stops rising) — Cremer, Li & Duvenaud (2018),
    "Inference Suboptimality in Variational Autoencoders". ``log_likelihood``: per-point
    estimates of log p(x) (an AIS column, say); without it, importance sampling with 5,000 draws.
    ``max_pairs``: (draw, point) pairs per pass of the final 1,000-draw estimates, which bounds
    memory: the points go in chunks of ``max_pairs // 1000`` (65 by default), each chunk's q*
    optimised on its own (q* is per point; a chunk stops when its own mean ELBO stops rising).

    Returns a DataFrame with ``log_likelihood``, ``elbo`` (the amortized guide's), ``elbo_qstar``,
    ``approximation_gap`` and ``amortization_gap`` per point.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> split = lvmkit.gap_split(model, guide, torch.ones(3, 4))
        >>> list(split.columns)[-2:]
        ['approximation_gap', 'amortization_gap']
    """

    values = as_data(data, model)
    n = values.check_sliceable()
    points = max(1, check_int("max_pairs", max_pairs, minimum=1) // GAP_FINAL_SAMPLES)
    if log_likelihood is None:
        log_likelihood = evaluate(model, guide, data, 5000, seed=seed).log_likelihood
    ll = np.asarray(log_likelihood, dtype=np.float64)
    if ll.shape != (n,):
        raise ValueError(f"log_likelihood must hold one value per point ({n}); got {ll.shape}")
    with (
        scoring(model, guide, seed),
        param_scope(model, guide, publish=False),
        eval_mode(model, guide),
        pyro.validation_enabled(False),
    ):
        with torch.no_grad():
            layout = find_layout(model, guide, values, vectorize=True)
        parts = [
            _split_chunk(model, guide, values.take(slice(start, start + points)), layout, lr)
            for start in range(0, n, points)
        ]
    q = np.concatenate([part[0] for part in parts])
    qstar = np.concatenate([part[1] for part in parts])
    return pd.DataFrame(
        {
            "log_likelihood": ll,
            "elbo": q,
            "elbo_qstar": qstar,
            "approximation_gap": ll - qstar,
            "amortization_gap": qstar - q,
        }
    )


def _split_chunk(model, guide, values, layout, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """ELBO under the amortized guide and under a per-point Gaussian q* (Adam from the guide's
    moments, early stop), for the points of ``values``: two ``(n,)`` arrays."""
    n = values.check_sliceable()
    with torch.no_grad():
        start = Target(model, guide, values, layout, GAP_FINAL_SAMPLES, n)
        amortized = start.initial()
    elbo_q = (amortized.log_p - amortized.log_q).mean(0)
    loc = {k: u.mean(0) for k, u in amortized.u.items()}  # q*'s start: the guide's moments
    log_scale = {k: u.std(0).clamp(min=1e-3).log() for k, u in amortized.u.items()}
    del amortized
    params = [t.requires_grad_(True) for t in [*loc.values(), *log_scale.values()]]
    optimizer = torch.optim.Adam(params, lr=lr)
    target = Target(model, guide, values, layout, GAP_SAMPLES, n)
    best, stale = -math.inf, 0
    with torch.enable_grad():  # (inside scoring's no_grad)
        for _ in range(GAP_MAX_ITERATIONS):
            optimizer.zero_grad()
            elbo = _qstar_elbo(target, loc, log_scale, GAP_SAMPLES)
            (-elbo.sum()).backward()
            optimizer.step()
            mean = float(elbo.detach().mean())
            stale = 0 if mean > best + GAP_TOLERANCE else stale + 1
            best = max(best, mean)
            if stale >= GAP_PATIENCE:
                break
    with torch.no_grad():
        elbo_qstar = _qstar_elbo(start, loc, log_scale, GAP_FINAL_SAMPLES)
    return elbo_q.double().cpu().numpy(), elbo_qstar.double().cpu().numpy()


def _qstar_elbo(target: Target, loc, log_scale, draws: int) -> torch.Tensor:
    """The ELBO of each point under q* (reparameterised ``draws`` samples), ``(n,)``."""
    u, log_q = {}, 0.0
    for name in loc:
        eps = torch.randn((draws, *loc[name].shape), device=loc[name].device)
        u[name] = loc[name] + log_scale[name].exp() * eps
        normal = torch.distributions.Normal(loc[name], log_scale[name].exp())
        log_q = log_q + normal.log_prob(u[name]).reshape(draws, target.n, -1).sum(-1)
    with torch.enable_grad():
        state = target.evaluate(u)
    return (state.log_p + state.log_jac - log_q).mean(0)


__all__ = ["bdmc", "gap_split"]
