"""The M2 ablation in the README: α ten times Kingma et al.'s, 100 labels, 12 epochs, as a
contender of the M2 benchmark (writes benchmarks/results/vae-m2-ablation-alpha10-cpu.*).

    python examples/m2_alpha_ablation.py [FACTOR] [EPOCHS]
"""

import dataclasses
import sys

from lvmkit import benchmarks as bench
from lvmkit.benchmarks import vae
from lvmkit.benchmarks.contenders import Contender, Task


def alpha_times(factor: float):
    """The built-in M2 contender with ``factor`` times the task's α."""

    def factory(task: Task) -> Contender:
        alpha = factor * task.extra["aux_weight"]
        return vae._builtin_m2(dataclasses.replace(task, extra={**task.extra, "aux_weight": alpha}))

    return factory


if __name__ == "__main__":
    factor = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    name = f"M2, alpha x{factor:g}"
    protocol = dataclasses.replace(vae.M2_PROFILES["full"], epochs=epochs)
    frame = vae.run_m2(
        "full",
        scale=protocol,
        contenders={name: alpha_times(factor)},
        only=name,
        settings=("100 labels",),
    )
    bench.write_results(frame, "benchmarks/results", f"vae-m2-ablation-alpha{factor:g}-cpu")
    print(frame.to_markdown(index=False))
