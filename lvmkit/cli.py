"""The ``lvmkit`` command: ``train``, ``evaluate``, ``bench``, ``sample`` and ``plot``.

Bad arguments — and a corrupt checkpoint, a run directory in use, a full disk, a NaN loss — end
with ``lvmkit: error: …`` on stderr and exit status 2, as argparse does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lvmkit import runs
from lvmkit.inference._rundir import RunDirInUseError


def _parser() -> argparse.ArgumentParser:
    defaults = runs.TrainSpec()
    parser = argparse.ArgumentParser(prog="lvmkit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model on MNIST, evaluate it, print results")
    train.add_argument("--family", default=defaults.family, help=f"one of {runs.FAMILIES}")
    train.add_argument(
        "--likelihood",
        default=defaults.likelihood,
        help="bernoulli | gaussian | gaussian_fixed (default: %(default)s)",
    )
    train.add_argument("--latent-dim", type=int, default=defaults.latent_dim)
    train.add_argument(
        "--hidden-dims",
        type=int,
        nargs="+",
        default=list(defaults.hidden_dims),
        help="decoder widths from z to x; the encoder mirrors them",
    )
    train.add_argument("--activation", default=defaults.activation)
    train.add_argument(
        "--binarization",
        default=defaults.binarization,
        help="dynamic | static | none (default: %(default)s)",
    )
    train.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"total epochs (default: {defaults.epochs}; with --resume: the run's)",
    )
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument(
        "--objective", default=defaults.objective, help="elbo | mean_field | iwae | rws"
    )
    train.add_argument(
        "--num-particles",
        type=int,
        default=defaults.num_particles,
        help="samples per image in the objective; K of iwae / rws (default: %(default)s)",
    )
    train.add_argument(
        "--beta", type=float, default=defaults.beta, help="KL weight (β-VAE; default: 1)"
    )
    train.add_argument(
        "--warmup-epochs",
        type=float,
        default=defaults.warmup_epochs,
        help="epochs of linear KL warm-up from 0 to beta (default: none)",
    )
    train.add_argument("--device", default=defaults.device, help="auto | cpu | cuda")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument(
        "--eval-samples",
        type=int,
        default=defaults.eval_samples,
        help="importance samples K per test image (default: %(default)s)",
    )
    train.add_argument(
        "--eval-points",
        type=int,
        default=None,
        help="evaluate on the first N test images (default: all 10,000)",
    )
    train.add_argument(
        "--train-points",
        type=int,
        default=None,
        help="train on the first N training images (default: all 50,000)",
    )
    train.add_argument("--valid-points", type=int, default=defaults.valid_points)
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run directory (default: runs/<family>-<likelihood>-<time>)",
    )
    train.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (other options come from its config)",
    )
    train.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trace the loss with the PyTorch JIT (default: on for the built-in VAE with "
        "objective elbo)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="also checkpoint every STEPS steps inside an epoch (default: at epoch ends)",
    )
    train.add_argument(
        "--on-nonfinite",
        default=defaults.on_nonfinite,
        help="raise | reduce_lr: after a NaN/inf loss, roll back and stop, or roll back, halve "
        "lr and go on (default: %(default)s)",
    )
    train.add_argument(
        "--mlflow",
        metavar="TRACKING_URI",
        default=None,
        help="log to MLflow, e.g. sqlite:///mlflow.db (needs the mlflow extra)",
    )
    train.add_argument(
        "--mlflow-experiment", default="lvmkit", help="MLflow experiment (default: %(default)s)"
    )
    train.add_argument(
        "--tensorboard",
        metavar="LOG_DIR",
        type=Path,
        default=None,
        help="write TensorBoard event files to LOG_DIR (needs the tensorboard extra)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    ev = commands.add_parser("evaluate", help="evaluate a run's checkpoint on the MNIST test set")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="importance samples K per image (default: the run's)",
    )
    ev.add_argument(
        "--points", type=int, default=None, help="first N test images (default: the run's)"
    )
    ev.add_argument("--device", default="auto")
    ev.add_argument("--quiet", action="store_true")

    bench = commands.add_parser("bench", help="run a benchmark suite; write CSV and Markdown")
    bench.add_argument(
        "suite", help="benchmark name: gmm | nonlinear | speed | vae (with a part, below)"
    )
    bench.add_argument(
        "part",
        nargs="?",
        help="for `bench vae`: latent | iwae | m2 | cvae | variants",
    )
    bench.add_argument("--profile", default="full", help="quick | full (default: %(default)s)")
    bench.add_argument("--device", default="auto", help="auto | cpu | cuda")
    bench.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks") / "results",
        help="folder for SUITE-DEVICE-PROFILE.csv/.md and its -figures/ (default: %(default)s)",
    )

    sample = commands.add_parser("sample", help="draw images from a run's model into a PNG grid")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("-n", type=int, default=64, help="number of images (default: %(default)s)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--out", type=Path, default=None, help="PNG path (default: RUN_DIR/figures/samples.png)"
    )
    plot = commands.add_parser(
        "plot",
        help="draw a run's figures (ELBO curve, samples, reconstructions, latent scatter, "
        "traversal, interpolation, k̂) into RUN_DIR/figures",
    )
    plot.add_argument("run_dir", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "evaluate":
            results = runs.evaluate_run(
                args.run_dir,
                num_samples=args.num_samples,
                points=args.points,
                device=args.device,
                progress=not args.quiet,
            )
            print(runs.format_results(results))
            return 0
        if args.command == "plot":
            for written in runs.plot_run(args.run_dir):
                print(written)
            return 0
        path = runs.sample_run(args.run_dir, n=args.n, seed=args.seed, out=args.out)
        print(path)
        return 0
    except (ValueError, TypeError, OSError, ImportError, RunDirInUseError) as err:
        parser.exit(2, f"lvmkit: error: {err}\n")
    return 0  # unreachable: parser.exit raises SystemExit


def _train(args: argparse.Namespace) -> int:
    callbacks = _loggers(args)
    if args.resume is not None:
        result = runs.resume_run(
            args.resume, epochs=args.epochs, progress=not args.quiet, callbacks=callbacks
        )
    else:
        # every TrainSpec field has an option of the same name
        fields = {
            field.name: getattr(args, field.name) for field in dataclasses.fields(runs.TrainSpec)
        }
        fields["hidden_dims"] = tuple(fields["hidden_dims"])
        if fields["epochs"] is None:
            fields["epochs"] = runs.TrainSpec.epochs
        spec = runs.TrainSpec(**fields)
        out = (
            args.out
            or Path("runs") / f"{spec.family}-{spec.likelihood}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        result = runs.train_run(spec, out, progress=not args.quiet, callbacks=callbacks)
    for logger in callbacks:
        if hasattr(logger, "close"):
            logger.close()
    if result is None:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    print(runs.format_results(result.results))
    print(f"\nrun directory: {result.run_dir}")
    return 0


def _loggers(args: argparse.Namespace) -> list:
    """The experiment loggers asked for on the command line (rank 0 only under torchrun)."""
    from lvmkit.inference._distributed import env_rank
    from lvmkit.inference.callbacks import MLflowLogger, TensorBoardLogger

    if env_rank() != 0:
        return []
    loggers: list = []
    if args.mlflow is not None:
        loggers.append(MLflowLogger(args.mlflow, experiment=args.mlflow_experiment))
    if args.tensorboard is not None:
        loggers.append(TensorBoardLogger(args.tensorboard))
    return loggers


def _bench(args: argparse.Namespace) -> int:
    from lvmkit.benchmarks import BENCHMARKS, write_results
    from lvmkit.inference._data import resolve_device
    from lvmkit.models._checks import check_choice

    key = args.suite
    if args.suite == "vae":
        if args.part is None:
            raise ValueError(
                "bench vae needs a part: latent | iwae | m2 | cvae | variants "
                "(e.g. `lvmkit bench vae iwae --profile quick`)"
            )
        key = f"vae-{args.part}"
    elif args.part is not None:
        raise ValueError(f"bench {args.suite} takes no part; got {args.part!r}")
    suite = BENCHMARKS[check_choice("suite", key, BENCHMARKS)]
    tag = resolve_device(args.device).type
    name = f"{key}-{tag}-{args.profile}"
    frame = suite(args.profile, device=args.device, figures_dir=args.out / f"{name}-figures")
    csv, markdown = write_results(frame, args.out, name)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep=""))
    print(f"\nwritten: {csv} and {markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
