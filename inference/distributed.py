"""Several processes training one model with PyTorch's own distributed engine.

``torchrun --nproc_per_node=N …`` starts N copies of the program with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and a rendezvous address in the environment; ``fit`` then joins the process group
(gloo on the CPU, nccl on CUDA, one GPU per process), wraps the ELBO module in
``DistributedDataParallel`` (gradients averaged across processes during ``backward``), and gives
each process its shard of every epoch's data through ``DistributedSampler``. Rank 0 alone writes
the run directory and calls the callbacks; every rank reads the checkpoint on resume.

A pair whose parameters are not all in ``nn.Module``\\ s (plain functions with ``pyro.param``)
cannot be wrapped in DDP, which only sees module parameters: its gradients are averaged with one
``all_reduce`` of the flattened gradients after ``backward`` instead — the same arithmetic.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler


@dataclass(frozen=True)
class World:
    """This process's place among the processes training together."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    created: bool = False  # fit joined the process group itself (and leaves it at the end)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def env_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def launched() -> bool:
    """Started by torchrun (or any launcher setting the env:// variables) with >1 process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def wanted() -> bool:
    """Whether this process trains among several: started by torchrun, or in a process group
    of more than one that the caller initialised."""
    return launched() or (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    )


def join(dev: torch.device) -> tuple[World, torch.device]:
    """Join (or reuse) the process group; return this process's world and its device (for CUDA,
    the GPU ``LOCAL_RANK``)."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    created = False
    if not dist.is_initialized():
        needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [v for v in needed if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"distributed training needs the variables torchrun sets; {missing} are not set "
                "(start with `torchrun --nproc_per_node=N …`)"
            )
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        created = True
    world = World(dist.get_rank(), dist.get_world_size(), local_rank, created)
    return world, dev


def leave(world: World) -> None:
    if world.created and dist.is_initialized():
        dist.destroy_process_group()


def agree(world: World, ok: bool, what: str) -> None:
    """Every rank says whether its set-up worked; all raise if any failed (so none waits for
    a collective that will never come)."""
    if not world.distributed:
        return
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_comm_device(world))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if ok and not int(flag.item()):
        raise RuntimeError(f"another process failed during {what} (see its error)")


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when it is True on some rank."""
    if not world.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device(world))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_sum(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over ranks (a new tensor; the input is unchanged)."""
    if not world.distributed:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out


def gather(world: World, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def epoch_order(world: World, seed: int, epoch: int, n: int) -> torch.Tensor:
    """This rank's data order for ``epoch``: its shard of a seeded shuffle (padded by repeating
    points so that every rank takes the same number of steps)."""
    sampler: DistributedSampler[int] = DistributedSampler(
        _Indices(n), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(iter(sampler)), dtype=torch.int64)


def shard_size(world: World, n: int) -> int:
    return -(-n // world.size)


class _Indices(Dataset[int]):
    """0 … n−1: all the sampler needs is the length (the data stay on the device)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def wrap_loss(world: World, loss_fn: Any, params: dict[str, torch.Tensor], dev: torch.device):
    """The loss module in DDP when its modules own every trained tensor, else the module with
    parameters broadcast from rank 0; and whether gradients still need :func:`average_grads`."""
    owned = {id(p) for p in loss_fn.parameters()} if isinstance(loss_fn, nn.Module) else set()
    if all(id(p) in owned for p in params.values()):
        ddp = nn.parallel.DistributedDataParallel(
            loss_fn, device_ids=[dev.index] if dev.type == "cuda" else None
        )
        return ddp, False
    with torch.no_grad():
        for p in params.values():
            dist.broadcast(p, src=0)
    return loss_fn, True


def unwrap_loss(world: World, loss_fn: Any) -> Any:
    """The loss module out of its DDP wrapper, once every rank got here; the caller frees the
    wrapper before leaving the process group.

    Freed later — after ``destroy_process_group`` left DDP's reducer the last owner of the
    process group — the reducer's deallocation (holding the GIL) ran gloo's destructor, which
    joins its worker threads, one of which waited for the GIL to free the last all-reduce's
    tensors: a two-process ``fit`` hung at its end (seen twice on a 2-core CPU, 2026-12-08).
    """
    if world.distributed:
        dist.barrier()  # every rank's collectives done: none left in gloo's queue
    if isinstance(loss_fn, nn.parallel.DistributedDataParallel):
        return loss_fn.module
    return loss_fn


def average_grads(world: World, params: Iterable[torch.Tensor]) -> None:
    """Average the gradients over ranks in place: one all_reduce of them flattened."""
    grads = []
    for p in params:  # a parameter this rank's step did not reach: a zero gradient here
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _comm_device(world: World) -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
