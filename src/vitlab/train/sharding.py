"""Training strategies: one process, DDP replicas, or FSDP2 shards; and the sharded checkpoints of FSDP.

`fsdp` builds the model on the meta device, applies `fully_shard` to every block and then to the
whole model (ZeRO-3: parameters, gradients and optimizer state split over the ranks), and fills the
shards with exactly the values a normal build gives (`init_sharded`), without any rank holding the
whole model. Its checkpoints are written by every rank through torch.distributed.checkpoint, can be
resumed on any number of ranks, and read or consolidated into one safetensors file by one process.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from vitlab.errors import VitlabError
from vitlab.models.vit import VisionTransformer, init_weights
from vitlab.runs import checkpoint as ckpt
from vitlab.runtime import distributed
from vitlab.runtime.context import Runtime


def wrap_model(
    build: Callable[[], VisionTransformer],
    strategy: str,
    ctx: Runtime,
    precision: str = "fp32",
    compile: bool = False,
    cpu_offload: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """The model the optimizer updates, and the module the loop calls, for `strategy`.

    single: `build()` on the device. ddp: the same, in DistributedDataParallel when there are several
    processes. fsdp: sharded over all processes (one process too: CPU offload then lets one GPU train
    a model that its memory does not hold), with bf16 parameters for the compute and fp32 gradient
    reduction when `precision` is bf16; `compile` applies to single and ddp.
    """
    if strategy == "single" and ctx.distributed:
        raise VitlabError(f"train.strategy=single runs one process, but torchrun started {ctx.world_size}; use ddp or fsdp")
    if strategy != "fsdp":
        model = build().to(ctx.device)
        net = torch.compile(model) if compile else model
        if ctx.distributed:
            net = DistributedDataParallel(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        return model, net
    if not dist.is_initialized():
        dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    with torch.device("meta"):
        model = build()
    blueprint = copy.deepcopy(model) if ctx.is_main else None
    mp_policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if cpu_offload else OffloadPolicy()
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    model.to_empty(device="cpu" if cpu_offload else ctx.device)  # offloaded shards live on the CPU
    for buffer in model.buffers():  # buffers are not sharded: they go where the compute is
        buffer.data = buffer.data.to(ctx.device)
    init_sharded(model, blueprint)
    return model, model


@contextlib.contextmanager
def gradient_sync(net: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward pass only if `enabled` (off for all but the last micro-batch)."""
    if isinstance(net, DistributedDataParallel) and not enabled:
        with net.no_sync():
            yield
    elif isinstance(net, FSDPModule):
        net.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


@torch.no_grad()
def init_sharded(model: VisionTransformer, blueprint: VisionTransformer | None) -> None:
    """Fill the shards of a meta-built, sharded `model` with the values `build()` gives from rank 0's RNG state.

    Rank 0 (which passes `blueprint`, an unsharded copy on the meta device) redoes the normal build's
    draws in their order, one block at a time on the CPU: the layers' constructors (each layer's
    `reset_parameters`), then the model's `reset_parameters` (`init_weights` on every module in order,
    then `reset_embeddings`). Each block is scattered to its shards as soon as it is done; the
    embeddings and head come last. No rank holds more than one block and the embeddings in full.
    Initialising the shards in place instead (`reset_parameters` after `to_empty`) gives every rank
    the same numbers on CPU meshes, where DTensor has no random ops (../shared/PLATFORM.md).
    """
    depth = len(model.blocks)
    rest = [name for name, _ in model.named_parameters() if not name.startswith("blocks.")]
    if blueprint is None:
        for index in range(depth):
            _scatter(model, [f"blocks.{index}.{name}" for name, _ in model.blocks[index].named_parameters()], None)
        _scatter(model, rest, None)
        _broadcast_buffers(model, None)
        return
    blocks = list(blueprint.blocks)
    for module in _modules_with_blocks_as_indices(blueprint, blocks):  # all but the blocks is small: materialise it
        if not isinstance(module, int):
            module.to_empty(device="cpu", recurse=False)

    def replay(visit: Callable[[nn.Module], None], done: Callable[[int, nn.Module], None]) -> None:
        for module in _modules_with_blocks_as_indices(blueprint, blocks):
            if isinstance(module, int):
                block = copy.deepcopy(blocks[module]).to_empty(device="cpu")
                for inner in block.modules():
                    visit(inner)
                done(module, block)
            else:
                visit(module)

    def constructor(module: nn.Module) -> None:
        if module is not blueprint and hasattr(module, "reset_parameters"):
            module.reset_parameters()

    def scatter(index: int, block: nn.Module) -> None:
        full = {f"blocks.{index}.{name}": p for name, p in block.named_parameters()}
        _scatter(model, list(full), full)

    replay(constructor, lambda index, block: None)
    replay(init_weights, scatter)
    blueprint.reset_embeddings()
    _scatter(model, rest, dict(blueprint.named_parameters()))
    _broadcast_buffers(model, blueprint)


def _modules_with_blocks_as_indices(model: nn.Module, blocks: list[nn.Module]) -> Iterator[nn.Module | int]:
    """`model.modules()` in order, with each block's subtree replaced by the block's index."""
    index = {id(b): i for i, b in enumerate(blocks)}

    def walk(module: nn.Module) -> Iterator[nn.Module | int]:
        if id(module) in index:
            yield index[id(module)]
            return
        yield module
        for child in module.children():
            yield from walk(child)

    return walk(model)


def _scatter(model: nn.Module, names: list[str], full: Mapping[str, torch.Tensor] | None) -> None:
    """Copy rank 0's full tensors `full[name]` into the shards of `model`'s parameters `names`.

    The other ranks pass no tensors and receive into a placeholder of the full shape, one parameter at a time.
    """
    params = dict(model.named_parameters())
    for name in names:
        param = params[name]
        mesh = param.device_mesh
        source = full[name] if full is not None else torch.empty(param.shape, dtype=param.dtype)
        shard = distribute_tensor(source.to(mesh.device_type), mesh, param.placements, src_data_rank=0)
        param.to_local().copy_(shard.to_local())


def _broadcast_buffers(model: nn.Module, blueprint: nn.Module | None) -> None:
    """Give every rank rank 0's buffers (the fixed sin-cos position table)."""
    reference = dict(blueprint.named_buffers()) if blueprint is not None else {}
    for name, buffer in model.named_buffers():
        if name in reference:
            buffer.copy_(reference[name])
        dist.broadcast(buffer, src=0)


def save_sharded_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict, keep: int
) -> None:
    """Every rank writes its shards of model and optimizer into `checkpoints/step-N/sharded`; rank 0 publishes it."""
    tmp = distributed.broadcast_object(ckpt.staging_folder(run_dir, step) if dist.get_rank() == 0 else None)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / ckpt.SHARDED)
    if dist.get_rank() == 0:
        ckpt.publish(tmp, step, meta, keep)
    dist.barrier()


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore model and optimizer: from an `fsdp` run's sharded checkpoint (into any strategy and number of ranks) or a plain one."""
    if ckpt.is_sharded(checkpoint):
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        ckpt.load_sharded(state, checkpoint / ckpt.SHARDED, local=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    elif isinstance(model, FSDPModule):
        raise VitlabError(
            f"{checkpoint} was written without sharding (train.strategy single or ddp); "
            "resume it with that strategy, or start a new run from its weights"
        )
    else:
        ckpt.load_weights(checkpoint, model)
        ckpt.load_optimizer(checkpoint, optimizer)


def consolidate(path: str | Path, out: str | Path | None = None) -> Path:
    """Merge a sharded checkpoint's model into one safetensors file (default: CHECKPOINT/model.safetensors)."""
    checkpoint = ckpt.find_checkpoint(path)
    if not ckpt.is_sharded(checkpoint):
        raise VitlabError(
            f"{checkpoint} is not sharded (not an fsdp run's, with a {ckpt.SHARDED}/ folder); its model.safetensors is the whole model"
        )
    out = Path(out) if out else checkpoint / "model.safetensors"
    save_file(ckpt.weights(ckpt.read_sharded(checkpoint / ckpt.SHARDED, "model")), out)
    return out
