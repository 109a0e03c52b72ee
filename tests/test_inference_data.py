"""to_inference_data: groups, dims and values against direct computation, and ArviZ's own
functions run on the result."""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from sklearn.datasets import load_iris

import lvmkit
from conftest import assert_close
from lvmkit.inference.weights import import_arviz
from lvmkit.models.gmm import empty_guide

az = import_arviz()


def _vae(seed: int = 0):
    pyro.set_rng_seed(seed)
    return lvmkit.build_vae(lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,)))


def _x(n: int = 7) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 6), 0.4), generator=torch.Generator().manual_seed(3))


def test_vae_groups_dims_and_values_match_direct_computation():
    model, guide = _vae()
    x = _x()
    idata = lvmkit.to_inference_data(model, guide, x, num_samples=40, max_pairs=50)  # 7 passes
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    }
    assert idata.posterior["z"].dims == ("chain", "draw", "point", "z_dim_0")
    assert idata.posterior["z"].shape == (1, 40, 7, 2)
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "point", "x_dim_0")
    assert idata.observed_data["x"].dims == ("point", "x_dim_0")
    np.testing.assert_array_equal(idata.observed_data["x"].values, x.numpy())
    replicated = idata.posterior_predictive["x"].values
    assert set(np.unique(replicated)) <= {0.0, 1.0}

    # log w = log p(x | z) + log p(z) − log q(z | x), each drawn z recomputed by hand
    z = torch.as_tensor(idata.posterior["z"].values[0])  # (K, n, 2)
    with torch.no_grad():
        loc, scale = guide.encode(x)
        log_q = dist.Normal(loc, scale).log_prob(z).sum(-1)
        log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_lik = model.likelihood(z).log_prob(x)
    expected = (log_lik + log_prior - log_q).double().numpy()
    # log_likelihood: log p(x_n | z) of the observed site at each draw (for az.loo / az.waic)
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "point")
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], log_lik, rtol=1e-5, atol=1e-4)
    log_weight = idata.sample_stats["log_weight"]
    assert log_weight.dims == ("chain", "draw", "point")
    np.testing.assert_allclose(log_weight.values[0], expected, rtol=1e-5, atol=1e-4)
    _, k_hat = az.psislw(log_weight.values[0].T)
    np.testing.assert_allclose(idata.sample_stats["pareto_k"].values, k_hat)
    assert idata.sample_stats["pareto_k"].dims == ("point",)
    # the draws follow the guide: their mean is the encoder's mean within 4 standard errors
    se = scale / np.sqrt(40)
    assert bool(((z.mean(0) - loc).abs() <= 4 * se).all())


def test_arviz_functions_work_on_the_result():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, guide = _vae()
    idata = lvmkit.to_inference_data(model, guide, _x(4), num_samples=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one chain: ArviZ warns about r_hat
        # ArviZ 0.23's plots call a matplotlib API that 3.11 deprecates: theirs, not ours
        warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
        # plot_khat announces that it will want LOO's ELPDData; IS weights have no LOO object
        warnings.filterwarnings("ignore", "support for DataArrays", FutureWarning)
        summary = az.summary(idata, var_names=["z"])
        assert len(summary) == 4 * 2
        az.plot_posterior(idata, var_names=["z"], coords={"point": [0]})
        az.plot_ppc(idata, num_pp_samples=10)
        az.plot_khat(idata.sample_stats["pareto_k"])
    plt.close("all")


def test_mixture_labels_follow_the_responsibilities_and_weights_are_exact():
    iris = load_iris().data
    mixture = lvmkit.GaussianMixture(3, seed=0).fit(iris)
    x = torch.as_tensor(iris, dtype=torch.float32)
    idata = lvmkit.to_inference_data(mixture._fitted(), empty_guide, x, num_samples=2000)
    labels = idata.posterior["y"]
    assert labels.dims == ("chain", "draw", "point")
    freq = np.stack([(labels.values[0] == j).mean(0) for j in range(3)], axis=1)
    resp = mixture.predict_proba(iris)
    # each frequency within 5 binomial standard errors of p(y = j | x_n) (plus float slack)
    assert np.all(np.abs(freq - resp) <= 5 * np.sqrt(resp * (1 - resp) / 2000) + 1e-3)
    # nothing is sampled that the weight depends on: log w = log p(x_n) exactly, every draw
    log_weight = idata.sample_stats["log_weight"].values[0]
    exact = np.broadcast_to(mixture.score_samples(iris), (2000, 150))
    np.testing.assert_allclose(log_weight, exact, rtol=1e-5)


def _hierarchical():
    """mu ~ N(0, 10²) global; z_n ~ N(mu, 1); x_n ~ N(z_n, 1); guide q(mu) q(z_n | x_n)."""

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        m = pyro.param("m", torch.tensor(0.7))
        s = pyro.param("s", torch.tensor(0.2), constraint=dist.constraints.positive)
        a = pyro.param("a", torch.tensor(0.5))
        mu = pyro.sample("mu", dist.Normal(m, s))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(a * x + 0.5 * mu, 0.8))

    return model, guide


def test_global_latents_get_draw_only_dims_and_one_joint_weight_per_draw():
    model, guide = _hierarchical()
    x = torch.randn(12, generator=torch.Generator().manual_seed(0)) + 1.0
    idata = lvmkit.to_inference_data(model, guide, x, num_samples=3000, max_pairs=12 * 500)
    mu = idata.posterior["mu"]
    assert mu.dims == ("chain", "draw")
    assert idata.posterior["z"].dims == ("chain", "draw", "point")
    assert abs(float(mu.mean()) - 0.7) < 4 * 0.2 / np.sqrt(3000)
    assert abs(float(mu.std()) - 0.2) < 0.02
    # the joint weight:
    # Σ_n [log p(z_n | mu) + log p(x_n | z_n) − log q(z_n)] + log p(mu) − log q(mu)
    m, s = 0.7, 0.2
    mu_k = torch.as_tensor(mu.values[0]).double()[:, None]
    z = torch.as_tensor(idata.posterior["z"].values[0]).double()
    xd = x.double()
    local = (
        dist.Normal(mu_k, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(xd)
        - dist.Normal(0.5 * xd + 0.5 * mu_k, 0.8).log_prob(z)
    ).sum(1)
    expected = (
        local + dist.Normal(0.0, 10.0).log_prob(mu_k[:, 0]) - dist.Normal(m, s).log_prob(mu_k[:, 0])
    )
    log_weight = idata.sample_stats["log_weight"]
    assert log_weight.dims == ("chain", "draw")
    assert_close(log_weight.values[0], expected, rtol=1e-4, atol=1e-3)
    k_hat = idata.sample_stats["pareto_k"]
    assert k_hat.dims == () and np.isfinite(float(k_hat))
    _, expected_k = az.psislw(log_weight.values[0][None])
    assert_close(float(k_hat), float(expected_k[0]))
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "point")


def test_same_seed_same_draws_and_the_callers_random_state_is_untouched():
    model, guide = _vae()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = lvmkit.to_inference_data(model, guide, _x(), num_samples=5, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    b = lvmkit.to_inference_data(model, guide, _x(), num_samples=5, seed=4)
    np.testing.assert_array_equal(a.posterior["z"].values, b.posterior["z"].values)
    assert np.isnan(a.sample_stats["pareto_k"].values).all()  # 5 draws: too few for PSIS


def test_bad_arguments_are_refused_with_the_argument_named():
    model, guide = _vae()
    with pytest.raises(ValueError, match="num_samples"):
        lvmkit.to_inference_data(model, guide, _x(), num_samples=0)
    with pytest.raises(TypeError, match="posterior_predictive must be True or False"):
        lvmkit.to_inference_data(model, guide, _x(), posterior_predictive="yes")
    with pytest.raises(ValueError, match=r"max_bytes=.*fewer num_samples"):
        lvmkit.to_inference_data(model, guide, _x(), num_samples=1000, max_bytes=1000)
    no_ppc = lvmkit.to_inference_data(model, guide, _x(), num_samples=3, posterior_predictive=False)
    assert "posterior_predictive" not in no_ppc.groups()


def test_bayesian_mixture_global_means_and_enumerated_labels():
    """locs ~ N(0, 5²) global, y_n ~ Cat(w) enumerated, x_n ~ N(locs[y_n], I); q(locs) fixed."""
    from pyro.ops.indexing import Vindex

    k, d = 2, 2
    w = torch.tensor([0.4, 0.6])
    m0 = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])

    def model(x):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(k, d), 5.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(Vindex(locs)[..., y, :], 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("locs", dist.Normal(m0, 0.3).to_event(2))

    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.randn(10, 2, generator=g) + m0[0], torch.randn(15, 2, generator=g) + m0[1]]
    )
    idata = lvmkit.to_inference_data(model, guide, x, num_samples=400)
    assert idata.posterior["locs"].dims == ("chain", "draw", "locs_dim_0", "locs_dim_1")
    assert idata.posterior["y"].dims == ("chain", "draw", "point")
    # joint weight: log p(locs) − log q(locs) + Σ_n log Σ_j w_j N(x_n; locs_j, I)
    locs = torch.as_tensor(idata.posterior["locs"].values[0]).double()  # (S, K, D)
    comp = dist.Normal(locs[:, None], 1.0).log_prob(x.double()[None, :, None]).sum(-1)
    comp = comp + w.double().log()  # (S, n, K)
    prior = dist.Normal(torch.zeros(k, d, dtype=torch.float64), 5.0).log_prob(locs).sum((-1, -2))
    q = dist.Normal(m0.double(), 0.3).log_prob(locs).sum((-1, -2))
    expected = comp.logsumexp(-1).sum(-1) + prior - q
    assert_close(idata.sample_stats["log_weight"].values[0], expected, rtol=1e-5, atol=1e-4)
    # each label is drawn from p(y_n | x_n, locs) of its own draw of the means
    resp = comp.softmax(-1).mean(0).numpy()
    y = idata.posterior["y"].values[0]
    freq = np.stack([(y == j).mean(0) for j in range(k)], axis=1)
    assert np.abs(freq - resp).max() < 0.08  # 400 draws: standard error ≤ 0.025


def test_dict_data_and_a_guide_that_draws_labels():
    """M2 on unlabelled images: the guide draws y ~ q(y | x) (its enumeration is for training),
    z given y; both land in the posterior, x in the posterior predictive."""
    pyro.set_rng_seed(0)
    cfg = lvmkit.M2Config(data_dim=6, num_classes=3, latent_dim=2, hidden_dims=(8,))
    model, guide = lvmkit.build_m2(cfg)
    x = _x(5)
    idata = lvmkit.to_inference_data(model, guide, {"x": x}, num_samples=600)
    assert idata.posterior["y"].dims == ("chain", "draw", "point")
    assert idata.posterior["z"].dims == ("chain", "draw", "point", "z_dim_0")
    assert set(idata.posterior_predictive) == {"x"} and set(idata.observed_data) == {"x"}
    with torch.no_grad():
        q_y = torch.softmax(guide.classifier(x), -1).numpy()  # (n, C)
    y = idata.posterior["y"].values[0]
    freq = np.stack([(y == c).mean(0) for c in range(3)], axis=1)
    assert np.abs(freq - q_y).max() < 0.08  # 600 draws: standard error ≤ 0.021
