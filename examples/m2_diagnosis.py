"""Why M2's accuracy falls after ~10 epochs at 100 labels: the built-in M2 of the benchmark
(Kingma et al.'s protocol, 100 labels) trained by ``lvmkit.fit`` with a callback that, after each
epoch, measures on 1,000 test images

- ``accuracy``: argmax q(y | x) against the labels (%);
- ``q_entropy``: the mean entropy of q(y | x), nats (log 10 = 2.30 is uniform);
- ``y_use_nats``: ELBO(x, y_true) − mean_y ELBO(x, y) — how much better the generative model
  explains an image with its true label than with any label: 0 when the decoder ignores y;
- ``model_accuracy``: argmax_y ELBO(x, y) against the labels — the generative model's own
  classification (%).

Writes benchmarks/results/vae-m2-diagnosis-EPOCHSep-cpu.csv.

    python examples/m2_diagnosis.py --epochs 20
"""

import argparse
import dataclasses

import pandas as pd
import pyro
import torch

import lvmkit
from lvmkit import datasets
from lvmkit.benchmarks import m2
from lvmkit.benchmarks.protocol import PROFILES
from lvmkit.data import load_mnist
from lvmkit.inference import Callback
from lvmkit.inference.params import eval_mode


def diagnose(model, guide, x: torch.Tensor, y: torch.Tensor, classes: int = 10) -> dict:
    """The four measures above for an M2 pair (``guide.classifier`` gives q(y | x)'s logits)."""
    with torch.no_grad(), eval_mode(model, guide):
        q = guide.classifier(x).softmax(-1)
    entropy = float(-(q * q.clamp_min(1e-12).log()).sum(-1).mean())
    per_label = [
        torch.as_tensor(
            lvmkit.evaluate(model, guide, {"x": x, "y": torch.full_like(y, k)}, 4, seed=1)
            .elbo.to_numpy()
            .copy()
        )
        for k in range(classes)
    ]
    elbo = torch.stack(per_label, -1)  # (N, classes): ELBO(x, y = k)
    return {
        "accuracy": 100 * float((q.argmax(-1) == y).float().mean()),
        "q_entropy": entropy,
        "y_use_nats": float((elbo.gather(1, y[:, None])[:, 0] - elbo.mean(-1)).mean()),
        "model_accuracy": 100 * float((elbo.argmax(-1) == y).float().mean()),
    }


class Diagnosis(Callback):
    def __init__(self, contender, x, y):
        self.contender, self.x, self.y, self.rows = contender, x, y, []

    def on_epoch_end(self, epoch, metrics):
        c = self.contender
        self.rows.append({"epoch": epoch, **diagnose(c.model, c.guide, self.x, self.y)})
        print(self.rows[-1], flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    protocol = dataclasses.replace(PROFILES["m2"]["full"], epochs=args.epochs)
    train = load_mnist("train", binarization="static", seed=protocol.seed)
    test = load_mnist("test", binarization="static", seed=protocol.seed)
    task = m2.m2_task(100, len(train.x))
    sources = datasets.semi_supervised(train.x, train.y, 100, seed=protocol.seed)
    pyro.set_rng_seed(protocol.seed)
    contender = m2.builtin_m2(task)
    diagnosis = Diagnosis(contender, test.x[:1000], test.y[:1000].long())
    lvmkit.fit(
        contender.model,
        contender.guide,
        sources,
        objective=contender.objective,
        callbacks=[diagnosis],
        progress=False,
        **protocol.fit_options(len(train.x), protocol.seed, "cpu"),
    )
    path = f"benchmarks/results/vae-m2-diagnosis-{args.epochs}ep-cpu.csv"
    pd.DataFrame(diagnosis.rows).to_csv(path, index=False)
    print(f"written: {path}")
