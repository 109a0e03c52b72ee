"""Pyro's own examples, as a Pyro user writes them, through lvmkit unchanged.

Each pair of :mod:`pairs` is trained by ``lvmkit.fit``, scored by ``lvmkit.evaluate`` and
converted by ``lvmkit.to_inference_data`` with no change to the model or guide, and its training
losses are checked against Pyro's own SVI loop run on the same initial weights and minibatches
(:mod:`reference`). "Within noise": the loops draw the same samples where they consume the random
stream alike, so their losses agree far closer than the stated tolerances; the tolerances allow
for the optimizers' float rounding (one torch optimizer over all parameters against Pyro's one
per parameter).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from sklearn.datasets import load_digits

import lvmkit
from conftest import assert_close
from lvmkit.inference.weights import import_arviz

from pairs import (  # isort: skip
    CVAE, DMM, GMM_DATA, SSVAE, VAE, dmm_data, dmm_minibatch, gmm_guide, gmm_model, norm_vae,
    quadrant_task,
)  # fmt: skip
from reference import pyro_loop, pyro_loop_interleaved, pyro_loop_two_sources  # isort: skip

az = import_arviz()


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8×8 digits, binarized at half intensity: (x, labels)."""
    data = load_digits()
    x = torch.as_tensor(data.data > 7, dtype=torch.float32)
    return x, torch.as_tensor(data.target)


def _twin(module: torch.nn.Module):
    """The same initial weights for Pyro's loop."""
    return copy.deepcopy(module)


def _close_losses(ours, pyros, rtol):
    ours, pyros = np.asarray(ours, dtype=float), np.asarray(pyros, dtype=float)
    assert np.allclose(ours, pyros, rtol=rtol), f"lvmkit {ours} vs Pyro {pyros}"


# -- examples/vae/vae.py --------------------------------------------------------------------


def test_vae_example(mnist_small):
    train, test = mnist_small
    x = torch.bernoulli(train.x[:512], generator=torch.Generator().manual_seed(0))
    pyro.set_rng_seed(1)
    vae = VAE(z_dim=8, hidden=64)
    twin = _twin(vae)
    result = lvmkit.fit(
        vae.model, vae.guide, x, epochs=3, batch_size=64, seed=0, device="cpu", progress=False,
        optimizer=pyro.optim.Adam({"lr": 1e-3}),
    )  # fmt: skip
    pyro.clear_param_store()
    theirs = pyro_loop(
        twin.model, twin.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(), [x],
        epochs=3, batch_size=64,
    )  # fmt: skip
    _close_losses(result.history.train_loss, theirs, rtol=1e-3)
    scores = lvmkit.evaluate(vae.model, vae.guide, test.x[:60], num_samples=50)
    summary = lvmkit.summarize(scores)
    assert summary.likelihood == "log p(x)" and summary.log_likelihood >= summary.elbo
    assert -summary.log_likelihood == pytest.approx(theirs[-1], rel=0.15)  # same scale as training
    idata = lvmkit.to_inference_data(vae.model, vae.guide, test.x[:10], num_samples=20)
    assert dict(idata.posterior["latent"].sizes) == {"chain": 1, "draw": 20, "point": 10,
                                                     "latent_dim_0": 8}  # fmt: skip
    assert dict(idata.log_likelihood["obs"].sizes) == {"chain": 1, "draw": 20, "point": 10}


@pytest.mark.parametrize(
    "make_optim",
    [
        lambda: pyro.optim.AdagradRMSProp({"eta": 0.05, "t": 0.1}),  # its rate is eta, not lr
        lambda: pyro.optim.ClippedAdam({"lr": 3e-3, "clip_norm": 5.0, "lrd": 0.999}),
    ],
    ids=["AdagradRMSProp", "ClippedAdam"],
)
def test_pyro_optimizers_whatever_they_call_their_rate(digits, make_optim):
    """examples/sparse_gamma_def.py trains with AdagradRMSProp, whose rate is ``eta``: fit
    reads no ``lr`` it does not have (it failed with KeyError: 'lr'), and trains as Pyro's loop."""
    x, _ = digits
    x = x[:256]
    pyro.set_rng_seed(1)
    vae = VAE(data_dim=64, z_dim=4, hidden=32)
    twin = _twin(vae)
    result = lvmkit.fit(
        vae.model, vae.guide, x, epochs=2, batch_size=64, seed=0, device="cpu", progress=False,
        optimizer=make_optim(),
    )  # fmt: skip
    pyro.clear_param_store()
    theirs = pyro_loop(
        twin.model, twin.guide, make_optim(), Trace_ELBO(), [x], epochs=2, batch_size=64
    )
    _close_losses(result.history.train_loss, theirs, rtol=1e-3)
    rate = make_optim().pt_optim_args.get("eta", 0.05)
    assert 0 < result.history.lr.iloc[0] <= rate  # the rate, under whatever name (lrd lowers it)


# -- examples/cvae/ ----------------------------------------------------------------------------


def test_cvae_example_with_its_boolean_mask(digits, caplog):
    images, _ = digits
    xs, ys = quadrant_task(images[:480], side=8)
    pyro.set_rng_seed(2)
    cvae = CVAE(data_dim=64, z_dim=4, hidden=32)
    twin = _twin(cvae)
    result = lvmkit.fit(
        cvae.model, cvae.guide, (xs, ys), epochs=3, batch_size=48, seed=0, device="cpu",
        progress=False, optimizer=pyro.optim.Adam({"lr": 1e-3}),
    )  # fmt: skip
    pyro.clear_param_store()
    theirs = pyro_loop(
        twin.model, twin.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(), [xs, ys],
        epochs=3, batch_size=48,
    )  # fmt: skip
    _close_losses(result.history.train_loss, theirs, rtol=1e-3)
    test_xs, test_ys = quadrant_task(images[1500:1560], side=8)
    with caplog.at_level("WARNING", logger="lvmkit"):
        scores = lvmkit.evaluate(cvae.model, cvae.guide, (test_xs, test_ys), num_samples=40)
    assert "sequential passes" in caplog.text  # loc[xs == -1] cannot take a particle dim
    summary = lvmkit.summarize(scores)
    assert np.isfinite(summary.log_likelihood) and summary.log_likelihood >= summary.elbo
    assert scores.shape[0] == 60
    idata = lvmkit.to_inference_data(cvae.model, cvae.guide, (test_xs[:8], test_ys[:8]),
                                     num_samples=10)  # fmt: skip
    assert dict(idata.posterior["z"].sizes) == {"chain": 1, "draw": 10, "point": 8, "z_dim_0": 4}
    assert dict(idata.log_likelihood["y"].sizes) == {"chain": 1, "draw": 10, "point": 8}


# -- examples/vae/ss_vae_M2.py --------------------------------------------------------------


# labelled minibatches have nothing to enumerate, and Pyro says so (in its own loop too)
@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites configured")
def test_ss_vae_labelled_and_unlabelled_in_one_fit(digits):
    images, labels = digits
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    sup = (images[:60], one_hot[:60])
    unsup = (images[60:1340],)
    pyro.set_rng_seed(3)
    ss = SSVAE(data_dim=64, classes=10, z_dim=4, hidden=32, aux_loss_multiplier=46.0)
    twin = _twin(ss)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    result = lvmkit.fit(
        ss.model, ss.enumerated_guide(),
        [lvmkit.Source(unsup, batch_size=64), lvmkit.Source(sup)],  # the labels' share: 3 a step
        epochs=3, seed=0, device="cpu", progress=False, objective=elbo,
        optimizer=pyro.optim.Adam({"lr": 1e-3, "betas": (0.9, 0.999)}),
    )  # fmt: skip
    pyro.clear_param_store()
    theirs = pyro_loop_two_sources(
        twin.model, twin.enumerated_guide(), pyro.optim.Adam({"lr": 1e-3, "betas": (0.9, 0.999)}),
        TraceEnum_ELBO(max_plate_nesting=1), unsup, sup, epochs=3, batch_sizes=(64, 3),
    )  # fmt: skip
    # the loss per point counts each point once, whatever poutine.scale the aux term carries
    # (the reported loss used to be divided by the ×46 of the observed y_aux site)
    _close_losses(result.history.train_loss, theirs, rtol=1e-3)
    assert result.history.train_loss.iloc[-1] > 20  # ~40 nats an 8×8 digit, not 40 / 46
    test_x = images[1400:1500]
    accuracy = [
        float((net.classifier(test_x) == labels[1400:1500]).float().mean()) for net in (ss, twin)
    ]
    assert accuracy[0] == pytest.approx(accuracy[1], abs=0.03)  # the same classifier, trained alike
    scores = lvmkit.evaluate(ss.model, ss.enumerated_guide(), test_x, num_samples=30)
    assert np.isfinite(lvmkit.summarize(scores).log_likelihood)
    idata = lvmkit.to_inference_data(ss.model, ss.enumerated_guide(), test_x[:6], num_samples=8)
    assert dict(idata.posterior["y"].sizes) == {"chain": 1, "draw": 8, "point": 6, "y_dim_0": 10}


@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites configured")
def test_ss_vae_stepped_as_pyros_loop_steps_it(digits):
    """Pyro's ss_vae_M2 loop gives each source's minibatch its own step, the labelled ones
    interleaved among the unlabelled: lvmkit.Interleaved reproduces it step for step."""
    images, labels = digits
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    sup = (images[:96], one_hot[:96])
    unsup = (images[96:736],)
    pyro.set_rng_seed(3)
    ss = SSVAE(data_dim=64, classes=10, z_dim=4, hidden=32, aux_loss_multiplier=46.0)
    twin = _twin(ss)
    data = lvmkit.Interleaved([lvmkit.Source(unsup), lvmkit.Source(sup)])
    result = lvmkit.fit(
        ss.model, ss.enumerated_guide(), data, epochs=2, batch_size=32, seed=0, device="cpu",
        progress=False, objective=TraceEnum_ELBO(max_plate_nesting=1),
        optimizer=pyro.optim.Adam({"lr": 1e-3}),
    )  # fmt: skip
    pyro.clear_param_store()
    theirs = pyro_loop_interleaved(
        twin.model, twin.enumerated_guide(), pyro.optim.Adam({"lr": 1e-3}),
        TraceEnum_ELBO(max_plate_nesting=1), unsup, sup, epochs=2, batch_size=32,
    )  # fmt: skip
    _close_losses(result.history.train_loss, theirs, rtol=1e-3)
    for ours, pyros in zip(ss.parameters(), twin.parameters(), strict=True):
        assert_close(ours, pyros, atol=1e-3, rtol=1e-3)  # the same updates, step for step


# -- the Gaussian-mixture tutorial -------------------------------------------------------------


def _gmm_by_hand(guide, data):
    """log p(x_i | θ̂) = logsumexp_k log w_k + log N(x_i; loc_k, scale), from the AutoDelta."""
    theta = guide.median(data)
    w, locs, scale = theta["weights"], theta["locs"], theta["scale"]
    comp = dist.Normal(locs, scale).log_prob(data[:, None]) + w.log()
    return torch.logsumexp(comp, dim=-1)


def test_gmm_tutorial_keeps_the_users_initialisation():
    data = GMM_DATA
    optim_args = {"lr": 0.1, "betas": [0.8, 0.99]}
    elbo = TraceEnum_ELBO(max_plate_nesting=1)

    def initial_loss(seed):  # the tutorial's initialize(seed): a start from the data, scored
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        return elbo.loss(gmm_model, gmm_guide(data), data)

    best = min(range(10), key=initial_loss)  # the tutorial's best of several starts
    pyro.clear_param_store()
    pyro.set_rng_seed(best)  # the user's seed for the AutoDelta's lazy initialisation
    guide = gmm_guide(data)
    result = lvmkit.fit(
        gmm_model, guide, data, batch_size=None, epochs=200, seed=0, device="cpu",
        progress=False, objective=TraceEnum_ELBO(max_plate_nesting=1),
        optimizer=pyro.optim.Adam(optim_args),
    )  # fmt: skip
    pyro.clear_param_store()
    pyro.set_rng_seed(best)
    twin = gmm_guide(data)
    TraceEnum_ELBO(max_plate_nesting=1).loss(gmm_model, twin, data)  # the tutorial's initialize()
    theirs = pyro_loop(
        gmm_model, twin, pyro.optim.Adam(optim_args), TraceEnum_ELBO(max_plate_nesting=1),
        [data], epochs=200, batch_size=len(data),
    )  # fmt: skip
    _close_losses(result.history.train_loss.iloc[[0, 50, -1]], np.array(theirs)[[0, 50, -1]],
                  rtol=1e-3)  # fmt: skip
    ours, pyros = guide.median(data), twin.median(data)
    for name in ("weights", "locs", "scale"):
        assert_close(ours[name], pyros[name], atol=1e-3, msg=name)
    assert sorted(ours["weights"].tolist())[1] == pytest.approx(0.6, abs=0.05)  # 2 and 3 points
    scores = lvmkit.evaluate(gmm_model, guide, data, num_samples=3)
    assert_close(scores.log_likelihood, _gmm_by_hand(guide, data), atol=1e-4)
    assert scores.attrs["likelihood"].startswith("log p(x | θ̂)")
    with pytest.warns(RuntimeWarning, match="point mass.*az.loo / az.waic on it are degenerate"):
        idata = lvmkit.to_inference_data(gmm_model, guide, data, num_samples=40)
    assert_close(idata.log_likelihood["obs"].values[0, 0], _gmm_by_hand(guide, data), atol=1e-4)
    with warnings.catch_warnings():  # 5 points: ArviZ finds its k̂ fit shaky, and says so
        warnings.simplefilter("ignore", UserWarning)
        loo = az.loo(idata)
    # every draw of a point mass is the same θ̂: leaving a point out changes nothing
    assert float(loo.elpd_loo) == pytest.approx(float(_gmm_by_hand(guide, data).sum()), abs=1e-3)


# -- examples/dmm/dmm.py ---------------------------------------------------------------------


def test_dmm_example_markov_masks_packed_sequences_clipped_adam():
    seqs, lengths = dmm_data(num=32, t_max=7, input_dim=12)
    pyro.set_rng_seed(4)
    dmm = DMM(input_dim=12, z_dim=3)
    twin = _twin(dmm)
    clipped = {"lr": 3e-3, "betas": (0.96, 0.999), "clip_norm": 10.0, "lrd": 0.999}
    result = lvmkit.fit(
        dmm.model, dmm.guide, (seqs, lengths), transform=lambda batch: dmm_minibatch(*batch),
        epochs=3, batch_size=8, seed=0, device="cpu", progress=False,
        optimizer=pyro.optim.ClippedAdam(clipped),
    )  # fmt: skip
    pyro.clear_param_store()
    theirs = pyro_loop(
        twin.model, twin.guide, pyro.optim.ClippedAdam(clipped), Trace_ELBO(), [seqs, lengths],
        epochs=3, batch_size=8, transform=dmm_minibatch,
    )  # fmt: skip
    _close_losses(result.history.train_loss, theirs, rtol=1e-3)
    # plate "z_minibatch" found, z_1 … z_T under pyro.markov, masked frames scored as nothing
    scores = lvmkit.evaluate(dmm.model, dmm.guide, (seqs, lengths), num_samples=20,
                             transform=lambda batch: dmm_minibatch(*batch))  # fmt: skip
    assert scores.shape[0] == 32 and scores.log_likelihood.notna().all()
    idata = lvmkit.to_inference_data(
        dmm.model, dmm.guide, (seqs[:6], lengths[:6]), num_samples=5,
        transform=lambda batch: dmm_minibatch(*batch),
    )  # fmt: skip
    assert dict(idata.log_likelihood["obs_x_1"].sizes) == {"chain": 1, "draw": 5, "point": 6}


# -- BatchNorm and Dropout ------------------------------------------------------------------


def test_batchnorm_and_dropout_networks_are_scored_in_eval_mode(digits, caplog):
    images, _ = digits
    x = images[:256, :16]
    pyro.set_rng_seed(5)
    model, guide, encoder, decoder = norm_vae(data_dim=16)
    pyro.set_rng_seed(5)
    model2, guide2, *_ = norm_vae(data_dim=16)
    result = lvmkit.fit(
        model, guide, x, epochs=2, batch_size=32, seed=0, device="cpu", progress=False,
        optimizer=pyro.optim.Adam({"lr": 1e-3}),
    )  # fmt: skip
    pyro.clear_param_store()
    theirs = pyro_loop(
        model2, guide2, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(), [x], epochs=2, batch_size=32
    )
    _close_losses(result.history.train_loss, theirs, rtol=1e-3)
    stats = encoder[1].running_mean.clone()
    with caplog.at_level("WARNING", logger="lvmkit"):
        first = lvmkit.evaluate(model, guide, images[300:340, :16], num_samples=30)
    second = lvmkit.evaluate(model, guide, images[300:340, :16], num_samples=30)
    assert "sequential passes" in caplog.text  # BatchNorm1d cannot take a particle dim
    assert_close(first.log_likelihood, second.log_likelihood, atol=0)  # no dropout noise
    assert torch.equal(encoder[1].running_mean, stats)  # evaluation moved no statistics
    assert encoder.training and decoder.training  # each module given back its mode
    idata = lvmkit.to_inference_data(model, guide, images[300:305, :16], num_samples=6)
    assert dict(idata.posterior["z"].sizes)["draw"] == 6
