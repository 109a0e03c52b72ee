"""Evaluation against closed forms: factor analysis has an exact log p(x) and posterior."""

from __future__ import annotations

import math

import pandas as pd
import pyro
import pyro.poutine as poutine
import pytest
import torch

import lvmkit
from conftest import assert_close, interrupted_scoring
from linear_gaussian import LinearGaussianGuide, make_problem
from lvmkit.inference.summary import PARETO_K_THRESHOLD


def test_exact_posterior_guide_gives_exact_log_likelihood():
    # With q(z | x) = p(z | x) every log-weight equals log p(x): ELBO = IS = exact, zero variance.
    model, x = make_problem()
    guide = LinearGaussianGuide(5, 2).set_exact(model)
    lw = lvmkit.log_weights(model, guide, x, num_samples=7)
    assert lw.shape == (7, 200)
    assert_close(lw, model.exact_log_prob(x).expand(7, -1), atol=1e-4, rtol=0)
    scores = lvmkit.evaluate(model, guide, x, num_samples=50)
    assert_close(scores["elbo"], model.exact_log_prob(x), atol=1e-4, rtol=0)
    assert_close(scores["log_likelihood"], model.exact_log_prob(x), atol=1e-4, rtol=0)
    assert_close(scores["ess"], torch.full((200,), 50.0), atol=1e-3, rtol=0)


def test_importance_sampling_approaches_exact_as_k_grows_and_elbo_stays_below():
    model, x = make_problem(n=100)
    guide = LinearGaussianGuide(5, 2)  # untrained: q(z | x) = N(0, I), the prior
    exact = model.exact_log_prob(x).mean().item()
    gaps = {}
    for k in (1, 10, 100, 3000):
        summary = lvmkit.summarize(lvmkit.evaluate(model, guide, x, num_samples=k, seed=1))
        assert summary.elbo < exact  # Jensen: the ELBO is a lower bound
        assert summary.log_likelihood < exact + 0.05  # IS is a lower bound in expectation
        gaps[k] = exact - summary.log_likelihood
    assert gaps[1] > gaps[10] > gaps[100] > gaps[3000]
    assert gaps[3000] < 0.05 * gaps[1]  # with the prior as proposal, K = 3000 closes > 95 %
    assert gaps[3000] < 0.1  # nats per point


def _counting(model, seen: list[int]):
    """Wrap ``model`` to record how many (sample, point) pairs each call draws for "z"."""

    def counting_model(x=None, *, batch_size=None):
        trace = poutine.trace(model).get_trace(x, batch_size=batch_size)
        seen.append(trace.nodes["z"]["value"].shape[:-1].numel())  # (K_chunk, N_chunk) pairs
        return trace.nodes["_RETURN"]["value"]

    return counting_model


def test_chunking_is_exact_and_bounds_each_pass():
    model, x = make_problem(n=37)
    guide = LinearGaussianGuide(5, 2).set_exact(model)
    seen: list[int] = []
    counting_model = _counting(model, seen)
    lw = lvmkit.log_weights(counting_model, guide, x, num_samples=40, max_pairs=64)
    assert lw.shape == (40, 37)
    # seen[:3] are the probes: the plate check on 2 points, the particle check (3 particles of
    # those 2 points) and the memory measurement (one pair)
    assert seen[:3] == [2, 6, 1] and max(seen[3:]) <= 64 and sum(seen[3:]) == 40 * 37
    assert_close(lw, model.exact_log_prob(x).expand(40, -1), atol=1e-4, rtol=0)


def test_default_chunk_size_follows_the_device():
    from lvmkit.inference.weights import DEFAULT_MAX_PAIRS

    model, x = make_problem(n=3)
    guide = LinearGaussianGuide(5, 2)
    seen: list[int] = []
    lvmkit.log_weights(_counting(model, seen), guide, x, num_samples=5000)
    # one point at a time, in equal passes of at most 4096 samples: 2 × 2500 (one shape to
    # compile, not 4096 + 904)
    assert DEFAULT_MAX_PAIRS["cpu"] == 4096 and max(seen) == 2500


def test_evaluate_table_summary_and_pareto_k():
    model, x = make_problem(n=40)
    scores = lvmkit.evaluate(model, LinearGaussianGuide(5, 2), x, num_samples=500)
    assert isinstance(scores, pd.DataFrame) and len(scores) == 40
    assert list(scores.columns) == ["elbo", "log_likelihood", "pareto_k", "ess"]
    assert scores["pareto_k"].notna().all()
    assert (scores["log_likelihood"] >= scores["elbo"] - 1e-9).all()  # logmeanexp ≥ mean
    summary = lvmkit.summarize(scores)
    assert summary.num_points == 40 and summary.num_samples == 500
    assert summary.frac_pareto_k_above_0_7 == pytest.approx(
        (scores["pareto_k"] > PARETO_K_THRESHOLD).mean()
    )
    assert summary.gap == pytest.approx((scores["log_likelihood"] - scores["elbo"]).mean())
    assert list(summary.to_frame().columns)[:3] == ["num_points", "num_samples", "elbo"]


def test_evaluate_is_reproducible_and_leaves_caller_rng_alone():
    model, x = make_problem(n=20)
    guide = LinearGaussianGuide(5, 2)
    pyro.set_rng_seed(123)
    before = torch.get_rng_state()
    a = lvmkit.evaluate(model, guide, x, num_samples=30, seed=4)
    b = lvmkit.evaluate(model, guide, x, num_samples=30, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    pd.testing.assert_frame_equal(a, b)


def test_few_samples_give_nan_pareto_k_not_an_error():
    model, x = make_problem(n=5)
    scores = lvmkit.evaluate(model, LinearGaussianGuide(5, 2), x, num_samples=3)
    assert scores["pareto_k"].isna().all()
    assert math.isnan(lvmkit.summarize(scores).frac_pareto_k_above_0_7)


def test_a_global_latent_gives_the_posterior_predictive_density_per_point():
    """Sites outside the data plate are drawn from the guide and conditioned on: with
    q(shift) = N(m, s²) and x_n | shift ~ N(shift·1, I) in 3-D, the per-point estimate is
    log E_q[p(x_n | shift)] = log N(x_n; m·1, I + s²·11ᵀ), known exactly."""
    import pyro.distributions as dist

    m, s = 0.5, 0.7

    def model(x=None, batch_size=None):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))  # a global latent
        with pyro.plate("data", x.shape[0]):
            # expand(len(x), 3): this model does not broadcast over particles (sequential passes)
            pyro.sample("x", dist.Normal(shift, 1.0).expand([x.shape[0], 3]).to_event(1), obs=x)

    def guide(x=None, batch_size=None):
        pyro.sample("shift", dist.Normal(m, s))

    x = torch.tensor([[0.0, 0.5, 1.0], [2.0, 1.5, 1.0], [-1.0, 0.0, 0.0]])
    scores = lvmkit.evaluate(model, guide, x, num_samples=3000)
    cov = torch.eye(3) + s**2 * torch.ones(3, 3)
    exact = dist.MultivariateNormal(torch.full((3,), m), cov).log_prob(x)
    assert_close(scores.log_likelihood, exact, atol=0.03, rtol=0)
    assert scores.attrs["likelihood"] == "log E_q(θ)[p(x | θ)], θ = shift drawn from the guide"
    assert lvmkit.summarize(scores).likelihood == scores.attrs["likelihood"]


def test_missing_data_plate_is_a_clear_error():
    import pyro.distributions as dist

    def model(x=None):
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[0], 3]).to_event(2), obs=x)

    def guide(x=None):
        pass

    with pytest.raises(ValueError, match=r"found no plate over the 4 data points.*data_plate="):
        lvmkit.log_weights(model, guide, torch.zeros(4, 3), num_samples=2)


def test_an_interrupted_evaluation_continues_to_the_same_numbers(tmp_path, monkeypatch):
    model, x = make_problem(n=90)
    guide = LinearGaussianGuide(5, 2)
    straight = lvmkit.evaluate(model, guide, x, 40, max_pairs=400)
    path = tmp_path / "partial.pt"
    with interrupted_scoring(monkeypatch, block=1200, at=3), pytest.raises(KeyboardInterrupt):
        lvmkit.evaluate(model, guide, x, 40, max_pairs=400, checkpoint=path)  # blocks of 30
    assert lvmkit.inference.checkpoint.load_checkpoint(path)["stop"] == 60
    other = lvmkit.evaluate(model, guide, x, 41, max_pairs=400, checkpoint=path)  # another K
    assert len(other) == 90 and not path.exists()  # started over, then done
    with interrupted_scoring(monkeypatch, block=1200, at=3), pytest.raises(KeyboardInterrupt):
        lvmkit.evaluate(model, guide, x, 40, max_pairs=400, checkpoint=path)
    resumed = lvmkit.evaluate(model, guide, x, 40, max_pairs=400, checkpoint=path)
    pd.testing.assert_frame_equal(resumed, straight)
