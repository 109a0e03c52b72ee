"""``lvmkit bench vae pythae``: the VAE families lvmkit shares with pythae (Chadebec et al. 2022),
each trained by lvmkit and by pythae itself, side by side on pythae's reproducibility protocol.

pythae is the library users pick for breadth of VAE families: its own model classes (``VAE``,
``IWAE``, ``MIWAE``, ``PIWAE``, ``CIWAE``, ``VAMP``, ``HVAE``) run through its own trainer
(``BaseTrainer``) here, on the same statically binarized MNIST images, with the same networks —
lvmkit's 784-400-20 ReLU encoder and Bernoulli decoder, passed to pythae through its
``BaseEncoder`` / ``BaseDecoder`` hooks with the same initial weights — the same minibatch size,
Adam learning rate and epochs. Each row says:

- ``test_nll`` (± ``nll_se``, ``frac_k_above_0_7``): −log p(x) on the first ``n_is`` test images,
  importance-sampled with K draws by lvmkit's :func:`~lvmkit.inference.evaluate` — for pythae's
  rows on its trained networks wrapped as a Pyro pair (its prior, its encoder's Gaussian, its
  decoder's Bernoulli probabilities), so both libraries are scored by one estimator;
- ``pythae_get_nll``: pythae's own ``get_nll`` (K draws, its batches of 100) on the same images,
  for pythae's rows — the number pythae's users read;
- ``seconds_per_epoch``: training wall time over epochs (set-up, lvmkit's compilation and
  pythae's checks included); ``median_epoch_s``: the median epoch after the first; on pythae's
  rows ``time_ratio_to_lvmkit``, the ratio of the two medians in the same run. Each library
  scores 1,000 held-out images every epoch (lvmkit's one-sample bound, pythae's eval loss).

The published numbers (each paper's, and pythae's reproduction of it, from pythae's
``examples/scripts/reproducibility/README.md``; Rainforth et al.'s on dynamically binarized
MNIST, this suite's on a static binarization) are rows of the same table; they come from
hundreds of epochs (the ``paper`` profile's length, a GPU's), ``quick`` and ``full`` from a
CPU's minutes. Where pythae is not installed (``pip install 'lvmkit[pythae]'``) its rows say so
and lvmkit's still run.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from lvmkit.base import check_choice
from lvmkit.benchmarks import contenders as cs
from lvmkit.benchmarks.contenders import Contender, Task
from lvmkit.benchmarks.protocol import (
    BINARY_IMAGES,
    PROFILE_NAMES,
    VALIDATION,
    finish,
    history_curve,
    vae_pair,
)
from lvmkit.benchmarks.variants import binarize_static
from lvmkit.data import load_mnist
from lvmkit.inference import CIWAE, MIWAE, PIWAE, evaluate, summarize
from lvmkit.models import VAEConfig
from lvmkit.pairs import build_hvae, build_vamp_vae

INSTALL = "pip install 'lvmkit[pythae]'"
LATENT, HIDDEN = 20, (400,)


@dataclass(frozen=True)
class PythaeProtocol:
    """One profile: data, training and scoring shared by both libraries."""

    n_train: int | None  # training images (None: all 50,000)
    n_is: int  # test images scored by importance sampling
    epochs: int
    num_samples: int  # K of both estimates (a multiple of 100 above 100: pythae's batches)
    num_pseudo: int  # the VampPrior's pseudo-inputs
    iwae_samples: int = 5  # the IWAE's k
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0

    def describe(self) -> str:
        return (
            f"Adam(lr={self.lr:g}), batch {self.batch_size}, {self.epochs} epochs, "
            f"IWAE k = {self.iwae_samples}, MIWAE and PIWAE M = K = 8, CIWAE K = 64 and "
            f"beta = 0.05, VampPrior with {self.num_pseudo} pseudo-inputs; "
            f"test -log p(x) on {self.n_is} images at K = {self.num_samples}"
        )


PROFILES = {
    "quick": PythaeProtocol(n_train=500, n_is=10, epochs=1, num_samples=50, num_pseudo=20),
    "full": PythaeProtocol(n_train=None, n_is=1000, epochs=5, num_samples=1000, num_pseudo=500),
    # pythae's reproducibility runs: the whole training split, hundreds of epochs, K = 5000
    "paper": PythaeProtocol(
        n_train=None, n_is=10_000, epochs=500, num_samples=5000, num_pseudo=500
    ),
}

# (family, paper, data and K, the paper's −log p(x), pythae's) — the transcription of
# pythae's examples/scripts/reproducibility/README.md
PUBLISHED = [
    ("VAE", "Rezende & Mohamed 2015", "binary MNIST, K = 200", 89.9, 89.78),
    ("VampPrior", "Tomczak & Welling 2018", "binary MNIST, K = 5000", 85.57, 85.79),
    ("IWAE", "Burda et al. 2016 (n = 50)", "binary MNIST, K = 5000", 87.1, 86.82),
    ("MIWAE", "Rainforth et al. 2018", "dynamic MNIST, K = 5000", 84.97, 85.09),
    ("PIWAE", "Rainforth et al. 2018", "dynamic MNIST, K = 5000", 84.46, 84.58),
    ("CIWAE", "Rainforth et al. 2018 (β = 0.05)", "dynamic MNIST, K = 5000", 84.57, 84.74),
    ("HVAE", "Caterini et al. 2018 (4 leapfrog steps)", "binary MNIST, K = 1000", 86.40, 86.21),
]


def _families(p: PythaeProtocol) -> dict[str, dict[str, Any]]:
    """Name → how lvmkit builds it (a pair and fit options) and how pythae does (its classes)."""
    cfg = VAEConfig(784, latent_dim=LATENT, hidden_dims=HIDDEN)
    k = p.iwae_samples
    return {
        "VAE": dict(pair=lambda: vae_pair(cfg), fit={}, pythae=("VAE", "VAEConfig", {})),
        f"IWAE (k={k})": dict(
            pair=lambda: vae_pair(cfg),
            fit=dict(objective="iwae", num_particles=k),
            pythae=("IWAE", "IWAEConfig", {"number_samples": k}),
        ),
        # Rainforth et al. 2018's three, at their M = K = 8 (64 draws a point) and β = 0.05
        "MIWAE (M=8, K=8)": dict(
            pair=lambda: vae_pair(cfg),
            fit=dict(objective=MIWAE(8, groups=8)),
            pythae=("MIWAE", "MIWAEConfig", {"number_gradient_estimates": 8, "number_samples": 8}),
        ),
        "PIWAE (M=8, K=8)": dict(
            pair=lambda: vae_pair(cfg),
            fit=dict(objective=PIWAE(8, groups=8)),
            pythae=("PIWAE", "PIWAEConfig", {"number_gradient_estimates": 8, "number_samples": 8}),
        ),
        "CIWAE (K=64, β=0.05)": dict(
            pair=lambda: vae_pair(cfg),
            fit=dict(objective=CIWAE(64, beta=0.05)),
            pythae=("CIWAE", "CIWAEConfig", {"number_samples": 64, "beta": 0.05}),
        ),
        f"VampPrior ({p.num_pseudo} pseudo-inputs)": dict(
            pair=lambda: build_vamp_vae(cfg, num_pseudo=p.num_pseudo),
            fit={},
            pythae=("VAMP", "VAMPConfig", {"number_components": p.num_pseudo}),
        ),
        # Caterini et al.'s 4 tempered leapfrog steps, ε and β₀ learned (both libraries from
        # ε = 0.01, β₀ = 0.3)
        "HVAE (4 leapfrog steps)": dict(
            pair=lambda: build_hvae(cfg, num_steps=4, step_size=0.01, beta0=0.3),
            fit={},
            pythae=(
                "HVAE",
                "HVAEConfig",
                {
                    "n_lf": 4,
                    "eps_lf": 0.01,
                    "beta_zero": 0.3,
                    "learn_eps_lf": True,
                    "learn_beta_zero": True,
                },
            ),
        ),
    }


def run(
    profile="full",
    *,
    device="cpu",
    figures_dir=None,
    scale=None,
    contenders=None,
    only=None,
    settings=None,
) -> pd.DataFrame:
    """Each shared family trained by lvmkit and by pythae on the same images and networks, and
    your contenders beside them (trained by lvmkit; the binary images, as ``model(x=x)``)."""
    profile = check_choice("profile", profile, PROFILE_NAMES)
    p = scale or PROFILES[profile]
    if settings is not None:
        raise ValueError("vae-pythae has one setting; choose contenders with only=")
    train = load_mnist("train", limit=p.n_train)
    test = load_mnist("test", limit=p.n_is)
    x_train = binarize_static(train.x, p.seed)
    x_test = binarize_static(test.x, p.seed + 1)
    families = _families(p)
    builtin = {name: _lvmkit_factory(spec) for name, spec in families.items()}
    chosen = cs.select("vae-pythae", builtin, contenders, only)
    task = Task("vae-pythae", "784-400-20", 784, ("x",), BINARY_IMAGES, latent_dim=LATENT,
                hidden_dims=HIDDEN, activation="relu", num_train=len(x_train))  # fmt: skip
    pythae, why = _import_pythae()
    rows: list[dict[str, Any]] = []
    curves: list[pd.DataFrame] = []  # lvmkit's rows: the held-out ELBO per epoch
    for name, factory in chosen.items():
        pyro.set_rng_seed(p.seed)
        contender = cs.build(name, factory, task, [{"x": x_test[:4]}])
        protocol = dict(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, seed=p.seed,
                        device=device)  # fmt: skip
        result, per_epoch = cs.train(
            contender, task, x_train, validation_data=x_test[:VALIDATION], protocol=protocol
        )
        curves.append(history_curve(result.history, task.setting, name))
        row: dict[str, Any] = {"family": name.split(" (")[0], "contender": name,
                               "library": "lvmkit", "epochs": p.epochs}  # fmt: skip
        row.update(_scores(contender.model, contender.guide, x_test, p))
        row["seconds_per_epoch"] = per_epoch
        row["median_epoch_s"] = _median_after_first(result.history["seconds"].tolist())
        rows.append(row)
        if name not in families:  # a user's contender: lvmkit's row only
            continue
        spec = families[name]
        pythae_row: dict[str, Any] = {"family": row["family"], "contender": f"pythae {name}",
                                      "library": "pythae", "epochs": p.epochs}  # fmt: skip
        if pythae is None:
            rows.append({**pythae_row, "note": why})
            continue
        pyro.set_rng_seed(p.seed)  # the same initial weights as lvmkit's row
        model, guide = spec["pair"]()
        theirs = _pythae_model(pythae, spec["pythae"], model, guide)
        seconds, epochs = _train_pythae(pythae, theirs, x_train, x_test[:VALIDATION], p, device)
        pythae_row.update(_scores(*_as_pair(theirs), x_test, p))
        hamiltonian = spec["pythae"][0] == "HVAE"  # (its get_nll runs its leapfrog: gradients)
        with torch.enable_grad() if hamiltonian else torch.no_grad(), _quiet():
            theirs.eval()
            pythae_row["pythae_get_nll"] = -float(
                theirs.get_nll(
                    x_test.to(cs._device_of(theirs)), n_samples=p.num_samples,
                    batch_size=min(p.num_samples, 100),
                )
            )  # fmt: skip
        pythae_row["seconds_per_epoch"] = seconds
        pythae_row["median_epoch_s"] = _median_after_first(epochs)
        pythae_row["time_ratio_to_lvmkit"] = pythae_row["median_epoch_s"] / row["median_epoch_s"]
        if "VAMP" in spec["pythae"][0]:
            pythae_row["note"] = "pseudo-inputs pythae's own (a linear layer on one-hot inputs)"
        if hamiltonian:
            pythae_row["note"] = (
                "test_nll: lvmkit scores pythae's networks with its encoder's Gaussian alone "
                "(pythae's leapfrog is not reproduced); pythae_get_nll runs its own"
            )
        rows.append(pythae_row)
    for family, paper, setting, reference, reproduced in PUBLISHED:
        for source, value in ((paper, reference), ("pythae's reproduction", reproduced)):
            rows.append({"family": family, "contender": source, "library": "published",
                         "test_nll": value, "note": setting})  # fmt: skip
    return finish(pd.DataFrame(rows), curves, p.describe())


def _lvmkit_factory(spec: dict[str, Any]) -> Callable[[Task], Contender]:
    def factory(task: Task) -> Contender:
        model, guide = spec["pair"]()
        fit = dict(spec["fit"])
        return Contender(model, guide, objective=fit.pop("objective", None),
                         num_particles=fit.pop("num_particles", None), fit_options=fit)  # fmt: skip

    return factory


def _scores(model, guide, x_test: torch.Tensor, p: PythaeProtocol) -> dict[str, float]:
    s = summarize(evaluate(model, guide, x_test, p.num_samples, seed=p.seed))
    return {
        "test_elbo": s.elbo,
        "test_nll": -s.log_likelihood,
        "nll_se": s.log_likelihood_se,
        "frac_k_above_0_7": s.frac_pareto_k_above_0_7,
    }


def _import_pythae() -> tuple[Any, str]:
    try:
        import pythae.models
        import pythae.trainers
    except ImportError:
        return None, f"pythae is not installed: {INSTALL}"
    return pythae, ""


def _pythae_model(pythae: Any, which: tuple[str, str, dict[str, Any]], model, guide) -> Any:
    """pythae's own model class around copies of lvmkit's networks (the same initial weights):
    the encoder's (loc, log σ²) as its ``embedding`` / ``log_covariance``, the decoder's
    Bernoulli logits through a sigmoid as its ``reconstruction`` (pythae's ``bce`` loss takes
    probabilities; its HVAE's takes the logits themselves)."""
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self, net: nn.Module) -> None:
            BaseEncoder.__init__(self)
            self.net = net

        def forward(self, x: torch.Tensor) -> Any:
            loc, log_var = self.net(x.reshape(len(x), -1)).split(LATENT, dim=-1)
            return ModelOutput(embedding=loc, log_covariance=log_var)

    class Decoder(BaseDecoder):
        def __init__(self, net: nn.Module, logits: bool) -> None:
            BaseDecoder.__init__(self)
            self.net, self.logits = net, logits

        def forward(self, z: torch.Tensor) -> Any:
            out = self.net(z)
            return ModelOutput(reconstruction=out if self.logits else torch.sigmoid(out))

    name, config_name, extra = which
    config = getattr(pythae.models, config_name)(
        input_dim=(784,), latent_dim=LATENT, reconstruction_loss="bce", **extra
    )
    encoder = Encoder(copy.deepcopy(encoder_net(guide)))
    decoder = Decoder(copy.deepcopy(model.decoder), logits=_takes_logits(name))
    with warnings.catch_warnings():  # (HVAE's reminder that its decoder gives logits: it does)
        warnings.simplefilter("ignore", UserWarning)
        return getattr(pythae.models, name)(config, encoder=encoder, decoder=decoder)


def _takes_logits(name: str) -> bool:
    """Whether pythae's ``bce`` loss of this model reads logits (its HVAE) or probabilities."""
    return name == "HVAE"


def encoder_net(guide: nn.Module) -> nn.Module:
    """The network behind lvmkit's Gaussian encoder: the guide's own, or its base's (the
    Hamiltonian encoder moves the base's draw)."""
    net = guide.net if hasattr(guide, "net") else getattr(guide, "base").net  # noqa: B009
    assert isinstance(net, nn.Module)
    return net


def _train_pythae(pythae: Any, model: Any, x_train: torch.Tensor, x_eval: torch.Tensor,
                  p: PythaeProtocol, device: str) -> tuple[float, list[float]]:  # fmt: skip
    """pythae's own trainer on the training images, its loss on ``x_eval`` each epoch (as
    lvmkit's rows compute a held-out bound each epoch); its seconds per epoch over the whole
    call, and each epoch's."""
    from pythae.data.datasets import BaseDataset
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    ends: list[float] = []

    class Clock(TrainingCallback):
        def on_epoch_end(self, training_config: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    with _quiet(), tempfile.TemporaryDirectory() as out:  # (it saves its final model there)
        config = BaseTrainerConfig(
            output_dir=out, per_device_train_batch_size=p.batch_size,
            per_device_eval_batch_size=p.batch_size, num_epochs=p.epochs, learning_rate=p.lr,
            seed=p.seed, no_cuda=str(device) == "cpu",
        )  # fmt: skip
        train, held_out = (BaseDataset(x, torch.zeros(len(x))) for x in (x_train, x_eval))
        tic = time.perf_counter()
        BaseTrainer(model, train, held_out, training_config=config, callbacks=[Clock()]).train()
        whole = time.perf_counter() - tic
    epochs = [b - a for a, b in zip([tic, *ends], ends, strict=False)]
    return whole / p.epochs, epochs


def _median_after_first(seconds: list[float]) -> float:
    """The median epoch after the first (set-up, compilation), or the first where it is all."""
    return statistics.median(seconds[1:] or seconds)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pythae's console reports (its loggers' INFO lines, ``get_nll``'s prints) kept out of the
    suite's output; its progress bars stay."""
    loggers = [logging.getLogger(name) for name in logging.root.manager.loggerDict
               if name.startswith("pythae")]  # fmt: skip
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _as_pair(theirs: Any) -> tuple[Callable[..., None], Callable[..., None]]:
    """pythae's trained networks as a Pyro pair lvmkit's evaluation scores: its prior (N(0, I),
    or the VampPrior's mixture of the encoder's posteriors at its pseudo-inputs), its encoder's
    Gaussian and its decoder's Bernoulli probabilities."""
    encoder, decoder = theirs.encoder, theirs.decoder
    vamp = hasattr(theirs, "pseudo_inputs")
    logits = _takes_logits(type(theirs).__name__)

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = encoder(x)
        return out.embedding, torch.exp(0.5 * out.log_covariance)

    def prior(x: torch.Tensor) -> Any:
        if not vamp:
            loc = x.new_zeros(len(x), LATENT)
            return dist.Normal(loc, torch.ones_like(loc)).to_event(1)
        components = theirs.number_components
        pseudo = theirs.pseudo_inputs(theirs.idle_input.to(x.device)).reshape(components, -1)
        loc, scale = encode(pseudo)  # (C, Dz) each
        mixture = dist.Categorical(logits=x.new_zeros(components))
        return dist.MixtureSameFamily(mixture, dist.Normal(loc, scale).to_event(1)).expand([len(x)])

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", prior(x))
            out = decoder(z)["reconstruction"]
            bernoulli = dist.Bernoulli(logits=out) if logits else dist.Bernoulli(probs=out)
            pyro.sample("x", bernoulli.to_event(1), obs=x)

    def guide(x: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            loc, scale = encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide
