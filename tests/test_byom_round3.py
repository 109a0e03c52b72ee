"""Pyro's own patterns, run unchanged through fit and evaluate (round 3): a guide that observes
sites (auxiliary classifiers, as Pyro's CEVAE), model and guide networks registered under one
name, data in a dict, ``bdmc`` on a pair written as Pyro writes it, LOO under a point-mass guide,
a CPU run on a machine with CUDA, and pandas input."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule
from torch import nn

import lvmkit
from conftest import assert_close

# -- 1. a guide observing sites: an auxiliary q(y | x) is not a latent ----------------------------

# x = W z + ε, y = v·z + η, z ~ N(0, I): the exact posterior p(z | x, y) is Gaussian, so a guide
# proposing from it gives every draw the same weight, log p(x, y), to rounding.
W = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.0]])
V = torch.tensor([0.7, -0.4])
A = torch.cat([W, V[None]])  # (x, y) = A z + noise
COV = torch.linalg.inv(torch.eye(2) + A.T @ A)  # posterior covariance of z
GAIN = COV @ A.T  # posterior mean = GAIN @ (x, y)


def aux_model(x, y):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T, 1.0).to_event(1), obs=x)
        pyro.sample("y", dist.Normal(z @ V, 1.0), obs=y)


def aux_guide(x, y):
    """An auxiliary predictor of y from x (observed, as CEVAE's guide observes t and y; its
    parameter is trained by its own loss term), then the exact posterior of z."""
    slope = pyro.param("slope", torch.zeros(3))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ slope, 1.0), obs=y, infer={"is_auxiliary": True})
        loc = torch.cat([x, y[:, None]], dim=-1) @ GAIN.T
        pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(COV)))


def _aux_data(n=6):
    z = torch.randn(n, 2)
    return z @ W.T + torch.randn(n, 3), z @ V + torch.randn(n)


def _exact(x, y):
    joint = dist.MultivariateNormal(torch.zeros(4), A @ A.T + torch.eye(4))
    return joint.log_prob(torch.cat([x, y[:, None]], dim=-1))


def _pyro_elbo(model, guide, *args):
    """log p(all model sites) − log q(the guide's latent sites), from Pyro's own traces."""
    guide_trace = pyro.poutine.trace(guide).get_trace(*args)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(*args)
    log_p = sum(s["fn"].log_prob(s["value"]) for s in model_trace.nodes.values()
                if s["type"] == "sample")  # fmt: skip
    log_q = sum(s["fn"].log_prob(s["value"]) for s in guide_trace.nodes.values()
                if s["type"] == "sample" and not s["is_observed"])  # fmt: skip
    return log_p - log_q


def test_observed_guide_sites_are_left_out_of_log_q():
    """Counting q(y | x) in log q took it off every weight: ELBO and log-likelihood were
    log p(x, y) − log q(y | x). IS, AIS, the gap split and ArviZ's log weights now give
    log p(x, y) itself, as Pyro's traces do."""
    x, y = _aux_data()
    pyro.param("slope", torch.tensor([0.3, -0.2, 0.5]))
    exact = _exact(x, y)
    assert_close(_pyro_elbo(aux_model, aux_guide, x, y), exact, atol=1e-4)
    scores = lvmkit.evaluate(aux_model, aux_guide, (x, y), num_samples=8)
    assert_close(scores.elbo.to_numpy().copy(), exact, atol=1e-4)
    assert_close(scores.log_likelihood.to_numpy().copy(), exact, atol=1e-4)
    annealed = lvmkit.evaluate(aux_model, aux_guide, (x, y), num_samples=2, method="ais",
                               num_steps=5)  # fmt: skip
    assert_close(annealed.log_likelihood.to_numpy().copy(), exact, atol=1e-4)
    split = lvmkit.gap_split(aux_model, aux_guide, (x, y), log_likelihood=exact.numpy())
    assert_close(split.elbo.to_numpy().copy(), exact, atol=1e-4)
    data = lvmkit.to_inference_data(aux_model, aux_guide, (x, y), num_samples=4)
    assert "y" not in data.posterior and "z" in data.posterior
    assert_close(data.sample_stats.log_weight.values[0], exact.expand(4, -1), atol=1e-4)


# -- 2. model and guide networks under one name (Pyro's CEVAE) ------------------------------------


class _Net(nn.Module):
    def __init__(self, inputs, outputs=1):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(inputs, 8), nn.ELU(), nn.Linear(8, outputs))

    def forward(self, x):
        return self.fc(x).squeeze(-1)


class CevaeModel(PyroModule):
    """As Pyro's contributed CEVAE: z → x, t, y; y's network split by the treatment t."""

    def __init__(self, features=4, latent=2):
        super().__init__()
        self.latent = latent
        self.x_nn = _Net(latent, features)
        self.t_nn = _Net(latent)
        self.y0_nn = _Net(latent)
        self.y1_nn = _Net(latent)

    def forward(self, x, t, y):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent]).to_event(1))
            pyro.sample("x", dist.Normal(self.x_nn(z), 1.0).to_event(1), obs=x)
            t = pyro.sample("t", dist.Bernoulli(logits=self.t_nn(z)), obs=t)
            loc = torch.where(t.bool(), self.y1_nn(z), self.y0_nn(z))
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)


class CevaeGuide(PyroModule):
    """Auxiliary classifiers q(t | x), q(y | t, x) under the model's network names, then q(z)."""

    def __init__(self, features=4, latent=2):
        super().__init__()
        self.t_nn = _Net(features)
        self.y0_nn = _Net(features)
        self.y1_nn = _Net(features)
        self.z_nn = _Net(features + 2, 2 * latent)

    def forward(self, x, t, y):
        with pyro.plate("data", x.shape[0]):
            t = pyro.sample("t", dist.Bernoulli(logits=self.t_nn(x)), obs=t,
                            infer={"is_auxiliary": True})  # fmt: skip
            loc = torch.where(t.bool(), self.y1_nn(x), self.y0_nn(x))
            y = pyro.sample("y", dist.Normal(loc, 1.0), obs=y, infer={"is_auxiliary": True})
            out = self.z_nn(torch.cat([x, t[..., None], y[..., None]], dim=-1))
            z_loc, z_scale = out.chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(z_loc, nn.functional.softplus(z_scale)).to_event(1))


def _cevae_data(n=64):
    z = torch.randn(n, 2)
    x = z @ torch.randn(2, 4) + 0.5 * torch.randn(n, 4)
    t = torch.bernoulli(torch.sigmoid(z[:, 0]))
    y = z[:, 1] + 2 * t + 0.3 * torch.randn(n)
    return x, t, y


def test_networks_sharing_a_name_in_model_and_guide_train_as_pyro_trains_them():
    """Pyro's CEVAE registers t_nn, y0_nn and y1_nn in both its model and its guide. Pyro trains
    the guide's (the first to reach the param store in a step); the model's computes with its
    initial weights. fit refused the pair, telling the user to clear a store already clear; it
    now trains it to Pyro's losses, step for step, and says once what the clash means."""
    from pyro.contrib.cevae import TraceCausalEffect_ELBO

    x, t, y = _cevae_data()
    model, guide = CevaeModel(), CevaeGuide()
    model_copy, guide_copy = CevaeModel(), CevaeGuide()
    model_copy.load_state_dict(model.state_dict())
    guide_copy.load_state_dict(guide.state_dict())
    initial_t = model.t_nn.fc[0].weight.detach().clone()

    with pytest.warns(RuntimeWarning, match=r"model and the guide both register.*'t_nn"):
        result = lvmkit.fit(
            model, guide, (x, t, y), epochs=4, batch_size=None, seed=1, progress=False,
            optimizer=pyro.optim.Adam({"lr": 0.01}), objective=TraceCausalEffect_ELBO(),
            device="cpu",
        )  # fmt: skip
    assert torch.equal(model.t_nn.fc[0].weight, initial_t)  # as in Pyro: the guide's is trained
    assert not torch.equal(guide.t_nn.fc[0].weight, guide_copy.t_nn.fc[0].weight)

    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    svi = pyro.infer.SVI(model_copy, guide_copy, pyro.optim.Adam({"lr": 0.01}),
                         TraceCausalEffect_ELBO())  # fmt: skip
    losses = [svi.step(x, t, y) / len(x) for _ in range(4)]
    assert_close(result.history.train_loss.to_numpy().copy(), losses, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(guide.parameters(), guide_copy.parameters(), strict=True):
        assert_close(ours.detach(), theirs.detach(), atol=1e-6)


def test_compiled_steps_of_a_pair_sharing_names_match_its_eager_steps():
    """The shared-name pair compiles too (TraceCausalEffect_ELBO's own ``torch_item`` is kept on
    the device during the capture, wherever an objective imported it): the same losses as the
    eager steps, the model's same-named networks untouched."""
    from pyro.contrib.cevae import TraceCausalEffect_ELBO

    x, t, y = _cevae_data()
    runs = []
    for compile_ in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model, guide = CevaeModel(), CevaeGuide()
        initial_t = model.t_nn.fc[0].weight.detach().clone()
        with pytest.warns(RuntimeWarning, match="'t_nn'"):
            runs.append(lvmkit.fit(model, guide, (x, t, y), epochs=3, batch_size=16,
                                   progress=False, objective=TraceCausalEffect_ELBO(),
                                   compile=compile_))  # fmt: skip
        assert torch.equal(model.t_nn.fc[0].weight, initial_t)
    assert runs[1].compiled and not runs[0].compiled
    assert_close(runs[1].history.train_loss.to_numpy().copy(),
                 runs[0].history.train_loss.to_numpy().copy(), rtol=1e-4)  # fmt: skip


# -- 3. data in dicts: the loss per point ---------------------------------------------------------


def dict_model(prior, obs, num_obs):
    """Global prior tensors in one dict, per-observation tensors in another, a count."""
    loc = pyro.sample("loc", dist.Normal(prior["loc"], prior["scale"]))
    with pyro.plate("obs", num_obs):
        pyro.sample("y", dist.Normal(loc + obs["shift"], 1.0), obs=obs["y"])


def dict_guide(prior, obs, num_obs):
    mean = pyro.param("mean", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("loc", dist.Normal(mean, scale))


def test_a_loss_on_data_in_dicts_is_per_point_as_evaluate_counts_them():
    """No per-point tensor at the top level: the points were counted as 1, and train_loss was
    the whole data's loss (1,000 times Pyro's per-observation loss here). Both fit and evaluate
    count the data plate's points now."""
    n = 1000
    obs = {"shift": torch.randn(n), "y": torch.randn(n) + 2.0}
    prior = {"loc": torch.tensor(0.0), "scale": torch.tensor(5.0)}
    data = (prior, obs, n)
    result = lvmkit.fit(dict_model, dict_guide, data, epochs=3, batch_size=None, seed=1, lr=0.05,
                        progress=False, device="cpu")  # fmt: skip
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    svi = pyro.infer.SVI(dict_model, dict_guide, pyro.optim.Adam({"lr": 0.05}),
                         pyro.infer.Trace_ELBO())  # fmt: skip
    losses = [svi.step(*data) / n for _ in range(3)]
    assert_close(result.history.train_loss.to_numpy().copy(), losses, rtol=1e-5)
    assert len(lvmkit.evaluate(dict_model, dict_guide, data, num_samples=4)) == n


def test_points_that_cannot_be_counted_are_said_so():
    def unplated(obs):
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        pyro.sample("y", dist.Normal(loc, 1.0).expand([len(obs["y"])]).to_event(1), obs=obs["y"])

    def guide(obs):
        pyro.sample("loc", dist.Normal(pyro.param("mean", torch.tensor(0.0)), 1.0))

    with pytest.warns(RuntimeWarning, match="cannot tell how many data points.*whole data"):
        lvmkit.fit(unplated, guide, ({"y": torch.randn(20)},), epochs=1, batch_size=None,
                   progress=False)  # fmt: skip


# -- 4. bdmc on a pair written as Pyro writes it --------------------------------------------------

LOADINGS = torch.tensor([[1.5, 0.0], [0.4, -1.2], [-0.8, 0.9], [0.3, 0.2], [1.0, 1.0]])


def pyro_style_model(x):
    """As Pyro's vae.py: called model(x), the data observed as "obs" on a reshaped view."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("latent", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("obs", dist.Normal(z @ LOADINGS.T, 0.3).to_event(1), obs=x.reshape(-1, 5))


class PyroStyleGuide(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(5, 4)

    def forward(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("latent", dist.Normal(loc, log_scale.exp()).to_event(1))


def test_bdmc_brackets_a_pair_that_is_called_as_pyro_calls_it():
    """bdmc called model(x=None, batch_size=n): a TypeError for any model written as Pyro's
    examples write them. With the data as a template, the model runs with its observed sites
    unconditioned and the simulated values replace the argument they read."""
    template = torch.zeros(6, 5)
    sandwich = lvmkit.bdmc(pyro_style_model, PyroStyleGuide(), template, num_samples=4,
                           num_steps=100)  # fmt: skip
    simulated = sandwich.attrs["data"]
    assert simulated.shape == (6, 5) and not torch.equal(simulated, template)
    cov = 0.09 * torch.eye(5) + LOADINGS @ LOADINGS.T
    exact = dist.MultivariateNormal(torch.zeros(5), cov).log_prob(simulated)
    lower, upper = sandwich.lower.mean(), sandwich.upper.mean()
    assert lower <= float(exact.mean()) <= upper
    assert upper - lower < 3
    with pytest.raises(ValueError, match=r"site 'obs' observes a tensor that is none of"):
        lvmkit.bdmc(lambda x: pyro_style_model(x + 0.0), PyroStyleGuide(), template,
                    num_samples=2, num_steps=2)  # fmt: skip
    with pytest.raises(TypeError, match=r"model\(x=None, batch_size=n\).*as a template"):
        lvmkit.bdmc(pyro_style_model, PyroStyleGuide(), num_samples=2, num_steps=2)


# -- 5. LOO under a point-mass guide --------------------------------------------------------------

GMM_DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])


@pyro.infer.config_enumerate
def gmm(data):
    """Pyro's GMM tutorial, as byom.md shows it."""
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(2)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def test_loo_under_a_point_mass_guide_is_warned_and_a_guide_with_spread_gives_one():
    """az.loo on an AutoDelta's draws: p_loo 0 and k̂ infinite on every point, without a word.
    to_inference_data now warns and records it; AutoNormal over the same globals gives a LOO."""
    import arviz as az
    from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value

    global_sites = pyro.poutine.block(gmm, expose=["weights", "locs", "scale"])
    start = init_to_value(values={"locs": GMM_DATA[[0, -1]]})
    options = dict(batch_size=None, progress=False,
                   objective=pyro.infer.TraceEnum_ELBO(max_plate_nesting=1))  # fmt: skip
    point = AutoDelta(global_sites, init_loc_fn=start)
    lvmkit.fit(gmm, point, GMM_DATA, epochs=200,
               optimizer=pyro.optim.Adam({"lr": 0.1, "betas": [0.8, 0.99]}), **options)  # fmt: skip
    assert_close(point.median(GMM_DATA)["locs"], [0.5, 11.0], atol=0.05)  # Pyro's tutorial's
    with pytest.warns(RuntimeWarning, match=r"same value in every draw.*point mass.*AutoNormal"):
        idata = lvmkit.to_inference_data(gmm, point, GMM_DATA, num_samples=20)
    assert idata.log_likelihood.attrs["point_mass_guide"] == 1

    spread = AutoNormal(global_sites, init_loc_fn=start)
    lvmkit.fit(gmm, spread, GMM_DATA, epochs=300, optimizer=pyro.optim.Adam({"lr": 0.05}),
               **options)  # fmt: skip
    idata = lvmkit.to_inference_data(gmm, spread, GMM_DATA, num_samples=200)
    assert idata.log_likelihood.attrs["point_mass_guide"] == 0
    with pytest.warns(UserWarning, match="Pareto"):  # five points: some k̂ are high, rightly
        loo = az.loo(idata, pointwise=True)
    assert loo.p_loo > 0.5 and np.isfinite(loo.pareto_k.values).all()  # (AutoDelta: 0, inf)


# -- 6. a CPU run on a machine with CUDA ----------------------------------------------------------


def test_a_cpu_run_on_a_machine_with_cuda_never_touches_it(monkeypatch, tmp_path):
    """fork_rng with every visible CUDA device initialised CUDA (a context and its memory) for a
    run whose data and pair are all on the CPU. A machine with one GPU, stood in for: any call
    that would initialise CUDA or read its random state fails the test."""

    import torch._dynamo  # (its rules index torch's functions: loaded before they are replaced)

    def touching(name):
        def touched(*args, **kwargs):
            raise AssertionError(f"a CPU run called torch.cuda.{name}")

        return touched

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for name in (
        "init", "_lazy_init", "get_rng_state", "set_rng_state", "current_device",
        "get_rng_state_all", "set_rng_state_all", "synchronize", "mem_get_info",
    ):  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, touching(name))
    x, y = _aux_data(20)
    result = lvmkit.fit(aux_model, aux_guide, (x, y), epochs=2, batch_size=10, progress=False,
                        run_dir=tmp_path / "run")  # fmt: skip
    assert result.history.train_loss.notna().all()
    lvmkit.evaluate(aux_model, aux_guide, (x, y), num_samples=4)
    lvmkit.evaluate(aux_model, aux_guide, (x, y), num_samples=2, method="ais", num_steps=3)
    lvmkit.to_inference_data(aux_model, aux_guide, (x, y), num_samples=3)
    lvmkit.bdmc(aux_model, aux_guide, (x, y), num_samples=2, num_steps=3)


# -- 9. pandas ------------------------------------------------------------------------------------


def test_a_numeric_dataframe_is_taken_as_its_values_and_a_text_column_is_named(caplog):
    import pandas as pd

    x, y = _aux_data(8)
    frame = pd.DataFrame(x.numpy(), columns=["height", "weight", "age"])
    series = pd.Series(y.numpy(), name="income")
    expected = lvmkit.evaluate(aux_model, aux_guide, (x, y), num_samples=4)
    with caplog.at_level("WARNING", logger="lvmkit"):
        scores = lvmkit.evaluate(aux_model, aux_guide, (frame, series), num_samples=4)
    assert "['height', 'weight', 'age'] in that order" in caplog.text
    assert_close(scores.elbo.to_numpy().copy(), expected.elbo.to_numpy().copy())
    lvmkit.fit(aux_model, aux_guide, {"x": frame, "y": series}, epochs=1, batch_size=4,
               progress=False)  # fmt: skip
    mixture = lvmkit.GaussianMixture(2, max_iter=20).fit(frame)  # scikit-learn users pass frames
    assert mixture.predict(frame).shape == (8,)
    frame["city"] = ["Seoul", "Paris"] * 4
    with pytest.raises(TypeError, match=r"data\[0\] must be numeric, but column 'city' has dtype"):
        lvmkit.evaluate(aux_model, aux_guide, (frame, series), num_samples=4)
    with pytest.raises(TypeError, match=r"must be numeric, but column 'city'"):
        lvmkit.GaussianMixture(2, max_iter=20).fit(frame)
