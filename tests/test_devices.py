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
from lvmkit.inference._data import call_of
from lvmkit.inference.objectives import TraceELBO, TraceMeanFieldELBO
from lvmkit.inference.weights import Layout, log_density_pass

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
