"""Kill-and-resume harness: SIGKILL a training process at random moments, resume it, and check
that nothing completed is ever lost.

Each "life" is a fresh process (forked from a server that has already imported torch, Pyro and
lvmkit, so it starts in milliseconds) that resumes the run from its checkpoint — or starts it —
and trains with ``checkpoint_every`` steps between checkpoints. The harness kills it either at a
random moment or while it is writing a checkpoint (the process reports every write, fsync and
rename of the checkpoint code and pauses there, so the kill lands half-way through a file, before
a rename or between the checkpoint and ``history.csv``). After the target number
of kills the last life runs to the end. Then it checks:

(a) every life started from a checkpoint that verified (header, size, SHA-256) and never from an
    earlier point than the life before it;
(b) the final parameters and optimizer state equal those of an uninterrupted run with the same
    seed, bit for bit (CPU);
(c) ``history.csv`` lists every epoch exactly once, with the same losses as the uninterrupted run.

Run by hand with a bigger setting::

    python tests/kill_resume.py --kills 200 --epochs 120 --points 2048

``tests/test_kill_resume.py`` runs it at a small size in the default test suite.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_EVENTS = "events.log"


@dataclass(frozen=True)
class Setting:
    epochs: int = 12
    points: int = 256
    batch_size: int = 32
    checkpoint_every: int = 3
    seed: int = 0


@dataclass
class Report:
    kills: int = 0
    kills_while_writing: int = 0
    resumes: int = 0
    fresh_starts: int = 0
    epochs_verified: int = 0
    killed_before_loading: int = 0
    resumed_from: tuple[tuple[int, int], ...] = ()

    def line(self) -> str:
        return (
            f"kill-and-resume: {self.kills} kills ({self.kills_while_writing} during checkpoint "
            f"writes), {self.resumes} resumes from verified checkpoints (epoch.step "
            f"{_span(self.resumed_from)}), {self.fresh_starts} fresh starts, "
            f"{self.killed_before_loading} killed before loading; {self.epochs_verified} epochs "
            "verified bit-identical to an uninterrupted run"
        )


def _span(points: tuple[tuple[int, int], ...]) -> str:
    resumed = [p for p in points if p != (0, 0)]
    if not resumed:
        return "none"
    return f"{resumed[0][0]}.{resumed[0][1]} to {resumed[-1][0]}.{resumed[-1][1]}"


def _log(run_dir: Path, message: str) -> None:
    """One line, one write(2) on an O_APPEND file: whole even if the process dies right after."""
    fd = os.open(
        run_dir.parent / f"{run_dir.name}.{_EVENTS}", os.O_WRONLY | os.O_APPEND | os.O_CREAT
    )
    try:
        os.write(fd, (message + "\n").encode())
    finally:
        os.close(fd)


def _events(run_dir: Path) -> list[str]:
    path = run_dir.parent / f"{run_dir.name}.{_EVENTS}"
    return path.read_text().splitlines() if path.exists() else []


def _life(run_dir: str, setting: Setting, pause_in_writes: float) -> None:
    """One training process: resume (or start), train to the end unless killed."""
    import torch

    import lvmkit
    from lvmkit.inference import checkpoint as ckpt
    from lvmkit.inference.rundir import RunDir

    torch.set_num_threads(1)
    run = Path(run_dir)
    save = RunDir.save

    def logged_save(self, state):
        save(self, state)
        _log(run, "saved")

    RunDir.save = logged_save  # type: ignore[method-assign]
    if pause_in_writes:
        _pause_in_writes(run, pause_in_writes, ckpt)
    checkpoint = run / "checkpoint.pt"
    if checkpoint.exists():
        state = ckpt.load_checkpoint(checkpoint)  # raises unless the file verifies
        _log(run, f"resume {state['epoch']} {state['step']}")
    else:
        _log(run, "fresh")
    torch.manual_seed(setting.seed)
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=20, latent_dim=3, hidden_dims=(16,)))
    x = torch.bernoulli(
        torch.full((setting.points, 20), 0.3), generator=torch.Generator().manual_seed(1)
    )
    lvmkit.fit(
        model,
        guide,
        x,
        epochs=setting.epochs,
        batch_size=setting.batch_size,
        seed=setting.seed,
        device="cpu",
        transform=lvmkit.binarize,  # draws random numbers every step: RNG state must survive
        run_dir=run,
        resume=checkpoint.exists(),
        checkpoint_every=setting.checkpoint_every,
        progress=False,
    )
    _log(run, "done")


def _pause_in_writes(run: Path, pause: float, module) -> None:
    """Log and pause before every write(), fsync and file open in ``module`` (the checkpoint
    code), so that the harness can kill the process half-way through a file or a rename."""

    def pausing(fn):
        def wrapped(*args, **kwargs):
            _log(run, "writing")
            time.sleep(pause)  # the harness may kill us here
            return fn(*args, **kwargs)

        return wrapped

    class PausingFile:
        def __init__(self, handle):
            self._handle = handle
            self.write = pausing(handle.write)

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

    real_fdopen, real_open = os.fdopen, open
    os.fsync = pausing(os.fsync)
    os.replace = pausing(os.replace)
    os.fdopen = lambda *a, **k: PausingFile(real_fdopen(*a, **k))  # type: ignore[assignment]
    module.open = lambda *a, **k: PausingFile(real_open(*a, **k))


def _noop() -> None:
    pass


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    # torch.optim imports torch._dynamo on first use (~3 s here): do it once, in the server
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "pyro", "lvmkit", "kill_resume"])
    return ctx


def _start(ctx, run_dir: Path, setting: Setting, pause: float):
    process = ctx.Process(target=_life, args=(str(run_dir), setting, pause), daemon=True)
    process.start()
    return process


def run_harness(
    work: Path, *, kills: int = 20, setting: Setting | None = None, rng_seed: int = 0
) -> Report:
    """Run the harness in ``work``; raise AssertionError on any violation; return the counts."""
    import pandas as pd
    import torch

    from lvmkit.inference.checkpoint import load_checkpoint

    setting = setting or Setting()
    ctx = _context()
    rng = random.Random(rng_seed)
    reference, killed = work / "reference", work / "killed"

    warm = ctx.Process(target=_noop, daemon=True)  # boots the server (imports) off the clock
    warm.start()
    warm.join()
    tic = time.perf_counter()
    process = _start(ctx, reference, setting, 0.0)
    process.join(timeout=600)
    assert process.exitcode == 0, f"the uninterrupted run failed (exit code {process.exitcode})"
    full_life = time.perf_counter() - tic
    checkpoints = sum(1 for line in _events(reference) if line == "saved")

    report = Report()
    lives = 0
    while True:
        lives += 1
        assert lives <= 20 * kills + 10, "the run makes no progress between kills"
        killing = report.kills < kills
        on_write = killing and rng.random() < 0.5
        # let 0, 1 or 2 check points (on average) pass, so the kills spread over the whole run
        saves = rng.randint(0, max(0, 2 * checkpoints // kills - 1))
        process = _start(ctx, killed, setting, 0.02 if on_write else 0.0)
        if not killing:
            process.join(timeout=600)
            assert process.exitcode == 0, f"the last life failed (exit code {process.exitcode})"
            break
        seen = len(_events(killed))
        deadline = time.perf_counter() + 10 * full_life + 10
        while process.is_alive() and time.perf_counter() < deadline:
            if _events(killed)[seen:].count("saved") >= saves:
                break
            time.sleep(0.001)
        if on_write:  # then kill half-way through one of the next check point's writes
            seen, nth_write = len(_events(killed)), rng.randint(1, 10)
            while process.is_alive() and time.perf_counter() < deadline:
                if _events(killed)[seen:].count("writing") >= nth_write:
                    break
                time.sleep(0.001)
        else:  # or at a random moment before the next check point ends
            process.join(timeout=rng.uniform(0.0, full_life / checkpoints))
        if process.is_alive():
            process.kill()
            process.join()
            report.kills += 1
            report.kills_while_writing += on_write
        else:
            assert process.exitcode == 0, f"a life failed on its own (exit code {process.exitcode})"
            break  # it finished before the kill

    starts = [line for line in _events(killed) if line.startswith(("resume", "fresh"))]
    # a life killed in its first milliseconds never got to load; every other one logged its start
    assert 1 <= len(starts) <= lives, f"{lives} lives but {len(starts)} starts"
    report.killed_before_loading = lives - len(starts)
    points = []
    for line in starts:
        if line == "fresh":
            report.fresh_starts += 1
            points.append((0, 0))
        else:
            report.resumes += 1
            _, epoch, step = line.split()
            points.append((int(epoch), int(step)))
    # (a) a fresh start is only allowed before the first checkpoint; then never a step back
    assert points == sorted(points), f"a life resumed from an earlier point: {points}"
    report.resumed_from = tuple(points)

    # (b) bit-identical final state
    ours, theirs = (
        load_checkpoint(killed / "checkpoint.pt"),
        load_checkpoint(reference / "checkpoint.pt"),
    )
    assert ours["params"].keys() == theirs["params"].keys()
    for name, value in theirs["params"].items():
        assert torch.equal(ours["params"][name], value), f"parameter {name} differs"
    for index, state in theirs["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(ours["optimizer"]["state"][index][key], value), f"Adam {key} differs"

    # (c) every epoch exactly once, with the uninterrupted run's losses
    history = pd.read_csv(killed / "history.csv")
    expected = pd.read_csv(reference / "history.csv")
    assert list(history.epoch) == list(range(1, setting.epochs + 1)), list(history.epoch)
    assert history.train_loss.tolist() == expected.train_loss.tolist()
    report.epochs_verified = len(history)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=Setting.epochs)
    parser.add_argument("--points", type=int, default=Setting.points)
    parser.add_argument("--checkpoint-every", type=int, default=Setting.checkpoint_every)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    args = parser.parse_args(argv)
    setting = Setting(
        epochs=args.epochs, points=args.points, checkpoint_every=args.checkpoint_every
    )
    with tempfile.TemporaryDirectory() as work:
        report = run_harness(Path(work), kills=args.kills, setting=setting, rng_seed=args.seed)
    print(report.line())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
