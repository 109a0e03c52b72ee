"""The lvmkit command: train, evaluate, bench, sample and plot.

Bad arguments — and a corrupt checkpoint, a run directory in use, a full disk, a NaN loss — end
with ``lvmkit: error: …`` on stderr (naming the command-line flag) and exit status 2, as argparse
does. Ctrl-C ends with one line saying what was saved and the command that continues (status 130).
Torch, Pyro and the rest load only once a command runs, so ``lvmkit --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lvmkit.spec import FAMILIES, TrainSpec

DESCRIPTION = (
    "lvmkit: latent-variable models on Pyro. Train a model on MNIST and evaluate it (importance-"
    "sampled log-likelihood, Pareto k), continue or re-score a run, draw its figures, or run a "
    "benchmark suite."
)
EPILOG = "Run `lvmkit COMMAND --help` for a command's options."


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default (but not a "(default: None)" where there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False  # (0 is a default to show)
        if hidden or action.default is argparse.SUPPRESS or "%(default)" in text:
            return text
        return super()._get_help_string(action) or text


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 1; got {value}")
    return value


def _common(command: argparse.ArgumentParser, *, device: bool = True) -> None:
    command.add_argument(
        "--threads",
        type=_threads,
        default="auto",
        help="CPU threads for torch: 'auto' (the CPUs this process may use, less those other work "
        "keeps busy; an OMP_NUM_THREADS you set is kept) or a number",
    )
    if device:
        command.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvmkit", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text, formatter_class=_Formatter)

    _train_options(command("train", TRAIN_HELP))
    _evaluate_options(command("evaluate", "score a run's checkpoint on the MNIST test set (again)"))
    _bench_options(command("bench", "run a benchmark suite; write its CSV, Markdown and figures"))
    _sample_options(command("sample", "draw images from a run's model into a PNG grid"))
    plot = command(
        "plot",
        "draw a run's figures (ELBO curve, samples, reconstructions, latent "
        "scatter, traversal, interpolation, k) into RUN_DIR/figures",
    )
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
    _common(plot, device=False)
    return parser


TRAIN_HELP = "train a model on MNIST, evaluate it on the test set, print results"


def _train_options(train: argparse.ArgumentParser) -> None:
    # the defaults as declared (making a TrainSpec would run its checks, which load torch)
    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(TrainSpec)})
    option = train.add_argument
    option("--family", default=d.family, help=f"model family: {' | '.join(FAMILIES)}")
    option("--likelihood", default=d.likelihood, help="bernoulli | gaussian | gaussian_fixed")
    option("--latent-dim", type=int, default=d.latent_dim, help="dimensions of z")
    option(
        "--hidden-dims",
        type=int,
        nargs="+",
        default=list(d.hidden_dims),
        help="decoder widths from z to x; the encoder mirrors them",
    )
    option("--activation", default=d.activation, help="relu | tanh | softplus | elu")
    option(
        "--binarization",
        default=d.binarization,
        help="dynamic (a fresh draw each epoch) | static (one draw) | none (grey levels)",
    )
    option(
        "--epochs",
        type=int,
        default=None,
        help=f"total epochs (default: {d.epochs}; with --resume, the run's)",
    )
    option("--batch-size", type=int, default=d.batch_size, help="images per minibatch")
    option("--lr", type=float, default=d.lr, help="Adam's learning rate")
    option("--objective", default=d.objective, help="elbo | mean_field | iwae | rws")
    option(
        "--num-particles",
        type=int,
        default=d.num_particles,
        help="samples per image in the objective; the K of iwae / rws",
    )
    option("--beta", type=float, default=d.beta, help="weight of the KL term (β-VAE)")
    option(
        "--warmup-epochs",
        type=float,
        default=d.warmup_epochs,
        help="epochs of linear KL warm-up from 0 to --beta",
    )
    option("--seed", type=int, default=d.seed, help="seeds weights, data order and every draw")
    option(
        "--eval-samples",
        type=int,
        default=d.eval_samples,
        help="importance samples K per test image",
    )
    option(
        "--eval-points",
        type=int,
        default=None,
        help="evaluate on the first N test images (default: all 10,000)",
    )
    option(
        "--train-points",
        type=int,
        default=None,
        help="train on the first N training images (default: all 50,000)",
    )
    option(
        "--valid-points",
        type=int,
        default=d.valid_points,
        help="held-out ELBO each epoch on the first N validation images",
    )
    option(
        "--out",
        type=Path,
        default=None,
        help="run directory (default: runs/FAMILY-LIKELIHOOD-TIME)",
    )
    option(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (other options come from its config)",
    )
    option(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile each training step as one function: loss, gradients and optimizer "
        "(default: on runs of 2,000 steps or more; --no-compile: eager steps)",
    )
    option(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="also checkpoint every STEPS steps inside an epoch (default: at epoch ends)",
    )
    option(
        "--on-nonfinite",
        default=d.on_nonfinite,
        help="raise | reduce_lr: after a NaN/inf loss, roll back and stop, or roll back, halve "
        "the lr and go on",
    )
    option(
        "--mlflow",
        metavar="TRACKING_URI",
        default=None,
        help="log to MLflow, e.g. sqlite:///mlflow.db (needs the mlflow extra)",
    )
    option("--mlflow-experiment", default="lvmkit", help="MLflow experiment name")
    option(
        "--tensorboard",
        metavar="LOG_DIR",
        type=Path,
        default=None,
        help="write TensorBoard event files to LOG_DIR (needs the tensorboard extra)",
    )
    option("--quiet", action="store_true", help="no progress bars")
    _common(train)


def _evaluate_options(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
    ev.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="importance samples K per image (default: the run's)",
    )
    ev.add_argument(
        "--points",
        type=int,
        default=None,
        help="the first N test images, at most 10,000 (default: the run's)",
    )
    ev.add_argument(
        "--method",
        choices=("is", "ais", "ais-prior"),
        default="is",
        help="is: importance sampling (K = --num-samples); ais: annealed importance sampling "
        "with --num-samples chains (writes evaluation-ais.csv, results-ais.csv)",
    )
    ev.add_argument("--num-steps", type=int, default=1000, help="AIS's intermediate distributions")
    ev.add_argument(
        "--gap-split",
        action="store_true",
        help="also split each image's ELBO gap into approximation and amortization parts "
        "(a Gaussian fitted per image; columns of the evaluation file)",
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(ev)


def _bench_options(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("suite", help="ais | gmm | nonlinear | sequence | speed | vae (with a part)")
    bench.add_argument(
        "part", nargs="?", help="for bench vae: latent | iwae | m2 | cvae | variants | pythae"
    )
    bench.add_argument(
        "--profile",
        default="full",
        help="quick (seconds) | full (the papers' protocols, shortened: minutes to hours on 2 "
        "CPU cores) | paper (the papers' lengths: GPU); bench ais also has long (10,000 AIS "
        "steps on a few images: minutes on one CPU thread) and wide (1,000 test images at "
        "1,000 steps: under an hour on 2 CPU cores)",
    )
    bench.add_argument(
        "--contender",
        action="append",
        default=[],
        metavar="NAME=MODULE:FUNCTION",
        help="your own model, trained and scored beside the built-in rows (gmm, sequence and vae "
        "suites; "
        "repeatable): FUNCTION(task) returns (model, guide); MODULE is importable or a path to "
        "a .py file",
    )
    bench.add_argument(
        "--only",
        metavar="NAME",
        default=None,
        help="run just this contender (the published rows still come)",
    )
    bench.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks") / "results",
        help="folder for SUITE-DEVICE-PROFILE.csv/.md and its -figures/",
    )
    _common(bench)


def _sample_options(sample: argparse.ArgumentParser) -> None:
    sample.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
    sample.add_argument("-n", type=int, default=64, help="number of images")
    sample.add_argument("--seed", type=int, default=0, help="seeds the draws")
    sample.add_argument(
        "--out", type=Path, default=None, help="PNG path (default: RUN_DIR/samples-N-seedSEED.png)"
    )
    _common(sample, device=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from lvmkit.inference.rundir import RunDirInUseError
    from lvmkit.inference.threads import using

    try:
        with using(_threads_of(args)):
            return _run(args)
    except KeyboardInterrupt:
        from lvmkit import runs

        print(f"\nlvmkit: interrupted. {runs.interrupted(args)}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, RunDirInUseError) as err:
        parser.exit(2, f"lvmkit: error: {_with_flags(str(err))}\n")
    return 0  # unreachable: parser.exit raises SystemExit


def _threads_of(args: argparse.Namespace) -> int | str:
    """``--threads``; for a run that goes on (``train --resume``, ``evaluate`` of a run), 'auto'
    means the count the run started with, so that it ends with the same bits."""
    from lvmkit.inference.rundir import recorded_threads
    from lvmkit.inference.threads import resumed

    run_dir = getattr(args, "resume", None) if args.command == "train" else None
    if args.command == "evaluate":
        run_dir = args.run_dir
    if run_dir is None:
        return args.threads
    chosen = resumed(args.threads, recorded_threads(run_dir), f"the run in {run_dir}")
    return args.threads if chosen is None else chosen


def _run(args: argparse.Namespace) -> int:
    from lvmkit import runs

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
            method=args.method,
            num_steps=args.num_steps,
            gap=args.gap_split,
        )
        print(runs.results_markdown(results))
        return 0
    if args.command == "plot":
        for written in runs.plot_run(args.run_dir):
            print(written)
        return 0
    path, replaced = runs.sample_run(args.run_dir, n=args.n, seed=args.seed, out=args.out)
    print(f"{path} (replaced the file that was there)" if replaced else path)
    return 0


def _train(args: argparse.Namespace) -> int:
    from lvmkit import runs

    callbacks = _loggers(args)
    if args.resume is not None:
        result = runs.resume_run(
            args.resume,
            epochs=args.epochs,
            threads=args.threads,
            progress=not args.quiet,
            callbacks=callbacks,
        )
    else:
        # every TrainSpec field has an option of the same name
        fields = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainSpec)}
        fields["hidden_dims"] = tuple(fields["hidden_dims"])
        if fields["epochs"] is None:
            fields["epochs"] = TrainSpec.epochs
        spec = TrainSpec(**fields)
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
    print(runs.results_markdown(result.results))
    print(f"\nrun directory: {result.run_dir}")
    return 0


def _loggers(args: argparse.Namespace) -> list:
    """The experiment loggers asked for on the command line (rank 0 only under torchrun)."""
    from lvmkit.inference.callbacks import MLflowLogger, TensorBoardLogger
    from lvmkit.inference.distributed import env_rank

    if env_rank() != 0:
        return []
    loggers: list = []
    if args.mlflow is not None:
        loggers.append(MLflowLogger(args.mlflow, experiment=args.mlflow_experiment))
    if args.tensorboard is not None:
        loggers.append(TensorBoardLogger(args.tensorboard))
    return loggers


def _bench(args: argparse.Namespace) -> int:
    from lvmkit.base import check_choice
    from lvmkit.benchmarks import BENCHMARKS

    key = args.suite
    if args.suite == "vae":
        if args.part is None:
            raise ValueError(
                "bench vae needs a part: latent | iwae | m2 | cvae | variants | pythae "
                "(e.g. `lvmkit bench vae iwae --profile quick`)"
            )
        key = f"vae-{args.part}"
    elif args.part is not None:
        raise ValueError(f"bench {args.suite} takes no part; got {args.part!r}")
    check_choice("suite", key, BENCHMARKS)
    progress = logging.getLogger("lvmkit.benchmarks")  # a line as each contender starts
    handler = None if progress.handlers else logging.StreamHandler(sys.stderr)
    if handler is not None:  # (for this call only: the stream is this call's stderr)
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
    try:
        return _run_bench(args, key)
    finally:
        if handler is not None:
            progress.removeHandler(handler)


def _run_bench(args: argparse.Namespace, key: str) -> int:
    import pandas as pd

    from lvmkit.benchmarks import run, write_results
    from lvmkit.benchmarks.contenders import load
    from lvmkit.inference.devices import resolve_device

    loaded = dict(load(spec) for spec in args.contender)
    if len(loaded) < len(args.contender):
        names = [spec.partition("=")[0] for spec in args.contender]
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"--contender names must differ; {twice} given more than once")
    tag = resolve_device(args.device).type
    name = f"{key}-{tag}-{args.profile}"
    frame = run(
        key,
        args.profile,
        device=args.device,
        contenders=loaded or None,
        only=args.only,
        figures_dir=args.out / f"{name}-figures",
    )
    csv, markdown = write_results(frame, args.out, name)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep=""))
    print(f"\nwritten: {csv} and {markdown}")
    return 0


# -- messages in the command line's terms -----------------------------------------------------

# option names as the library says them → the flag; plain words only where they are the subject
_FLAGS = {
    **{f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainSpec)},
    "KLSchedule.beta": "--beta",
    "KLSchedule.warmup_epochs": "--warmup-epochs",
    "num_samples": "--num-samples",
    "points": "--points",
    "only": "--only",
    "n": "-n",
}


def _with_flags(message: str) -> str:
    """``eval_samples must be …`` → ``--eval-samples must be …``; ``device='cuda'`` →
    ``--device cuda``: errors name what the user typed."""
    for name in sorted(_FLAGS, key=len, reverse=True):
        flag, word = _FLAGS[name], re.escape(name)
        message = re.sub(rf"\b{word}=(['\"]?)([^'\",;)\s]*)\1", rf"{flag} \2", message)
        message = re.sub(rf"^(unknown )?{word}( must| \S)", rf"\1{flag}\2", message)
        message = re.sub(rf"(each entry of ){word}\b", rf"\1{flag}", message)
        if "_" in name:
            message = re.sub(rf"(?<![-\w.]){word}\b", flag, message)
    return message


if __name__ == "__main__":
    sys.exit(main())
