"""The VAE variants: β / KL warm-up, IWAE, RWS, active units, AE/DAE/CAE/AAE, CVAE and M2."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

import lvmkit
from conftest import assert_close
from lvmkit import datasets
from lvmkit.inference.annealing import LatentScale
from lvmkit.inference.calls import call_of
from lvmkit.inference.feeds import load as load_feeds
from lvmkit.inference.kernel import log_density_pass
from lvmkit.inference.layout import find_layout
from lvmkit.inference.objectives import IWAE, ReweightedWakeSleep, TraceELBO
from lvmkit.models import empty_guide

SMALL = lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,))


def _binary(n=128, d=6, seed=0):
    return torch.bernoulli(torch.rand(n, d, generator=torch.Generator().manual_seed(seed)))


# -- KL schedule ------------------------------------------------------------------------------


def test_kl_schedule_ramps_linearly_then_holds():
    s = lvmkit.KLSchedule(beta=2.0, warmup_epochs=4, start=0.5)
    assert [s.weight(e) for e in (0, 2, 4, 9)] == [0.5, 1.25, 2.0, 2.0]
    assert lvmkit.KLSchedule(beta=3.0).weight(0) == 3.0 and lvmkit.KLSchedule().constant


@pytest.mark.parametrize("field", ["beta", "warmup_epochs", "start"])
def test_kl_schedule_refuses_negative_values(field):
    with pytest.raises(ValueError, match=f"KLSchedule.{field} must be >= 0; got -1"):
        lvmkit.KLSchedule(**{field: -1.0})


def test_latent_scale_weights_only_the_latent_terms():
    """With the draws fixed, the scaled loss is −log p(x|z) + w (log q(z|x) − log p(z)): linear
    in w, with the reconstruction term at w = 0."""
    model, guide = lvmkit.build_vae(SMALL)
    x = _binary(16)
    losses = []
    for w in (0.0, 1.0, 2.0):
        pyro.set_rng_seed(3)
        s1, s2 = LatentScale(w), LatentScale(w)
        losses.append(TraceELBO().differentiable_loss(s1(model), s2(guide), x=x).item())
    pyro.set_rng_seed(3)
    z = guide(x)
    reconstruction = -model.likelihood(z).log_prob(x).sum().item()
    assert_close(losses[0], reconstruction, rtol=1e-5)
    assert_close(losses[2] - losses[1], losses[1] - losses[0], rtol=1e-4)
    assert losses[1] != losses[0]


def test_fit_logs_the_kl_weight_and_keeps_val_elbo_unweighted():
    x = _binary(256)
    schedule = lvmkit.KLSchedule(beta=1.0, warmup_epochs=2)
    model, guide = lvmkit.build_vae(SMALL)
    result = lvmkit.fit(
        model,
        guide,
        x,
        epochs=3,
        batch_size=64,
        kl_schedule=schedule,
        validation_data=x[:32],
        progress=False,
        device="cpu",
    )
    assert list(result.history.columns[:4]) == ["epoch", "train_loss", "kl_weight", "val_elbo"]
    assert result.history.kl_weight.tolist() == [0.375, 0.875, 1.0]  # at each epoch's last step
    assert not result.compiled
    # with β = 20 the weighted objective is far above the true loss, which val_elbo reports
    pyro.set_rng_seed(0)
    model, guide = lvmkit.build_vae(SMALL)
    heavy = lvmkit.fit(
        model,
        guide,
        x,
        epochs=1,
        batch_size=64,
        kl_schedule=lvmkit.KLSchedule(beta=20.0),
        validation_data=x[:32],
        progress=False,
        device="cpu",
    )
    elbo = lvmkit.summarize(lvmkit.evaluate(model, guide, x[:32], num_samples=2000)).elbo
    assert heavy.history.val_elbo.iloc[0] == pytest.approx(elbo, abs=0.3)  # one-sample noise
    assert heavy.history.train_loss.iloc[0] > -elbo + 0.5


def test_beta_changes_training_and_a_warmup_refuses_compile(tmp_path):
    x = _binary(256)
    finals = []
    for beta in (1.0, 8.0):
        pyro.set_rng_seed(0)
        model, guide = lvmkit.build_vae(SMALL)
        result = lvmkit.fit(
            model,
            guide,
            x,
            epochs=2,
            kl_schedule=lvmkit.KLSchedule(beta=beta),
            progress=False,
            device="cpu",
            compile=beta != 1.0,
        )
        finals.append(result.history.train_loss.iloc[-1])
        assert result.compiled is (beta != 1.0)  # a constant β is compiled like any constant
    assert finals[1] > finals[0]
    with pytest.raises(ValueError, match="compile=True freezes the KL weight"):
        lvmkit.fit(
            *lvmkit.build_vae(SMALL),
            x,
            compile=True,
            progress=False,
            kl_schedule=lvmkit.KLSchedule(warmup_epochs=3),
        )
    with pytest.raises(TypeError, match=r"kl_schedule must be a lvmkit\.KLSchedule"):
        lvmkit.fit(*lvmkit.build_vae(SMALL), x, kl_schedule=2.0, progress=False)
    lvmkit.fit(
        *lvmkit.build_vae(SMALL),
        x,
        epochs=1,
        run_dir=tmp_path / "r",
        progress=False,
        kl_schedule=lvmkit.KLSchedule(warmup_epochs=3),
    )
    with pytest.raises(ValueError, match="kl_schedule"):
        lvmkit.fit(
            *lvmkit.build_vae(SMALL),
            x,
            epochs=2,
            run_dir=tmp_path / "r",
            resume=True,
            progress=False,
            kl_schedule=lvmkit.KLSchedule(warmup_epochs=5),
        )


# -- IWAE and RWS ------------------------------------------------------------------------------


def test_iwae_with_one_sample_is_the_elbo_estimator():
    """Same seed, same draws: IWAE(K=1) and Trace_ELBO give the same value."""
    model, guide = lvmkit.build_vae(SMALL)
    x = _binary(32)
    pyro.set_rng_seed(5)
    iwae = IWAE(num_particles=1).differentiable_loss(model, guide, x=x)
    pyro.set_rng_seed(5)
    elbo = TraceELBO().differentiable_loss(model, guide, x=x)
    assert_close(iwae, elbo, rtol=1e-5)


def test_iwae_bound_rises_with_k_and_matches_the_mean_elbo_at_k1():
    pyro.set_rng_seed(0)
    model, guide = lvmkit.build_vae(SMALL)
    x = _binary(64)
    lvmkit.fit(model, guide, x, epochs=3, progress=False, device="cpu")
    means = {}
    with torch.no_grad():
        for k in (1, 5, 50):
            values = [
                float(IWAE(num_particles=k).differentiable_loss(model, guide, x=x))
                for _ in range(40)
            ]
            means[k] = -sum(values) / len(values) / len(x)
    elbo = lvmkit.summarize(lvmkit.evaluate(model, guide, x, 200)).elbo
    assert abs(means[1] - elbo) < 0.05  # K = 1: the ELBO, in expectation
    assert means[1] < means[5] < means[50]


def test_iwae_refuses_a_guide_without_rsample():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", pyro.distributions.Bernoulli(0.5))
            pyro.sample("x", pyro.distributions.Normal(y, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", pyro.distributions.Bernoulli(0.3))

    with pytest.raises(ValueError, match=r"guide site 'y' .* has no rsample: use objective='rws'"):
        IWAE(3).differentiable_loss(model, guide, x=torch.zeros(4))
    loss = ReweightedWakeSleep(3).differentiable_loss(model, guide, x=torch.zeros(4))
    assert torch.isfinite(loss)


def test_rws_value_is_the_iwae_bound_and_its_gradients_are_the_two_phases():
    model, guide = lvmkit.build_vae(SMALL)
    x = _binary(16)
    k = 7
    pyro.set_rng_seed(2)
    rws = ReweightedWakeSleep(k).differentiable_loss(model, guide, x=x)
    rws.backward()
    got = {n: p.grad.clone() for n, p in [*model.named_parameters(), *guide.named_parameters()]}
    # the same draws by hand: wake-θ = −Σ_n logmeanexp_k w, wake-φ = −Σ w̃ log q, z detached
    model.zero_grad()
    guide.zero_grad()
    call = call_of((), {"x": x})
    layout = find_layout(model, guide, call)  # (draws nothing from the random stream)
    pyro.set_rng_seed(2)
    log_p, log_q = log_density_pass(model, guide, call, k, layout, detach=True)
    log_w = log_p - log_q.detach()
    bound = (torch.logsumexp(log_w, 0) - math.log(k)).sum()
    assert_close(rws.detach(), -bound.detach(), rtol=1e-5)
    w = torch.softmax(log_w, 0).detach()  # normalized per data point
    (-bound - (w * log_q).sum()).backward()
    for name, p in [*model.named_parameters(), *guide.named_parameters()]:
        assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_iwae_and_rws_train_through_fit():
    x = _binary(256)
    for objective in ("iwae", "rws"):
        pyro.set_rng_seed(0)
        model, guide = lvmkit.build_vae(SMALL)
        result = lvmkit.fit(
            model,
            guide,
            x,
            epochs=4,
            objective=objective,
            num_particles=5,
            batch_size=64,
            lr=1e-2,
            progress=False,
            device="cpu",
        )
        assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0]


# -- active units and reconstructions ------------------------------------------------------------


def test_active_units_finds_a_collapsed_unit():
    guide = lvmkit.GaussianEncoder(
        lvmkit.GaussianEncoderConfig(data_dim=6, latent_dim=3, hidden_dims=(8,))
    )
    with torch.no_grad():
        last = guide.net[-1]
        last.weight[1].zero_()  # unit 1's posterior mean no longer depends on x
        last.weight[0].mul_(50)  # unit 0's varies a lot
    result = lvmkit.active_units(guide, _binary(200))
    assert result.total == 3 and result.variances[1] == 0
    assert result.variances[0] > 0.01 and result.count == int((result.variances > 0.01).sum())
    assert 1 <= result.count <= 2


def test_code_functions_refuse_bad_arguments():
    model, guide = lvmkit.build_vae(SMALL)
    x = _binary(8)
    with pytest.raises(TypeError, match="site must be the name of a sample site"):
        lvmkit.posterior_means(guide, x, site=3)
    with pytest.raises(ValueError, match="the guide has no sample site 'w'"):
        lvmkit.posterior_means(guide, x, site="w")
    with pytest.raises(ValueError, match="max_pairs must be an int >= 1; got 0"):
        lvmkit.reconstruction_error(model, guide, x, max_pairs=0)
    with pytest.raises(ValueError, match="threshold must be >= 0; got -1"):
        lvmkit.active_units(guide, x, threshold=-1.0)
    with pytest.raises(ValueError, match="active units need at least 2 data points; got 1"):
        lvmkit.active_units(guide, x[:1])


def test_reconstruction_error_is_the_squared_error_for_unit_gaussian_decoders():
    cfg = lvmkit.AutoencoderConfig(
        lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,), likelihood="gaussian_fixed")
    )
    model, guide = lvmkit.build_autoencoder(cfg)
    x = torch.rand(10, 6)
    with torch.no_grad():
        mean = model.decoder(guide.encode(x))
    expected = 0.5 * ((x - mean) ** 2).sum(-1) + 3 * math.log(2 * math.pi)
    assert_close(lvmkit.reconstruction_error(model, guide, x), expected, rtol=1e-5)


# -- deterministic autoencoders ----------------------------------------------------------------


def _ae(kind, **kw):
    return lvmkit.build_autoencoder(lvmkit.AutoencoderConfig(SMALL, kind=kind, **kw))


def test_dae_corrupts_in_training_only():
    _, guide = _ae("dae", corruption=0.5)
    x = torch.ones(50, 6)
    guide.train()
    trained = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
    guide.eval()
    evaluated = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
    assert_close(evaluated, guide.encode(x))
    assert not torch.allclose(trained, evaluated)


def test_cae_penalty_is_lambda_times_the_jacobian_norm():
    _, guide = _ae("cae", contraction=0.3)
    x = torch.rand(5, 6)
    jac = torch.stack([torch.autograd.functional.jacobian(guide.net, row) for row in x])
    guide.train()
    site = poutine.trace(guide).get_trace(x).nodes["contractive_penalty"]
    assert_close(site["fn"].log_factor, 0.3 * jac.pow(2).sum((-2, -1)), rtol=1e-5)
    guide.eval()
    assert "contractive_penalty" not in poutine.trace(guide).get_trace(x).nodes


def test_aae_discriminator_gradient_comes_from_its_own_loss_only():
    model, guide = _ae("aae")
    x = _binary(32)
    pyro.set_rng_seed(1)
    TraceELBO().differentiable_loss(model, guide, x=x).backward()
    got = [p.grad.clone() for p in guide.adversary.parameters()]
    enc = [p.grad.clone() for p in guide.net.parameters()]
    guide.zero_grad()
    pyro.set_rng_seed(1)
    code = guide.encode(x)
    real = guide.adversary(torch.randn_like(code)).squeeze(-1)
    fake = guide.adversary(code.detach()).squeeze(-1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    (
        bce(real, torch.ones_like(real), reduction="sum")
        + bce(fake, torch.zeros_like(fake), reduction="sum")
    ).backward()
    for a, b in zip(got, guide.adversary.parameters(), strict=True):
        assert_close(a, b.grad, rtol=1e-4, atol=1e-6)
    assert all(float(g.abs().sum()) > 0 for g in enc)  # the encoder hears both terms


def test_aae_trains_with_a_second_optimizer_and_resumes(tmp_path):
    x = _binary(256)
    pyro.set_rng_seed(0)
    model, guide = _ae("aae", adversary_lr=1e-3)
    full = lvmkit.fit(model, guide, x, epochs=3, batch_size=64, progress=False, device="cpu")
    pyro.set_rng_seed(0)
    model, guide = _ae("aae", adversary_lr=1e-3)
    lvmkit.fit(model, guide, x, epochs=2, batch_size=64, progress=False, run_dir=tmp_path / "r")
    pyro.set_rng_seed(9)
    model2, guide2 = _ae("aae", adversary_lr=1e-3)
    resumed = lvmkit.fit(
        model2,
        guide2,
        x,
        epochs=3,
        batch_size=64,
        progress=False,
        run_dir=tmp_path / "r",
        resume=True,
    )
    for name, value in full.params.items():
        assert torch.equal(value, resumed.params[name]), name


def test_autoencoder_config_refuses_bad_values():
    with pytest.raises(ValueError, match="unknown kind 'vae': expected one of"):
        lvmkit.AutoencoderConfig(SMALL, kind="vae")
    with pytest.raises(ValueError, match=r"corruption must be in \[0, 1\); got 1.0"):
        lvmkit.AutoencoderConfig(SMALL, kind="dae", corruption=1.0)
    for field in ("contraction", "adversarial_weight"):
        with pytest.raises(ValueError, match=f"{field} must be >= 0; got -0.1"):
            lvmkit.AutoencoderConfig(SMALL, **{field: -0.1})
    with pytest.raises(TypeError, match="vae must be a VAEConfig"):
        lvmkit.AutoencoderConfig({"data_dim": 6})


# -- CVAE --------------------------------------------------------------------------------------


def test_quadrants_hide_the_right_pixels():
    images = torch.ones(3, 16)
    data = datasets.quadrants(images, 1)
    grid = data["mask"][0].reshape(4, 4)
    assert grid[2:, :2].sum() == 0 and grid.sum() == 12  # bottom left given, three hidden
    assert (data["c"][data["mask"]] == -1).all() and (data["c"][~data["mask"]] == 1).all()
    assert datasets.quadrant_mask(3, 4).reshape(4, 4)[:2, :2].all()
    with pytest.raises(ValueError, match="num_given must be 1, 2 or 3"):
        datasets.quadrants(images, 4)


def test_cvae_and_baseline_train_and_score_only_the_hidden_quadrants():
    cfg = lvmkit.CVAEConfig(data_dim=16, cond_dim=16, latent_dim=2, hidden_dims=(8,))
    data = datasets.quadrants(_binary(64, 16), 2)
    baseline = lvmkit.ConditionalBaseline(cfg)
    lvmkit.fit(baseline, empty_guide, data, epochs=2, progress=False, device="cpu")
    scores = lvmkit.evaluate(baseline, empty_guide, data, 1)
    with torch.no_grad():
        p = torch.sigmoid(baseline.net(data["c"]))
    bern = data["x"] * p.log() + (1 - data["x"]) * (1 - p).log()
    assert_close(scores.log_likelihood, (bern * data["mask"]).sum(-1), rtol=1e-4)
    model, guide = lvmkit.build_cvae(cfg)
    result = lvmkit.fit(model, guide, data, epochs=2, progress=False, device="cpu", compile=True)
    assert result.compiled  # a dict of tensors (x, c, mask) compiles
    summary = lvmkit.summarize(lvmkit.evaluate(model, guide, data, 50))
    assert summary.log_likelihood >= summary.elbo
    assert model(c=data["c"][:3]).shape == (3, 16)


def test_cvae_refuses_a_bad_condition_or_mask():
    cfg = lvmkit.CVAEConfig(data_dim=16, cond_dim=16, latent_dim=2, hidden_dims=(8,))
    data = datasets.quadrants(_binary(8, 16), 2)
    model, guide = lvmkit.build_cvae(cfg)
    with pytest.raises(ValueError, match=r"data 'c' must have shape \(N, 16\)"):
        lvmkit.fit(model, guide, {**data, "c": data["c"][:, :4]}, progress=False)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        lvmkit.fit(model, guide, {**data, "mask": data["mask"].float()}, progress=False)


# -- M2 ----------------------------------------------------------------------------------------


def _clusters(n=600, d=12, classes=3, seed=0):
    """Binary data whose class sets which third of the pixels tends to be on."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    probs = torch.full((n, d), 0.1)
    for c in range(classes):
        probs[y == c, c * d // classes : (c + 1) * d // classes] = 0.9
    return torch.bernoulli(probs, generator=g), y


def test_semi_supervised_split_is_balanced_and_passes_each_image_once_an_epoch():
    x, y = _clusters()
    unlabelled, labelled = datasets.semi_supervised(x, y, 30, seed=1)
    assert (unlabelled.name, labelled.name) == ("unlabelled", "labelled")
    assert len(unlabelled.data["x"]) == 570 and len(labelled.data["x"]) == 30
    assert torch.bincount(labelled.data["y"]).tolist() == [10, 10, 10]
    assert labelled.data["y"].dtype == torch.long
    every = torch.cat([unlabelled.data["x"], labelled.data["x"]])
    assert sorted(map(tuple, every.tolist())) == sorted(map(tuple, x.tolist()))
    model, _ = lvmkit.build_m2(lvmkit.M2Config(data_dim=12, num_classes=3, hidden_dims=(8,)))
    feeds = load_feeds([unlabelled, labelled], model, None, batch_size=50).train
    assert [sum(f.shares) for f in feeds] == [570, 30]  # each image once per epoch
    assert len(feeds[0].shares) == len(feeds[1].shares) == 12  # in the same 12 steps
    with pytest.raises(ValueError, match="multiple of the 3 classes"):
        datasets.semi_supervised(x, y, 31)


def _m2(**kw):
    cfg = dict(data_dim=12, num_classes=3, latent_dim=2, hidden_dims=(32,))
    return lvmkit.build_m2(lvmkit.M2Config(**{**cfg, **kw}))


def _fit_m2(model, guide, data, **kw):
    """15 epochs of an M2-like pair on the cluster data, labels enumerated for unlabelled points."""
    objective = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    return lvmkit.fit(
        model,
        guide,
        data,
        epochs=15,
        batch_size=50,
        lr=1e-2,
        objective=objective,
        progress=False,
        device="cpu",
        **kw,
    )


def test_m2_learns_the_classes_from_few_labels():
    x, y = _clusters()
    data = datasets.semi_supervised(x, y, 12, seed=0)
    model, guide = _m2(aux_weight=5)
    result = _fit_m2(model, guide, data, validation_data=x[:100])
    guide.eval()
    accuracy = float((guide.classify(x) == y).float().mean())
    assert accuracy > 0.9, accuracy
    assert result.history.val_elbo.iloc[-1] > result.history.val_elbo.iloc[0]
    summary = lvmkit.summarize(lvmkit.evaluate(model, guide, x[:50], 100))
    assert summary.log_likelihood >= summary.elbo


def test_m2_labelled_weight_scales_the_guide_as_well_as_the_model():
    """labelled_weight w must give w × (the labelled ELBO), a bound: weighting log p(x, y, z)
    alone and not log q(z | x, y) leaves no maximum (it reached −75 nats per image)."""
    x, y = _clusters(40)
    losses = {}
    for weight in (1.0, 2.5):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model, guide = _m2(labelled_weight=weight, aux_weight=0)
        pyro.set_rng_seed(3)
        losses[weight] = pyro.infer.Trace_ELBO().loss(model, guide, x, y)
    assert losses[2.5] == pytest.approx(2.5 * losses[1.0], rel=1e-5)


def test_m2_aux_term_is_alpha_log_q_of_each_labelled_image_in_training_only():
    x, y = _clusters(40)
    model, guide = _m2(aux_weight=7.0)
    trace = pyro.poutine.trace(model).get_trace(x, y)
    log_q = torch.distributions.Categorical(logits=guide.classifier(x)).log_prob(y)
    trace.compute_log_prob()
    assert torch.allclose(trace.nodes["classifier_log_q"]["log_prob"], 7.0 * log_q)
    model.eval()
    assert "classifier_log_q" not in pyro.poutine.trace(model).get_trace(x, y).nodes
    assert lvmkit.models.kingma_aux_weight(50_000, 100) == 50.0


def _m1(x, latent=4, epochs=30):
    """A small M1 (VAE) trained on all of ``x``, labels unused."""
    m1 = lvmkit.VAE(lvmkit.VAEConfig(data_dim=x.shape[1], latent_dim=latent, hidden_dims=(32,)))
    encoder = lvmkit.GaussianEncoder(lvmkit.GaussianEncoderConfig(x.shape[1], latent, (32,)))
    lvmkit.fit(m1, encoder, x, epochs=epochs, batch_size=50, lr=1e-2, progress=False, device="cpu")
    return m1, encoder


def test_m1_m2_learns_the_classes_on_m1s_code_and_leaves_m1_as_trained():
    x, y = _clusters()
    m1, encoder = _m1(x)
    before = {k: v.clone() for k, v in [*m1.state_dict().items(), *encoder.state_dict().items()]}
    data = datasets.semi_supervised(x, y, 12, seed=0)
    cfg = lvmkit.M2Config(data_dim=4, num_classes=3, latent_dim=2, hidden_dims=(32,), aux_weight=5)
    model, guide = lvmkit.build_m1_m2(cfg, m1, encoder)
    assert model.classifier is guide.classifier and model.m1_decoder is m1
    _fit_m2(model, guide, data)
    after = {k: v for k, v in [*m1.state_dict().items(), *encoder.state_dict().items()]}
    assert all(torch.equal(before[k], after[k]) for k in before)  # M1 is not trained further
    guide.eval()
    accuracy = float((guide.classify(x) == y).float().mean())
    assert accuracy > 0.9, accuracy
    summary = lvmkit.summarize(lvmkit.evaluate(model, guide, x[:50], 100))  # a model of x
    assert summary.log_likelihood >= summary.elbo
    assert model(batch_size=7).shape == (7, 12)


def test_m1_m2_refuses_an_m1_it_cannot_use():
    x, _ = _clusters(40)
    m1, encoder = _m1(x, epochs=1)
    cfg = lvmkit.M2Config(data_dim=4, num_classes=3, latent_dim=2, hidden_dims=(8,))
    with pytest.raises(ValueError, match=r"config\.data_dim must be M1's latent size 4"):
        lvmkit.build_m1_m2(lvmkit.M2Config(data_dim=12, num_classes=3), m1, encoder)
    with pytest.raises(TypeError, match=r"m1_guide must have encode\(x\)"):
        lvmkit.build_m1_m2(cfg, m1, lambda x: x)
    with pytest.raises(TypeError, match=r"m1_model must have likelihood\(z\)"):
        lvmkit.build_m1_m2(cfg, encoder, encoder)
    model, guide = lvmkit.build_m1_m2(cfg, m1, encoder)
    with pytest.raises(ValueError, match=r"data 'x' must have shape \(N, 12\)"):
        lvmkit.fit(model, guide, {"x": x[:, :4]}, progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y": lambda d: d["y"] + 3}, r"data 'y' must hold labels in 0..2"),
        ({"y": lambda d: d["y"].float()}, r"data 'y' must be a 1-D integer tensor"),
        ({"x": lambda d: d["x"] * 2}, r"data 'x' must be in \[0, 1\]"),
    ],
)
def test_m2_refuses_bad_labels(change, message):
    x, y = _clusters(60)
    unlabelled, labelled = datasets.semi_supervised(x, y, 6)
    bad = {k: change[k](labelled.data) if k in change else v for k, v in labelled.data.items()}
    model, guide = lvmkit.build_m2(lvmkit.M2Config(data_dim=12, num_classes=3, hidden_dims=(8,)))
    with pytest.raises(ValueError, match=message):
        lvmkit.fit(
            model,
            guide,
            [unlabelled, lvmkit.Source(bad)],
            objective=TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False),
            progress=False,
        )


def test_particles_are_never_silently_dropped_by_compile():
    """A compiled step draws every particle: its loss is checked against the eager loss of all
    of them, and it trains as the eager step does."""
    x = _binary(128)
    results = []
    for compile in (False, True):
        pyro.set_rng_seed(0)
        model, guide = lvmkit.build_vae(SMALL)
        results.append(lvmkit.fit(model, guide, x, epochs=2, num_particles=5, seed=1,
                                  compile=compile, progress=False, device="cpu"))  # fmt: skip
    assert results[1].compiled
    assert results[1].history.train_loss.tolist() == pytest.approx(
        results[0].history.train_loss.tolist(), rel=1e-5
    )
