"""Data-parallel training with ``torchrun`` (DDP): NCCL on GPUs, gloo on CPUs.

The loss must see the *global* batch: :func:`gather_with_grad` all-gathers the embeddings of every
rank, in rank order, so that gradients flow back to each rank's own part. Its backward sums the
incoming gradients over ranks; with DDP then averaging parameter gradients over ranks, every rank
ends up with exactly the gradient of a single process on the concatenated batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank (rank order), differentiable w.r.t. the local part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), 0)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank, without gradients (labels, indices)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects of any size; ``[obj]`` without a
    process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def backend_for(device: str = "auto") -> str:
    """``nccl`` when this process trains on a GPU, ``gloo`` otherwise (CPU, or ``device='cpu'``)."""
    return "nccl" if torch.cuda.is_available() and not str(device).startswith("cpu") else "gloo"


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (no-op without it).

    On GPUs each process first selects its own device (``LOCAL_RANK``), then joins with NCCL, so
    that collectives never all land on GPU 0; on CPUs it joins with gloo.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    backend = backend_for(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` when a process group is up:
    ``device_ids=[device.index]`` on CUDA, none on CPU (gloo). Without a process group: ``model``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class RankSlice:
    """This rank's contiguous share of every global batch of ``batches`` (a batch sampler or a list
    of batches): every rank draws the same global batch and trains on its own part of it; in one
    process, the whole batch. Each global batch must divide evenly among the ranks (checked by
    the task that makes them)."""

    def __init__(self, batches, info: DistInfo | None = None):
        self.batches, self.info = batches, info if info is not None else current()

    def __iter__(self):
        rank, world = self.info.rank, self.info.world_size
        for batch in self.batches:
            n = len(batch) // world
            yield batch[rank * n : (rank + 1) * n]

    def __len__(self) -> int:
        return len(self.batches)
