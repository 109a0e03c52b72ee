"""The README's M2 ablations, each a contender of the M2 benchmark (``--labels``, 100 by default):
Kingma et al.'s α scaled (``--alpha-times``) or set per labelled image (``--alpha``: Pyro's example
uses 46 at every label count), Kingma et al.'s initialisation, every weight N(0, 0.001²) and every
bias 0 (``--init-std``; their code's ``init_w(1e-3)``), a smaller code z (``--latent-dim``;
Kingma's is 50), and Adam's learning rate and β₁ (``--lr``, ``--beta1``: Pyro's example's are
4.2e-4 and 0.95), for ``--epochs`` epochs; ``--stacked`` ablates M1+M2 (M2 on the code of the
suite's M1) instead of M2 on pixels. Writes benchmarks/results/vae-m2-ablation-NAME-cpu.*
(table and curve).

    python examples/m2_ablation.py --alpha-times 10 --epochs 12
    python examples/m2_ablation.py --init-std 0.001 --epochs 50
    python examples/m2_ablation.py --latent-dim 5 --epochs 12
    python examples/m2_ablation.py --labels 3000 --alpha 46 --epochs 12
    python examples/m2_ablation.py --alpha 46 --lr 4.2e-4 --beta1 0.95 --epochs 12
    python examples/m2_ablation.py --stacked --labels 3000 --alpha 46 --epochs 20
"""

import argparse
import dataclasses

from torch import nn

from lvmkit import benchmarks as bench
from lvmkit.benchmarks import m2
from lvmkit.benchmarks.contenders import Contender, Task
from lvmkit.benchmarks.protocol import PROFILES


def alpha_times(factor: float, absolute: float | None = None, factory=m2.builtin_m2):
    """``factory``'s contender with ``factor`` times the task's α, or α = ``absolute``."""

    def made(task: Task) -> Contender:
        alpha = absolute if absolute is not None else factor * task.extra["aux_weight"]
        return factory(dataclasses.replace(task, extra={**task.extra, "aux_weight": alpha}))

    return made


def latent(dim: int, factory=m2.builtin_m2):
    """``factory``'s contender with a ``dim``-dimensional z."""

    def made(task: Task) -> Contender:
        return factory(dataclasses.replace(task, latent_dim=dim))

    return made


def initialised(std: float, factory=m2.builtin_m2):
    """``factory``'s contender with every linear layer's weights drawn N(0, std²), biases 0."""

    def made(task: Task) -> Contender:
        contender = factory(task)
        for module in (contender.model, contender.guide):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, 0.0, std)
                    nn.init.zeros_(layer.bias)
        return contender

    return made


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=100, choices=m2.M2_LABELS["full"])
    parser.add_argument("--stacked", action="store_true", help="M1+M2 instead of M2 on pixels")
    parser.add_argument("--alpha-times", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--init-std", type=float, default=None)
    parser.add_argument("--latent-dim", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--beta1", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    factory, parts, tags = m2.builtin_m2, [], []
    if args.stacked:
        factory = m2.builtin_m1_m2
        tags.append("m1m2")
    if args.labels != 100:
        tags.append(f"{args.labels}labels")
    if args.alpha_times != 1.0 or args.alpha is not None:
        factory = alpha_times(args.alpha_times, args.alpha, factory)
        if args.alpha is not None:
            parts.append(f"alpha {args.alpha:g}")
            tags.append(f"alpha{args.alpha:g}-per-image")
        else:
            parts.append(f"alpha x{args.alpha_times:g}")
            tags.append(f"alpha{args.alpha_times:g}")
    if args.latent_dim is not None:
        factory = latent(args.latent_dim, factory)
        parts.append(f"z of {args.latent_dim}")
        tags.append(f"z{args.latent_dim}")
    if args.init_std is not None:
        factory = initialised(args.init_std, factory)
        parts.append(f"init N(0, {args.init_std:g}^2)")
        tags.append(f"init{args.init_std:g}")
    protocol = dataclasses.replace(PROFILES["m2"]["full"], epochs=args.epochs)
    if args.lr is not None or args.beta1 is not None:
        lr = args.lr if args.lr is not None else protocol.lr
        beta1 = args.beta1 if args.beta1 is not None else protocol.optimizer_args["betas"][0]
        betas = (beta1, protocol.optimizer_args["betas"][1])
        protocol = dataclasses.replace(protocol, lr=lr, optimizer_args={"betas": betas})
        parts.append(f"Adam lr {lr:g}, beta1 {beta1:g}")
        tags.append(f"lr{lr:g}-beta{beta1:g}")
    name = ("M1+M2, " if args.stacked else "M2, ") + (", ".join(parts) or "as built in")
    frame = m2.run(
        "full",
        scale=protocol,
        contenders={name: factory},
        only=name,
        settings=(f"{args.labels} labels",),
    )
    tag = "-".join(tags) or "builtin"
    bench.write_results(frame, "benchmarks/results", f"vae-m2-ablation-{tag}-{args.epochs}ep-cpu")
    print(frame.to_markdown(index=False))
