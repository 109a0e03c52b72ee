"""fit(compile=True), and compile=None on a user's pair: the traced loss trains like the eager one,
or falls back and says why."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import lvmkit
from lvmkit.inference.calls import call_of
from lvmkit.inference.train import AUTO_TRACE_STEPS
from plain_pair import make_plain_pair


def _data(n: int) -> torch.Tensor:
    proto = torch.where(
        torch.rand(4, 12, generator=torch.Generator().manual_seed(0)) > 0.5, 0.9, 0.1
    )
    return torch.bernoulli(proto[torch.arange(n) % 4], generator=torch.Generator().manual_seed(1))


def _fit(compile: bool, n: int = 200, **kwargs):
    pyro.set_rng_seed(3)
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=12, latent_dim=2, hidden_dims=(16,)))
    options = {"epochs": 3, "batch_size": 32, "seed": 5, "device": "cpu", "progress": False}
    return lvmkit.fit(model, guide, _data(n), compile=compile, **{**options, **kwargs})


def test_the_traced_loss_has_the_eager_gradient_not_twice_it():
    """Pyro 1.9's JitTrace_ELBO.differentiable_loss adds the loss's gradient to the surrogate's,
    doubling it; Adam hid that (it ignores a constant scale), SGD does not: one SGD step traced
    and one eager must end at the same parameters."""
    options = {"epochs": 1, "batch_size": 200, "optimizer": torch.optim.SGD, "lr": 0.05}
    eager, traced = _fit(False, **options), _fit(True, **options)
    assert traced.compiled
    for name, value in eager.params.items():
        torch.testing.assert_close(traced.params[name], value, atol=1e-6, rtol=1e-5)


def test_compiled_training_matches_eager_training():
    # 200 = 6 × 32 + 8: the last, smaller batch gets its own traced graph.
    eager, traced = _fit(False), _fit(True)
    assert traced.compiled and not eager.compiled
    assert traced.history.train_loss.tolist() == pytest.approx(
        eager.history.train_loss.tolist(), rel=1e-5
    )
    for name, value in eager.params.items():
        torch.testing.assert_close(traced.params[name], value, atol=1e-4, rtol=1e-4)


def test_compiled_training_with_a_transform_and_resume_is_exact(tmp_path):
    kwargs = {"transform": torch.bernoulli, "validation_data": _data(40)}
    full = _fit(True, epochs=4, run_dir=tmp_path / "full", **kwargs)
    _fit(True, epochs=2, run_dir=tmp_path / "cut", **kwargs)
    resumed = _fit(True, epochs=4, run_dir=tmp_path / "cut", resume=True, **kwargs)
    for name, value in full.params.items():
        assert torch.equal(resumed.params[name], value), name


def test_each_batch_shape_gets_its_own_graph():
    # len(x) is a Python int under tracing: a graph traced at 16 rows would keep making 16 rows.
    decoder = torch.nn.Linear(2, 3)

    def model(x=None):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))  # event (2,)
            pyro.sample(
                "x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x
            )  # batch (N,) event (3,)

    def guide(x=None):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))  # batch (N,) event (2,)

    histories = []
    for compile in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        decoder.reset_parameters()
        result = lvmkit.fit(
            model,
            guide,
            torch.randn(40, 3, generator=torch.Generator().manual_seed(2)),
            epochs=2,
            batch_size=16,
            device="cpu",
            compile=compile,
            progress=False,
        )
        histories.append(result.history.train_loss.tolist())
    assert histories[1] == pytest.approx(histories[0], rel=1e-5)


def test_untraceable_model_falls_back_with_a_warning():
    hidden = torch.nn.Parameter(torch.zeros(3))  # used by the model but never registered with Pyro

    def model(x=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(torch.zeros(3), 1.0).to_event(1)
            )  # batch (N,) event (3,)
            pyro.sample(
                "x", dist.Normal(z + hidden, 1.0).to_event(1), obs=x
            )  # batch (N,) event (3,)

    def guide(x=None):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))  # batch (N,) event (3,)

    with pytest.warns(RuntimeWarning, match="could not be traced.*training continues uncompiled"):
        result = lvmkit.fit(
            model,
            guide,
            torch.randn(64, 3),
            epochs=2,
            batch_size=16,
            device="cpu",
            compile=True,
            progress=False,
        )
    assert list(result.history.epoch) == [1, 2] and not result.compiled


def test_compile_by_default_only_for_declared_static_pairs():
    assert _fit(None, epochs=1).compiled  # the built-in VAE declares a static structure
    assert not _fit(None, epochs=1, objective="mean_field").compiled  # no traced mean-field loss
    assert not _fit(False, epochs=1).compiled
    model, guide, _ = make_plain_pair()
    result = lvmkit.fit(model, guide, _data(64), epochs=1, device="cpu", progress=False)
    assert not result.compiled  # user models are not traced unless asked


def test_compile_needs_the_elbo_objective():
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=12, latent_dim=2))
    with pytest.raises(ValueError, match="compile=True traces the 'elbo' objective only"):
        lvmkit.fit(model, guide, _data(8), objective="mean_field", compile=True, device="cpu")


def _tutorial_pair():
    """A pair as Pyro's VAE tutorial writes one: plain functions, the prior made with
    ``x.new_zeros`` / ``x.new_ones`` each call."""
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12))
    encoder = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = x.new_zeros(x.shape[0], 2), x.new_ones(x.shape[0], 2)
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = encoder(x).split(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return model, guide, [*decoder.parameters(), *encoder.parameters()]


def _builtin_pair():
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=12, latent_dim=2, hidden_dims=(16,)))
    return model, guide, [*model.parameters(), *guide.parameters()]


@pytest.mark.parametrize("make", [_builtin_pair, _tutorial_pair], ids=["built-in", "tutorial"])
def test_the_specialized_graph_is_smaller_and_computes_the_traced_loss_and_gradients(make):
    """The shape-specialised graph, called straight with the param store's tensors, gives the
    loss and gradients of Pyro's traced function bit for bit, from fewer nodes; a prior made
    from the data's metadata (``x.new_zeros``, ``x.new_ones``) is a constant in it."""
    from lvmkit.inference import compiled

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide, params = make()
    x = _data(32)
    eager = pyro.infer.Trace_ELBO()

    def fallback(call):  # the eager loss the graph is checked against when it is made
        return eager.differentiable_loss(model, guide, *call.args, **call.kwargs)

    loss = compiled.CompiledLoss(model, guide, fallback=fallback)
    with pyro.validation_enabled(False):
        loss(call_of((), {"x": x}))  # traces and specialises
    ((key, specialized),) = loss._by_shape.items()
    assert key == ((0, ("x",)), ((32, 12), torch.float32, torch.device("cpu")))
    before, after = specialized.nodes
    assert after < before / 2
    kinds = {node.kind() for node in specialized.function.graph.nodes()}
    assert not kinds & compiled._MADE_FROM_METADATA
    elbo = compiled._JitTraceELBO(ignore_jit_warnings=True)  # Pyro's traced function, unfolded

    def positional_model(x):
        return model(x=x)

    def positional_guide(x):
        return guide(x=x)

    with warnings.catch_warnings(), pyro.validation_enabled(False):
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace's, as in compiled.py
        elbo.differentiable_loss(positional_model, positional_guide, x)
    results = []
    for call in (
        lambda: specialized([x]),
        lambda: elbo.differentiable_loss(positional_model, positional_guide, x),
    ):
        torch.manual_seed(7)
        with pyro.validation_enabled(False), torch.jit.optimized_execution(False):
            value = call()
        grads = torch.autograd.grad(value, params)
        results.append((value.detach(), grads))
    (v1, g1), (v2, g2) = results
    assert torch.equal(v1, v2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.parametrize("auto", [True, False], ids=["fit's auto tracing", "compile=True"])
def test_an_epochs_last_smaller_minibatch_is_traced_only_when_asked(auto):
    """Under auto tracing, a minibatch smaller than the first (an epoch's last) runs eagerly: one
    step an epoch does not repay a trace and its check. compile=True traces every shape."""
    from lvmkit.inference import compiled

    pyro.clear_param_store()
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=12, latent_dim=2, hidden_dims=(16,)))
    eager = pyro.infer.Trace_ELBO()
    eager_rows: list[int] = []

    def fallback(call):
        eager_rows.append(len(call.kwargs["x"]))
        return eager.differentiable_loss(model, guide, *call.args, **call.kwargs)

    loss = compiled.CompiledLoss(model, guide, fallback=fallback, auto=auto)
    x = _data(10)
    with pyro.validation_enabled(False):
        for rows in (slice(0, 4), slice(4, 8), slice(8, 10), slice(0, 4), slice(8, 10)):
            loss(call_of((), {"x": x[rows]}))
    shapes = sorted(key[1][0][0] for key in loss._by_shape)
    assert loss.active and shapes == ([4] if auto else [2, 4])
    checks = [4] if auto else [4, 2]  # each graph's first call checks it against the eager loss
    assert eager_rows == ([*checks, 2, 2] if auto else checks)


def test_without_the_specialisation_the_plain_traced_replay_still_trains(monkeypatch):
    from lvmkit.inference import compiled

    def unavailable(elbo):
        raise AttributeError("a torch without these TorchScript passes")

    monkeypatch.setattr(compiled, "_Specialized", unavailable)
    traced, eager = _fit(True), _fit(False)
    assert traced.compiled  # traced, replayed through Pyro's wrapper
    assert traced.history.train_loss.tolist() == pytest.approx(
        eager.history.train_loss.tolist(), rel=1e-5
    )


# -- a user's own pair: traced on a long run where it checks out, else eager with one line -------


def _user_pair(branch: bool = False, draw_numpy: bool = False, declared: bool | None = None):
    """A plain-function VAE as Pyro's tutorial writes it (nothing declared to lvmkit)."""
    pyro.set_rng_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 12))
    encoder = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    rng = np.random.default_rng(0)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            logits = decoder(z)  # (N, 12)
            if branch and x.sum() > 60:  # a tensor steering Python: tracing would freeze it
                logits = 2 * logits
            if draw_numpy:  # numpy's draws: a trace would freeze this one
                logits = logits + float(rng.normal())
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_var = encoder(x).split(2, dim=-1)  # (N, 2) each
            pyro.sample("z", dist.Normal(loc, (0.5 * log_var).exp()).to_event(1))

    if declared is not None:
        model.static_structure = declared  # type: ignore[attr-defined]
    return model, guide


def _user_fit(compile, steps: int = AUTO_TRACE_STEPS, **pair_options):
    pyro.clear_param_store()
    model, guide = _user_pair(**pair_options)
    return lvmkit.fit(model, guide, _data(2 * steps), epochs=1, batch_size=2, seed=5,
                      device="cpu", compile=compile, progress=False)  # fmt: skip


def test_a_users_pair_is_traced_on_a_long_run_and_trains_as_the_eager_step():
    traced, eager = _user_fit(None), _user_fit(False)
    assert traced.compiled and not eager.compiled
    assert traced.history.train_loss.tolist() == pytest.approx(
        eager.history.train_loss.tolist(), rel=1e-6
    )
    for name, value in eager.params.items():
        torch.testing.assert_close(traced.params[name], value, atol=1e-6, rtol=1e-6)
    assert not _user_fit(None, steps=20).compiled  # a short run: tracing would not pay


@pytest.mark.parametrize(
    "options, why",
    [
        ({"branch": True}, r"Converting a tensor to a Python boolean .*test_compiled\.py:\d+"),
        ({"draw_numpy": True}, r"the traced loss differs from the eager one: loss"),
        ({"declared": False}, None),
    ],
    ids=["a tensor steers Python", "numpy draws", "declared dynamic"],
)
def test_a_users_pair_that_cannot_be_traced_trains_eagerly_saying_why_in_one_line(
    options, why, caplog
):
    with caplog.at_level("WARNING", logger="lvmkit"):
        result = _user_fit(None, **options)
    assert not result.compiled
    lines = [r.getMessage() for r in caplog.records if "untraced" in r.getMessage()]
    if why is None:  # static_structure = False: not tried, nothing to say
        assert lines == []
    else:
        assert len(lines) == 1 and "\n" not in lines[0]
        assert re.search(why, lines[0]), lines[0]


def test_a_traced_users_pair_resumes_to_the_bits_of_an_uninterrupted_run(tmp_path):
    class Stop(lvmkit.Callback):
        def on_epoch_end(self, epoch, metrics):
            if epoch == 1:
                raise KeyboardInterrupt  # the run dies after its first epoch's checkpoint

    def run(path, **options):
        pyro.clear_param_store()
        model, guide = _user_pair()
        data = _data(AUTO_TRACE_STEPS)  # 2 epochs of 100 steps
        return lvmkit.fit(model, guide, data, epochs=2, batch_size=2, seed=5, device="cpu",
                          run_dir=path, progress=False, **options)  # fmt: skip

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callbacks=[Stop()])
    resumed = run(tmp_path / "cut", resume=True)
    assert whole.compiled and resumed.compiled
    for name, value in whole.params.items():
        assert torch.equal(resumed.params[name], value), name
