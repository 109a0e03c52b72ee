"""Run directories: atomic files, no silent overwrite, and clear errors for foreign checkpoints."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import lvmkit
from lvmkit.inference.checkpoint import (
    CHECKPOINT_FORMAT,
    MAGIC,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)

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
    # no temporary files left; the checkpoint before the last one is kept
    assert files == [".lock", "checkpoint.prev.pt", "checkpoint.pt", "config.json", "history.csv"]
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert load_checkpoint(tmp_path / "run" / "checkpoint.prev.pt")["epoch"] == 1


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


def _forge(path, payload_obj, *, fmt=CHECKPOINT_FORMAT):
    """A file with a valid lvmkit header around any torch.save payload."""
    buffer = io.BytesIO()
    torch.save(payload_obj, buffer)
    payload = buffer.getvalue()
    header = {"format": fmt, "lvmkit_version": "9.9", "size": len(payload)}
    header["sha256"] = hashlib.sha256(payload).hexdigest()
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + payload)


def test_truncated_checkpoint_is_an_error_that_points_to_the_previous_one(tmp_path):
    _fit(tmp_path / "run", epochs=2)
    path = tmp_path / "run" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    with pytest.raises(
        CheckpointError, match=r"truncated.*checkpoint\.prev\.pt \(after epoch 1\) is intact"
    ):
        _fit(tmp_path / "run", epochs=3, resume=True)


def test_tampered_checkpoint_is_an_error(tmp_path):
    _fit(tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[-500] ^= 0x01  # one flipped bit in the payload
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its SHA-256 check"):
        load_checkpoint(path)


def test_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    _forge(path, {"format": CHECKPOINT_FORMAT, "payload": Exception("arbitrary object")})
    with pytest.raises(CheckpointError, match="objects other than tensors and plain data"):
        load_checkpoint(path)


def test_foreign_files_are_errors(tmp_path):
    save_checkpoint(tmp_path / "ok.pt", {"epoch": 1})
    assert load_checkpoint(tmp_path / "ok.pt")["epoch"] == 1
    _forge(tmp_path / "future.pt", {"format": 99}, fmt=99)
    with pytest.raises(CheckpointError, match=r"lvmkit 9\.9 in checkpoint format 99.*reads format"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"epoch": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"plain torch\.save file"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_checkpoint(tmp_path / "empty.pt")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"epoch": 2, "bad": Unsaveable()})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_disk_full_during_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _fit(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            if self.written + len(data) > 4096:  # the disk fills part-way through the file
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match=r"No space left on device.*untouched") as info:
        _fit(tmp_path / "run", epochs=2, resume=True)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert after == before  # no temporary file left, nothing changed
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    _fit(tmp_path / "run", epochs=2, resume=True)  # and the run goes on once there is space


_FILE_LIMIT_CHILD = """
import resource, signal, sys, torch, lvmkit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,)))
x = torch.bernoulli(torch.full((40, 6), 0.5), generator=torch.Generator().manual_seed(0))
kw = dict(batch_size=8, device="cpu", run_dir=sys.argv[1], progress=False)
lvmkit.fit(model, guide, x, epochs=1, **kw)
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # the file system is now "full"
try:
    lvmkit.fit(model, guide, x, epochs=2, resume=True, **kw)
except OSError as err:
    print("ERROR", err)
"""


def test_file_size_limit_of_the_os_keeps_the_previous_checkpoint(tmp_path):
    """The same, with the kernel refusing the write (RLIMIT_FSIZE) instead of a patched file."""
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", _FILE_LIMIT_CHILD, str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "ERROR" in out and "File too large" in out and "untouched" in out, out
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert not list(run.glob(".*.tmp"))


def test_history_is_rewritten_from_the_checkpoint_on_resume(tmp_path):
    _fit(tmp_path / "run", epochs=2)
    history = tmp_path / "run" / "history.csv"
    full = history.read_text()
    history.write_text(full.splitlines()[0] + "\n")  # as if killed before history.csv was written
    (tmp_path / "run" / ".checkpoint.pt.stale.tmp").write_bytes(b"half a write")
    _fit(tmp_path / "run", epochs=2, resume=True)
    assert history.read_text() == full
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_run_directory_in_use_by_a_live_process_is_an_error(tmp_path):
    run = tmp_path / "run"
    _fit(run)
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(run / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = (run / "checkpoint.pt").read_bytes()
        with pytest.raises(RuntimeError, match=r"in use by a live process \(pid \d+"):
            _fit(run, epochs=2, resume=True)
        assert (run / "checkpoint.pt").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    _fit(run, epochs=2, resume=True)  # a killed holder's lock is released by the kernel


_LOCK_HOLDER = """
import fcntl, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
print("locked", flush=True)
time.sleep(600)
"""
