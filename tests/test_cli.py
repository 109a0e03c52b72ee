"""The `lvmkit` command end to end, at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

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
    assert "lvmkit (this run: run)" in out and "Burda et al. 2016" in out and "-86.76" in out
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

    png = tmp_path / "grid.png"
    assert main(["sample", str(run), "-n", "9", "--out", str(png)]) == 0
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
        (["train", "--beta", "-1"], "KLSchedule.beta must be >= 0; got -1"),
        (["train", "--num-particles", "0"], "num_particles must be an int >= 1; got 0"),
        (["bench", "vae"], "bench vae needs a part: latent | iwae | m2 | cvae | variants"),
        (["bench", "vae", "iwea"], "Did you mean 'vae-iwae'"),
        (["bench", "gmm", "iwae"], "bench gmm takes no part"),
        (["train", "--likelihood", "gaussian"], "use binarization='none'"),
        (["train", "--epochs", "0"], "epochs must be an int >= 1; got 0"),
        (["evaluate", "no/such/run"], "does not exist"),
        (["sample", "no/such/run", "-n", "0"], "n must be an int >= 1"),
        (["train", "--on-nonfinite", "reduce"], "Did you mean 'reduce_lr'"),
        (["train", "--checkpoint-every", "0"], "checkpoint_every must be an int >= 1; got 0"),
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
    from mlflow.tracking import MlflowClient
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
