"""The `lvmkit` command end to end, at a tiny size."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest

from conftest import interrupted_scoring
from lvmkit import runs
from lvmkit.cli import main

TINY = [
    "--epochs",
    "2",
    "--train-points",
    "300",
    "--valid-points",
    "50",
    "--eval-points",
    "20",
    "--eval-samples",
    "40",
    "--hidden-dims",
    "32",
    "--latent-dim",
    "4",
    "--quiet",
]


def test_train_resume_evaluate_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "**lvmkit (this run: run)**" in out and "Burda et al. 2016" in out and "−86.76" in out
    assert out.startswith("| source | model | training data | epochs | K | test images |")
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock",
        "checkpoint.prev.pt",
        "checkpoint.pt",
        "config.json",
        "evaluation.csv",
        "figures",
        "history.csv",
        "results.csv",
    ]
    assert sorted(p.name for p in (run / "figures").iterdir()) == sorted(runs.FIGURES)
    scores = pd.read_csv(run / "evaluation.csv")
    assert list(scores.columns) == ["elbo", "log_likelihood", "pareto_k", "ess"]
    assert len(scores) == 20
    config = json.loads((run / "config.json").read_text())
    assert config["metadata"]["spec"]["latent_dim"] == 4 and config["fit"]["batch_size"] == 128
    results = pd.read_csv(run / "results.csv")
    ours = results.iloc[0]
    assert ours["eval_samples"] == 40 and ours["eval_points"] == 20 and ours["epochs"] == 2
    assert ours["test_log_likelihood"] >= ours["test_elbo"]

    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    assert list(pd.read_csv(run / "history.csv").epoch) == [1, 2, 3]

    assert main(["evaluate", str(run), "--num-samples", "25", "--points", "10", "--quiet"]) == 0
    assert pd.read_csv(run / "results.csv").iloc[0]["eval_samples"] == 25

    # AIS (and the gap split) beside the importance-sampled files, which stay as they are
    before = {n: (run / n).read_bytes() for n in ("evaluation.csv", "results.csv")}
    argv = ["evaluate", str(run), "--method", "ais", "--num-samples", "3", "--num-steps", "4"]
    capsys.readouterr()
    assert main([*argv, "--points", "5", "--gap-split", "--quiet"]) == 0
    assert "ais, 4 steps" in capsys.readouterr().out
    scores = pd.read_csv(run / "evaluation-ais.csv")
    assert list(scores.columns) == [
        "elbo", "log_likelihood", "pareto_k", "ess", "elbo_qstar", "approximation_gap",
        "amortization_gap",
    ]  # fmt: skip
    assert len(scores) == 5 and scores.log_likelihood.notna().all()
    results = pd.read_csv(run / "results-ais.csv")
    assert {"approximation_gap", "amortization_gap"} <= set(results.columns)
    assert {n: (run / n).read_bytes() for n in before} == before

    png = tmp_path / "grid.png"
    assert main(["sample", str(run), "-n", "9", "--out", str(png)]) == 0
    capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for figure in (run / "figures").iterdir():
        figure.unlink()
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(written) == sorted(str(run / "figures" / name) for name in runs.FIGURES)
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compiled_training_from_the_cli(tmp_path):
    assert main(["train", *TINY, "--epochs", "1", "--compile", "--out", str(tmp_path / "c")]) == 0
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["fit"]["compile"] is True and config["metadata"]["spec"]["compile"] is True


def test_iwae_and_kl_warmup_from_the_cli(tmp_path):
    run = tmp_path / "w"
    argv = ["train", *TINY, "--epochs", "2", "--objective", "iwae", "--num-particles", "3"]
    assert main([*argv, "--beta", "0.5", "--warmup-epochs", "1", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["fit"]["objective"] == "iwae" and config["fit"]["num_particles"] == 3
    assert config["fit"]["kl_schedule"] == {"beta": 0.5, "warmup_epochs": 1.0, "start": 0.0}
    # 3 steps an epoch: epoch 1 ends at step 3, 2/3 of the way up the one-epoch ramp to 0.5
    assert pd.read_csv(run / "history.csv").kl_weight.tolist() == pytest.approx([1 / 3, 0.5])
    assert pd.read_csv(run / "results.csv").iloc[0]["active_units"] >= 0


def test_same_arguments_same_numbers(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / name)]) == 0
    a, b = (pd.read_csv(tmp_path / name / "results.csv") for name in ("a", "b"))
    assert a.drop(columns="source").equals(b.drop(columns="source"))
    history = [pd.read_csv(tmp_path / name / "history.csv") for name in ("a", "b")]
    assert history[0].train_loss.equals(history[1].train_loss)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--likelihood", "bernouli"], "Did you mean 'bernoulli'"),
        (["train", "--objective", "iwea"], "Did you mean 'iwae'"),
        (["train", "--beta", "-1"], "--beta must be >= 0; got -1"),
        (["train", "--num-particles", "0"], "--num-particles must be an int >= 1; got 0"),
        (["bench", "vae"], "bench vae needs a part: latent | iwae | m2 | cvae | variants"),
        (["bench", "vae", "iwea"], "Did you mean 'vae-iwae'"),
        (["bench", "gmm", "iwae"], "bench gmm takes no part"),
        (["train", "--likelihood", "gaussian"], "use --binarization none"),
        (["train", "--epochs", "0"], "--epochs must be an int >= 1; got 0"),
        (["evaluate", "no/such/run"], "no/such/run is not a run directory: no such folder"),
        (["sample", "no/such/run", "-n", "0"], "-n must be an int >= 1"),
        (["train", "--on-nonfinite", "reduce"], "Did you mean 'reduce_lr'"),
        (["train", "--checkpoint-every", "0"], "--checkpoint-every must be an int >= 1; got 0"),
        (["train", "--eval-samples", "0"], "--eval-samples must be an int >= 1; got 0"),
        (["train", "--eval-points", "20000"], "--eval-points must be at most 10,000"),
        (["train", "--threads", "0"], "--threads: expected 'auto' or an int >= 1; got 0"),
    ],
    ids=[
        "likelihood",
        "objective",
        "beta",
        "num-particles",
        "bench-vae-no-part",
        "bench-vae-bad-part",
        "bench-part-not-taken",
        "gaussian-dynamic",
        "epochs",
        "missing-run",
        "n",
        "on-nonfinite",
        "checkpoint-every",
        "eval-samples",
        "eval-points",
        "threads",
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_run_directory_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    with pytest.raises(SystemExit):
        main(["train", *TINY, "--out", str(run)])
    assert "already holds a run" in capsys.readouterr().err


def test_corrupt_checkpoint_and_busy_run_directory_are_clear_errors(tmp_path, capsys):
    import fcntl
    import os

    run = tmp_path / "run"
    assert (
        main(["train", *TINY, "--epochs", "1", "--checkpoint-every", "2", "--out", str(run)]) == 0
    )
    fd = os.open(run / ".lock", os.O_RDWR)  # another open file description: as another process
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--resume", str(run), "--epochs", "2", "--quiet"])
    finally:
        os.close(fd)
    assert exit_info.value.code == 2
    assert "is in use by a live process" in capsys.readouterr().err
    checkpoint = run / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-10])
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(run), "--epochs", "2", "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "truncated" in err and "checkpoint.prev.pt" in err


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "lvmkit", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "train" in out and "evaluate" in out and "sample" in out


def test_training_logs_to_mlflow_and_tensorboard(tmp_path, capsys):
    MlflowClient = pytest.importorskip("mlflow.tracking").MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["train", *TINY, "--out", str(tmp_path / "run"), "--mlflow", uri]
    assert main([*argv, "--mlflow-experiment", "cli", "--tensorboard", str(tmp_path / "tb")]) == 0
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_elbo")] == [1, 2]
    results = pd.read_csv(tmp_path / "run" / "results.csv").iloc[0]
    logged = run.data.metrics["test_log_likelihood"]
    assert logged == pytest.approx(results["test_log_likelihood"], rel=1e-6)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/train_loss")] == [1, 2]
    assert events.Scalars("test/log_likelihood")[0].value == pytest.approx(logged, rel=1e-6)


# -- first run as a newcomer: help, errors, interrupts --------------------------------------


def test_every_train_option_has_help_and_shows_its_default():
    from lvmkit.cli import _parser

    parser = _parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    for name, command in subparsers.choices.items():
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    text = subparsers.choices["train"].format_help()
    for shown in ("(default: 128)", "(default: 0.001)", "(default: 5000)", "(default: 0)",
                  "(default: auto)", "(default: all 10,000)"):  # fmt: skip
        assert shown in " ".join(text.split()), shown


def test_help_is_plain_text_and_loads_no_torch():
    """`lvmkit --help` answers without importing torch (measured: 0.18 s against 2.6 s)."""
    code = (
        "import sys, contextlib, io\n"
        "from lvmkit.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(repr(out.getvalue()), 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    text, torch_loaded = result.stdout.rsplit(" ", 1)
    assert torch_loaded.strip() == "False"
    assert "``" not in text and "train" in text and "evaluate" in text


def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--device", "cuda", "--out", str(run)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--device cuda but this torch build sees no CUDA" in err
    assert not run.exists()


def test_a_folder_that_is_not_a_run_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv in (
        ["evaluate", str(tmp_path / "empty")],
        ["train", "--resume", str(tmp_path / "empty")],
    ):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert f"{tmp_path / 'empty'} is not a run directory: no config.json there" in err
        assert "lvmkit train --out" in err


@pytest.fixture
def finished_run(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    return run


def test_resume_with_nothing_left_to_train_says_so(finished_run, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(finished_run), "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "has trained all 1 of its epochs and been evaluated: nothing left to do" in err
    assert f"lvmkit evaluate {finished_run}" in err


def test_points_beyond_the_test_set_are_refused(finished_run, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", str(finished_run), "--points", "10001", "--quiet"])
    assert (
        "--points must be at most 10,000 (the MNIST test split's size)" in capsys.readouterr().err
    )


def test_sample_leaves_the_runs_own_figure_alone(finished_run, capsys):
    own = (finished_run / "figures" / "samples.png").read_bytes()
    capsys.readouterr()
    assert main(["sample", str(finished_run), "-n", "9"]) == 0
    first = capsys.readouterr().out.strip()
    assert first == str(finished_run / "samples-9-seed0.png")
    assert main(["sample", str(finished_run), "-n", "9"]) == 0
    assert "(replaced the file that was there)" in capsys.readouterr().out
    assert (finished_run / "figures" / "samples.png").read_bytes() == own


def test_ctrl_c_in_training_ends_quietly_and_resume_continues(tmp_path, capsys, monkeypatch):
    from lvmkit.inference import loop as loop_module

    real = loop_module.Loop._check_point
    state = {"points": 0}

    def interrupt_after_the_first(self):
        real(self)
        state["points"] += 1
        if state["points"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module.Loop, "_check_point", interrupt_after_the_first)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"lvmkit: interrupted. The checkpoint after epoch 1 is in {run}; "
        f"`lvmkit train --resume {run}` continues from it"
    )
    assert "Traceback" not in err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert list(pd.read_csv(run / "history.csv").epoch) == [1, 2]


def test_ctrl_c_before_any_checkpoint_leaves_nothing(tmp_path, capsys, monkeypatch):
    from lvmkit.inference import step

    def interrupted(self, calls):
        raise KeyboardInterrupt

    monkeypatch.setattr(step.Trainer, "step", interrupted)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 130
    assert "Nothing was saved yet" in capsys.readouterr().err
    assert not run.exists()


def test_ctrl_c_in_evaluation_keeps_the_scored_images(tmp_path, capsys, monkeypatch):
    """The figures are written before the evaluation; an interrupted evaluation keeps what it
    scored, and `lvmkit evaluate` continues to the numbers of one never interrupted."""
    import importlib

    from lvmkit.inference.devices import resolve_device

    # passes of 20 images × 200 samples on the device the CLI picks (CUDA's default is larger)
    weights_module = importlib.import_module("lvmkit.inference.weights")
    used = resolve_device("auto").type
    monkeypatch.setitem(weights_module.DEFAULT_MAX_PAIRS, used, 4000)
    argv = [*TINY, "--epochs", "1", "--eval-points", "60", "--eval-samples", "200"]
    assert main(["train", *argv, "--out", str(tmp_path / "straight")]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    with interrupted_scoring(monkeypatch, block=4000, at=2):  # blocks of 20 images
        assert main(["train", *argv, "--out", str(run)]) == 130
    err = capsys.readouterr().err
    assert (
        f"lvmkit: interrupted. 20 of 60 test images were scored and kept in "
        f"{run / 'evaluation.partial.pt'}; `lvmkit evaluate {run}` continues from them"
    ) in err
    assert sorted(p.name for p in (run / "figures").iterdir()) == sorted(runs.FIGURES[:6])
    assert main(["evaluate", str(run), "--quiet"]) == 0
    assert not (run / "evaluation.partial.pt").exists()
    ours, straight = (pd.read_csv(d / "evaluation.csv") for d in (run, tmp_path / "straight"))
    pd.testing.assert_frame_equal(ours, straight)


def test_threads_are_recorded_in_the_runs_config(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--threads", "1", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["fit"]["threads"] == 1 and config["metadata"]["spec"]["threads"] == 1


def test_the_makefile_has_the_targets_the_docs_name():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    makefile = (root / "Makefile").read_text()
    targets = {line.split(":")[0] for line in makefile.splitlines() if line and line[0].isalpha()}
    mentioned = set()
    for path in (
        root / "pyproject.toml",
        root / "README.md",
        *sorted((root / "docs").glob("*.md")),
    ):
        mentioned |= set(re.findall(r"(?:^|`)make ([a-z][a-z-]*)", path.read_text(), flags=re.M))
    assert mentioned - targets == set()
    assert re.search(r'^license = "MIT"$', (root / "pyproject.toml").read_text(), flags=re.M)


def test_check_gpu_says_there_is_no_cuda_and_exits_0(monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    import torch

    path = Path(__file__).resolve().parents[1] / "tools" / "check_gpu.py"
    spec = importlib.util.spec_from_file_location("check_gpu", path)
    assert spec is not None and spec.loader is not None
    check_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_gpu.main([]) == 0
    assert "check-gpu: no CUDA device here" in capsys.readouterr().out
