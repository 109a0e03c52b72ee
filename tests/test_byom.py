"""Bring your own model: the ten findings of running Pyro users' pairs through lvmkit, each
checked (every test here failed before the reshape), and the conventions that fixed them."""

from __future__ import annotations

import functools
import logging
import math
import types
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta

import lvmkit
from conftest import assert_close
from lvmkit.inference.loop import epoch_order
from lvmkit.inference.weights import import_arviz

# -- 1. pyro.markov -------------------------------------------------------------------------

T = 3


def walk_model(x):
    """A Gaussian random walk z_0 … z_{T−1} observed with unit noise, in a pyro.markov loop."""
    with pyro.plate("data", x.shape[0]):
        z = x.new_zeros(x.shape[0])
        for t in pyro.markov(range(T)):
            z = pyro.sample(f"z_{t}", dist.Normal(z, 1.0))
            pyro.sample(f"x_{t}", dist.Normal(z, 1.0), obs=x[:, t])


def walk_guide(x):
    loc = pyro.param("loc", torch.zeros(T))
    with pyro.plate("data", x.shape[0]):
        for t in pyro.markov(range(T)):
            pyro.sample(f"z_{t}", dist.Normal(loc[t] + 0.5 * x[:, t], 1.0))


def walk_log_likelihood(x):
    """Exact: z = cumsum of N(0, 1) steps, so Cov(z_s, z_t) = min(s, t) + 1; x = z + noise."""
    idx = torch.arange(T)
    cov = torch.minimum(idx[:, None], idx[None, :]).float() + 1 + torch.eye(T)
    return dist.MultivariateNormal(torch.zeros(T), cov).log_prob(x)


def test_markov_models_evaluate_train_and_convert():
    x = torch.randn(6, T) * 2
    scores = lvmkit.evaluate(walk_model, walk_guide, x, num_samples=4000)
    assert_close(scores.log_likelihood, walk_log_likelihood(x), atol=0.08, rtol=0)
    idata = lvmkit.to_inference_data(walk_model, walk_guide, x, num_samples=20)
    assert dict(idata.posterior["z_2"].sizes) == {"chain": 1, "draw": 20, "point": 6}
    for objective in ("elbo", "iwae", "rws"):
        result = lvmkit.fit(
            walk_model, walk_guide, x, epochs=2, batch_size=3, objective=objective,
            num_particles=1 if objective == "elbo" else 4, validation_data=x[:2],
            device="cpu", progress=False,
        )  # fmt: skip
        assert result.history.val_elbo.notna().all(), objective


# -- 2. the loss per point is not divided by a poutine.scale ----------------------------------


def test_train_loss_counts_points_whatever_scale_an_observed_site_carries():
    """An auxiliary term ×46 on an observed site (the SS-VAE's) weights the loss; it does not
    change how many points the loss stands for (it used to divide the reported loss by 46)."""
    x, y = torch.randn(20), torch.randn(20)

    def model(x, y):
        loc = pyro.param("loc", torch.tensor(0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)
            with poutine.scale(scale=46.0):
                pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    def guide(x, y):
        pass

    result = lvmkit.fit(
        model, guide, {"x": x, "y": y}, epochs=1, batch_size=20, lr=1e-6, device="cpu",
        progress=False,
    )  # fmt: skip
    expected = -(dist.Normal(0.5, 1.0).log_prob(x) + 46 * dist.Normal(0.5, 1.0).log_prob(y))
    assert result.history.train_loss.iloc[0] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_a_plate_declaring_the_full_size_counts_it():
    """pyro.plate("data", N, subsample=...) given minibatches: each minibatch's loss stands for
    N points, so the loss per point is the epoch's sum over steps / (steps × N)."""
    x = torch.randn(40)
    n_total = len(x)

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", n_total, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pass

    result = lvmkit.fit(model, guide, x, epochs=1, batch_size=10, lr=1e-9, device="cpu",
                        progress=False)  # fmt: skip
    expected = -dist.Normal(0.0, 1.0).log_prob(x).mean()  # each minibatch ×4, four steps
    assert result.history.train_loss.iloc[0] == pytest.approx(float(expected), rel=1e-5)


# -- 3. models that do not broadcast over particles ------------------------------------------


def _masked_pair(w: torch.Tensor, sigma: float, observed: torch.Tensor):
    """z ~ N(0, 1); the observed coordinates x[:, observed] ~ N(z·w, σ²), picked with a boolean
    mask as Pyro's CVAE does; the guide is the exact posterior, so every weight is log p(x)."""
    w_obs = w[observed]

    def model(x):
        bias = pyro.param("bias", torch.tensor(0.0))  # (0 until trained: the weights stay exact)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = z[..., None] * w + bias  # (…, n, D)
            mask = observed.expand(x.shape)
            picked = loc[mask].view(x.shape[0], -1)  # fails with a particle dim in front
            pyro.sample("x", dist.Normal(picked, sigma).to_event(1), obs=x[mask].view(len(x), -1))

    def guide(x):
        precision = 1 + (w_obs**2).sum() / sigma**2
        mean = (x[:, observed] @ w_obs) / sigma**2 / precision
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean, precision**-0.5))

    def exact(x):
        cov = torch.outer(w_obs, w_obs) + sigma**2 * torch.eye(len(w_obs))
        return dist.MultivariateNormal(torch.zeros(len(w_obs)), cov).log_prob(x[:, observed])

    return model, guide, exact


def test_boolean_mask_selection_runs_its_particles_in_sequential_passes(caplog):
    w, observed = torch.tensor([1.0, -0.5, 2.0, 0.3]), torch.tensor([True, False, True, True])
    model, guide, exact = _masked_pair(w, 0.5, observed)
    x = torch.randn(9, 4)
    with caplog.at_level(logging.WARNING, logger="lvmkit"):
        scores = lvmkit.evaluate(model, guide, x, num_samples=30, max_pairs=16)
    assert "sequential passes" in caplog.text
    assert_close(scores.log_likelihood, exact(x), atol=1e-4, rtol=0)
    assert_close(scores.elbo, exact(x), atol=1e-4, rtol=0)  # an exact guide: no gap
    result = lvmkit.fit(model, guide, x, epochs=1, batch_size=3, num_particles=4,
                        device="cpu", progress=False)  # fmt: skip
    assert np.isfinite(result.history.train_loss).all()


def test_sequential_and_vectorised_particles_agree():
    from linear_gaussian import LinearGaussianGuide, make_problem

    model, x = make_problem(n=8)
    guide = LinearGaussianGuide(5, 2).set_exact(model)
    vectorised = lvmkit.evaluate(model, guide, x, num_samples=25, vectorize_particles=True)
    sequential = lvmkit.evaluate(model, guide, x, num_samples=25, vectorize_particles=False)
    assert_close(vectorised.log_likelihood, sequential.log_likelihood, atol=1e-4, rtol=0)
    assert_close(sequential.log_likelihood, model.exact_log_prob(x), atol=1e-4, rtol=0)


# -- 4. seeds ----------------------------------------------------------------------------------


def _mixture(data):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights),
                                 infer={"enumerate": "parallel"})  # fmt: skip
        pyro.sample("obs", dist.Normal(locs[assignment], 1.0), obs=data)


def _lazy_guide(data):
    def init_loc_fn(site):
        if site["name"] == "weights":
            return torch.ones(2) / 2
        return data[torch.multinomial(torch.ones(len(data)) / len(data), 2)]  # random: seeded

    return AutoDelta(poutine.block(_mixture, expose=["weights", "locs"]), init_loc_fn=init_loc_fn)


def _initial_locs(seed, data):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = _lazy_guide(data)
    with torch.no_grad():
        guide(data)
    return guide.median(data)["locs"]


def test_a_lazily_initialised_guide_keeps_the_users_initialisation():
    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0, 30.0])
    user_seed = next(s for s in range(1, 50) if not torch.equal(
        _initial_locs(s, data), _initial_locs(0, data)))  # fmt: skip
    expected = _initial_locs(user_seed, data)
    pyro.clear_param_store()
    pyro.set_rng_seed(user_seed)
    guide = _lazy_guide(data)
    lvmkit.fit(
        _mixture, guide, data, batch_size=None, epochs=1, seed=0, device="cpu", progress=False,
        objective=pyro.infer.TraceEnum_ELBO(max_plate_nesting=1),
        optimizer=pyro.optim.Adam({"lr": 1e-4}),
    )  # fmt: skip
    assert_close(guide.median(data)["locs"], expected, atol=1e-3)


def test_seed_none_leaves_the_random_state_to_the_user():
    x = torch.bernoulli(torch.full((32, 4), 0.4))

    def trained(user_seed, seed):
        pyro.set_rng_seed(0)
        model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
                                                         hidden_dims=(8,)))  # fmt: skip
        torch.manual_seed(user_seed)
        result = lvmkit.fit(model, guide, x, epochs=2, batch_size=8, seed=seed, device="cpu",
                            progress=False)  # fmt: skip
        return result.history.train_loss.tolist()

    assert trained(1, None) == trained(1, None)  # the user's seed decides
    assert trained(1, None) != trained(2, None)
    assert trained(1, 0) == trained(2, 0)  # fit's seed decides


# -- 5. the data interface ---------------------------------------------------------------------


def _gaussian_loc():
    """x_n ~ N(loc, 1), loc a parameter starting at 0: the model(data) of a Pyro tutorial."""
    x = torch.linspace(-1, 3, 16)

    def model(data):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)

    def guide(data):
        pass

    return model, guide, x


def test_a_tensor_goes_first_to_a_model_without_an_x():
    model, guide, data = _gaussian_loc()  # model(data): no parameter named x
    data = data + 2.0
    lvmkit.fit(model, guide, data, epochs=150, batch_size=None, lr=0.1, device="cpu",
               progress=False)  # fmt: skip
    assert pyro.param("loc").item() == pytest.approx(float(data.mean()), abs=0.2)
    scores = lvmkit.evaluate(model, guide, data, num_samples=2)
    assert_close(scores.log_likelihood, dist.Normal(pyro.param("loc"), 1.0).log_prob(data),
                 atol=1e-5)  # fmt: skip


def test_tuples_dicts_and_arguments_that_are_not_per_point():
    x, y = torch.randn(24, 3), torch.randn(24)
    args = types.SimpleNamespace(noise=0.5)
    net = torch.nn.Linear(3, 1)
    seen = []

    def model(features, targets, args, width, layer):
        pyro.module("layer", layer)
        seen.append((width, args.noise, layer is net, features.shape[0]))
        with pyro.plate("rows", features.shape[0]):
            pyro.sample("t", dist.Normal(layer(features).squeeze(-1), args.noise), obs=targets)

    def guide(features, targets, args, width, layer):
        pass

    result = lvmkit.fit(model, guide, (x, y, args, 7, net), epochs=2, batch_size=8,
                        device="cpu", progress=False)  # fmt: skip
    assert {s[:3] for s in seen} == {(7, 0.5, True)} and {s[3] for s in seen} >= {8}
    assert len(result.history) == 2
    as_dict = {"features": x, "targets": y, "args": args, "width": 7, "layer": net}
    scores = lvmkit.evaluate(model, guide, as_dict, num_samples=2)
    expected = dist.Normal(net(x).squeeze(-1), 0.5).log_prob(y).detach()
    assert_close(scores.log_likelihood, expected, atol=1e-5)


def test_a_model_that_subsamples_itself_gets_the_whole_data():
    x = torch.randn(50) + 2.0

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x), subsample_size=10) as index:
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=x[index])

    def guide(x):
        with pyro.plate("data", len(x), subsample_size=10):
            pass

    result = lvmkit.fit(model, guide, x, batch_size=None, epochs=60, lr=0.1, device="cpu",
                        progress=False)  # fmt: skip
    loc = pyro.param("loc").detach()
    assert loc.item() == pytest.approx(float(x.mean()), abs=0.3)
    assert result.history.train_loss.iloc[-1] == pytest.approx(
        float(-dist.Normal(loc, 1.0).log_prob(x).mean()), abs=0.5
    )  # per point: a subsample of 10 stands for the 50
    scores = lvmkit.evaluate(model, guide, x, num_samples=2, max_pairs=8)  # chunks: its indices
    assert_close(scores.log_likelihood, dist.Normal(loc, 1.0).log_prob(x), atol=1e-5)


def test_several_sources_each_pass_once_an_epoch_by_default():
    big, small = torch.randn(100, 2), torch.randn(25, 2)
    sizes = []

    def model(x, tag=None):
        loc = pyro.param("loc", torch.zeros(2))
        sizes.append((tag, x.shape[0]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x, tag=None):
        pass

    sources = [lvmkit.Source({"x": big, "tag": "big"}, batch_size=10),
               lvmkit.Source({"x": small, "tag": "small"})]  # fmt: skip
    result = lvmkit.fit(model, guide, sources, epochs=2, device="cpu", progress=False)
    per_epoch = [s for s in sizes[-20:]]  # the second epoch: 10 steps of each source
    assert [s for s in per_epoch if s[0] == "big"] == [("big", 10)] * 10
    assert sum(n for tag, n in per_epoch if tag == "small") == 25  # 3 a step, passed once
    assert result.history.train_loss.notna().all()


def test_a_signature_that_does_not_fit_the_data_names_both():
    def model(mini_batch, mini_batch_mask):
        pass

    with pytest.raises(TypeError, match=r"model\(mini_batch, mini_batch_mask\) cannot be called"
                       r".*missing a required argument: 'mini_batch_mask'"):  # fmt: skip
        lvmkit.fit(model, model, torch.zeros(8, 2), epochs=1, progress=False)


# -- 6. the data plate's name --------------------------------------------------------------------


def _documents(counts):
    loc = pyro.param("loc", torch.zeros(3))
    # (an inner plate "words"; the points are documents)
    with pyro.plate("words", 3), pyro.plate("documents", counts.shape[0], dim=-2):
        pyro.sample("c", dist.Poisson(loc.exp()), obs=counts)


def _no_guide(counts):
    pass


def test_the_plate_over_the_points_is_found_or_named():
    counts = torch.poisson(torch.full((7, 3), 2.0))
    found = lvmkit.evaluate(_documents, _no_guide, counts, num_samples=2)
    named = lvmkit.evaluate(_documents, _no_guide, counts, num_samples=2, data_plate="documents")
    expected = dist.Poisson(torch.ones(3)).log_prob(counts).sum(-1)
    assert_close(found.log_likelihood, expected, atol=1e-5)
    assert_close(named.log_likelihood, expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"data_plate='data'.*its plates: .*'documents'"):
        lvmkit.evaluate(_documents, _no_guide, counts, num_samples=2, data_plate="data")


# -- 7. any optimizer ----------------------------------------------------------------------------


def test_a_torch_optimizer_class_with_its_arguments():
    model, guide, x = _gaussian_loc()
    lvmkit.fit(model, guide, x, epochs=1, batch_size=None, optimizer=torch.optim.SGD,
               optimizer_args={"momentum": 0.9}, lr=0.01, device="cpu", progress=False)  # fmt: skip
    # one SGD step on −Σ log N(x; loc, 1) from loc = 0: loc ← 0.01 · Σ x
    assert pyro.param("loc").item() == pytest.approx(0.01 * float(x.sum()), rel=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: pyro.optim.Adam({"lr": 0.05, "betas": (0.8, 0.99)}),
        lambda: pyro.optim.ClippedAdam({"lr": 0.05, "clip_norm": 0.3, "lrd": 0.9}),
        lambda: pyro.optim.ExponentialLR(
            {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.01}, "gamma": 0.5}
        ),
    ],
    ids=["adam-betas", "clipped-adam", "exponential-lr"],
)
def test_a_pyro_optimizer_trains_as_pyros_own_loop(make):
    model, guide, x = _gaussian_loc()
    lvmkit.fit(model, guide, x, epochs=4, batch_size=None, optimizer=make(), device="cpu",
               progress=False)  # fmt: skip
    ours = pyro.param("loc").item()
    pyro.clear_param_store()
    optim = make()
    svi = pyro.infer.SVI(model, guide, optim, Trace_ELBO())
    for _ in range(4):
        svi.step(x)
        if isinstance(optim, pyro.optim.PyroLRScheduler):
            optim.step()  # Pyro's schedulers step once an epoch
    assert ours == pytest.approx(pyro.param("loc").item(), rel=1e-6)


def test_schedules_by_epoch_and_by_step_and_clipping():
    model, guide, x = _gaussian_loc()
    by_epoch = lvmkit.fit(
        model, guide, x, epochs=3, batch_size=8, lr=0.1, device="cpu", progress=False,
        scheduler=torch.optim.lr_scheduler.StepLR, scheduler_args={"step_size": 1, "gamma": 0.5},
    )  # fmt: skip
    assert by_epoch.history.lr.tolist() == pytest.approx([0.1, 0.05, 0.025])  # lr of each epoch
    pyro.clear_param_store()
    by_step = lvmkit.fit(
        model, guide, x, epochs=2, batch_size=8, lr=0.1, device="cpu", progress=False,
        scheduler=functools.partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5),
        scheduler_interval="step",
    )  # fmt: skip
    assert by_step.history.lr.tolist() == pytest.approx([0.1 * 0.5, 0.1 * 0.5**3])
    pyro.clear_param_store()
    lvmkit.fit(model, guide, x, epochs=1, batch_size=None, optimizer=torch.optim.SGD, lr=10.0,
               clip_norm=1e-3, device="cpu", progress=False)  # fmt: skip
    assert abs(pyro.param("loc").item()) == pytest.approx(10.0 * 1e-3, rel=1e-4)


def _small_vae_fit(x, run_dir, epochs, resume, user_seed=None, **options):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=5, latent_dim=2, hidden_dims=(8,)))
    if user_seed is not None:
        torch.manual_seed(user_seed)
    return lvmkit.fit(model, guide, x, epochs=epochs, batch_size=8, run_dir=run_dir,
                      resume=resume, device="cpu", progress=False, **options)  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": pyro.optim.ClippedAdam({"lr": 0.01, "clip_norm": 1.0, "lrd": 0.99})},
        {"lr": 0.01, "scheduler": torch.optim.lr_scheduler.StepLR,
         "scheduler_args": {"step_size": 1, "gamma": 0.7}},
        {"lr": 0.01, "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau,
         "scheduler_args": {"patience": 0, "factor": 0.5, "threshold": 1.0,
                            "threshold_mode": "abs"}},  # no epoch gains a nat: lr halves
    ],
    ids=["clipped-adam", "step-lr", "plateau"],
)  # fmt: skip
def test_resume_is_exact_with_any_optimizer_and_schedule(tmp_path, options):
    x = torch.bernoulli(torch.full((40, 5), 0.3))

    def run(run_dir, epochs, resume=False):
        return _small_vae_fit(x, run_dir, epochs, resume, **options)

    reference = run(tmp_path / "ref", 4)
    run(tmp_path / "run", 2)
    resumed = run(tmp_path / "run", 4, resume=True)
    for name, value in reference.params.items():
        assert torch.equal(value, resumed.params[name]), name
    assert resumed.history.lr.tolist() == reference.history.lr.tolist()
    assert len(set(reference.history.lr)) > 1  # the schedule did change the lr


def test_an_optimizer_already_built_is_refused():
    model, guide, x = _gaussian_loc()
    built = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match=r"pass torch.optim.SGD and its settings"):
        lvmkit.fit(model, guide, x, optimizer=built, progress=False)
    with pytest.raises(ValueError, match=r"lr is set by the pyro.optim optimizer"):
        lvmkit.fit(model, guide, x, optimizer=pyro.optim.Adam({"lr": 0.1}), lr=0.1,
                   progress=False)  # fmt: skip


# -- 8. global latents ------------------------------------------------------------------------


def _hierarchical(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))  # a global latent
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def _mu_guide(x):
    loc = pyro.param("mu_loc", torch.tensor(0.0))
    scale = pyro.param("mu_scale", torch.tensor(0.5), constraint=dist.constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def test_minibatches_of_a_model_with_unscaled_global_latents_warn_once():
    x = torch.randn(40) + 1.0
    with pytest.warns(RuntimeWarning, match=r"global latent sites \['mu'\].*about 4 times") as rec:
        lvmkit.fit(_hierarchical, _mu_guide, x, epochs=2, batch_size=10, device="cpu",
                   progress=False)  # fmt: skip
    assert len([w for w in rec if "global latent" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lvmkit.fit(_hierarchical, _mu_guide, x, epochs=1, batch_size=None, device="cpu",
                   progress=False)  # fmt: skip


def test_global_latents_in_evaluate_and_in_arviz_loo():
    x = torch.tensor([0.5, 1.5, 2.0, -0.3])
    pyro.param("mu_loc", torch.tensor(1.0))
    pyro.param("mu_scale", torch.tensor(0.4), constraint=dist.constraints.positive)
    scores = lvmkit.evaluate(_hierarchical, _mu_guide, x, num_samples=4000)
    # log E_q(mu)[N(x_n; mu, 1)] = log N(x_n; 1, 1 + 0.4²)
    assert_close(scores.log_likelihood, dist.Normal(1.0, math.sqrt(1.16)).log_prob(x), atol=0.02)
    idata = lvmkit.to_inference_data(_hierarchical, _mu_guide, x, num_samples=200)
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "point")
    az = import_arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one chain
        assert math.isfinite(float(az.waic(idata).elpd_waic))
        assert math.isfinite(float(az.loo(idata).elpd_loo))


# -- 9. a stale param store -----------------------------------------------------------------


def _net_pair(net):
    def model(x):
        pyro.module("decoder", net)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(net(x), 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    return model, guide


def test_a_param_store_holding_another_networks_parameters_is_named():
    x = torch.randn(8, 3)
    lvmkit.fit(*_net_pair(torch.nn.Linear(3, 3)), x, epochs=1, progress=False)
    bigger = torch.nn.Sequential(torch.nn.Linear(3, 3))  # "decoder$$$0.weight": a new name
    lvmkit.fit(*_net_pair(bigger), x, epochs=1, progress=False)
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 3))
    with pytest.raises(
        ValueError,
        match=r"already holds 'decoder\$\$\$0.weight' with shape "
        r"\(3, 3\).*pyro.module\('decoder'.*shape \(5, 3\).*clear_param_store",
    ):
        lvmkit.fit(*_net_pair(other), x, epochs=1, progress=False)
    same = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.warns(RuntimeWarning, match=r"same shape.*clear_param_store"):
        lvmkit.fit(*_net_pair(same), x, epochs=1, progress=False)


# -- 10. compile falls back on every capture failure ---------------------------------------


def test_compile_falls_back_when_a_traced_graph_does_not_fit_a_later_minibatch():
    """The model keeps the time steps some sequence of the minibatch reaches (a boolean mask: a
    shape that depends on the data's values, as a DMM's does): a graph captured on a minibatch
    with a long sequence would not fit one of short sequences, so none is used."""
    n, t_max, batch = 16, 6, 4
    lengths = torch.full((n,), 2)
    lengths[epoch_order(0, 1, n)[0]] = t_max  # the first minibatch holds a long sequence
    seqs = torch.randn(n, t_max)

    def model(seqs, lengths):
        loc = pyro.param("loc", torch.tensor(0.0))
        reached = (lengths[None, :] > torch.arange(seqs.shape[1])[:, None]).any(dim=1)
        window = seqs[:, reached]  # (n, steps reached)
        with pyro.plate("data", seqs.shape[0]):
            for t in range(window.shape[1]):
                pyro.sample(f"x_{t}", dist.Normal(loc, 1.0).mask(lengths > t), obs=window[:, t])

    def guide(seqs, lengths):
        pass

    with pytest.warns(RuntimeWarning, match=r"compile=True.*depends on the data's values"):
        traced = lvmkit.fit(model, guide, (seqs, lengths), epochs=2, batch_size=batch,
                            compile=True, device="cpu", progress=False)  # fmt: skip
    pyro.clear_param_store()
    eager = lvmkit.fit(model, guide, (seqs, lengths), epochs=2, batch_size=batch, device="cpu",
                       progress=False)  # fmt: skip
    assert not traced.compiled
    assert_close(traced.history.train_loss, eager.history.train_loss, rtol=1e-6)


def test_compile_falls_back_for_arguments_that_are_not_tensors():
    model, guide, x = _gaussian_loc()

    def with_options(x, options):
        return model(x)

    def guide_with_options(x, options):
        return guide(x)

    options = types.SimpleNamespace(verbose=False)
    with pytest.warns(RuntimeWarning, match=r"not all tensors \(SimpleNamespace\)"):
        result = lvmkit.fit(with_options, guide_with_options, (x, options), epochs=1,
                            compile=True, device="cpu", progress=False)  # fmt: skip
    assert not result.compiled


def test_a_model_computing_a_plausible_but_wrong_shape_with_particles_is_caught():
    """The GMM tutorial's locs[assignment] runs with a particle plate (locs batched over
    particles, indexed along the particle dim instead of the components) and gives values of a
    plausible shape that Pyro's checks let through; the probe's strict shape check refuses it, so
    that evaluation and fit's num_particles > 1 draw particles one by one instead."""
    from lvmkit.inference.calls import as_data
    from lvmkit.inference.layout import broadcasts, find_layout

    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])
    pyro.set_rng_seed(4)
    guide = _lazy_guide(data)
    call = as_data(data, _mixture)
    with torch.no_grad():
        guide(data)  # (initialised)
        layout = find_layout(_mixture, guide, call, vectorize=False)
    assert layout.global_sites == ("locs", "weights") and layout.point_masses
    assert not broadcasts(_mixture, guide, call, layout)
    from linear_gaussian import LinearGaussianGuide, make_problem

    model, x = make_problem(n=4)
    exact = LinearGaussianGuide(5, 2).set_exact(model)
    assert broadcasts(model, exact, as_data(x, model), find_layout(model, exact, as_data(x, model)))


def test_a_run_started_with_seed_none_resumes_with_its_own_seed(tmp_path):
    x = torch.bernoulli(torch.full((40, 5), 0.3))

    def run(run_dir, epochs, resume=False):
        # the user's stream after building: the data order's seed is drawn from it
        return _small_vae_fit(x, run_dir, epochs, resume, user_seed=11, seed=None)

    reference = run(tmp_path / "ref", 3)
    run(tmp_path / "run", 1)
    resumed = run(tmp_path / "run", 3, resume=True)
    for name, value in reference.params.items():
        assert torch.equal(value, resumed.params[name]), name


def test_deterministic_sites_are_neither_data_nor_density():
    """pyro.deterministic records an observed site with no density, often outside any plate."""
    model, guide, x = _gaussian_loc()

    def recorded(data):
        pyro.deterministic("mean", data.mean())  # outside the plate
        model(data)

    scores = lvmkit.evaluate(recorded, guide, x, num_samples=2)
    assert_close(scores.log_likelihood, dist.Normal(0.0, 1.0).log_prob(x), atol=1e-6)
    idata = lvmkit.to_inference_data(recorded, guide, x, num_samples=2)
    assert "mean" not in idata.observed_data and "mean" not in idata.log_likelihood
