"""Benchmark suites as protocols that take your own model: contenders from Python and the command
line, clear errors for bad ones, the papers' schedules, and the hand-written references."""

from __future__ import annotations

import math
import sys

import pyro
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

import lvmkit
import user_models
from lvmkit.benchmarks import Contender, contenders, cvae, iwae, m2, protocol, references, run
from lvmkit.cli import main

SUITES = ["vae-latent", "vae-iwae", "vae-m2", "vae-cvae", "vae-variants", "gmm", "sequence"]


@pytest.mark.parametrize("suite", SUITES)
def test_a_users_plain_function_pair_runs_on_every_suite(suite):
    frame = run(suite, "quick", contenders={"mine": user_models.make_pair}, only="mine")
    who = frame[
        "method" if suite == "gmm" else "variant" if suite == "vae-variants" else "contender"
    ]
    mine = frame[who == "mine"]
    assert len(mine) >= 1
    metric = {
        "gmm": "heldout_log_lik",
        "vae-m2": "accuracy",
        "vae-cvae": "nll_is",
        "vae-variants": "test_nll",
        "sequence": "nll_per_frame",
    }.get(suite, "test_nll")
    assert mine[metric].notna().all() and (mine[metric].abs() < 1e4).all()
    curves = frame.attrs["curves"]
    assert "mine" in set(curves.contender) and (curves.epoch >= 1).all()
    assert set(curves.contender) <= {"mine", cvae.BASELINE}  # (the CVAE protocol's baseline)
    if suite in ("vae-iwae", "vae-m2", "vae-cvae", "sequence"):  # published rows come with --only
        assert len(set(who)) > 1


def test_m2_table_sets_m2_beside_the_classifier_on_labels_alone_and_the_reference():
    frame = m2.run("quick")
    assert list(frame.contender) == [
        protocol.BUILTIN,
        m2.STACKED,
        m2.SUPERVISED,
        m2.SUPERVISED_M1,
        protocol.REFERENCE,
        m2.M2_SOURCE,
        m2.M1_M2_SOURCE,
        m2.PYRO_M2_SOURCE,
    ]
    rows = frame.set_index("contender")
    assert rows.loc[m2.M2_SOURCE, "accuracy"] == pytest.approx(88.03)
    assert rows.loc[m2.M1_M2_SOURCE, "accuracy"] == pytest.approx(96.67)
    assert rows.loc[protocol.BUILTIN, "minus_supervised_only"] == pytest.approx(
        rows.loc[protocol.BUILTIN, "accuracy"] - rows.loc[m2.SUPERVISED, "accuracy"]
    )
    assert rows.loc[m2.STACKED, "minus_m1_code_only"] == pytest.approx(
        rows.loc[m2.STACKED, "accuracy"] - rows.loc[m2.SUPERVISED_M1, "accuracy"]
    )
    assert rows.minus_m1_code_only.notna().sum() == 1  # M1+M2's row only
    curves = frame.attrs["curves"]
    for name in (protocol.BUILTIN, m2.STACKED, m2.SUPERVISED, m2.SUPERVISED_M1, protocol.REFERENCE):
        assert sorted(curves[curves.contender == name].epoch) == [1, 2]  # a point per epoch
    assert "Adam(lr=0.0003, betas=(0.9, 0.999)), batch 200" in frame.attrs["protocol"]
    assert (
        "M1 first: VAE 784-600-600-50 softplus on all training images, 1 epoch ("
        in (frame.attrs["protocol"])
    )


def test_iwae_schedule_is_burda_et_al_stages_in_proportion():
    schedule = protocol.StagedDecay(3280)  # one step per epoch: the paper's epochs exactly
    ends = [1, 4, 13, 40, 121, 364, 1093, 3280]  # cumulative 3^i epochs
    for i, end in enumerate(ends):
        assert schedule(end - 1) == pytest.approx(10 ** (-i / 7))
    assert schedule(3280) == pytest.approx(10 ** (-1))
    short = protocol.StagedDecay(328)  # a tenth as long: the same stages, a tenth as long
    assert short(36) == pytest.approx(10 ** (-5 / 7))  # stage 5 ends at 36.4 of 328 steps
    assert short(37) == pytest.approx(10 ** (-6 / 7))
    options = protocol.PROFILES["iwae"]["full"].fit_options(50_000, 0, "cpu")
    assert options["batch_size"] == 20 and options["optimizer_args"]["eps"] == 1e-4
    assert options["scheduler_interval"] == "step"
    assert options["scheduler"].keywords["lr_lambda"].total_steps == 100 * 2500


def test_aevb_protocol_is_adagrad_with_the_parameter_prior_as_weight_decay():
    options = protocol.PROFILES["latent"]["full"].fit_options(50_000, 0, "cpu")
    assert options["optimizer"] is torch.optim.Adagrad and options["lr"] == 0.02
    assert options["optimizer_args"] == {"weight_decay": 100 / 50_000}


def test_hand_written_vae_objectives_estimate_what_lvmkit_scores():
    """The reference's ELBO and IWAE bound, averaged over many draws, are lvmkit's evaluate
    ELBO and importance-sampled log-likelihood: the same objective, written by hand."""
    torch.manual_seed(0)
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=12, latent_dim=3, hidden_dims=(16,)))
    x = torch.bernoulli(torch.full((64, 12), 0.3))
    with torch.no_grad():
        log_w = references.vae_log_weights(model.decoder, guide.net, x, 4000)
    scores = lvmkit.evaluate(model, guide, x, 4000)
    assert log_w.mean(0).mean() == pytest.approx(scores.elbo.mean(), rel=2e-3)
    iwae = torch.logsumexp(log_w, 0) - math.log(4000)
    assert iwae.mean() == pytest.approx(scores.log_likelihood.mean(), rel=2e-3)


def test_hand_written_m2_loss_estimates_pyros_enumerated_elbo():
    torch.manual_seed(0)
    cfg = lvmkit.M2Config(
        data_dim=12, num_classes=3, latent_dim=2, hidden_dims=(16,), aux_weight=4.0
    )
    model, guide = lvmkit.build_m2(cfg)
    xu = torch.bernoulli(torch.full((20, 12), 0.4))
    xl, yl = torch.bernoulli(torch.full((6, 12), 0.6)), torch.tensor([0, 1, 2, 0, 1, 2])
    elbo = TraceEnum_ELBO(
        max_plate_nesting=1,
        num_particles=3000,
        vectorize_particles=True,
        strict_enumeration_warning=False,
    )
    with torch.no_grad():
        pyro_loss = elbo.loss(model, guide, xu) + elbo.loss(model, guide, xl, yl)
        by_hand = torch.stack(
            [
                references.m2_loss(
                    model.decoder, guide.encoder, guide.classifier, xu, xl, yl, classes=3, alpha=4.0
                )
                for _ in range(3000)
            ]
        ).mean()
    assert float(by_hand) == pytest.approx(pyro_loss, rel=2e-3)


# -- bad contenders ---------------------------------------------------------------------------


def _task(**kw):
    base = dict(
        suite="vae-iwae",
        setting="VAE k=1",
        data_dim=784,
        arguments=("x",),
        data="binary images",
        latent_dim=4,
    )
    return contenders.Task(**{**base, **kw})


def test_a_factory_that_returns_no_pair_is_refused():
    probe = [{"x": torch.zeros(4, 784)}]
    with pytest.raises(
        TypeError,
        match=r"contender 'x': its factory not_a_pair returned "
        r"Sequential; expected \(model, guide\)",
    ):
        contenders.build("x", user_models.not_a_pair, _task(), probe)
    with pytest.raises(TypeError, match="not \\(model, guide\\) callables \\(int, int\\)"):
        contenders.build("x", lambda task: (1, 2), _task(), probe)


def test_a_pair_that_does_not_fit_the_data_is_refused_before_training():
    probe = [{"x": torch.zeros(4, 784)}]
    with pytest.raises(
        ValueError,
        match=r"contender 'small' does not fit vae-iwae \(VAE k=1; "
        r"data x: \(4, 784\) — binary images\): RuntimeError",
    ):
        contenders.build("small", user_models.wrong_size, _task(), probe)

    def observes_nothing(task):
        def model(x):
            pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))

        return model, lambda x: None

    with pytest.raises(ValueError, match="the model observes nothing"):
        contenders.build("blind", observes_nothing, _task(), probe)


def test_contender_names_and_options_are_checked():
    with pytest.raises(ValueError, match="contender name 'lvmkit' clashes with a row of vae-iwae"):
        run("vae-iwae", "quick", contenders={"lvmkit": user_models.make_pair})
    with pytest.raises(ValueError, match="clashes"):
        run("vae-iwae", "quick", contenders={iwae.IWAE_SOURCE: user_models.make_pair})
    with pytest.raises(ValueError, match="only='nobody' names no contender of vae-iwae"):
        run("vae-iwae", "quick", contenders={"mine": user_models.make_pair}, only="nobody")
    with pytest.raises(TypeError, match="contender 'mine' must be a factory"):
        run("vae-iwae", "quick", contenders={"mine": "models.py:make"})
    with pytest.raises(ValueError, match="contenders, only and settings are for"):
        run("speed", "quick", contenders={"mine": user_models.make_pair})
    with pytest.raises(ValueError, match=r"may not set \['epochs'\]"):
        Contender(lambda x: x, lambda x: x, fit_options={"epochs": 3})


def test_cli_contender_errors_name_the_flag(tmp_path, capsys):
    def error(*extra):
        with pytest.raises(SystemExit) as stop:
            main(["bench", "vae", "iwae", "--profile", "quick", "--out", str(tmp_path), *extra])
        return stop.value.code, capsys.readouterr().err

    code, err = error("--contender", "mine")
    assert code == 2 and "--contender must be NAME=MODULE:FUNCTION" in err
    code, err = error("--contender", "mine=no_such_module_xyz:make")
    assert code == 2 and "cannot import 'no_such_module_xyz'" in err
    code, err = error("--contender", "mine=user_models:nothing_here")
    assert code == 2 and "user_models has no 'nothing_here'" in err
    code, err = error("--contender", f"mine={tmp_path / 'missing.py'}:make")
    assert code == 2 and "no file" in err
    pair = "mine=user_models:make_pair"
    code, err = error("--contender", pair, "--contender", pair)
    assert code == 2 and "--contender names must differ; ['mine']" in err
    code, err = error("--contender", pair, "--only", "nobody")
    assert code == 2 and "--only nobody names no contender" in err
    assert not list(tmp_path.glob("*.csv"))  # nothing written


def test_cli_only_runs_one_contender_beside_the_paper_rows(tmp_path):
    args = [
        "bench",
        "vae",
        "iwae",
        "--profile",
        "quick",
        "--out",
        str(tmp_path),
        "--contender",
        "mine=user_models:make_pair",
        "--only",
        "mine",
    ]
    assert main(args) == 0
    import pandas as pd

    from lvmkit.inference.devices import resolve_device

    tag = resolve_device("auto").type  # the CLI runs its suites on CUDA where there is one
    table = pd.read_csv(tmp_path / f"vae-iwae-{tag}-quick.csv")
    assert set(table.contender) == {"mine", iwae.IWAE_SOURCE}
    assert (tmp_path / f"vae-iwae-{tag}-quick-figures" / "vae-iwae-nll.png").is_file()


# -- bench vae pythae: pythae's own classes beside lvmkit's ------------------------------------


def test_pythae_gets_lvmkits_networks_and_its_pair_scores_as_lvmkits():
    """pythae's model starts from lvmkit's initial weights, and the Pyro pair that lets lvmkit's
    estimator score pythae's networks gives lvmkit's own pair's log-weights on the same draws
    (the VampPrior's too, once pythae's pseudo-inputs are lvmkit's)."""
    pytest.importorskip("pythae")
    from lvmkit.benchmarks import pythae_side

    pythae, _ = pythae_side._import_pythae()
    x = torch.bernoulli(torch.full((6, 784), 0.3), generator=torch.Generator().manual_seed(0))
    p = pythae_side.PROFILES["quick"]
    for name, spec in pythae_side._families(p).items():
        pyro.set_rng_seed(0)
        model, guide = spec["pair"]()
        theirs = pythae_side._pythae_model(pythae, spec["pythae"], model, guide)
        net = pythae_side.encoder_net(guide)
        for a, b in zip(theirs.encoder.net.parameters(), net.parameters(), strict=True):
            assert torch.equal(a, b) and a is not b  # the same weights, pythae's own copy
        if spec["pythae"][0] == "HVAE":  # (scored by its Gaussian encoder: see its row's note)
            continue
        if hasattr(theirs, "pseudo_inputs"):  # pythae's layer on one-hot inputs → lvmkit's
            layer = theirs.pseudo_inputs[0]
            with torch.no_grad():
                layer.weight.copy_(model.prior.pseudo_inputs.T)
                layer.bias.zero_()
        pyro.set_rng_seed(1)
        ours = lvmkit.log_weights(model, guide, x, 7)
        pyro.set_rng_seed(1)  # the same draws of z
        scored = lvmkit.log_weights(*pythae_side._as_pair(theirs), x, 7)
        torch.testing.assert_close(scored, ours, atol=1e-3, rtol=1e-5, msg=name)


def test_bench_vae_pythae_sets_pythae_beside_lvmkit_and_the_published_rows():
    pytest.importorskip("pythae")
    from lvmkit.benchmarks import pythae_side

    table = pythae_side.run("quick", only="VAE")
    by = table.set_index("contender")
    assert list(table.library) == [
        "lvmkit",
        "pythae",
        *["published"] * 2 * len(pythae_side.PUBLISHED),
    ]
    assert by.loc["VAE", "library"] == "lvmkit" and by.loc["pythae VAE", "library"] == "pythae"
    for row in ("VAE", "pythae VAE"):
        assert math.isfinite(by.loc[row, "test_nll"]) and by.loc[row, "median_epoch_s"] > 0
    # one estimator for both, and pythae's own beside it: the same quantity, other draws
    assert abs(by.loc["pythae VAE", "pythae_get_nll"] - by.loc["pythae VAE", "test_nll"]) < 25
    assert by.loc["pythae VAE", "time_ratio_to_lvmkit"] == pytest.approx(
        by.loc["pythae VAE", "median_epoch_s"] / by.loc["VAE", "median_epoch_s"]
    )


def test_bench_vae_pythae_without_pythae_keeps_lvmkits_rows_and_says_how(monkeypatch):
    from lvmkit.benchmarks import pythae_side

    monkeypatch.setitem(sys.modules, "pythae", None)  # import pythae → ImportError
    table = pythae_side.run("quick", only="VAE")
    theirs = table[table.library == "pythae"]
    assert list(theirs.contender) == ["pythae VAE"] and theirs.test_nll.isna().all()
    assert "pip install 'lvmkit[pythae]'" in theirs.note.iloc[0]
    assert table[table.library == "lvmkit"].test_nll.notna().all()
