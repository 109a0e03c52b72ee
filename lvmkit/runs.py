"""Run directories: train a built-in model on MNIST, evaluate it, and keep everything on disk.

A run directory holds ``config.json`` (the :class:`TrainSpec` and fit settings), ``history.csv``
and ``checkpoint.pt`` (written by :func:`lvmkit.fit` after every epoch), ``results.csv`` (the test
evaluation beside published references) and ``figures/`` (ELBO curve, samples, reconstructions).
The CLI is a thin layer over the functions here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyro

from lvmkit import plots
from lvmkit.data import MNIST_IMAGE_SHAPE, Dataset, binarize, load_mnist
from lvmkit.guides import GaussianEncoder, GaussianEncoderConfig
from lvmkit.inference import OBJECTIVES, KLSchedule, active_units, evaluate, fit, summarize
from lvmkit.inference._data import resolve_device
from lvmkit.inference._distributed import env_rank
from lvmkit.inference._rundir import CHECKPOINT_FILE, CONFIG_FILE, HISTORY_FILE, RunLock
from lvmkit.inference.checkpoint import atomic_write_text, load_checkpoint, read_json
from lvmkit.inference.train import NONFINITE_POLICIES
from lvmkit.models import LIKELIHOODS, VAE, VAEConfig
from lvmkit.models._checks import check_choice, check_float, check_int, check_sizes
from lvmkit.models._mlp import ACTIVATIONS

FAMILIES = ("vae",)
TRAIN_BINARIZATIONS = ("dynamic", "static", "none")
RESULTS_FILE = "results.csv"
EVALUATION_FILE = "evaluation.csv"  # per test image: elbo, log_likelihood, pareto_k, ess

# Published test NLLs of one-stochastic-layer VAEs on binarized MNIST, for the results table.
REFERENCES = pd.DataFrame(
    [
        {
            "source": "Burda et al. 2016 (IWAE), Table 1",
            "model": "VAE k=1, 784-200-200-50 tanh",
            "binarization": "dynamic",
            "epochs": 3280,
            "eval_samples": 5000,
            "test_elbo": float("nan"),
            "test_log_likelihood": -86.76,
        },
        {
            "source": "pythae benchmark (Chadebec et al. 2022)",
            "model": "VAE, MLP",
            "binarization": "static",
            "epochs": float("nan"),
            "eval_samples": 200,
            "test_elbo": float("nan"),
            "test_log_likelihood": -89.78,
        },
    ]
)


@dataclass(frozen=True)
class TrainSpec:
    """Everything that defines a training run of a built-in model on MNIST."""

    family: str = "vae"  # one of FAMILIES
    likelihood: str = "bernoulli"  # one of lvmkit.models.LIKELIHOODS
    latent_dim: int = 20  # the PyTorch VAE example's 784-400-20 network
    hidden_dims: tuple[int, ...] = (400,)
    activation: str = "relu"
    binarization: str = "dynamic"  # fresh Bernoulli draw per epoch: the NLL-table protocol
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    objective: str = "elbo"  # or "mean_field", "iwae", "rws" (lvmkit.OBJECTIVES)
    num_particles: int = 1  # samples per point in the objective; the K of iwae / rws
    beta: float = 1.0  # weight of the KL term (β-VAE); with warmup_epochs, its final value
    warmup_epochs: float = 0.0  # epochs of linear KL warm-up from 0 to beta
    device: str = "auto"
    seed: int = 0
    eval_samples: int = 5000  # the standard K for published IS log-likelihoods
    eval_points: int | None = None  # None: the whole 10,000-image test set
    train_points: int | None = None  # None: the whole 50,000-image training split
    valid_points: int | None = 2000  # held-out ELBO per epoch on the first images of "valid"
    compile: bool | None = None  # JIT-trace the loss; None: fit decides (on for the built-in VAE)
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints; None: epoch ends
    on_nonfinite: str = "raise"  # or "reduce_lr": halve lr after a NaN and go on (fit's option)

    def kl_schedule(self) -> KLSchedule | None:
        """The KL weighting of this run (None for the plain ELBO)."""
        if self.beta == 1.0 and self.warmup_epochs == 0:
            return None
        return KLSchedule(beta=self.beta, warmup_epochs=self.warmup_epochs)

    def __post_init__(self) -> None:
        check_choice("family", self.family, FAMILIES)
        check_choice("likelihood", self.likelihood, LIKELIHOODS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("binarization", self.binarization, TRAIN_BINARIZATIONS)
        object.__setattr__(self, "hidden_dims", check_sizes("hidden_dims", self.hidden_dims))
        check_choice("objective", self.objective, OBJECTIVES)
        self.kl_schedule()  # checks beta and warmup_epochs
        for name in ("latent_dim", "epochs", "batch_size", "eval_samples", "num_particles"):
            check_int(name, getattr(self, name))
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        for name in ("eval_points", "train_points", "valid_points", "checkpoint_every"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        check_float("lr", self.lr)
        check_int("seed", self.seed, minimum=0)
        if self.likelihood == "bernoulli" and self.binarization == "none":
            raise ValueError(
                "likelihood='bernoulli' needs binary data: binarization='dynamic' or 'static'; "
                "got binarization='none' (use likelihood='gaussian' for grey levels)"
            )
        if self.likelihood != "bernoulli" and self.binarization == "dynamic":
            raise ValueError(
                f"likelihood={self.likelihood!r} models grey levels: use binarization='none' "
                "(or 'static'); got 'dynamic'"
            )

    @property
    def eval_binarization(self) -> str:
        """Held-out data are binarized once (seeded) unless the run uses grey levels."""
        return "none" if self.binarization == "none" else "static"


@dataclass(frozen=True)
class RunResult:
    """A finished run: where it lives, its per-epoch history and its results table."""

    run_dir: Path
    history: pd.DataFrame
    results: pd.DataFrame


def build_vae(config: VAEConfig) -> tuple[VAE, GaussianEncoder]:
    """A :class:`VAE` and the :class:`GaussianEncoder` that mirrors its decoder.

    Example::

        >>> import lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=784, latent_dim=20))
        >>> guide.config.hidden_dims, model.config.hidden_dims
        ((400,), (400,))
    """
    guide_config = GaussianEncoderConfig(
        data_dim=config.data_dim,
        latent_dim=config.latent_dim,
        hidden_dims=tuple(reversed(config.hidden_dims)),
        activation=config.activation,
    )
    return VAE(config), GaussianEncoder(guide_config)


def model_config(spec: TrainSpec, data_dim: int) -> VAEConfig:
    return VAEConfig(
        data_dim=data_dim,
        latent_dim=spec.latent_dim,
        hidden_dims=spec.hidden_dims,
        activation=spec.activation,
        likelihood=spec.likelihood,
    )


def train_run(
    spec: TrainSpec,
    run_dir: str | Path,
    *,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> RunResult | None:
    """Train ``spec`` into a new ``run_dir``; evaluate on the test set; write results, figures.

    Under ``torchrun`` every process trains and rank 0 alone evaluates, writes and draws; the
    other ranks return None. ``callbacks`` go to ``fit`` and to the test-set ``evaluate``.
    """
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_FILE).exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; use `lvmkit train --resume {run_dir}` or another --out"
        )
    metadata = {"spec": dataclasses.asdict(spec), "image_shape": list(MNIST_IMAGE_SHAPE)}
    return _train(
        spec, run_dir, resume=False, metadata=metadata, progress=progress, callbacks=callbacks
    )


def resume_run(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> RunResult | None:
    """Continue the run in ``run_dir`` (to ``epochs`` in all, default: its own), then evaluate."""
    run_dir = Path(run_dir)
    spec = read_spec(run_dir)
    if epochs is not None:
        spec = dataclasses.replace(spec, epochs=check_int("epochs", epochs))
    return _train(spec, run_dir, resume=True, metadata=None, progress=progress, callbacks=callbacks)


def read_spec(run_dir: str | Path) -> TrainSpec:
    """The :class:`TrainSpec` stored in a run directory's ``config.json``."""
    config = read_json(Path(run_dir) / CONFIG_FILE)
    try:
        fields = dict(config["metadata"]["spec"])
        fields["hidden_dims"] = tuple(fields["hidden_dims"])
        return TrainSpec(**fields)
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{run_dir} was not written by `lvmkit train` (config.json: {err})"
        ) from err


def load_run(run_dir: str | Path, *, device: str = "cpu") -> tuple[VAE, GaussianEncoder, TrainSpec]:
    """Rebuild a run's model and guide with the parameters of its last checkpoint."""
    run_dir = Path(run_dir)
    spec = read_spec(run_dir)
    state = load_checkpoint(run_dir / CHECKPOINT_FILE)
    data_dim = math.prod(read_json(run_dir / CONFIG_FILE)["metadata"]["image_shape"])
    model, guide = build_vae(model_config(spec, data_dim))
    for prefix, module in (("model", model), ("guide", guide)):
        own = {
            k[len(prefix) + 1 :]: v
            for k, v in state["params"].items()
            if k.startswith(prefix + ".")
        }
        module.load_state_dict({**module.state_dict(), **own})
    return model.to(device), guide.to(device), spec


def evaluate_run(
    run_dir: str | Path,
    *,
    num_samples: int | None = None,
    points: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate a run's last checkpoint on the test set; write and return ``results.csv``."""
    model, guide, spec = load_run(run_dir, device="cpu")
    spec = dataclasses.replace(
        spec,
        eval_samples=spec.eval_samples if num_samples is None else num_samples,
        eval_points=spec.eval_points if points is None else points,
        device=device,
    )
    dev = resolve_device(device)
    history = pd.read_csv(Path(run_dir) / "history.csv")
    with RunLock(run_dir):
        return _evaluate_and_write(
            spec, Path(run_dir), model.to(dev), guide.to(dev), history, progress
        )


def sample_run(
    run_dir: str | Path, *, n: int = 64, seed: int = 0, out: str | Path | None = None
) -> Path:
    """Draw ``n`` images from a run's model (decoder means of z ~ p(z)) into a PNG grid."""
    check_int("n", n)
    model, _, _ = load_run(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "figures" / "samples.png"
    plots.sample_grid(model, n, seed=seed, image_shape=MNIST_IMAGE_SHAPE, path=path)
    return path


# -- internals -------------------------------------------------------------------------------


def _train(
    spec: TrainSpec,
    run_dir: Path,
    *,
    resume: bool,
    metadata: dict[str, Any] | None,
    progress: bool,
    callbacks: list[Any] | None,
) -> RunResult | None:
    train, valid = _train_data(spec)
    pyro.set_rng_seed(spec.seed)  # initial weights too: the same spec gives the same numbers
    model, guide = build_vae(model_config(spec, train.x.shape[1]))
    if env_rank() != 0:  # under torchrun: rank 0 owns the folder, evaluates and draws
        _fit(spec, run_dir, model, guide, train, valid, resume, metadata, False, callbacks)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):  # held through evaluation and figures, not only fit
        history = _fit(
            spec, run_dir, model, guide, train, valid, resume, metadata, progress, callbacks
        )
        return _finish(spec, run_dir, model, guide, history, progress=progress, callbacks=callbacks)


def _fit(spec, run_dir, model, guide, train, valid, resume, metadata, progress, callbacks):
    result = fit(
        model,
        guide,
        train.x,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        objective=spec.objective,
        num_particles=spec.num_particles,
        kl_schedule=spec.kl_schedule(),
        seed=spec.seed,
        device=spec.device,
        compile=spec.compile,
        checkpoint_every=spec.checkpoint_every,
        on_nonfinite=spec.on_nonfinite,
        validation_data=valid.x,
        transform=binarize if spec.binarization == "dynamic" else None,
        run_dir=run_dir,
        resume=resume,
        metadata=metadata,
        progress=progress,
        callbacks=callbacks,
    )
    return result.history


def _train_data(spec: TrainSpec) -> tuple[Dataset, Dataset]:
    train_bin = "static" if spec.binarization == "static" else "none"
    train = load_mnist("train", binarization=train_bin, seed=spec.seed, limit=spec.train_points)
    valid = load_mnist(
        "valid", binarization=spec.eval_binarization, seed=spec.seed, limit=spec.valid_points
    )
    return train, valid


def _finish(spec, run_dir: Path, model, guide, history, *, progress: bool, callbacks) -> RunResult:
    results = _evaluate_and_write(spec, run_dir, model, guide, history, progress, callbacks)
    _draw(spec, run_dir, model, guide, history)
    return RunResult(run_dir, history, results)


FIGURES = (
    "elbo.png",
    "samples.png",
    "reconstructions.png",
    "latent.png",
    "traversal.png",
    "interpolation.png",
    "khat.png",
)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw a run's figures into ``RUN_DIR/figures`` from its history, its checkpoint and its
    per-image evaluation (``evaluation.csv``, for the k̂ plot); return their paths."""
    run_dir = Path(run_dir)
    model, guide, spec = load_run(run_dir)
    history = pd.read_csv(run_dir / HISTORY_FILE)
    return _draw(spec, run_dir, model, guide, history)


def _draw(spec: TrainSpec, run_dir: Path, model, guide, history: pd.DataFrame) -> list[Path]:
    figures = run_dir / "figures"
    test = load_mnist("test", binarization=spec.eval_binarization, seed=spec.seed, limit=2000)
    x = test.x.to(next(model.parameters()).device)
    paths = [figures / name for name in FIGURES]
    plots.elbo_curve(history, path=paths[0])
    plots.sample_grid(model, 64, seed=spec.seed, path=paths[1])
    plots.reconstructions(model, guide, x[:16], path=paths[2])
    plots.latent_scatter(
        guide, x, test.y.numpy(), title="E_q[z | x] of 2,000 test images", path=paths[3]
    )
    plots.latent_traversal(model, path=paths[4])
    plots.interpolation(model, guide, x[:6], x[6:12], path=paths[5])
    scores = run_dir / EVALUATION_FILE
    if scores.is_file():
        plots.khat_plot(pd.read_csv(scores)["pareto_k"], path=paths[6])
    else:
        paths.pop()
    return paths


def _evaluate_and_write(
    spec: TrainSpec, run_dir: Path, model, guide, history, progress, callbacks=None
):
    test = load_mnist(
        "test", binarization=spec.eval_binarization, seed=spec.seed, limit=spec.eval_points
    )
    scores = evaluate(
        model,
        guide,
        test.x,
        spec.eval_samples,
        seed=spec.seed,
        progress=progress,
        callbacks=callbacks,
    )
    atomic_write_text(run_dir / EVALUATION_FILE, scores.to_csv(index=False))
    summary = summarize(scores)
    ours = {
        "source": f"lvmkit (this run: {run_dir.name})",
        "model": f"VAE, 784-{'-'.join(map(str, spec.hidden_dims))}-{spec.latent_dim} "
        f"{spec.activation}, {spec.likelihood}",
        "binarization": spec.binarization,
        "epochs": int(history["epoch"].max()),
        "eval_samples": spec.eval_samples,
        "test_elbo": summary.elbo,
        "test_log_likelihood": summary.log_likelihood,
        "log_likelihood_se": summary.log_likelihood_se,
        "eval_points": summary.num_points,
        "frac_pareto_k_above_0_7": summary.frac_pareto_k_above_0_7,
        "active_units": active_units(guide, test.x).count,
    }
    rows = [ours]
    if spec.likelihood == "bernoulli":  # published NLLs are for binary MNIST only
        rows += REFERENCES.to_dict("records")
    results = pd.DataFrame(rows)
    atomic_write_text(run_dir / RESULTS_FILE, results.to_csv(index=False))
    return results


def format_results(results: pd.DataFrame) -> str:
    """The results table as aligned text for a terminal."""
    shown = results.drop(columns=[c for c in ("log_likelihood_se",) if c in results])
    for column in ("epochs", "eval_samples", "eval_points"):  # counts: no decimals, "—" if absent
        if column in shown:
            shown[column] = shown[column].map(lambda v: "—" if pd.isna(v) else str(int(v)))
    with pd.option_context("display.max_colwidth", 48, "display.width", 200):
        return shown.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="—")
