"""Run directories: atomic files, no silent overwrite, and clear errors for foreign checkpoints."""

from __future__ import annotations

import pytest
import torch

import lvmkit
from lvmkit.inference.checkpoint import load_checkpoint, save_checkpoint

D = 6


def _fit(run_dir, *, latent: int = 2, lr: float = 1e-3, epochs: int = 1, resume: bool = False):
    model, guide = lvmkit.build_vae(
        lvmkit.VAEConfig(data_dim=D, latent_dim=latent, hidden_dims=(8,))
    )
    x = torch.bernoulli(torch.full((40, D), 0.5), generator=torch.Generator().manual_seed(0))
    return lvmkit.fit(
        model,
        guide,
        x,
        epochs=epochs,
        lr=lr,
        batch_size=8,
        device="cpu",
        run_dir=run_dir,
        resume=resume,
        metadata={"note": "test"},
        progress=False,
    )


def test_run_directory_files(tmp_path):
    _fit(tmp_path / "run", epochs=2)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["checkpoint.pt", "config.json", "history.csv"]  # no temporary files left
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2


def test_existing_run_is_not_overwritten(tmp_path):
    _fit(tmp_path / "run")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a run.*nothing was overwritten"):
        _fit(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.pt does not exist"):
        _fit(tmp_path / "nothing", resume=True)


def test_resume_with_other_settings_is_an_error(tmp_path):
    _fit(tmp_path / "run")
    with pytest.raises(ValueError, match=r"different settings \(lr: run has 0.001, now 0.01\)"):
        _fit(tmp_path / "run", lr=1e-2, epochs=2, resume=True)


def test_checkpoint_of_another_model_is_an_error(tmp_path):
    _fit(tmp_path / "run")
    with pytest.raises(ValueError, match="belongs to another model"):
        _fit(tmp_path / "run", latent=3, epochs=2, resume=True)


def test_truncated_checkpoint_is_an_error(tmp_path):
    _fit(tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable lvmkit checkpoint"):
        load_checkpoint(path)


def test_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": Exception("arbitrary object")}, path)
    with pytest.raises(ValueError, match="not a readable lvmkit checkpoint"):
        load_checkpoint(path)


def test_foreign_format_is_an_error(tmp_path):
    save_checkpoint(tmp_path / "ok.pt", {"epoch": 1})
    torch.save({"format": 99}, tmp_path / "future.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["epoch"] == 1
    with pytest.raises(ValueError, match="found format 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "bad": Unsaveable()})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
