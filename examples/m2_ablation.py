"""The README's M2 ablations, each a contender of the M2 benchmark at 100 labels: Kingma et al.'s
α scaled (``--alpha-times``) and Kingma et al.'s initialisation, every weight N(0, 0.001²) and
every bias 0 (``--init-std``; their code's ``init_w(1e-3)``), and a smaller code z
(``--latent-dim``; Kingma's is 50), for ``--epochs`` epochs. Writes
benchmarks/results/vae-m2-ablation-NAME-cpu.* (table and curve).

    python examples/m2_ablation.py --alpha-times 10 --epochs 12
    python examples/m2_ablation.py --init-std 0.001 --epochs 50
    python examples/m2_ablation.py --latent-dim 5 --epochs 12
"""

import argparse
import dataclasses

from torch import nn

from lvmkit import benchmarks as bench
from lvmkit.benchmarks import vae
from lvmkit.benchmarks.contenders import Contender, Task


def alpha_times(factor: float):
    """The built-in M2 contender with ``factor`` times the task's α."""

    def factory(task: Task) -> Contender:
        alpha = factor * task.extra["aux_weight"]
        return vae._builtin_m2(dataclasses.replace(task, extra={**task.extra, "aux_weight": alpha}))

    return factory


def latent(dim: int, factory=vae._builtin_m2):
    """``factory``'s contender with a ``dim``-dimensional z."""

    def made(task: Task) -> Contender:
        return factory(dataclasses.replace(task, latent_dim=dim))

    return made


def initialised(std: float, factory=vae._builtin_m2):
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
    parser.add_argument("--alpha-times", type=float, default=1.0)
    parser.add_argument("--init-std", type=float, default=None)
    parser.add_argument("--latent-dim", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    factory, parts, tags = vae._builtin_m2, [], []
    if args.alpha_times != 1.0:
        factory = alpha_times(args.alpha_times)
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
    name = "M2, " + (", ".join(parts) or "as built in")
    protocol = dataclasses.replace(vae.M2_PROFILES["full"], epochs=args.epochs)
    frame = vae.run_m2(
        "full", scale=protocol, contenders={name: factory}, only=name, settings=("100 labels",)
    )
    tag = "-".join(tags) or "builtin"
    bench.write_results(frame, "benchmarks/results", f"vae-m2-ablation-{tag}-{args.epochs}ep-cpu")
    print(frame.to_markdown(index=False))
