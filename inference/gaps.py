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
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch

from lvmkit.base import check_int
from lvmkit.inference.ais import Target, anneal, exact_start, is_sampled_latent
from lvmkit.inference.calls import as_data
from lvmkit.inference.evaluate import evaluate
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
    *,
    num_points: int = 50,
    num_samples: int = 4,
    num_steps: int = 1000,
    seed: int | None = 0,
    data_site: str = "x",
):
    """Bidirectional Monte Carlo: how far AIS is from log p(x), on data simulated from the model.

    Draws ``num_points`` points (and their latents) from the model — called as
    ``model(x=None, batch_size=num_points)``, lvmkit's convention for generating — then runs AIS
    with ``num_samples`` chains and ``num_steps`` distributions forwards from the guide (a
    stochastic *lower* bound of each point's log p(x)) and backwards from the exact latents the
    point was simulated with (a stochastic *upper* bound). Returns a DataFrame with columns
    ``lower`` and ``upper`` per point (``attrs["data"]``: the simulated data); their gap bounds
    AIS's error on such data, and says how many steps real data need (Grosse et al. 2015).

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> sandwich = lvmkit.bdmc(model, guide, num_points=3, num_samples=2, num_steps=5)
        >>> list(sandwich.columns), len(sandwich)
        (['lower', 'upper'], 3)
    """

    num_points = check_int("num_points", num_points)
    num_samples = check_int("num_samples", num_samples)
    num_steps = check_int("num_steps", num_steps)
    with scoring(model, guide, seed), param_scope(model, guide, publish=False):
        with torch.no_grad(), eval_mode(model, guide), pyro.validation_enabled(False):
            try:
                simulated = poutine.trace(model).get_trace(x=None, batch_size=num_points)
            except TypeError as err:
                raise TypeError(
                    "bdmc simulates data from the model as model(x=None, batch_size=n), "
                    f"lvmkit's convention for generating; this model cannot be called so ({err})"
                ) from None
        if data_site not in simulated.nodes:
            raise ValueError(f"the simulated trace has no site {data_site!r} (data_site=)")
        x = simulated.nodes[data_site]["value"].detach()
        latents = {
            name: site["value"].detach()
            for name, site in simulated.nodes.items()
            if is_sampled_latent(site) and name != data_site
        }
        call = as_data(x, model)
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
    frame.attrs.update(data=x.cpu(), num_samples=num_samples, num_steps=num_steps)
    return frame


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
