"""torchrun plumbing: process group set-up, cross-rank reductions, and a clean teardown."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from vitlab.errors import VitlabError


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` → this rank's CUDA device if there is one, else the CPU."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VitlabError("train.device='cuda' but torch sees no CUDA device; use train.device=cpu or auto")
        return torch.device("cuda", local_rank) if preference == "cuda" else torch.device(preference)
    return torch.device(preference)


def join(preference: str = "auto") -> tuple[int, int, torch.device]:
    """This process's rank, the world size and its device; joins torchrun's process group when launched by it (gloo on
    CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, device


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce across ranks in place (no-op in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0, in rank order."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_object(value: object) -> object:
    """Rank 0's `value` (any picklable object) on every rank (itself in a single process)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the whole of a DTensor (e.g. the gradient norm of FSDP parameters), or `tensor` itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def teardown() -> None:
    """Leave the process group cleanly.

    A gloo rank that exits with live collectives sometimes aborts ("terminate called without an
    active exception"); a barrier, garbage collection, then destroy fixed it in 10 of 10 runs
    (../shared/PLATFORM.md).
    """
    if dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


@torch.no_grad()
def max_rank_difference(model: torch.nn.Module) -> float:
    """Largest |parameter - rank 0's parameter| over all ranks and replicated parameters (0.0 when they agree).

    Sharded (FSDP) parameters have no replicas to compare.
    """
    if not dist.is_initialized():
        return 0.0
    worst = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        if isinstance(p, DTensor):
            continue
        reference = p.detach().clone()
        dist.broadcast(reference, src=0)
        worst = torch.maximum(worst, (p.detach() - reference).abs().max())
    return all_reduce(worst, "max").item()
