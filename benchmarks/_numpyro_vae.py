"""The speed benchmark's NumPyro contender: the same VAE, trained by NumPyro's SVI under jax.jit.

Same network as lvmkit's (encoder D-H-2Z with a log-variance head, decoder Z-H-D, ReLU, Bernoulli
logits), PyTorch's default initialisation (uniform ±1/√fan_in), NumPyro's ``Trace_ELBO`` (one
Monte-Carlo sample, as lvmkit's default) and Adam at the same learning rate. Imported only when
NumPyro is installed (``pip install 'lvmkit[numpyro]'``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import Adam


def _init_mlp(rng: np.random.Generator, widths: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    layers = []
    for fan_in, fan_out in itertools.pairwise(widths):
        bound = 1.0 / np.sqrt(fan_in)  # torch.nn.Linear's default
        weight = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        bias = rng.uniform(-bound, bound, fan_out).astype(np.float32)
        layers.append((weight, bias))
    return layers


def _mlp(prefix: str, init: list[tuple[np.ndarray, np.ndarray]], h: jnp.ndarray) -> jnp.ndarray:
    for i, (weight0, bias0) in enumerate(init):
        weight = numpyro.param(f"{prefix}_w{i}", weight0)
        bias = numpyro.param(f"{prefix}_b{i}", bias0)
        h = h @ weight + bias
        if i < len(init) - 1:
            h = jax.nn.relu(h)
    return h


def _svi(
    data_dim: int, hidden_dim: int, latent_dim: int, lr: float, first_batch: np.ndarray, seed: int
) -> tuple[SVI, object]:
    rng = np.random.default_rng(seed)
    decoder_init = _init_mlp(rng, [latent_dim, hidden_dim, data_dim])
    encoder_init = _init_mlp(rng, [data_dim, hidden_dim, 2 * latent_dim])

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", ndist.Normal(0.0, 1.0).expand([latent_dim]).to_event(1))
            logits = _mlp("decoder", decoder_init, z)  # (B, D)
            numpyro.sample("x", ndist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x):
        loc, log_var = jnp.split(_mlp("encoder", encoder_init, x), 2, axis=-1)  # (B, Z) each
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", ndist.Normal(loc, jnp.exp(0.5 * log_var)).to_event(1))

    svi = SVI(model, guide, Adam(lr), Trace_ELBO())
    return svi, svi.init(jax.random.PRNGKey(seed), jnp.asarray(first_batch))


def make_step(
    data_dim: int, hidden_dim: int, latent_dim: int, lr: float, first_batch: np.ndarray, seed: int
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Return ``step(x) -> loss``, one jitted SVI update on a JAX array ``x`` of shape (B, D)."""
    svi, state = _svi(data_dim, hidden_dim, latent_dim, lr, first_batch, seed)
    update = jax.jit(svi.update)
    holder = {"state": state}

    def step(x: jnp.ndarray) -> jnp.ndarray:
        holder["state"], loss = update(holder["state"], x)
        return loss.block_until_ready()

    return step


def make_epoch(
    hidden_dim: int,
    latent_dim: int,
    lr: float,
    data: np.ndarray,
    batch_size: int,
    seed: int,
    order: Callable[[int], np.ndarray],
) -> Callable[[int], float]:
    """Return ``epoch(number) -> loss``: one pass over ``data`` in ``order(number)``, each step
    ``SVI.update`` on the minibatch gathered by index inside the jitted function (as a NumPyro
    user writes a fast loop), the losses summed on the device and read once at the end."""
    svi, state = _svi(data.shape[1], hidden_dim, latent_dim, lr, data[:batch_size], seed)
    device_data = jnp.asarray(data)

    @jax.jit
    def update(state, total, index):
        state, loss = svi.update(state, device_data[index])
        return state, total + loss

    holder = {"state": state}

    def epoch(number: int) -> float:
        indices = order(number)
        total = jnp.zeros(())
        for start in range(0, len(indices), batch_size):
            index = jnp.asarray(indices[start : start + batch_size])
            holder["state"], total = update(holder["state"], total, index)
        return float(total)  # the epoch's loss, read once

    return epoch
