"""Annealed importance sampling (AIS) of log p(x) per data point, and its BDMC sandwich.

Importance sampling from the guide is only as good as the guide: where q(z | x) misses p(z | x)
the K-sample estimate stays nats below log p(x) (Pareto k̂ says so). AIS (Neal 2001) moves C
chains from q(z | x) to p(z | x) through the intermediate densities

    f_t(z) = q(z | x)^(1 − β_t) p(x, z)^β_t,   0 = β_0 < β_1 < … < β_T = 1,

each step reweighting by f_t / f_{t−1} = exp((β_t − β_{t−1}) (log p(x, z) − log q(z | x))) and
then moving z by an HMC transition that leaves f_t invariant. The weights' mean is an unbiased
estimate of p(x), so the log of their mean over chains is a stochastic lower bound of log p(x)
that tightens as T grows. Run backwards from an exact posterior sample — available for data
simulated from the model — the same chain gives an unbiased estimate of 1 / p(x), hence a
stochastic upper bound: bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015; Wu, Burda,
Salakhutdinov & Grosse 2017, whose settings are the defaults here: a sigmoid schedule, 10
leapfrog steps, one step size per point adapted towards 65 % acceptance).

Both run on the model's continuous latent sites that the guide proposes in the data plate (in
the unconstrained space of each site's support), vectorised over chains and points with the
evaluation kernel's particle plate; the model's enumerated discrete sites are summed out as in
:func:`lvmkit.inference.weights.log_densities`. Global sites must be point masses in the guide
(``AutoDelta``): they are held fixed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.trace_struct import Trace
from torch.distributions import biject_to

from lvmkit.inference._data import Data
from lvmkit.inference.weights import (
    PARTICLE_PLATE,
    Layout,
    in_plate,
    is_sample,
    log_densities,
    paired_traces,
)

LEAPFROG_STEPS = 10  # Wu et al. (2017)'s eval_gen
TARGET_ACCEPT = 0.65  # ... and its adaptation target
INITIAL_STEP_SIZE = 0.1
STEP_SIZE_CHANGE = 1.02  # step size × this after a step above the target, ÷ below


def sigmoid_schedule(num_steps: int, rad: float = 4.0) -> torch.Tensor:
    """β_0 = 0 < … < β_T = 1, dense near both ends (Grosse et al. 2015's sigmoid schedule)."""
    if num_steps == 1:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    s = torch.sigmoid(torch.linspace(-rad, rad, num_steps + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


@dataclass
class _State:
    """The chains: each latent site's unconstrained value ``(C, n, *event)``, and at it the
    log-densities ``(C, n)``: log p(x, z), log q(z | x) and the log-Jacobian of the support."""

    u: dict[str, torch.Tensor]
    log_p: torch.Tensor
    log_q: torch.Tensor
    log_jac: torch.Tensor


class _Target:
    """log p(x, z) and log q(z | x) of a pair at given latent values, per chain and point."""

    def __init__(self, model, guide, call: Data, layout: Layout, chains: int, n: int) -> None:
        self.model, self.guide, self.call, self.layout = model, guide, call, layout
        self.chains, self.n = chains, n
        with pyro.plate(PARTICLE_PLATE, chains, dim=layout.particle_dim):
            first = paired_traces(model, guide, call, enum_dim=layout.particle_dim - 1)
        self.sites: dict[str, Any] = {}
        for name in first.latents:
            site = first.guide.nodes[name]
            if name not in first.model.nodes or not in_plate(site, layout.plate):
                continue
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"AIS moves continuous latents; the guide's site {name!r} is discrete. "
                    "Enumerate it in the model instead (infer={'enumerate': 'parallel'}), or "
                    "score the pair with importance sampling (method='is')"
                )
            self.sites[name] = site
        if not self.sites:
            raise ValueError("AIS found no continuous latent site of the guide in the data plate")
        self.first = first
        self.transforms = {name: biject_to(s["fn"].support) for name, s in self.sites.items()}

    def initial(self) -> _State:
        """The chains' start: the guide's draws (the first trace)."""
        u = {
            name: self.transforms[name].inv(site["value"].detach())
            for name, site in self.sites.items()
        }
        return self.evaluate(u)

    def evaluate(self, u: dict[str, torch.Tensor], *, grad: bool = False) -> _State:
        values, log_jac = {}, torch.zeros(self.chains, self.n, device=self.call_device)
        for name, value in u.items():
            transform = self.transforms[name]
            z = transform(value)
            values[name] = z
            jac = transform.log_abs_det_jacobian(value, z)  # (its own event dims summed)
            log_jac = log_jac + jac.expand(value.shape[: jac.dim()]).reshape(
                self.chains, self.n, -1
            ).sum(-1)
        trace = Trace()
        for name, z in values.items():
            trace.add_node(name, type="sample", value=z, is_observed=False, infer={})
        replayed = poutine.replay(self.guide, trace=trace)
        with pyro.plate(PARTICLE_PLATE, self.chains, dim=self.layout.particle_dim):
            traces = paired_traces(
                self.model, replayed, self.call, enum_dim=self.layout.particle_dim - 1
            )
        log_p, log_q = log_densities(traces, self.layout, self.chains, self.n, self.call_device)
        return _State(u, log_p, log_q, log_jac)

    @property
    def call_device(self) -> torch.device:
        tensors = self.call.tensors()
        return tensors[0].device if tensors else torch.device("cpu")


def _log_f(state: _State, beta: float) -> torch.Tensor:
    """log f_β in the unconstrained space, per chain and point."""
    return (1.0 - beta) * state.log_q + beta * state.log_p + state.log_jac


def _hmc(target: _Target, state: _State, beta: float, step: torch.Tensor):
    """One HMC transition leaving f_β invariant, per chain and point; returns the new state and
    the acceptance probability ``(C, n)``. ``step``: the step size per point ``(n,)``."""
    u0 = {k: v.detach().requires_grad_(True) for k, v in state.u.items()}
    with torch.enable_grad():
        s0 = target.evaluate(u0)
        lf0 = _log_f(s0, beta)
        grads = torch.autograd.grad(lf0.sum(), list(u0.values()))
    momentum = {k: torch.randn_like(v) for k, v in u0.items()}
    kinetic0 = sum(_per_point(m**2 / 2, target) for m in momentum.values())

    def scaled(name: str) -> torch.Tensor:
        value = u0[name]
        return step.reshape((1, -1) + (1,) * (value.dim() - 2)).to(value.dtype)

    u = {k: v.detach() for k, v in u0.items()}
    r = {k: momentum[k] + scaled(k) / 2 * g for k, g in zip(u0, grads, strict=True)}
    lf = lf0
    for i in range(LEAPFROG_STEPS):
        u = {k: (u[k] + scaled(k) * r[k]).detach().requires_grad_(True) for k in u}
        with torch.enable_grad():
            s1 = target.evaluate(u)
            lf = _log_f(s1, beta)
            grads = torch.autograd.grad(lf.sum(), list(u.values()))
        last = i == LEAPFROG_STEPS - 1
        factor = 0.5 if last else 1.0
        r = {k: r[k] + factor * scaled(k) * g for k, g in zip(u, grads, strict=True)}
    kinetic1 = sum(_per_point(m**2 / 2, target) for m in r.values())
    log_accept = (lf.detach() - kinetic1) - (lf0.detach() - kinetic0)
    log_accept = torch.nan_to_num(log_accept, nan=-math.inf)
    accept = log_accept.clamp(max=0.0).exp()
    take = torch.rand_like(accept) < accept  # (C, n)
    new_u = {}
    for k in u:
        mask = take.reshape(take.shape + (1,) * (u[k].dim() - 2))
        new_u[k] = torch.where(mask, u[k].detach(), state.u[k])
    new = _State(
        new_u,
        torch.where(take, s1.log_p.detach(), state.log_p),
        torch.where(take, s1.log_q.detach(), state.log_q),
        torch.where(take, s1.log_jac.detach(), state.log_jac),
    )
    return new, accept


def _per_point(tensor: torch.Tensor, target: _Target) -> torch.Tensor:
    """Sum everything but the (chain, point) dims."""
    return tensor.reshape(target.chains, target.n, -1).sum(-1)


def anneal(
    model,
    guide,
    call: Data,
    layout: Layout,
    num_chains: int,
    num_steps: int,
    *,
    start: _State | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One AIS run over a chunk of points: ``(log weights (C, n), ELBO terms (C, n))``.

    Forward (default): chains start at the guide's draws and the log weights' mean estimates
    p(x). ``reverse``: chains start at ``start`` (exact posterior samples) and run from β = 1 to
    0; the log weights' mean estimates 1 / p(x)."""
    n = call.num_points or 1
    target = _Target(model, guide, call, layout, num_chains, n)
    state = start if start is not None else target.initial()
    elbo = (state.log_p - state.log_q).detach()
    betas = sigmoid_schedule(num_steps).tolist()
    if reverse:
        betas = betas[::-1]
    step = torch.full((n,), INITIAL_STEP_SIZE, device=state.log_p.device)
    log_w = torch.zeros_like(state.log_p)
    for previous, beta in itertools.pairwise(betas):
        log_w = log_w + (beta - previous) * (state.log_p - state.log_q)
        state, accept = _hmc(target, state, beta, step)
        rate = accept.mean(dim=0)  # per point, over chains
        step = torch.where(rate > TARGET_ACCEPT, step * STEP_SIZE_CHANGE, step / STEP_SIZE_CHANGE)
    return log_w.detach(), elbo


def exact_start(
    model, guide, call: Data, layout: Layout, num_chains: int, latents: dict[str, torch.Tensor]
) -> _State:
    """The reverse chains' start: the latents the data were simulated with (each point's value
    copied to every chain), an exact draw from p(z | x)."""
    n = call.num_points or 1
    target = _Target(model, guide, call, layout, num_chains, n)
    u = {}
    for name in target.sites:
        if name not in latents:
            raise ValueError(f"the simulated trace has no value for the guide's site {name!r}")
        value = latents[name].to(target.call_device)
        u[name] = target.transforms[name].inv(value.expand(num_chains, *value.shape))
    return target.evaluate(u)


def is_sampled_latent(site: Any) -> bool:
    return is_sample(site) and not site["is_observed"]


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
    import pandas as pd

    from lvmkit.inference._data import as_data
    from lvmkit.inference._params import eval_mode, param_scope
    from lvmkit.inference.evaluate import scoring
    from lvmkit.inference.weights import find_layout
    from lvmkit.models._checks import check_int

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


def prior_guide(model):
    """The model's own prior as a guide: its latent sites drawn from their priors, its observed
    sites left out (AIS's chains started from the prior, ``method="ais-prior"``)."""
    return poutine.block(model, hide_fn=lambda msg: bool(msg.get("is_observed")))


# -- the gap split (Cremer, Li & Duvenaud 2018) ---------------------------------------------------

GAP_SAMPLES = 64  # draws per point and iteration of q*'s ELBO
GAP_FINAL_SAMPLES = 1000  # draws per point of the final ELBO estimates
GAP_MAX_ITERATIONS = 2000
GAP_PATIENCE = 100  # iterations without the mean ELBO rising by GAP_TOLERANCE: stop
GAP_TOLERANCE = 1e-3


def gap_split(
    model,
    guide,
    data: Any,
    *,
    log_likelihood: Any = None,
    lr: float = 0.02,
    seed: int | None = 0,
):
    """Split the variational gap log p(x) − ELBO(q) of each point into its **approximation**
    part, log p(x) − ELBO(q*), and its **amortization** part, ELBO(q*) − ELBO(q), where q* is a
    Gaussian (diagonal, on each latent's unconstrained space) optimised for that point alone
    (Adam on a 64-sample ELBO, stopped when it stops rising) — Cremer, Li & Duvenaud (2018),
    "Inference Suboptimality in Variational Autoencoders". ``log_likelihood``: per-point
    estimates of log p(x) (an AIS column, say); without it, importance sampling with 5,000 draws.

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
    import numpy as np
    import pandas as pd

    from lvmkit.inference._data import as_data
    from lvmkit.inference._params import eval_mode, param_scope
    from lvmkit.inference.evaluate import evaluate, scoring
    from lvmkit.inference.weights import find_layout

    values = as_data(data, model)
    n = values.check_sliceable()
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
            start = _Target(model, guide, values, layout, GAP_FINAL_SAMPLES, n)
            amortized = start.initial()
        elbo_q = (amortized.log_p - amortized.log_q).mean(0)
        loc = {k: u.mean(0) for k, u in amortized.u.items()}  # q*'s start: the guide's moments
        log_scale = {k: u.std(0).clamp(min=1e-3).log() for k, u in amortized.u.items()}
        params = [t.requires_grad_(True) for t in [*loc.values(), *log_scale.values()]]
        optimizer = torch.optim.Adam(params, lr=lr)
        target = _Target(model, guide, values, layout, GAP_SAMPLES, n)
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
    q, qstar = elbo_q.double().cpu().numpy(), elbo_qstar.double().cpu().numpy()
    return pd.DataFrame(
        {
            "log_likelihood": ll,
            "elbo": q,
            "elbo_qstar": qstar,
            "approximation_gap": ll - qstar,
            "amortization_gap": qstar - q,
        }
    )


def _qstar_elbo(target: _Target, loc, log_scale, draws: int) -> torch.Tensor:
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
