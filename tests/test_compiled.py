"""fit's compiled step (loss, gradients, clipping and the update as one compiled function) trains
as the eager step does, resumes to the same bits, or falls back and says why.

Tolerances: a compiled step draws the eager step's random numbers (torch's own generator) and
computes the same operations, fused; their results differ in the last bits of float32
arithmetic, which a few dozen Adam steps grow to ~1e-6 relative. Histories are compared at
rel 1e-5 and parameters at 1e-4 after 3 epochs, one SGD step at 1e-6.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.optim.clipped_adam import ClippedAdam

import lvmkit
from conftest import interrupted_scoring
from lvmkit.inference import compiled as compiled_module, products, train, updates, weights
from lvmkit.inference.calls import call_of


def _data(n: int) -> torch.Tensor:
    proto = torch.where(
        torch.rand(4, 12, generator=torch.Generator().manual_seed(0)) > 0.5, 0.9, 0.1
    )
    return torch.bernoulli(proto[torch.arange(n) % 4], generator=torch.Generator().manual_seed(1))


def _fit(compile: bool | None, n: int = 192, **kwargs):
    pyro.set_rng_seed(3)
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=12, latent_dim=2, hidden_dims=(16,)))
    options = {"epochs": 3, "batch_size": 32, "seed": 5, "device": "cpu", "progress": False}
    return lvmkit.fit(model, guide, _data(n), compile=compile, **{**options, **kwargs})


def _assert_trains_alike(compiled, eager, *, atol: float = 1e-4) -> None:
    assert compiled.compiled and not eager.compiled
    assert compiled.history.train_loss.tolist() == pytest.approx(
        eager.history.train_loss.tolist(), rel=1e-5
    )
    for name, value in eager.params.items():
        torch.testing.assert_close(compiled.params[name], value, atol=atol, rtol=atol)


# -- the optimizers' updates written on tensors (no compilation: the arithmetic itself) ---------


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, betas=(0.8, 0.9)),
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda ps: ClippedAdam(ps, lr=0.01, clip_norm=0.5, lrd=0.9),  # pyro.optim.ClippedAdam's
    ],
    ids=["Adam", "fused Adam+L2", "AdamW", "SGD", "SGD nesterov", "ClippedAdam"],
)
def test_updates_written_on_tensors_are_the_optimizers_own(make):
    torch.manual_seed(0)
    start = [torch.randn(3, 2), torch.randn(4)]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    ours_opt, theirs_opt = make(ours), make(theirs)
    plan = updates.plan(ours_opt)
    assert plan is not None
    for _ in range(4):
        grads = [torch.randn_like(p) for p in start]
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        theirs_opt.step()
        plan.before(ours_opt)
        rates = [torch.tensor(float(g["lr"])) for g in ours_opt.param_groups]
        states = plan.state(ours_opt, ours)
        updates.apply(plan.rules, plan.groups(ours_opt, ours), ours, grads, states, rates)
        plan.after(ours_opt, ours)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # the state is in the optimizer's own layout: its eager step can follow (an epoch's last,
    # smaller minibatch under fit's default), and lands where it would have
    for p, g in zip(ours, grads, strict=True):
        p.grad = g.clone()
    ours_opt.step()
    for p, g in zip(theirs, grads, strict=True):
        p.grad = g.clone()
    theirs_opt.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_optimizers_without_an_update_on_tensors_are_said_so():
    ps = [torch.zeros(2, requires_grad=True)]
    assert updates.plan(torch.optim.Adagrad(ps)) is None
    assert updates.plan(torch.optim.Adam(ps, amsgrad=True)) is None
    assert updates.plan(torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5)) is None


# -- the compiled step in fit --------------------------------------------------------------------


def test_compiled_training_matches_eager_training():
    # (an epoch's last, smaller minibatch gets a graph of its own: see the test after next)
    eager, compiled = _fit(False), _fit(True)
    _assert_trains_alike(compiled, eager)
    assert compiled.compile_s > 0 and eager.compile_s == 0


def test_one_compiled_sgd_step_with_clipping_is_the_eager_step():
    """The gradient is the loss's (not doubled, as Pyro 1.9's JitTrace_ELBO had it) and the
    norm clipping is torch's: one SGD step ends at the eager step's parameters."""
    options = {"epochs": 1, "batch_size": 192, "optimizer": torch.optim.SGD, "lr": 0.05,
               "clip_norm": 0.5}  # fmt: skip
    eager, compiled = _fit(False, **options), _fit(True, **options)
    _assert_trains_alike(compiled, eager, atol=1e-6)


def test_an_optimizer_without_an_update_on_tensors_steps_eagerly_on_compiled_gradients():
    options = {"epochs": 2, "batch_size": 48, "optimizer": torch.optim.Adagrad, "lr": 0.05}
    eager, compiled = _fit(False, **options), _fit(True, **options)
    _assert_trains_alike(compiled, eager)


def test_compiled_training_with_a_transform_and_resume_is_exact(tmp_path):
    kwargs = {"transform": torch.bernoulli, "validation_data": _data(40)}
    full = _fit(True, epochs=4, run_dir=tmp_path / "full", **kwargs)
    _fit(True, epochs=2, run_dir=tmp_path / "cut", **kwargs)
    resumed = _fit(True, epochs=4, run_dir=tmp_path / "cut", resume=True, **kwargs)
    assert resumed.compiled
    for name, value in full.params.items():
        assert torch.equal(resumed.params[name], value), name


def test_each_batch_shape_gets_its_own_graph():
    # len(x) is a Python int in the captured graph: a graph made at 16 rows would keep making 16
    decoder = torch.nn.Linear(2, 3)

    def model(x=None):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))  # (N, 2)
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)  # (N, 3)

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
            model, guide, torch.randn(40, 3, generator=torch.Generator().manual_seed(2)),
            epochs=2, batch_size=16, device="cpu", compile=compile, progress=False,
        )  # fmt: skip
        histories.append(result.history.train_loss.tolist())
    assert result.compiled
    assert histories[1] == pytest.approx(histories[0], rel=1e-5)


@pytest.mark.parametrize("auto", [True, False], ids=["fit's default", "compile=True"])
def test_an_epochs_last_smaller_minibatch_is_compiled_only_when_asked(auto):
    """Under compile=None a minibatch smaller than the first (an epoch's last) takes the eager
    step: one step an epoch does not repay a compilation. compile=True compiles every shape."""
    built = []

    class Counting(compiled_module.CompiledStep):
        def _build(self, call, values):
            built.append(len(values[0]))
            return None  # (nothing compiled: the caller takes the eager step)

    step = Counting(lambda call: torch.zeros(()), {}, None, auto=auto)
    x = _data(10)
    for rows in (slice(0, 4), slice(4, 8), slice(8, 10)):
        step.failure = None
        assert step(call_of((), {"x": x[rows]})) is None
    assert built == ([4, 4] if auto else [4, 4, 2])


def test_an_iwae_objective_is_compiled_and_trains_as_the_eager_step():
    options = {"objective": "iwae", "num_particles": 5, "epochs": 2, "batch_size": 48}
    eager, compiled = _fit(False, **options), _fit(True, **options)
    _assert_trains_alike(compiled, eager)


def _mixture():
    @config_enumerate
    def model(x):
        weights = pyro.param("weights", torch.ones(2) / 2, constraint=dist.constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Categorical(weights))  # enumerated: (2, 1)
            pyro.sample("x", dist.Normal(locs[k], 1.0).to_event(1), obs=x)  # batch (N,) event (2,)

    def guide(x):
        pass

    x = torch.cat([torch.randn(30, 2) - 2, torch.randn(30, 2) + 2])[torch.randperm(60)]
    return model, guide, x


def test_an_enumerated_mixture_is_compiled_and_trains_as_the_eager_step():
    """The discrete assignment summed out on the device (lvmkit's kernel, as its IWAE objective
    contracts it: with one particle and nothing else latent, the exact log-likelihood)."""
    model, guide, x = _mixture()
    results = []
    for compile in (False, True):
        pyro.clear_param_store()
        results.append(lvmkit.fit(model, guide, x, objective="iwae", num_particles=1, epochs=3,
                                  batch_size=20, lr=0.05, seed=1, device="cpu", compile=compile,
                                  progress=False))  # fmt: skip
    _assert_trains_alike(results[1], results[0])


def test_pyros_traceenum_elbo_trains_eagerly_naming_the_pyro_function_that_reads_a_value():
    """Pyro 1.9's TraceEnum_ELBO asks on the host whether every enumerated probability is
    positive (Dice.compute_expectation): no graph can hold that decision."""
    model, guide, x = _mixture()
    pyro.clear_param_store()
    with pytest.warns(RuntimeWarning, match=r"Pyro's compute_expectation \(util\.py:\d+\)"):
        result = lvmkit.fit(model, guide, x, objective=TraceEnum_ELBO(max_plate_nesting=1),
                            epochs=1, batch_size=20, device="cpu", compile=True,
                            progress=False)  # fmt: skip
    assert not result.compiled


# -- a user's own pair under fit's default: compiled on a long run, else eager with one line ----


# -- large products through oneDNN (AMD CPUs; forced here on any CPU) ----------------------------


@pytest.mark.parametrize("bias", ["none", "row"])
@pytest.mark.parametrize("layout", ["contiguous", "x transposed", "weight transposed", "both"])
def test_the_onednn_product_is_the_product_on_any_strides(layout, bias):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(33, 70, generator=generator), torch.randn(21, 70, generator=generator)
    if layout in ("x transposed", "both"):
        x = x.t().contiguous().t()  # (33, 70) with strides (1, 33)
    if layout in ("weight transposed", "both"):
        weight = weight.t().contiguous().t()
    row = torch.randn(21, generator=generator) if bias == "row" else None
    expected = x.double() @ weight.double().t() + (0 if row is None else row.double())
    got = torch.ops.lvmkit.onednn_linear(x, weight, row)
    assert got.dtype == torch.float32 and got.shape == (33, 21)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)  # float32's rounding


@pytest.fixture
def onednn(monkeypatch):
    """The pass on for every product of every compiled CPU graph, whatever this CPU."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(products, "CPU_PRODUCTS", "onednn")
    monkeypatch.setattr(products, "MIN_MACS", 1)
    monkeypatch.setattr(compiled_module, "HOST_BOUND_WORK", 0)


def _onednn_calls(run):
    """``run()``'s result and how many oneDNN products its compiled steps took."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = run()
    return result, sum(e.count for e in profile.key_averages() if e.key == "lvmkit::onednn_linear")


def test_a_step_whose_products_go_through_onednn_trains_as_the_eager_step(onednn):
    compiled, calls = _onednn_calls(lambda: _fit(True))
    # 6 minibatches × 3 epochs, 11 products a step: 4 forward, 7 backward (none for the data)
    assert calls >= 18 * 11
    _assert_trains_alike(compiled, _fit(False))


def test_a_run_on_onednn_products_resumes_to_the_bits_of_an_uninterrupted_one(onednn, tmp_path):
    full, calls = _onednn_calls(lambda: _fit(True, epochs=4, run_dir=tmp_path / "full"))
    _fit(True, epochs=2, run_dir=tmp_path / "cut")
    resumed = _fit(True, epochs=4, run_dir=tmp_path / "cut", resume=True)
    assert calls > 0 and resumed.compiled
    for name, value in full.params.items():
        assert torch.equal(resumed.params[name], value), name


def test_which_cpus_take_onednn_products(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    for vendor, wanted in [("AuthenticAMD", True), ("GenuineIntel", False), ("", False)]:
        monkeypatch.setattr(products, "_cpu_vendor", lambda vendor=vendor: vendor)
        assert products.wanted() is wanted, vendor
    monkeypatch.setattr(products, "CPU_PRODUCTS", "onednn")
    assert products.wanted()
    monkeypatch.setattr(products, "CPU_PRODUCTS", "mkl")
    monkeypatch.setattr(products, "_cpu_vendor", lambda: "AuthenticAMD")
    assert not products.wanted()
    monkeypatch.setattr(products, "CPU_PRODUCTS", "blas")
    with pytest.raises(ValueError, match=r"must be 'auto', 'onednn' or 'mkl', got 'blas'"):
        products.wanted()


def _user_pair(branch: bool = False, draw_numpy: bool = False, declared: bool | None = None,
               batch_norm: bool = False):  # fmt: skip
    """A plain-function VAE as Pyro's tutorial writes it (nothing declared to lvmkit)."""
    pyro.set_rng_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 12))
    layers = [torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)]
    if batch_norm:
        layers.insert(1, torch.nn.BatchNorm1d(8))
    encoder = torch.nn.Sequential(*layers)
    rng = np.random.default_rng(0)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            logits = decoder(z)  # (N, 12)
            if branch and x.sum() > 60:  # a tensor steering Python: a graph would freeze it
                logits = 2 * logits
            if draw_numpy:  # numpy's draws: a graph would freeze this one
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


STEPS = 60  # fit's threshold for compiling by default, lowered for these tests


@pytest.fixture
def short_threshold(monkeypatch):
    monkeypatch.setattr(train, "AUTO_COMPILE_STEPS", STEPS)


def _user_fit(compile, steps: int = STEPS, **options):
    pyro.clear_param_store()
    model, guide = _user_pair(**options)
    return lvmkit.fit(model, guide, _data(4 * steps), epochs=1, batch_size=4, seed=5,
                      device="cpu", compile=compile, progress=False)  # fmt: skip


def test_a_users_pair_is_compiled_on_a_long_run_and_trains_as_the_eager_step(short_threshold):
    compiled, eager = _user_fit(None), _user_fit(False)
    _assert_trains_alike(compiled, eager)
    assert not _user_fit(None, steps=STEPS // 2).compiled  # a short run: compiling would not pay


@pytest.mark.parametrize(
    "options, why",
    [
        ({"branch": True}, r"reads a tensor's value in Python .*test_compiled\.py:\d+"),
        ({"draw_numpy": True}, r"the captured loss differs from the eager one: loss"),
        ({"batch_norm": True}, r"writes in place to a buffer"),
        ({"declared": False}, None),
    ],
    ids=["a tensor steers Python", "numpy draws", "BatchNorm's statistics", "declared dynamic"],
)
def test_a_users_pair_that_cannot_be_compiled_trains_eagerly_saying_why_in_one_line(
    options, why, caplog, short_threshold
):
    with caplog.at_level("WARNING", logger="lvmkit"):
        result = _user_fit(None, **options)
    assert not result.compiled and len(result.history) == 1
    lines = [r.getMessage() for r in caplog.records if "uncompiled" in r.getMessage()]
    if why is None:  # static_structure = False: not tried, nothing to say
        assert lines == []
    else:
        assert len(lines) == 1 and "\n" not in lines[0]
        assert re.search(why, lines[0]), lines[0]


def test_compile_true_warns_when_the_step_cannot_be_compiled():
    pyro.clear_param_store()
    model, guide = _user_pair(branch=True)
    with pytest.warns(RuntimeWarning, match="could not be compiled.*training continues eagerly"):
        result = lvmkit.fit(model, guide, _data(64), epochs=2, batch_size=16, device="cpu",
                            compile=True, progress=False)  # fmt: skip
    assert list(result.history.epoch) == [1, 2] and not result.compiled


def test_a_compiled_users_pair_resumes_to_the_bits_of_an_uninterrupted_run(
    tmp_path, short_threshold
):
    class Stop(lvmkit.Callback):
        def on_epoch_end(self, epoch, metrics):
            if epoch == 1:
                raise KeyboardInterrupt  # the run dies after its first epoch's checkpoint

    def run(path, **options):
        pyro.clear_param_store()
        model, guide = _user_pair()
        return lvmkit.fit(model, guide, _data(2 * STEPS), epochs=2, batch_size=4, seed=5,
                          device="cpu", run_dir=path, progress=False, **options)  # fmt: skip

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callbacks=[Stop()])
    resumed = run(tmp_path / "cut", resume=True)
    assert whole.compiled and resumed.compiled
    for name, value in whole.params.items():
        assert torch.equal(resumed.params[name], value), name


def test_the_captured_bernoulli_density_is_torchs_in_value_and_gradient():
    logits = torch.tensor([-100.0, -30, -20.5, -15, -1, 0, 1e-3, 1, 15, 20.5, 30, 100])
    for y in (0.0, 1.0, 0.3):
        target = torch.full_like(logits, y)
        ours, theirs = (logits.clone().requires_grad_() for _ in range(2))
        a = compiled_module._bce_with_logits(ours, target, reduction=0)
        b = torch.nn.functional.binary_cross_entropy_with_logits(theirs, target, reduction="none")
        torch.testing.assert_close(a, b, atol=2e-7, rtol=1e-6)
        (ga,) = torch.autograd.grad(a.sum(), ours)
        (gb,) = torch.autograd.grad(b.sum(), theirs)
        torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-6)
        assert float(ga[5]) == pytest.approx(0.5 - y)  # sigmoid(0) − y (|l|'s gradient: −y)
    call = call_of((torch.ones(2, 3),), {})
    logits = torch.zeros(2, 3, requires_grad=True)

    def loss(call):
        return -dist.Bernoulli(logits=logits).log_prob(call.args[0]).sum()

    graph, _ = compiled_module.capture(loss, call, [logits])
    targets = {node.target for node in graph.graph.nodes}
    assert torch.ops.aten.softplus.default in targets
    assert torch.ops.aten.binary_cross_entropy_with_logits.default not in targets


# -- the evaluation's pass compiled ---------------------------------------------------------------


def _scores(model, guide, compile, n: int = 22, **options):
    options = {"max_pairs": 256, "seed": 7, "device": "cpu", **options}  # chunks of 4 points
    return lvmkit.evaluate(model, guide, _data(n), 64, compile=compile, **options)


@pytest.mark.parametrize("pair", ["built-in VAE", "a user's pair"])
def test_a_compiled_evaluation_draws_and_scores_as_the_eager_one(pair):
    pyro.clear_param_store()
    if pair == "built-in VAE":
        model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=12, latent_dim=2))
    else:
        model, guide = _user_pair()
    torch.manual_seed(11)
    eager = _scores(model, guide, False, seed=None)  # from the caller's random stream
    after_eager = torch.rand(3)
    torch.manual_seed(11)
    compiled = _scores(model, guide, True, seed=None)
    assert torch.equal(torch.rand(3), after_eager)  # the caller's stream advanced alike
    assert compiled.attrs["compiled"] and not eager.attrs["compiled"]
    # the same draws: weights equal to float32's last bits (the last chunk, 2 points, has its
    # own graph), so the reductions agree to ~1e-6 and k̂'s tail fit to ~1e-4
    columns = ["elbo", "log_likelihood", "ess"]
    pd.testing.assert_frame_equal(compiled[columns], eager[columns], rtol=1e-5)
    np.testing.assert_allclose(compiled.pareto_k, eager.pareto_k, atol=1e-3)


def test_an_interrupted_compiled_evaluation_continues_to_the_same_bits(tmp_path, monkeypatch):
    model, guide = _user_pair()
    straight = _scores(model, guide, True)
    path = tmp_path / "partial.pt"
    with interrupted_scoring(monkeypatch, block=64 * 8, at=2), pytest.raises(KeyboardInterrupt):
        _scores(model, guide, True, checkpoint=path)
    assert lvmkit.inference.checkpoint.load_checkpoint(path)["stop"] == 8
    resumed = _scores(model, guide, True, checkpoint=path)
    assert resumed.attrs["compiled"]
    pd.testing.assert_frame_equal(resumed, straight)


def test_an_evaluation_compiles_by_default_only_where_it_repays(monkeypatch):
    model, guide = _user_pair()
    assert not _scores(model, guide, None).attrs["compiled"]  # 22 points: far too short
    monkeypatch.setattr(weights, "AUTO_COMPILE_WORK", 6 * 64 * 4 * 272)  # passes × pairs × params
    assert _scores(model, guide, None).attrs["compiled"]
    assert not _scores(model, guide, None, n=18).attrs["compiled"]  # 5 passes, not 6


def test_a_pair_that_cannot_be_compiled_is_evaluated_eagerly_saying_why(monkeypatch, caplog):
    model, guide = _user_pair(branch=True)
    eager = _scores(model, guide, False)
    monkeypatch.setattr(weights, "AUTO_COMPILE_WORK", 0)
    with caplog.at_level("WARNING", logger="lvmkit"):
        auto = _scores(model, guide, None)
    lines = [r.getMessage() for r in caplog.records if "passes eagerly" in r.getMessage()]
    assert len(lines) == 1 and re.search(
        r"reads a tensor's value .*test_compiled\.py:\d+", lines[0]
    )
    pd.testing.assert_frame_equal(auto, eager)  # the same numbers, eager throughout
    with pytest.warns(RuntimeWarning, match="pass could not be compiled.*continues eagerly"):
        assert not _scores(model, guide, True).attrs["compiled"]


# -- CUDA: the compiled step replayed as a CUDA graph --------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_step_on_cuda_trains_as_the_eager_step():
    options = {"device": "cuda", "epochs": 2}
    eager, compiled = _fit(False, **options), _fit(True, **options)
    _assert_trains_alike(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_compiled_cuda_run_resumes_to_the_same_bits(tmp_path):
    full = _fit(True, device="cuda", epochs=4, run_dir=tmp_path / "full")
    _fit(True, device="cuda", epochs=2, run_dir=tmp_path / "cut")
    resumed = _fit(True, device="cuda", epochs=4, run_dir=tmp_path / "cut", resume=True)
    for name, value in full.params.items():
        assert torch.equal(resumed.params[name], value), name
