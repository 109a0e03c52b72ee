"""The training loop: objectives, user-defined pairs, isolation, resume, and no per-step syncs."""

from __future__ import annotations

import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import lvmkit
from conftest import assert_close, needs_cuda
from lvmkit.inference.objectives import TraceELBO, TraceMeanFieldELBO
from plain_pair import make_plain_pair


def _binary(n: int = 256, d: int = 12, seed: int = 0) -> torch.Tensor:
    """Noisy binary copies of four fixed prototypes; ``seed`` picks the noise."""
    proto = torch.where(
        torch.rand(4, d, generator=torch.Generator().manual_seed(0)) > 0.5, 0.95, 0.05
    )
    return torch.bernoulli(
        proto[torch.arange(n) % 4], generator=torch.Generator().manual_seed(seed)
    )


def _pair(d: int = 12, latent: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return lvmkit.build_vae(lvmkit.VAEConfig(data_dim=d, latent_dim=latent, hidden_dims=(16,)))


@pytest.mark.parametrize(
    ("ours", "pyros"),
    [(TraceELBO, pyro.infer.Trace_ELBO), (TraceMeanFieldELBO, pyro.infer.TraceMeanField_ELBO)],
    ids=["elbo", "mean_field"],
)
def test_on_device_objectives_equal_pyros_own(ours, pyros):
    model, guide = _pair()
    x = _binary(32)
    pyro.set_rng_seed(5)
    loss = ours()(model, guide)(x=x)
    grads = torch.autograd.grad(loss, list(guide.parameters()))
    pyro.set_rng_seed(5)
    ref = pyros()(model, guide)(x=x)
    ref_grads = torch.autograd.grad(ref, list(guide.parameters()))
    assert_close(loss, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, atol=1e-5)


def test_analytic_and_monte_carlo_kl_agree_in_expectation():
    model, guide = _pair()
    x = _binary(64)
    with pyro.validation_enabled(False), torch.no_grad():
        draws = {
            name: torch.stack([obj()(model, guide)(x=x) for _ in range(300)])
            for name, obj in (("mc", TraceELBO), ("analytic", TraceMeanFieldELBO))
        }
    diff = draws["mc"].mean() - draws["analytic"].mean()
    se = (draws["mc"].var() / 300 + draws["analytic"].var() / 300).sqrt()
    assert abs(diff) < 4 * se  # same expectation, within four standard errors
    assert draws["analytic"].var() < draws["mc"].var()  # the analytic KL removes variance


def test_fit_reduces_the_loss_and_returns_history():
    model, guide = _pair()
    x = _binary()
    result = lvmkit.fit(
        model,
        guide,
        x,
        epochs=5,
        batch_size=32,
        lr=1e-2,
        seed=1,
        device="cpu",
        validation_data=_binary(64, seed=9),
        progress=False,
    )
    hist = result.history
    columns = ["epoch", "train_loss", "val_elbo", "lr", "seconds", "examples_per_s"]
    assert list(hist.columns) == columns
    assert list(hist.epoch) == [1, 2, 3, 4, 5]
    assert hist.train_loss.iloc[-1] < hist.train_loss.iloc[0] - 0.5
    assert hist.val_elbo.iloc[-1] > hist.val_elbo.iloc[0]
    assert (hist.examples_per_s > 0).all()
    assert result.model is model and result.device == torch.device("cpu")
    assert set(result.params) == {f"model.{k}" for k, _ in model.named_parameters()} | {
        f"guide.{k}" for k, _ in guide.named_parameters()
    }


def test_user_defined_pair_of_plain_functions_trains_and_evaluates():
    d, latent = 12, 2
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(latent, 16), nn.Tanh(), nn.Linear(16, d))
    encoder = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 2 * latent))

    def model(x=None):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(torch.zeros(latent), 1.0).to_event(1)
            )  # batch (N,) event (Dz,)
            pyro.sample(
                "x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x
            )  # batch (N,) event (D,)

    def guide(x=None):
        pyro.module("encoder", encoder)
        loc, log_scale = encoder(x).split(latent, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z", dist.Normal(loc, log_scale.exp()).to_event(1)
            )  # batch (N,) event (Dz,)

    before = lvmkit.summarize(lvmkit.evaluate(model, guide, _binary(64, seed=3), num_samples=50))
    result = lvmkit.fit(
        model, guide, _binary(), epochs=8, batch_size=32, lr=1e-2, device="cpu", progress=False
    )
    after = lvmkit.summarize(lvmkit.evaluate(model, guide, _binary(64, seed=3), num_samples=50))
    assert after.log_likelihood > before.log_likelihood + 0.5
    assert len(result.params) == 8  # 2 layers × (weight, bias) × 2 networks, via param sites
    # Plain functions keep Pyro's semantics: their parameters are in the global store afterwards.
    store = pyro.get_param_store()
    assert store["decoder$$$0.weight"] is decoder[0].weight


def test_two_fits_in_one_process_do_not_interfere():
    x = _binary()
    kwargs = dict(epochs=2, batch_size=32, seed=3, device="cpu", progress=False)
    model_a, guide_a = _pair(seed=7)
    lvmkit.fit(model_a, guide_a, x, **kwargs)
    trained_a = {k: v.clone() for k, v in model_a.state_dict().items()}
    model_b, guide_b = _pair(seed=7)  # same names, same initial values, separate modules
    lvmkit.fit(model_b, guide_b, x, **kwargs)
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, trained_a[key])  # b's fit did not touch a
        assert torch.equal(model_b.state_dict()[key], value)  # and b trained exactly like a
    assert len(pyro.get_param_store()) == 0  # module parameters never went to the global store


def test_resume_ends_with_the_parameters_of_an_uninterrupted_run(tmp_path):
    x, val = _binary(200), _binary(40, seed=5)
    kwargs = dict(
        batch_size=32,
        seed=11,
        device="cpu",
        validation_data=val,
        transform=torch.bernoulli,
        progress=False,
    )
    model, guide = _pair(seed=1)
    full = lvmkit.fit(model, guide, x.mul(0.8), epochs=4, run_dir=tmp_path / "full", **kwargs)
    model2, guide2 = _pair(seed=1)
    lvmkit.fit(model2, guide2, x.mul(0.8), epochs=2, run_dir=tmp_path / "cut", **kwargs)
    model3, guide3 = _pair(seed=99)  # a fresh process would rebuild with any initial values
    resumed = lvmkit.fit(
        model3, guide3, x.mul(0.8), epochs=4, run_dir=tmp_path / "cut", resume=True, **kwargs
    )
    for name, value in full.params.items():
        assert torch.equal(resumed.params[name], value), name
    assert list(resumed.history.epoch) == [1, 2, 3, 4]
    assert resumed.history.train_loss.tolist() == full.history.train_loss.tolist()
    on_disk = (tmp_path / "cut" / "history.csv").read_text().splitlines()
    assert len(on_disk) == 5 and on_disk[0].startswith("epoch,train_loss,val_elbo")


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_no_host_sync_per_training_step(monkeypatch, compile):
    x = _binary(32 * 25)  # 25 steps per epoch
    counts = {"n": 0}
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            # torch's Adam reads its step counters with .item(); they live on the host even
            # for CUDA parameters (unless capturable/fused), so those reads never wait for a GPU.
            if "torch/optim" not in sys._getframe(1).f_code.co_filename:
                counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def syncs(epochs: int) -> int:
        counts["n"] = 0
        model, guide = _pair()
        lvmkit.fit(
            model,
            guide,
            x,
            epochs=epochs,
            batch_size=32,
            device="cpu",
            compile=compile,
            progress=False,
        )
        return counts["n"]

    if compile:
        syncs(2)  # compilation reads values too: warm inductor's cache so both runs load it alike
    extra = syncs(4) - syncs(2)  # 50 more steps
    assert extra <= 2 * 2, f"{extra} host syncs in 2 epochs of 25 steps: expected ≤ 2 per epoch"


def test_same_seed_same_numbers():
    x = _binary()
    histories = []
    for _ in range(2):
        model, guide = _pair(seed=2)
        histories.append(
            lvmkit.fit(
                model, guide, x, epochs=2, batch_size=32, seed=4, device="cpu", progress=False
            ).history.train_loss.tolist()
        )
    assert histories[0] == histories[1]


@needs_cuda
def test_plain_function_pair_is_moved_to_cuda_and_evaluated_there():
    model, guide, decoder = make_plain_pair()
    lvmkit.fit(model, guide, _binary(), epochs=1, batch_size=32, device="cuda", progress=False)
    assert decoder.weight.is_cuda and pyro.param("loc").is_cuda
    assert len(lvmkit.evaluate(model, guide, _binary(8), num_samples=25)) == 8


@needs_cuda
def test_fit_and_evaluate_on_cuda():
    model, guide = _pair()
    result = lvmkit.fit(
        model, guide, _binary(), epochs=1, batch_size=32, device="cuda", progress=False
    )
    assert all(p.is_cuda for p in result.params.values())
    scores = lvmkit.evaluate(model, guide, _binary(16), num_samples=30)
    assert len(scores) == 16
