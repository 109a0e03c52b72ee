"""Run directories: train a built-in model on MNIST, evaluate it, and keep everything on disk.

A run directory holds ``config.json`` (the :class:`TrainSpec` and fit settings), ``history.csv``
and ``checkpoint.pt`` (written by :func:`lvmkit.fit` after every epoch), ``results.csv`` (the test
evaluation beside published references) and ``figures/`` (ELBO curve, samples, reconstructions).
The CLI is a thin layer over the functions here.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyro

from lvmkit import plots
from lvmkit.base import check_int
from lvmkit.data import MNIST_IMAGE_SHAPE, Dataset, binarize, load_mnist
from lvmkit.guides import GaussianEncoder
from lvmkit.inference import active_units, evaluate, fit, gap_split, summarize
from lvmkit.inference.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    read_json,
)
from lvmkit.inference.devices import resolve_device
from lvmkit.inference.distributed import env_rank
from lvmkit.inference.rundir import CHECKPOINT_FILE, CONFIG_FILE, HISTORY_FILE, RunLock
from lvmkit.models import VAE, VAEConfig
from lvmkit.pairs import build_vae
from lvmkit.spec import MNIST_SPLIT_SIZES, TrainSpec

RESULTS_FILE = "results.csv"
EVALUATION_FILE = "evaluation.csv"  # per test image: elbo, log_likelihood, pareto_k, ess
PARTIAL_FILE = "evaluation.partial.pt"  # the images scored so far by an interrupted evaluation
_current: dict[str, Path] = {}  # the run directory a command works on, for an interrupt's message

# Published test NLLs of one-stochastic-layer VAEs on binarized MNIST, for the results table.
REFERENCES = pd.DataFrame(
    [
        {
            "source": "Burda et al. 2016 (IWAE), Table 1",
            "model": "VAE k=1, 784-200-200-50 tanh",
            "binarization": "dynamic",
            "epochs": 3280,
            "eval_samples": 5000,
            "eval_points": 10_000,
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
class RunResult:
    """A finished run: where it lives, its per-epoch history and its results table."""

    run_dir: Path
    history: pd.DataFrame
    results: pd.DataFrame


def model_config(spec: TrainSpec, data_dim: int) -> VAEConfig:
    """The :class:`lvmkit.VAEConfig` a run of ``spec`` builds (``lvmkit train``'s model).

    Example::

        >>> from lvmkit.spec import TrainSpec
        >>> cfg = model_config(TrainSpec(), data_dim=784)
        >>> cfg.data_dim, cfg.latent_dim, cfg.hidden_dims
        (784, 20, (400,))
    """
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
    resolve_device(spec.device)  # before any folder is made
    metadata = {"spec": dataclasses.asdict(spec), "image_shape": list(MNIST_IMAGE_SHAPE)}
    created = not run_dir.exists()
    _current["run"] = run_dir
    try:
        return _train(
            spec, run_dir, resume=False, metadata=metadata, progress=progress, callbacks=callbacks
        )
    except BaseException:
        if created and env_rank() == 0 and not (run_dir / CHECKPOINT_FILE).exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing trained: no empty folder left
        raise


def resume_run(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    threads: int | str | None = None,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> RunResult | None:
    """Continue the run in ``run_dir`` (to ``epochs`` in all, default: its own), then evaluate.

    A run whose epochs are all trained but whose evaluation was interrupted finishes the
    evaluation; one with nothing left to do says so (a ``ValueError`` naming the way on).
    ``threads`` (default: the run's) as in :class:`TrainSpec`.
    """
    run_dir = Path(run_dir)
    spec = read_spec(run_dir)
    if epochs is not None:
        spec = dataclasses.replace(spec, epochs=check_int("epochs", epochs))
    if threads is not None:
        spec = dataclasses.replace(spec, threads=threads)
    _current["run"] = run_dir
    done = _epochs_done(run_dir)
    if done >= spec.epochs:
        if (run_dir / RESULTS_FILE).is_file() and not (run_dir / PARTIAL_FILE).is_file():
            raise ValueError(
                f"{run_dir} has trained all {done} of its epochs and been evaluated: nothing left "
                f"to do. Train it longer with --epochs {done + 10} (say), or score it again with "
                f"`lvmkit evaluate {run_dir}`"
            )
        print(f"{run_dir}: all {done} epochs are trained; finishing its evaluation")
        model, guide, _ = load_run(run_dir, device=str(resolve_device(spec.device)))
        history = pd.read_csv(run_dir / HISTORY_FILE)
        with RunLock(run_dir):
            return _finish(spec, run_dir, model, guide, history, progress=progress,
                           callbacks=callbacks)  # fmt: skip
    return _train(spec, run_dir, resume=True, metadata=None, progress=progress, callbacks=callbacks)


def _epochs_done(run_dir: Path) -> int:
    """Epochs the run's checkpoint has finished (0 without one)."""
    if not (run_dir / CHECKPOINT_FILE).is_file():
        return 0
    try:
        return int(load_checkpoint(run_dir / CHECKPOINT_FILE)["epoch"])
    except CheckpointError:
        return -1  # unreadable: resuming says what is wrong with it, and what can be done


def read_spec(run_dir: str | Path) -> TrainSpec:
    """The :class:`TrainSpec` stored in a run directory's ``config.json``."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        where = "no config.json there" if run_dir.is_dir() else "no such folder"
        raise FileNotFoundError(
            f"{run_dir} is not a run directory: {where}. `lvmkit train --out {run_dir}` makes "
            "one; `lvmkit train --resume RUN_DIR`, `lvmkit evaluate RUN_DIR`, `lvmkit sample` and "
            "`lvmkit plot` take the folder a training run wrote"
        )
    config = read_json(run_dir / CONFIG_FILE)
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
    method: str = "is",
    num_steps: int = 1000,
    gap: bool = False,
) -> pd.DataFrame:
    """Evaluate a run's last checkpoint on the test set; write and return ``results.csv``.

    An evaluation that was interrupted continues from the images it had scored (with the same
    ``num_samples`` and ``points``: the same numbers as an uninterrupted one). ``method="ais"``
    (``num_samples`` chains, ``num_steps`` distributions; :func:`lvmkit.evaluate`) writes
    ``evaluation-ais.csv`` and ``results-ais.csv`` beside the importance-sampled ones, which it
    leaves as they are. ``gap``: also split each image's ELBO gap into its approximation and
    amortization parts (:func:`lvmkit.gap_split`, on this evaluation's log-likelihoods), as
    columns of the evaluation file and means in the results table."""
    _current["run"] = Path(run_dir)
    if points is not None and check_int("points", points) > MNIST_SPLIT_SIZES["test"]:
        raise ValueError(
            f"points must be at most {MNIST_SPLIT_SIZES['test']:,} (the MNIST test split's size); "
            f"got {points}"
        )
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
            spec, Path(run_dir), model.to(dev), guide.to(dev), history, progress,
            method=method, num_steps=num_steps, gap=gap,
        )  # fmt: skip


def sample_run(
    run_dir: str | Path, *, n: int = 64, seed: int = 0, out: str | Path | None = None
) -> tuple[Path, bool]:
    """Draw ``n`` images from a run's model (decoder means of z ~ p(z)) into a PNG grid; return
    its path and whether a file was there before (the default path,
    ``RUN_DIR/samples-N-seedSEED.png``, never touches the run's own ``figures/samples.png``)."""
    check_int("n", n)
    check_int("seed", seed, minimum=0)
    model, _, _ = load_run(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / f"samples-{n}-seed{seed}.png"
    replaced = path.exists()
    plots.sample_grid(model, n, seed=seed, image_shape=MNIST_IMAGE_SHAPE, path=path)
    return path, replaced


def interrupted(args: Any) -> str:
    """What an interrupted command leaves on disk, and the command that continues it."""
    run_dir = _current.get("run")
    if run_dir is None:
        return "Nothing was saved."
    partial = run_dir / PARTIAL_FILE
    if partial.is_file():
        state = load_checkpoint(partial)
        n = state["key"]["points"]
        return (
            f"{state['stop']:,} of {n:,} test images were scored and kept in {partial}; "
            f"`lvmkit evaluate {run_dir}` continues from them"
        )
    if (run_dir / CHECKPOINT_FILE).is_file():
        state = load_checkpoint(run_dir / CHECKPOINT_FILE)
        at = f"after epoch {state['epoch']}" + (f", step {state['step']}" if state["step"] else "")
        if args.command == "evaluate" or _epochs_done(run_dir) >= read_spec(run_dir).epochs:
            return (
                f"The run's checkpoint ({at}) is in {run_dir}; `lvmkit evaluate {run_dir}` "
                "scores it"
            )
        return (
            f"The checkpoint {at} is in {run_dir}; `lvmkit train --resume {run_dir}` continues "
            "from it"
        )
    return "Nothing was saved yet (no epoch had finished); no run directory was left behind."


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
        threads=spec.threads,
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
    """Figures first (they need no evaluation), then the long evaluation, then its k̂ figure."""
    _draw(spec, run_dir, model, guide, history)
    results = _evaluate_and_write(spec, run_dir, model, guide, history, progress, callbacks)
    _draw_khat(run_dir)
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
    khat = _draw_khat(run_dir)
    return paths[:6] + ([khat] if khat is not None else [])


def _draw_khat(run_dir: Path) -> Path | None:
    """The k̂ figure of the run's last evaluation, if it has one."""
    scores = run_dir / EVALUATION_FILE
    if not scores.is_file():
        return None
    path = run_dir / "figures" / FIGURES[6]
    plots.khat_plot(pd.read_csv(scores)["pareto_k"], path=path)
    return path


def _evaluate_and_write(
    spec: TrainSpec, run_dir: Path, model, guide, history, progress, callbacks=None, *,
    method: str = "is", num_steps: int = 1000, gap: bool = False,
):  # fmt: skip
    test = load_mnist(
        "test", binarization=spec.eval_binarization, seed=spec.seed, limit=spec.eval_points
    )
    annealed = method != "is"
    scores = evaluate(
        model,
        guide,
        test.x,
        spec.eval_samples,
        seed=spec.seed,
        progress=progress,
        callbacks=callbacks,
        threads=spec.threads,
        # Ctrl-C keeps the images scored so far (importance sampling)
        checkpoint=None if annealed else run_dir / PARTIAL_FILE,
        method=method,
        num_steps=num_steps,
    )
    if gap:  # q*, fitted per image, on this evaluation's log p(x)
        split = gap_split(
            model, guide, test.x, log_likelihood=scores.log_likelihood, seed=spec.seed
        )
        for column in ("elbo_qstar", "approximation_gap", "amortization_gap"):
            scores[column] = split[column].to_numpy()
    suffix = f"-{method}" if annealed else ""
    evaluation_file = EVALUATION_FILE.replace(".csv", f"{suffix}.csv")
    atomic_write_text(run_dir / evaluation_file, scores.to_csv(index=False))
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
        **({"method": f"{method}, {num_steps} steps"} if annealed else {}),
        **(
            {c: float(scores[c].mean()) for c in ("approximation_gap", "amortization_gap")}
            if gap
            else {}
        ),
    }
    rows = [ours]
    if spec.likelihood == "bernoulli":  # published NLLs are for binary MNIST only
        rows += REFERENCES.to_dict("records")
    results = pd.DataFrame(rows)
    atomic_write_text(
        run_dir / RESULTS_FILE.replace(".csv", f"{suffix}.csv"), results.to_csv(index=False)
    )
    return results


def results_markdown(results: pd.DataFrame) -> str:
    """The results table as Markdown, in the README's own form: ± the standard error of the
    log-likelihood, k̂ as a percentage, columns a reader understands, our row first."""
    lines = [
        "| source | model | training data | epochs | K | test images | test ELBO "
        "| test log p(x), IS | k̂ > 0.7 | active units |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results.to_dict("records"):
        ours = str(row["source"]).startswith("lvmkit")
        ll = _number(row["test_log_likelihood"])
        se = row.get("log_likelihood_se")
        if ours and se is not None and not pd.isna(se):
            ll = f"**{ll}** ± {se:.2f}"
        method = row.get("method")
        if ours and isinstance(method, str):  # an AIS row: K is its chains
            ll = f"{ll} (by {method})"
        khat = row.get("frac_pareto_k_above_0_7")
        units = row.get("active_units")
        cells = [
            f"**{row['source']}**" if ours else str(row["source"]),
            str(row["model"]),
            f"{row['binarization']} binarization",
            _count(row["epochs"]),
            _count(row["eval_samples"]),
            _count(row.get("eval_points")),
            _number(row["test_elbo"]),
            ll,
            "—" if khat is None or pd.isna(khat) else f"{100 * khat:.1f} %",
            "—" if units is None or pd.isna(units) else _count(units),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: Any) -> str:
    """Two decimals with a true minus sign (as the README prints them); "—" where absent."""
    if value is None or pd.isna(value):
        return "—"
    return f"{value:.2f}".replace("-", "−")


def _count(value: Any) -> str:
    return "—" if value is None or pd.isna(value) else f"{int(value):,}"
