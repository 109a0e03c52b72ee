"""Non-finite losses are found without per-step syncs, rolled back and reported (or survived by
lowering lr); runs resume bit for bit from mid-epoch checkpoints."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from nan_models import ExpLoc, Flagged, FlaggedGuide, no_guide

import lvmkit
from lvmkit.inference.checkpoint import load_checkpoint
from lvmkit.inference.loop import epoch_order
from lvmkit.inference.rundir import CHECKPOINT_FILE

N, BATCH = 40, 8


def _flagged_data(flagged_row: int):
    x = torch.randn(N, generator=torch.Generator().manual_seed(1))
    flag = torch.zeros(N)
    flag[flagged_row] = 1.0
    return {"x": x, "flag": flag}


def _step_of(row: int, seed: int, epoch: int = 1) -> int:
    position = int((epoch_order(seed, epoch, N) == row).nonzero())
    return position // BATCH + 1


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("checkpoint_every", [None, 2])
def test_nan_is_rolled_back_and_named_by_epoch_step_and_site(tmp_path, checkpoint_every, compile):
    row = N - 1  # outside the first rows, which fit's set-up step scores
    seed = next(s for s in range(100) if _step_of(row, s) >= 3)  # not the validated first step
    bad_step = _step_of(row, seed)
    model, guide = Flagged(), FlaggedGuide()
    run = tmp_path / "run"
    with pytest.raises(lvmkit.NonFiniteLossError) as info:
        lvmkit.fit(
            model,
            guide,
            _flagged_data(row),
            epochs=2,
            batch_size=BATCH,
            seed=seed,
            device="cpu",
            run_dir=run,
            checkpoint_every=checkpoint_every,
            progress=False,
            compile=compile,  # compiled: the NaN found at the check point, located by replay
        )
    err = info.value
    assert (err.epoch, err.step, err.site) == (1, bad_step, "x")
    assert isinstance(err, FloatingPointError) and isinstance(err, ValueError)
    assert f"epoch 1, step {bad_step} of {N // BATCH}" in str(err)
    assert "sample site 'x' (model: its log-density is nan)" in str(err)
    # rolled back: the modules hold the last good state, which is what the run directory holds
    params = dict(model.named_parameters(prefix="model"))
    params.update(guide.named_parameters(prefix="guide"))
    assert all(bool(torch.isfinite(p).all()) for p in params.values())
    if checkpoint_every is None:
        assert "rolled back to the start of training" in str(err)
        assert not (run / CHECKPOINT_FILE).exists()
        assert model.w.item() == 1.0 and guide.a.item() == 0.5  # the initial values
    else:
        good_step = (bad_step - 1) // 2 * 2
        assert f"in epoch 1, after step {good_step}" in str(err)
        state = load_checkpoint(run / CHECKPOINT_FILE)
        assert (state["epoch"], state["step"]) == (0, good_step)
        for name, value in params.items():
            assert torch.equal(value.detach(), state["params"][name])


def test_reduce_lr_rolls_back_lowers_lr_and_finishes():
    x = 10 + torch.randn(64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(lvmkit.NonFiniteLossError, match=r"epoch 1, step 2 of 4.*site 'x'"):
        lvmkit.fit(ExpLoc(), no_guide, x, epochs=3, batch_size=16, lr=200.0, progress=False)
    model = ExpLoc()
    with pytest.warns(RuntimeWarning, match=r"continuing with lr") as record:
        result = lvmkit.fit(
            model,
            no_guide,
            x,
            epochs=3,
            batch_size=16,
            lr=200.0,
            on_nonfinite="reduce_lr",
            progress=False,
        )
    reductions = [str(w.message) for w in record if "continuing with lr" in str(w.message)]
    assert 1 <= len(reductions) <= lvmkit.inference.train.MAX_LR_REDUCTIONS
    assert "rolled back to the start of training and continuing with lr 200 → 100" in reductions[0]
    final_lr = 200.0 * 0.5 ** len(reductions)
    assert list(result.history.lr) == [final_lr] * 3
    assert bool(torch.isfinite(model.w)) and result.history.train_loss.notna().all()


def test_reduce_lr_gives_up_after_the_limit():
    row = N - 1
    seed = next(s for s in range(100) if _step_of(row, s) >= 3)
    with (
        pytest.warns(RuntimeWarning, match="continuing with lr"),
        pytest.raises(lvmkit.NonFiniteLossError, match="already lowered the lr 5 times"),
    ):
        lvmkit.fit(
            Flagged(),
            FlaggedGuide(),
            _flagged_data(row),
            epochs=1,
            batch_size=BATCH,
            seed=seed,
            on_nonfinite="reduce_lr",
            progress=False,
        )


class _Interrupt(Exception):
    pass


def _vae_fit(run_dir, *, epochs, compile, checkpoint_every, stop_after_calls=None, resume=False):
    torch.manual_seed(0)
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,)))
    x = torch.bernoulli(torch.full((50, 6), 0.4), generator=torch.Generator().manual_seed(3))
    calls = {"n": 0}

    def binarize_or_crash(batch):  # a dynamic transform (it draws random numbers) that can "die"
        calls["n"] += 1
        if stop_after_calls is not None and calls["n"] > stop_after_calls:
            raise _Interrupt
        return lvmkit.binarize(batch)

    return lvmkit.fit(
        model,
        guide,
        x,
        epochs=epochs,
        batch_size=8,
        device="cpu",
        transform=binarize_or_crash,
        run_dir=run_dir,
        resume=resume,
        checkpoint_every=checkpoint_every,
        compile=compile,
        progress=False,
    )


@pytest.mark.parametrize("compile", [False, True])
def test_resume_from_a_mid_epoch_checkpoint_is_bit_identical(tmp_path, compile):
    kw = {"epochs": 3, "checkpoint_every": 3, "compile": compile}
    reference = _vae_fit(tmp_path / "ref", **kw)
    # 7 steps an epoch: dies in epoch 2 after step 4; the last checkpoint is after step 3
    with pytest.raises(_Interrupt):
        _vae_fit(tmp_path / "run", stop_after_calls=1 + 7 + 4, **kw)
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)
    # (the epoch's data order is not stored: it is a function of the seed and the epoch)
    assert (state["epoch"], state["step"]) == (1, 3)
    resumed = _vae_fit(tmp_path / "run", resume=True, **kw)
    assert resumed.compiled is compile
    for name, value in reference.params.items():
        assert torch.equal(value, resumed.params[name]), name
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(history.epoch) == [1, 2, 3]
    assert history.train_loss.tolist() == reference.history.train_loss.tolist()
