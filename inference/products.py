"""Matrix products of a compiled graph through oneDNN where MKL is slow: on AMD CPUs.

torch's CPU build multiplies float32 matrices with MKL, and MKL takes its fast (AVX-512) code
paths on Intel CPUs only: on an AMD EPYC with AVX-512 a 128 × 784 by 784 × 400 product takes
800–920 µs on one thread, where oneDNN's — inside the same torch, as
``torch.ops.mkldnn._linear_pointwise`` on plain tensors — takes 365–395 µs and XLA's (NumPyro's)
335–375 µs. The MNIST VAE's step spends five such products forward and backward, so on these CPUs
the product decides the step.

:class:`OneDNNProducts` is an inductor graph pass (run on the compiled graph after AOTAutograd
has written the backward pass, so it sees the backward's products too) that replaces each float32
CPU ``mm`` and ``addmm`` of at least :data:`MIN_MACS` multiply-adds by :func:`linear`, a torch
operator around oneDNN's. Below that size oneDNN's fixed cost per call (~11 µs here against
MKL's ~3 µs) outweighs its speed. The rule is the CPU's vendor, not a timing taken at run time:
a resumed run must choose the kernels the killed run chose, or its bits differ.
:data:`CPU_PRODUCTS` overrides the rule ("onednn", "mkl").

oneDNN computes in float32 as MKL does (torch's default ``fp32_precision``), summing in its own
order: a compiled step's products differ from the eager step's in their last bits, as any two
kernels' do.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

# "auto": oneDNN on AMD x86 CPUs (see the module docstring), MKL elsewhere; "onednn" or "mkl"
CPU_PRODUCTS = "auto"
# multiply-adds of a product below which MKL's is kept (oneDNN's fixed cost per call is ~8 µs
# more; at ~45 against ~100 GMAC/s on one AMD core the two break even near 0.4 million)
MIN_MACS = 2**19

_aten = torch.ops.aten


# (a plain operator, not ``torch.library.custom_op``: that wrapper's Python costs ~5 µs a call)
_LIBRARY = torch.library.Library("lvmkit", "FRAGMENT")
_LIBRARY.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN: ``x`` (M, K), ``weight`` (N, K), ``bias`` (N,) or None,
    any strides; the kernel of the operator ``torch.ops.lvmkit.onednn_linear``. Not
    differentiable: the pass puts it in graphs whose backward is already written.

    >>> x, w = torch.ones(2, 3), torch.ones(4, 3)
    >>> torch.ops.lvmkit.onednn_linear(x, w, None)
    tensor([[3., 3., 3., 3.],
            [3., 3., 3., 3.]])
    """
    return _POINTWISE(x, weight, bias, "none", [], "")


_POINTWISE = torch.ops.mkldnn._linear_pointwise.default
_LIBRARY.impl("onednn_linear", linear, "CPU")


@torch.library.register_fake("lvmkit::onednn_linear")
def _linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def wanted() -> bool:
    """Whether compiled CPU graphs take their large float32 products from oneDNN here.

    >>> wanted() in (True, False)
    True
    """
    if CPU_PRODUCTS not in ("auto", "onednn", "mkl"):
        raise ValueError(
            f"lvmkit.inference.products.CPU_PRODUCTS must be 'auto', 'onednn' or 'mkl', "
            f"got {CPU_PRODUCTS!r}"
        )
    if CPU_PRODUCTS == "mkl" or not torch.backends.mkldnn.is_available():
        return False
    return CPU_PRODUCTS == "onednn" or _cpu_vendor() == "AuthenticAMD"


@functools.cache
def _cpu_vendor() -> str:
    """The x86 CPU's vendor string ("GenuineIntel", "AuthenticAMD"), or "" where unknown."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


class OneDNNProducts(CustomGraphPass):
    """The inductor pass (``post_grad_custom_post_pass``) that routes a graph's large float32 CPU
    products through :func:`linear` (see the module docstring)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            operands = _operands(node)
            if operands is None:
                continue
            a, b, bias = operands
            row = bias is not None and _is_row(bias.meta["val"], b.meta["val"].shape[1])
            with graph.inserting_before(node):
                weight = graph.call_function(_aten.permute.default, (b, [1, 0]))
                weight.meta["val"] = b.meta["val"].t()
                new = graph.call_function(
                    torch.ops.lvmkit.onednn_linear.default, (a, weight, bias if row else None)
                )
                new.meta = dict(node.meta)
                if bias is not None and not row:  # (a whole matrix added: after the product)
                    new = graph.call_function(_aten.add.Tensor, (new, bias))
                    new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)

    def uuid(self) -> Any:
        """Inductor's cache key for graphs this pass ran on: this file and the size rule."""
        source = Path(__file__).read_bytes() + str(MIN_MACS).encode()
        return hashlib.sha256(source).hexdigest()


# the pass compiled CPU graphs get (see compiled._compile_options)
PASS = OneDNNProducts()


def _operands(node: torch.fx.Node) -> tuple[Any, Any, Any] | None:
    """(a, b, bias) of a product ``a @ b (+ bias)`` that oneDNN should take, else None."""
    if node.op != "call_function":
        return None
    if node.target is _aten.addmm.default:
        if node.kwargs or len(node.args) != 3:  # (beta, alpha ≠ 1)
            return None
        bias, a, b = node.args
    elif node.target is _aten.mm.default:
        (a, b), bias = node.args, None
    else:
        return None
    values: list[torch.Tensor] = []
    for operand in (a, b) if bias is None else (a, b, bias):
        value = getattr(operand, "meta", {}).get("val")
        if not isinstance(value, torch.Tensor):
            return None
        values.append(value)
    if any(v.dtype != torch.float32 or v.device.type != "cpu" for v in values):
        return None
    (m, k), n = values[0].shape, values[1].shape[1]
    if bias is not None and values[2].dim() > 2:
        return None
    return (a, b, bias) if m * k * n >= MIN_MACS else None


def _is_row(bias: torch.Tensor, n: int) -> bool:
    """Whether ``bias`` is one dense row of ``n`` (what oneDNN adds itself)."""
    return (tuple(bias.shape), tuple(bias.stride())) == ((n,), (1,))
