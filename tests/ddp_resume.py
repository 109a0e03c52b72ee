"""Run under torchrun by test_distributed: a VAE trained in 2 processes with mid-epoch
checkpoints, straight through, or crashed at a mid-epoch checkpoint and resumed from it."""

from __future__ import annotations

import os
import sys

import pyro
import torch

import lvmkit


class Crash(lvmkit.Callback):
    def on_checkpoint(self, path, epoch, step):
        if (epoch, step) == (1, 3):  # in epoch 2, after its third step
            raise SystemExit(3)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    pyro.set_rng_seed(0)
    model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,)))
    x = torch.bernoulli(torch.full((100, 6), 0.4), generator=torch.Generator().manual_seed(1))
    result = lvmkit.fit(
        model,
        guide,
        x,
        epochs=3,
        batch_size=16,
        device="cpu",
        progress=False,
        checkpoint_every=3,
        run_dir=os.path.join(out, "straight" if mode == "straight" else "crashed"),
        resume=mode == "resume",
        callbacks=[Crash()] if mode == "crash" else [],
    )
    rank = int(os.environ["RANK"])
    torch.save(
        {"params": result.params, "history": result.history.to_dict("list")},
        os.path.join(out, f"{mode}-rank{rank}.pt"),
    )
