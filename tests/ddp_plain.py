"""Run under torchrun by test_distributed: a plain-function pair (pyro.module + pyro.param, which
DDP cannot see) trained in several processes; each rank saves its final parameters."""

from __future__ import annotations

import os
import sys

import pyro
import torch

import lvmkit
from plain_pair import make_plain_pair

if __name__ == "__main__":
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    pyro.set_rng_seed(rank)  # different initial weights per rank: fit must broadcast rank 0's
    model, guide, _ = make_plain_pair()
    x = torch.bernoulli(torch.full((96, 12), 0.3), generator=torch.Generator().manual_seed(0))
    result = lvmkit.fit(
        model, guide, x, epochs=3, batch_size=16, lr=0.05, device="cpu", progress=False
    )
    torch.save(
        {
            "params": {k: v.detach() for k, v in result.params.items()},
            "history": result.history.to_dict("list"),
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
