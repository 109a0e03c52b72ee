"""Device placement without a GPU: everything runs on PyTorch's "meta" device.

A tensor that a model, guide or objective creates on the CPU by accident (``torch.zeros(n)``
without ``device=``) collides with meta tensors and raises, just as it would collide with CUDA
tensors on a GPU. So these tests fail on a CPU-only machine for the bugs that would break GPUs.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

import lvmkit
from conftest import needs_cuda
from lvmkit.inference.calls import call_of
from lvmkit.inference.kernel import Layout, log_density_pass
from lvmkit.inference.objectives import TraceELBO, TraceMeanFieldELBO

META = torch.device("meta")


def _meta_pair(likelihood: str = "bernoulli"):
    config = lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,), likelihood=likelihood)
    model, guide = lvmkit.build_vae(config)
    return model.to(META), guide.to(META)


@pytest.mark.parametrize("likelihood", lvmkit.LIKELIHOODS)
@pytest.mark.parametrize("objective", [TraceELBO, TraceMeanFieldELBO], ids=["elbo", "mean_field"])
def test_training_loss_stays_on_the_device(likelihood, objective):
    model, guide = _meta_pair(likelihood)
    with pyro.validation_enabled(False):  # validation reads values on the host
        loss = objective()(model, guide)(x=torch.empty(5, 6, device=META))
    assert loss.device == META
    loss.backward()
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters())


@pytest.mark.parametrize("likelihood", lvmkit.LIKELIHOODS)
def test_generation_and_log_weights_stay_on_the_device(likelihood):
    model, guide = _meta_pair(likelihood)
    with pyro.validation_enabled(False), torch.no_grad():
        assert model(batch_size=3).device == META
        call = call_of((), {"x": torch.empty(4, 6, device=META)})
        log_p, log_q = log_density_pass(model, guide, call, 7, Layout(plate="data", nesting=1))
        lw = log_p - log_q
    assert lw.device == META and lw.shape == (7, 4)


def test_a_tensor_made_on_the_cpu_is_caught():
    class CpuPrior(lvmkit.VAE):
        def forward(self, x=None, *, batch_size=None):
            with pyro.plate("data", x.shape[0]):
                prior = dist.Normal(torch.zeros(self.config.latent_dim), 1.0).to_event(1)  # CPU!
                z = pyro.sample("z", prior)  # batch (N,) event (Dz,)
                pyro.sample("x", self.likelihood(z), obs=x)  # batch (N,) event (Dx,)

    config = lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,))
    model = CpuPrior(config).to(META)
    _, guide = _meta_pair()
    with (
        pyro.validation_enabled(False),
        pytest.raises(RuntimeError, match="on device cpu is not on the expected device meta"),
    ):
        TraceELBO()(model, guide)(x=torch.empty(5, 6, device=META))


# -- the device policy (inference/devices.py) ------------------------------------------------------


def _cpu_made_pair(data_dim: int = 6, latent_dim: int = 2):
    """A pair written for the CPU, as Pyro users write them: a network built before the fit,
    ``torch.ones``/``torch.zeros`` made inside the model and guide without ``device=``."""
    decoder = torch.nn.Linear(latent_dim, data_dim)
    encoder = torch.nn.Linear(data_dim, 2 * latent_dim)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(torch.zeros(latent_dim), torch.ones(latent_dim)).to_event(1)
            z = pyro.sample("z", prior)  # batch (N,) event (Dz,)
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)  # event (D,)

    def guide(x):
        pyro.module("encoder", encoder)
        loc, log_scale = encoder(x).chunk(2, dim=-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z", dist.Normal(loc, log_scale.exp()).to_event(1)
            )  # batch (N,) event (Dz,)

    return model, guide, decoder, encoder


def _binary(n: int = 64, d: int = 6) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, d), 0.3))


def test_by_default_cpu_data_train_on_the_cpu_on_a_machine_that_reports_cuda(monkeypatch):
    """fit, evaluate and to_inference_data move nothing unless asked, as Pyro's SVI: a pair
    written for the CPU trains and is scored on the CPU where CUDA is present."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, guide, decoder, _ = _cpu_made_pair()
    result = lvmkit.fit(model, guide, _binary(), epochs=2, batch_size=16, progress=False)
    assert result.device == torch.device("cpu") and not decoder.weight.is_cuda
    assert len(lvmkit.evaluate(model, guide, _binary(5), num_samples=30)) == 5
    idata = lvmkit.to_inference_data(model, guide, _binary(5), num_samples=4)
    assert dict(idata.posterior["z"].sizes)["point"] == 5


def test_data_and_parameters_on_different_devices_are_refused_naming_them():
    config = lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,))
    model, guide = lvmkit.build_vae(config)
    guide.to(META)
    with pytest.raises(ValueError) as info:
        lvmkit.fit(model, guide, _binary(), epochs=1, progress=False)
    message = str(info.value)
    assert message.startswith(
        "the data and the pair's parameters are on different devices: data, model."
    )
    assert "on cpu; guide." in message and "on meta" in message
    assert "moves nothing unless asked" in message and "device='cpu' or 'meta'" in message


def test_a_device_mismatch_inside_the_users_code_names_the_function_site_and_fix():
    """Data on the CPU, a network the user registers with pyro.module on another device (meta
    stands in for a GPU): lvmkit says where, in the user's function, after which site."""
    model, guide, decoder, _ = _cpu_made_pair()
    decoder.to(META)  # e.g. net.cuda() in the user's script, data left on the CPU
    with pytest.raises(ValueError) as info:
        lvmkit.fit(model, guide, _binary(), epochs=1, progress=False)
    message = str(info.value)
    assert "a device mismatch in model() at " in message and "test_devices.py" in message
    assert "sample site 'z'" in message
    assert "pass device='cpu' to fit" in message and "x.new_zeros" in message


def test_an_explicit_device_moves_networks_as_they_are_first_used_and_sets_the_default():
    """With an explicit device, a network whose forward runs is moved before it computes, and
    the user's code makes its tensors there (meta stands in for a GPU: a CPU tensor meeting a
    meta one raises, as it would on CUDA). Moving pyro.param tensors in place (a CPU tensor's
    storage cannot become a meta one) is checked on CUDA below."""
    from lvmkit.inference.devices import Placement

    network = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    placement = Placement(META, moves=True)
    with placement.first_use():
        out = network(torch.ones(5, 3) + torch.arange(3.0))  # made without device=
    assert out.device == META and network[1].running_mean.device == META
    assert placement.moved == {"networks": ["Linear", "BatchNorm1d"]}
    with placement.scope():
        assert torch.ones(2).device == META
    assert torch.ones(2).device == torch.device("cpu")
    assert Placement(torch.device("cpu"), moves=True).scope().__class__.__name__ == "nullcontext"


def test_the_explicit_device_moves_the_pairs_modules():
    from lvmkit.inference.devices import Placement, move_pair

    config = lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,))
    model, guide = lvmkit.build_vae(config)
    placement = Placement(META, moves=True)
    move_pair(placement, model, guide)
    assert all(p.device == META for p in [*model.parameters(), *guide.parameters()])
    assert placement.moved == {"the pair's modules": ["model", "guide"]}


def test_the_one_line_says_what_moved(caplog):
    from lvmkit.inference.devices import Placement

    placement = Placement(META, moves=True)
    placement.note("data", "data")
    placement.note("networks", "Linear")
    with caplog.at_level("WARNING", logger="lvmkit"):
        placement.say("fit")
        placement.say("fit")  # said once
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "lvmkit: fit moved to meta: data (data); networks (Linear); the model, guide and "
        "transform run with meta as torch's default device"
    ]


def test_a_bare_assert_in_the_model_gets_lvmkits_error_not_a_crash():
    def model(x):
        assert x.shape[1] == 99
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def guide(x):
        pass

    with pytest.raises(ValueError, match=r"AssertionError in model\(\) at .*test_devices.py"):
        lvmkit.evaluate(model, guide, torch.zeros(4, 3), num_samples=2)


@needs_cuda
def test_a_cpu_written_pair_runs_unchanged_on_cuda_when_asked():
    model, guide, decoder, encoder = _cpu_made_pair()
    result = lvmkit.fit(
        model, guide, _binary(), epochs=2, batch_size=16, device="cuda", progress=False
    )
    assert result.device.type == "cuda" and decoder.weight.is_cuda and encoder.weight.is_cuda
    assert all(p.is_cuda for p in result.params.values())
    scores = lvmkit.evaluate(model, guide, _binary(8), num_samples=30)  # the pair's device
    assert len(scores) == 8 and scores.log_likelihood.notna().all()
    again = lvmkit.evaluate(model, guide, _binary(8).cuda(), num_samples=30, device="cuda")
    assert len(again) == 8


@needs_cuda
def test_the_explicit_device_moves_param_store_tensors_in_place():
    from lvmkit.inference.devices import Placement, move_pair

    scale = pyro.param("scale", torch.ones(3)).unconstrained()
    network = torch.nn.Linear(2, 3)
    pyro.module("net", network)
    move_pair(Placement(torch.device("cuda"), moves=True), None, None)
    assert scale.is_cuda and network.weight.is_cuda  # the same objects, moved in place
    assert pyro.param("scale").is_cuda


@needs_cuda
def test_cuda_data_train_on_cuda_by_default_and_a_cpu_network_is_named():
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,)))
    model.cuda()
    guide.cuda()
    result = lvmkit.fit(model, guide, _binary().cuda(), epochs=1, progress=False)
    assert result.device.type == "cuda"
    cpu_model, cpu_guide, _, _ = _cpu_made_pair()
    with pytest.raises(ValueError, match=r"a device mismatch in (model|guide)\(\) at "):
        lvmkit.fit(cpu_model, cpu_guide, _binary().cuda(), epochs=1, progress=False)
