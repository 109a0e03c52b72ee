"""Annealed importance sampling and its BDMC sandwich against an exact log-likelihood: factor
analysis with an untrained guide, where importance sampling from the guide is far off."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import lvmkit
from linear_gaussian import LinearGaussianGuide, make_problem


def _hard_problem(n: int = 10):
    """20-d data, 5-d z, little noise: the untrained guide (the prior) misses the sharp
    posterior by far, so IS with 200 draws is tens of nats below log p(x)."""
    model, x = make_problem(n=n, data_dim=20, latent_dim=5, noise=0.05)
    return model, LinearGaussianGuide(20, 5), x


def test_ais_reaches_the_exact_log_likelihood_where_importance_sampling_does_not():
    model, guide, x = _hard_problem()
    exact = float(model.exact_log_prob(x).mean())
    is_ = lvmkit.evaluate(model, guide, x, 200)
    assert exact - is_.log_likelihood.mean() > 9  # importance sampling: nats off
    ais = lvmkit.evaluate(model, guide, x, 16, method="ais", num_steps=300)
    assert list(ais.columns) == ["elbo", "log_likelihood", "pareto_k", "ess"]
    assert ais.attrs["method"] == "ais" and ais.attrs["num_steps"] == 300
    assert ais.log_likelihood.mean() == pytest.approx(exact, abs=0.3)
    assert (ais.log_likelihood > ais.elbo).all()  # the chains' starts score the guide's ELBO
    assert lvmkit.summarize(ais).num_points == 10


def test_bdmc_brackets_the_exact_log_likelihood():
    model, guide, _ = _hard_problem()
    sandwich = lvmkit.bdmc(model, guide, num_points=4, num_samples=4, num_steps=100)
    exact = model.exact_log_prob(sandwich.attrs["data"])
    assert isinstance(sandwich, pd.DataFrame) and len(sandwich) == 4
    lower, upper = sandwich.lower.mean(), sandwich.upper.mean()
    assert lower <= float(exact.mean()) <= upper  # the sandwich (in expectation; 4 points here)
    assert upper - lower < 10  # at 100 steps (1,000: under 1 nat, 70 s on one thread, 50 points)


def test_ais_refuses_what_it_cannot_anneal():
    model, guide, x = _hard_problem(4)
    with pytest.raises(ValueError, match="checkpoint= is for method='is'"):
        lvmkit.evaluate(model, guide, x, 4, method="ais", checkpoint="somewhere.pt")
    with pytest.raises(ValueError, match=r"unknown method 'annealed': expected one of \["):
        lvmkit.evaluate(model, guide, x, 4, method="annealed")
    with pytest.raises(TypeError, match=r"model\(x=None, batch_size=n\)"):
        lvmkit.bdmc(lambda x: None, guide, num_points=2, num_samples=2, num_steps=2)


def test_the_schedule_runs_from_0_to_1_densest_at_the_ends():
    from lvmkit.inference.ais import sigmoid_schedule

    betas = sigmoid_schedule(100)
    assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()
    steps = betas.diff()
    assert steps[0] < steps[50] and steps[-1] < steps[50]
    assert torch.equal(sigmoid_schedule(1), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_ais_from_the_prior_gets_there_too():
    model, guide, x = _hard_problem(4)
    exact = float(model.exact_log_prob(x).mean())
    ais = lvmkit.evaluate(model, guide, x, 16, method="ais-prior", num_steps=200)
    assert ais.attrs["method"] == "ais-prior"
    assert ais.log_likelihood.mean() == pytest.approx(exact, abs=1.5)  # (200 steps, 4 points)


def test_the_gap_splits_into_approximation_and_amortization():
    """An untrained guide on factor analysis: almost all of its gap is amortization (a Gaussian
    fitted to each point alone reaches nearly log p(x); its diagonal covariance leaves a little
    approximation gap against the correlated exact posterior)."""
    model, guide, x = _hard_problem(6)
    exact = model.exact_log_prob(x)
    split = lvmkit.gap_split(model, guide, x, log_likelihood=exact)
    assert list(split.columns) == [
        "log_likelihood", "elbo", "elbo_qstar", "approximation_gap", "amortization_gap",
    ]  # fmt: skip
    assert (split.amortization_gap > 10).all()  # the prior as a guide: far from each posterior
    assert (split.approximation_gap > -0.05).all() and (split.approximation_gap < 2).all()
    total = split.log_likelihood - split.elbo
    assert (total - split.approximation_gap - split.amortization_gap).abs().max() < 1e-9


def test_the_gap_split_takes_its_points_in_chunks_that_bound_each_pass():
    """``max_pairs`` bounds the (draw, point) pairs of a pass: at 2,000, two points of 1,000
    draws. (All in one pass, 1,000 MNIST test images took the AIS benchmark to 18.6 GB.) Each
    chunk's q* is still each point's own best Gaussian."""
    model, guide, x = _hard_problem(6)
    exact = model.exact_log_prob(x)
    seen: list[int] = []

    def record(module, args, kwargs):
        seen.append(kwargs.get("x", args[0] if args else None).shape[0])

    handle = guide.register_forward_pre_hook(record, with_kwargs=True)
    try:
        split = lvmkit.gap_split(model, guide, x, log_likelihood=exact, max_pairs=2000)
    finally:
        handle.remove()
    assert seen and set(seen) == {2}  # three chunks of two points, never all six at once
    assert (split.amortization_gap > 10).all()
    assert (split.approximation_gap > -0.05).all() and (split.approximation_gap < 2).all()
    with pytest.raises(ValueError, match="max_pairs"):
        lvmkit.gap_split(model, guide, x, log_likelihood=exact, max_pairs=0)


def test_ais_with_a_discrete_label_summed_out():
    """A mixture of factor analysers' kind: y ~ Cat(π) enumerated in the model, z | y ~ N(μ_y, I),
    x | z ~ N(W z + b, ψ I); exact p(x) = Σ_y π_y N(x; W μ_y + b, W Wᵀ + ψ I). AIS anneals z
    with y summed out of every density it evaluates."""
    import pyro
    import pyro.distributions as dist

    gen = torch.Generator().manual_seed(1)
    d, dz, noise = 10, 2, 0.02
    weight, bias = torch.randn(d, dz, generator=gen), torch.randn(d, generator=gen)
    mus, weights = torch.tensor([[2.0, 0.0], [-2.0, 1.0]]), torch.tensor([0.3, 0.7])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(weights), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(mus[y], 1.0).to_event(1))  # batch (N,) event (Dz,)
            loc = z @ weight.T + bias
            pyro.sample("x", dist.Normal(loc, noise**0.5).to_event(1), obs=x)  # event (D,)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(dz), 1.5).to_event(1))  # a poor guide

    y = torch.multinomial(weights, 4, replacement=True, generator=gen)
    z = mus[y] + torch.randn(4, dz, generator=gen)
    x = z @ weight.T + bias + noise**0.5 * torch.randn(4, d, generator=gen)
    cov = weight @ weight.T + noise * torch.eye(d)
    comps = torch.stack([
        dist.MultivariateNormal(mus[k] @ weight.T + bias, cov).log_prob(x) for k in range(2)
    ])  # fmt: skip
    exact = float(torch.logsumexp(comps + weights.log()[:, None], dim=0).mean())
    ais = lvmkit.evaluate(model, guide, x, 16, method="ais", num_steps=150)
    assert ais.log_likelihood.mean() == pytest.approx(exact, abs=0.5)
