"""An inverse-autoregressive-flow posterior (Kingma, Salimans, Józefowicz, Chen, Sutskever &
Welling, "Improved Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016):
q(z | x) is the Gaussian encoder's N(μ(x), σ(x)²) pushed through a chain of affine
autoregressive transforms (Pyro's ``dist.transforms``: MADE networks, the latent order reversed
between steps), so its density is exact,

    log q(z | x) = log N(z_0; μ(x), σ(x)²) − Σ_t log |det ∂z_t / ∂z_{t−1}|,

and z stays reparameterized (IWAE and its relatives take it). The flow's weights are shared by
every data point (the paper also feeds a context h(x) to each step; this version does not).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import transforms
from pyro.nn import PyroModule
from torch import nn

from lvmkit.base import check_int, check_sizes
from lvmkit.guides.gaussian import GaussianEncoder, GaussianEncoderConfig


class IAFEncoder(PyroModule):
    """q(z | x): a :class:`lvmkit.GaussianEncoder`'s Gaussian through ``num_flows`` inverse
    autoregressive transforms (see the module docstring). ``num_flows=0`` is the Gaussian
    encoder itself.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_iaf_vae(
        ...     lvmkit.VAEConfig(data_dim=4, latent_dim=3, hidden_dims=(8,)), num_flows=2)
        >>> guide.posterior(torch.zeros(5, 4)).rsample().shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        config: GaussianEncoderConfig,
        *,
        num_flows: int = 2,
        flow_hidden: tuple[int, ...] | None = None,
    ) -> None:
        if not isinstance(config, GaussianEncoderConfig):
            raise TypeError(f"config must be a GaussianEncoderConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.num_flows = check_int("num_flows", num_flows, minimum=0)
        d = config.latent_dim
        hidden = check_sizes("flow_hidden", flow_hidden) if flow_hidden else (4 * d,)
        self.base = GaussianEncoder(config)
        self.flows = nn.ModuleList(
            [
                transforms.affine_autoregressive(d, hidden_dims=list(hidden))
                for _ in range(num_flows)
            ]
        )
        self.register_buffer("reverse", torch.arange(d - 1, -1, -1))

    def chain(self) -> list:
        """The transforms in order: each flow, the latent order reversed between them."""
        out: list = []
        for t, flow in enumerate(self.flows):
            if t:
                out.append(transforms.Permute(self.reverse))
            out.append(flow)
        return out

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x), batch ``(N,)``, event ``(latent_dim,)``."""
        loc, scale = self.base.encode(x)
        gaussian = dist.Normal(loc, scale).to_event(1)
        return dist.TransformedDistribution(gaussian, self.chain()) if self.num_flows else gaussian

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None):
        if x is None:
            raise ValueError("IAFEncoder needs data: call guide(x) with x of shape (N, D)")
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(x))  # batch (N,) event (Dz,)


__all__ = ["IAFEncoder"]
