"""Run under torchrun by test_distributed: a loss that overflows, in 2 processes, with
on_nonfinite="reduce_lr": every process must roll back together and end with the same
parameters."""

from __future__ import annotations

import os
import sys
import warnings

import torch
from nan_models import ExpLoc, no_guide

import lvmkit

if __name__ == "__main__":
    out = sys.argv[1]
    x = 10 + torch.randn(64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = lvmkit.fit(
            ExpLoc(), no_guide, x, epochs=3, batch_size=8, lr=200.0, on_nonfinite="reduce_lr",
            device="cpu", progress=False,
        )  # fmt: skip
    reductions = [str(w.message) for w in caught if "continuing with lr" in str(w.message)]
    torch.save(
        {
            "params": result.params,
            "history": result.history.to_dict("list"),
            "warnings": reductions,
        },
        os.path.join(out, f"rank{os.environ['RANK']}.pt"),
    )
