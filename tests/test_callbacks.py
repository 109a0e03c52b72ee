"""Callbacks on fit/evaluate, early stopping, and the MLflow and TensorBoard loggers (real
packages, local stores)."""

from __future__ import annotations

import logging

import pyro
import pytest
import torch
from nan_models import ExpLoc, no_guide

import lvmkit
from conftest import assert_close


def _pair(seed: int = 0):
    pyro.set_rng_seed(seed)
    return lvmkit.build_vae(lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,)))


def _x(n: int = 64) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 6), 0.4), generator=torch.Generator().manual_seed(1))


class Recorder(lvmkit.Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.events: list[tuple] = []
        self.stop_at = stop_at

    def on_fit_start(self, info):
        self.events.append(("start", info.epochs, len(info.history), info.run_dir))

    def on_epoch_end(self, epoch, metrics):
        self.events.append(("epoch", epoch, metrics["train_loss"]))
        return epoch == self.stop_at

    def on_checkpoint(self, path, epoch, step):
        assert path.is_file()
        self.events.append(("checkpoint", epoch, step))

    def on_evaluation(self, summary, name):
        self.events.append(("evaluation", name, summary.log_likelihood))

    def on_fit_end(self, history, error):
        self.events.append(("end", len(history), error))


def test_hooks_fire_in_order_with_the_history_values(tmp_path):
    model, guide = _pair()
    rec = Recorder()
    result = lvmkit.fit(
        model,
        guide,
        _x(),
        epochs=2,
        batch_size=32,
        device="cpu",
        progress=False,
        run_dir=tmp_path / "run",
        checkpoint_every=1,
        callbacks=[rec],
    )
    kinds = [e[0] for e in rec.events]
    assert kinds == ["start"] + ["checkpoint", "checkpoint", "epoch"] * 2 + ["end"]
    assert rec.events[0] == ("start", 2, 0, tmp_path / "run")
    assert [e[1:] for e in rec.events if e[0] == "checkpoint"] == [(0, 1), (1, 0), (1, 1), (2, 0)]
    losses = [e[2] for e in rec.events if e[0] == "epoch"]
    assert_close(losses, result.history["train_loss"].tolist())
    assert rec.events[-1] == ("end", 2, None)
    assert not result.stopped_early

    scores = lvmkit.evaluate(model, guide, _x(16), 30, callbacks=[rec], label="valid")
    name, ll = rec.events[-1][1:]
    assert name == "valid"
    assert_close(ll, scores["log_likelihood"].mean())


def test_a_callback_can_stop_training_and_resume_goes_on(tmp_path):
    run = tmp_path / "run"
    model, guide = _pair()
    result = lvmkit.fit(
        model, guide, _x(), epochs=5, device="cpu", progress=False, run_dir=run,
        callbacks=[Recorder(stop_at=2)],
    )  # fmt: skip
    assert result.stopped_early and list(result.history.epoch) == [1, 2]
    model, guide = _pair()
    rec = Recorder()
    resumed = lvmkit.fit(
        model, guide, _x(), epochs=4, device="cpu", progress=False, run_dir=run, resume=True,
        callbacks=[rec],
    )  # fmt: skip
    assert rec.events[0][:3] == ("start", 4, 2)
    assert list(resumed.history.epoch) == [1, 2, 3, 4]


def test_early_stopping_stops_and_rebuilds_its_state_on_resume(tmp_path):
    run = tmp_path / "run"
    stopper = lvmkit.EarlyStopping("train_loss", patience=2, min_delta=1e9)
    model, guide = _pair()
    result = lvmkit.fit(
        model, guide, _x(), epochs=10, device="cpu", progress=False, run_dir=run,
        callbacks=[stopper],
    )  # fmt: skip
    # no epoch improves by 1e9 nats: epoch 1 sets the best, epochs 2 and 3 use the patience
    assert stopper.stopped_epoch == 3 and result.stopped_early
    assert len(result.history) == 3
    # resumed with patience 3, the two epochs without improvement already count
    stopper = lvmkit.EarlyStopping("train_loss", patience=3, min_delta=1e9)
    model, guide = _pair()
    resumed = lvmkit.fit(
        model, guide, _x(), epochs=10, device="cpu", progress=False, run_dir=run, resume=True,
        callbacks=[stopper],
    )  # fmt: skip
    assert stopper.stopped_epoch == 4 and len(resumed.history) == 4


def test_early_stopping_improving_metric_never_stops():
    stopper = lvmkit.EarlyStopping("val_elbo", patience=1)
    assert not any(stopper.on_epoch_end(e, {"val_elbo": float(e)}) for e in range(1, 6))
    assert stopper.on_epoch_end(6, {"val_elbo": 5.0})  # no improvement: stop


def test_bad_callbacks_are_refused_before_training():
    model, guide = _pair()
    with pytest.raises(TypeError, match="callbacks must be a list"):
        lvmkit.fit(model, guide, _x(), epochs=1, device="cpu", callbacks=Recorder())
    with pytest.raises(TypeError, match=r"callbacks\[0\] \(int\) has none of the callback"):
        lvmkit.fit(model, guide, _x(), epochs=1, device="cpu", callbacks=[3])
    with pytest.raises(ValueError, match=r"unknown mode .up.: expected one of"):
        lvmkit.EarlyStopping(mode="up")
    with pytest.raises(KeyError, match="no such column"):
        lvmkit.fit(
            model, guide, _x(), epochs=1, device="cpu", progress=False,
            callbacks=[lvmkit.EarlyStopping("val_elbo")],
        )  # fmt: skip
    with pytest.raises(TypeError, match="label must be"):
        lvmkit.evaluate(model, guide, _x(4), 2, label="")


def test_fit_end_hook_gets_the_error_when_training_fails():
    rec = Recorder()
    with pytest.raises(lvmkit.NonFiniteLossError) as caught:
        lvmkit.fit(
            ExpLoc(),
            no_guide,
            10 + torch.randn(64, generator=torch.Generator().manual_seed(0)),
            epochs=3,
            batch_size=16,
            lr=200.0,
            device="cpu",
            progress=False,
            callbacks=[rec],
        )
    assert rec.events[-1][0] == "end" and rec.events[-1][2] is caught.value


@pytest.fixture
def quiet_mlflow():
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def test_mlflow_logger_writes_params_metrics_and_resumes_the_same_run(tmp_path, quiet_mlflow):
    MlflowClient = pytest.importorskip("mlflow.tracking").MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    model, guide = _pair()
    artifact_root = (tmp_path / "artifacts").as_uri()  # MLflow's default is ./mlruns in the cwd
    logger = lvmkit.MLflowLogger(
        uri, experiment="tests", log_checkpoints=True, artifact_location=artifact_root
    )
    result = lvmkit.fit(
        model, guide, _x(), epochs=2, batch_size=16, device="cpu", progress=False, run_dir=run,
        validation_data=_x(16), metadata={"note": "hi"}, callbacks=[logger],
    )  # fmt: skip
    scores = lvmkit.evaluate(model, guide, _x(16), 40, callbacks=[logger])
    client = MlflowClient(tracking_uri=uri)
    stored = client.get_run(logger.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params["batch_size"] == "16"
    assert stored.data.params["metadata.note"] == "hi"
    assert stored.data.tags["lvmkit.run_dir"] == str(run.resolve())
    history = client.get_metric_history(logger.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    assert_close([m.value for m in history], result.history["train_loss"].tolist())
    val = client.get_metric_history(logger.run_id, "val_elbo")
    assert_close([m.value for m in val], result.history["val_elbo"].tolist())
    assert_close(stored.data.metrics["test_log_likelihood"], scores["log_likelihood"].mean())
    artifacts = [a.path for a in client.list_artifacts(logger.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/checkpoint.pt"]
    assert list((tmp_path / "artifacts").rglob("checkpoint.pt"))  # and not in ./mlruns

    first_id = logger.run_id
    model, guide = _pair()
    logger = lvmkit.MLflowLogger(uri, experiment="tests")
    lvmkit.fit(
        model, guide, _x(), epochs=3, batch_size=16, device="cpu", progress=False, run_dir=run,
        validation_data=_x(16), resume=True, callbacks=[logger],
    )  # fmt: skip
    assert logger.run_id == first_id
    assert [m.step for m in client.get_metric_history(first_id, "train_loss")] == [1, 2, 3]


def test_tensorboard_logger_writes_scalars_read_back_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, guide = _pair()
    logger = lvmkit.TensorBoardLogger(tmp_path / "tb")
    result = lvmkit.fit(
        model, guide, _x(), epochs=3, device="cpu", progress=False, callbacks=[logger]
    )
    summary = lvmkit.summarize(lvmkit.evaluate(model, guide, _x(16), 40, callbacks=[logger]))
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = events.Scalars("train/train_loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert_close([e.value for e in loss], result.history["train_loss"].tolist(), rtol=1e-6)
    (ll,) = events.Scalars("test/log_likelihood")
    assert ll.step == 3
    assert_close(ll.value, summary.log_likelihood, rtol=1e-6)
