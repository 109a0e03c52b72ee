"""A user's own models for the benchmark suites, written as a Pyro user writes them: plain
functions that register their networks with ``pyro.module``, architectures unlike the built-ins
(one 64-unit ReLU layer, log-scales, one-hot labels). ``make_pair(task)`` reads the task and
returns the pair that fits it; ``tests/test_bench_contenders.py`` runs it on every suite.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO
from torch import nn
from torch.nn import functional as F

from lvmkit.benchmarks import Contender

HIDDEN = 64


def _net(inputs: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, outputs))


def _cat(*parts: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dim after broadcasting the batch dims (enumerated labels)."""
    batch = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*batch, p.shape[-1]) for p in parts], -1)


def vae(task):
    latent = task.latent_dim or 8
    decoder, encoder = _net(latent, task.data_dim), _net(task.data_dim, 2 * latent)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        loc, log_scale = encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return model, guide


def semi_supervised(task):
    classes, latent = task.num_classes, 8
    decoder = _net(latent + classes, task.data_dim)
    encoder = _net(task.data_dim + classes, 2 * latent)
    classifier = _net(task.data_dim, classes)
    alpha = task.extra["aux_weight"]

    def model(x, y=None):
        pyro.module("decoder", decoder)
        pyro.module("classifier", classifier)
        with pyro.plate("data", x.shape[0]):
            label = pyro.sample("y", dist.Categorical(logits=x.new_zeros(classes)), obs=y)
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent), 1.0).to_event(1))
            logits = decoder(_cat(z, F.one_hot(label, classes).to(x.dtype)))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
            if y is not None:
                pyro.factor("aux", alpha * dist.Categorical(logits=classifier(x)).log_prob(y))

    def guide(x, y=None):
        pyro.module("encoder", encoder)
        pyro.module("classifier", classifier)
        with pyro.plate("data", x.shape[0]):
            if y is None:
                y = pyro.sample(
                    "y", dist.Categorical(logits=classifier(x)), infer={"enumerate": "parallel"}
                )
            loc, log_scale = encoder(_cat(x, F.one_hot(y, classes).to(x.dtype))).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    objective = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    return Contender(model, guide, objective=objective)


def conditional(task):
    latent = 8
    prior, decoder = (
        _net(task.condition_dim, 2 * latent),
        _net(latent + task.condition_dim, task.data_dim),
    )
    encoder = _net(task.data_dim + task.condition_dim, 2 * latent)

    def model(x, c, mask):
        pyro.module("prior", prior)
        pyro.module("decoder", decoder)
        loc, log_scale = prior(c).chunk(2, -1)
        with pyro.plate("data", c.shape[0]):
            z = pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
            likelihood = dist.Bernoulli(logits=decoder(_cat(z, c))).mask(mask).to_event(1)
            pyro.sample("x", likelihood, obs=x)

    def guide(x, c, mask):
        pyro.module("encoder", encoder)
        loc, log_scale = encoder(torch.cat([x, c], -1)).chunk(2, -1)
        with pyro.plate("data", c.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return model, guide


def mixture(task):
    """A Gaussian mixture with diagonal covariances, the assignment summed out in the model
    (as Pyro's GMM tutorial does), every parameter a point estimate."""
    k, d = task.num_classes, task.data_dim

    def model(x):
        weights = pyro.param(
            "weights", torch.full((k,), 1 / k), constraint=dist.constraints.simplex
        )
        locs = pyro.param("locs", lambda: x[torch.randperm(len(x))[:k]].clone())
        scales = pyro.param("scales", torch.ones(k, d), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[y], scales[y]).to_event(1), obs=x)

    def guide(x):
        pass

    def classify(x):
        store = pyro.get_param_store()
        weights, locs, scales = (store[name] for name in ("weights", "locs", "scales"))
        log_joint = dist.Normal(locs, scales).to_event(1).log_prob(x[:, None]) + weights.log()
        return log_joint.argmax(-1)

    return Contender(model, guide, objective=TraceEnum_ELBO(max_plate_nesting=1), classify=classify)


def sequences(task):
    """A bag-of-frames VAE on padded sequences: the code from the mean frame within each length,
    every frame decoded from the code alone (no recurrence), the padding masked out."""
    latent, tokens = task.latent_dim or 8, task.extra["likelihood"] == "categorical"
    decoder, encoder = _net(latent, task.data_dim), _net(task.data_dim, 2 * latent)

    def within(x, lengths):
        return (torch.arange(x.shape[1]) < lengths[:, None]).float()

    def frames(x):  # tokens one-hot, so that both kinds are (N, T, D) frames
        return F.one_hot(x, task.data_dim).float() if tokens else x

    def model(x, lengths):
        pyro.module("decoder", decoder)
        mask = within(x, lengths).bool()
        with pyro.plate("chorales", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent), 1.0).to_event(1))
            shape = (*z.shape[:-1], x.shape[1], task.data_dim)
            logits = decoder(z)[..., None, :].expand(shape)
            if tokens:
                emission = dist.Categorical(logits=logits).mask(mask).to_event(1)
            else:
                emission = dist.Bernoulli(logits=logits).mask(mask[..., None]).to_event(2)
            pyro.sample("x", emission, obs=x)

    def guide(x, lengths):
        pyro.module("encoder", encoder)
        mean_frame = (frames(x) * within(x, lengths)[..., None]).sum(1) / lengths[:, None]
        loc, log_scale = encoder(mean_frame).chunk(2, -1)
        with pyro.plate("chorales", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return model, guide


def make_pair(task):
    """One factory for every suite: the pair that fits the task's data."""
    if task.suite == "gmm":
        return mixture(task)
    if "lengths" in task.arguments:
        return sequences(task)
    if "y" in task.arguments:
        return semi_supervised(task)
    if "c" in task.arguments:
        return conditional(task)
    return vae(task)


def not_a_pair(task):
    return _net(task.data_dim, 1)


def wrong_size(task):
    """A VAE for 10-dimensional data, whatever the task says."""
    return vae(type(task)(**{**task.__dict__, "data_dim": 10}))
