"""Gaussian mixtures: exact log-likelihoods, agreement with EM, and the scikit-learn interface."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture as SklearnGMM

import lvmkit
from lvmkit import datasets
from lvmkit.estimators import GaussianMixture
from lvmkit.guides import CategoricalEncoder, CategoricalEncoderConfig
from lvmkit.models import GaussianMixtureModel, GMMConfig, empty_guide


def _random_model(cov_type: str, k=3, d=2, seed=0, num_data=None) -> GaussianMixtureModel:
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(k, generator=g) + 0.2
    a = torch.randn(k, d, d, generator=g)
    cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(d)
    if cov_type == "diag":
        cov = torch.diagonal(cov, dim1=-2, dim2=-1)
    return GaussianMixtureModel(
        GMMConfig(k, d, cov_type, num_data=num_data),
        weights=weights / weights.sum(),
        means=3 * torch.randn(k, d, generator=g),
        covariances=cov,
    )


def _by_hand(model: GaussianMixtureModel, x: torch.Tensor) -> torch.Tensor:
    """log Σ_k λ_k N(x; μ_k, Σ_k) with logsumexp, straight from the parameters."""
    cov = model.covariances().detach()
    if cov.dim() == 2:
        cov = torch.diag_embed(cov)
    comps = torch.distributions.MultivariateNormal(model.locs.detach(), covariance_matrix=cov)
    log_w = torch.log_softmax(model.logits.detach(), -1)
    return torch.logsumexp(log_w + comps.log_prob(x[:, None, :]), dim=-1)


def _sklearn_twin(gm: GaussianMixture) -> SklearnGMM:
    twin = SklearnGMM(gm.n_components, covariance_type=gm.covariance_type)
    twin.weights_, twin.means_, twin.covariances_ = gm.weights_, gm.means_, gm.covariances_
    if gm.covariance_type == "full":  # what sklearn keeps: the Cholesky factor of Σ⁻¹
        twin.precisions_cholesky_ = np.linalg.inv(np.linalg.cholesky(gm.covariances_)).swapaxes(
            1, 2
        )
    else:
        twin.precisions_cholesky_ = 1 / np.sqrt(gm.covariances_)
    return twin


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_reported_log_likelihood_is_the_exact_mixture_log_likelihood(cov_type):
    model = _random_model(cov_type)
    x = torch.randn(50, 2) * 4
    exact = _by_hand(model, x)
    scores = lvmkit.evaluate(model, empty_guide, x, num_samples=1)  # y summed out
    np.testing.assert_allclose(scores.log_likelihood, exact.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores.elbo, exact.numpy(), rtol=0, atol=1e-4)
    gm = GaussianMixture(3, covariance_type=cov_type)
    gm.model_ = model
    np.testing.assert_allclose(gm.score_samples(x), exact.numpy(), rtol=0, atol=1e-4)
    twin = _sklearn_twin(gm)
    np.testing.assert_allclose(gm.score_samples(x), twin.score_samples(x.double()), atol=1e-4)
    np.testing.assert_allclose(gm.predict_proba(x), twin.predict_proba(x.double()), atol=1e-4)
    assert gm.bic(x) == pytest.approx(twin.bic(x.double()), abs=1e-2)


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_enumerated_svi_matches_em_on_separated_mixtures(cov_type):
    data = datasets.make_mixture(
        1200,
        [0.5, 0.3, 0.2],
        [[-5.0, 0.0], [5.0, 0.0], [0.0, 6.0]],
        [[[1.0, 0.5], [0.5, 1.0]], [[1.0, -0.3], [-0.3, 0.6]], [[0.4, 0.0], [0.0, 1.5]]],
        seed=3,
    )
    train, test = data.split(0.5, seed=0)
    gm = GaussianMixture(3, covariance_type=cov_type, n_init=2, max_iter=300, seed=0)
    gm.fit(train.x)
    em = SklearnGMM(3, covariance_type=cov_type, n_init=10, random_state=0).fit(train.x)
    ours, theirs = gm.score(test.x), em.score(test.x)
    assert ours >= theirs - 0.02, (ours, theirs)
    assert adjusted_rand_score(test.y, gm.predict(test.x)) >= 0.95
    assert gm.lower_bound_ == pytest.approx(gm.score(train.x), abs=0.01)
    assert gm.weights_.shape == (3,) and gm.means_.shape == (3, 2)
    expected = (3, 2, 2) if cov_type == "full" else (3, 2)
    assert gm.covariances_.shape == expected


def test_sampling_has_the_mixture_statistics():
    model = _random_model("full")
    gm = GaussianMixture(3)
    gm.model_ = model
    pyro.set_rng_seed(0)
    x, y = gm.sample(20_000)
    assert x.shape == (20_000, 2) and y.shape == (20_000,)
    np.testing.assert_allclose(np.bincount(y) / len(y), gm.weights_, atol=0.015)
    np.testing.assert_allclose(x.mean(0), gm.weights_ @ gm.means_, atol=0.1)
    for k in range(3):
        np.testing.assert_allclose(np.cov(x[y == k].T), gm.covariances_[k], rtol=0.1, atol=0.1)
    drawn = model(batch_size=7)  # ancestral sampling straight from the Pyro model
    assert drawn.shape == (7, 2)


def test_minibatches_are_scaled_to_the_full_data_size():
    model = _random_model("full", num_data=1000)
    x = torch.randn(10, 2)
    with poutine.enum(first_available_dim=-2):
        trace = poutine.trace(model).get_trace(x)
    assert trace.nodes["x"]["scale"] == pytest.approx(100.0)
    # fit reports the loss per data point, undoing the plate's N / n
    xs = torch.as_tensor(
        datasets.make_mixture(1000, [0.5, 0.5], [[0, 0], [4, 4]], [[1, 1], [1, 1]], seed=0).x
    )
    result = lvmkit.fit(
        model,
        empty_guide,
        xs,
        epochs=1,
        batch_size=100,
        lr=1e-9,  # (nothing moves: the loss is that of the initial parameters)
        objective=pyro.infer.TraceEnum_ELBO(max_plate_nesting=1),
        progress=False,
    )
    exact = -_by_hand(model, xs).mean().item()
    assert result.history.train_loss.iloc[0] == pytest.approx(exact, rel=1e-4)


def test_two_mixtures_with_function_guides_keep_their_own_parameters():
    a, b = _random_model("full", seed=1), _random_model("full", seed=2)
    x = torch.randn(20, 2)
    lvmkit.evaluate(a, empty_guide, x, 1)  # publishes nothing, but let a register first
    lvmkit.fit(
        a,
        empty_guide,
        x,
        epochs=2,
        batch_size=20,
        objective=pyro.infer.TraceEnum_ELBO(max_plate_nesting=1),
        progress=False,
    )
    scores = lvmkit.evaluate(b, empty_guide, x, 1)
    np.testing.assert_allclose(scores.log_likelihood, _by_hand(b, x).numpy(), atol=1e-4)
    assert "locs" not in pyro.get_param_store()  # a PyroModule's parameters stay in the module
    # and the scikit-learn face of two fitted mixtures of different sizes
    rng = np.random.default_rng(0)
    small = GaussianMixture(2, max_iter=5).fit(rng.normal(size=(30, 2)))
    GaussianMixture(3, max_iter=5).fit(rng.normal(size=(30, 5)))
    assert small.predict(rng.normal(size=(4, 2))).shape == (4,)
    assert small.sample(3)[0].shape == (3, 2)


def test_amortized_guide_gives_a_lower_bound():
    data = datasets.make_mixture(400, [0.5, 0.5], [[-3, 0], [3, 0]], [[1, 1], [1, 1]], seed=0)
    x = torch.as_tensor(data.x)
    model = GaussianMixture(2, seed=0)._initial_model(x, 0)
    guide = CategoricalEncoder(CategoricalEncoderConfig(2, 2, num_data=len(x)))
    lvmkit.fit(model, guide, x, epochs=5, batch_size=100, lr=0.01, progress=False)
    bound = lvmkit.evaluate(model, guide, x, 200)
    exact = _by_hand(model, x).numpy()
    assert bound.elbo.mean() < exact.mean()  # a bound (per point it is a K-sample estimate)
    assert np.abs(bound.log_likelihood - exact).mean() < 0.02  # IS over the 2 values of y


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="Did you mean 'diag'"):
        GaussianMixture(2, covariance_type="diagonal")
    with pytest.raises(ValueError, match="not fitted yet"):
        GaussianMixture(2).predict(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="fewer than n_components=5"):
        GaussianMixture(5).fit(np.zeros((3, 2)))
    gm = GaussianMixture(2, max_iter=5).fit(np.random.default_rng(0).normal(size=(20, 2)))
    with pytest.raises(ValueError, match="X has 3 features, but this mixture was fitted on 2"):
        gm.score(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="must be finite"):
        gm.score(np.full((4, 2), np.nan))


def test_data_sets_are_reproducible():
    assert np.array_equal(datasets.make_ring(50, seed=1).x, datasets.make_ring(50, seed=1).x)
    assert not np.array_equal(datasets.make_ring(50, seed=1).x, datasets.make_ring(50, seed=2).x)
    z = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(datasets.ring_map(z), [[0.3 + 0.6, 0.4 + 0.8]])
    iris, digits = datasets.load_iris(), datasets.load_digits(10)
    assert iris.x.shape == (150, 4) and set(iris.y) == {0, 1, 2}
    assert digits.x.shape == (1797, 10) and len(set(digits.y)) == 10
    with pytest.raises(ValueError, match="probability vector"):
        datasets.make_mixture(10, [0.5, 0.6], [[0, 0], [1, 1]], [[1, 1], [1, 1]])


def test_degenerate_data_still_fit():
    """Fewer distinct points than components: k-means leaves singular clusters behind, and the
    starting covariances must still factorize (found by the property tests' cousins)."""
    import warnings

    x = np.r_[np.zeros((5, 2)), np.ones((5, 2))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn: fewer distinct clusters than n_clusters
        gm = GaussianMixture(3, max_iter=20).fit(x)
    assert np.isfinite(gm.score(x))


def test_tol_stops_early_and_reports_convergence():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-3, 1, (100, 2)), rng.normal(3, 1, (100, 2))])
    full = GaussianMixture(2, max_iter=400, seed=0).fit(X)
    assert full.n_iter_ == 400 and full.converged_
    early = GaussianMixture(2, max_iter=400, tol=1e-4, seed=0).fit(X)
    assert early.converged_ and early.n_iter_ < 400
    assert early.lower_bound_ == pytest.approx(full.lower_bound_, abs=0.01)
    short = GaussianMixture(2, max_iter=3, seed=0).fit(X)
    assert not short.converged_ and short.n_iter_ == 3
    with pytest.raises(ValueError, match="tol"):
        GaussianMixture(2, tol=-1.0)
