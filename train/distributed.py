"""Data-parallel training under torchrun: PyTorch's DistributedDataParallel over NCCL (CUDA) or gloo (CPU).

`torchrun --nproc_per_node=N -m archlab.compare.cli train CONFIG` (or `archlab train CONFIG --nproc N`, which
execs exactly that) starts N processes; each sees RANK / WORLD_SIZE / LOCAL_RANK in its environment. Every rank
builds the same model from the same seed and draws the same global batch from the deterministic sampler, then
trains on its own contiguous slice of rows (train.batch_size stays the global batch). DDP averages the
gradients, so N processes follow the 1-process loss curve up to the order of floating-point sums. Eval
batches are split across ranks and their byte-weighted sums reduced. Only rank 0 writes: metrics, progress
bar, wandb, checkpoints, samples, summary.

The objective's whole loss runs inside the wrapped module's forward (LossModule), so every parameter it
touches - backbone, heads, a JEPA predictor or probe - is used inside DDP's forward, as DDP requires.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from archlab.train.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place in a torchrun launch (a single process when not launched by torchrun)."""
    return World(rank=int(os.environ.get("RANK", 0)), size=int(os.environ.get("WORLD_SIZE", 1)),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def start(world: World, device: torch.device) -> None:
    """Joins the process group (NCCL on CUDA, gloo on CPU) once; a no-op for a single process."""
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def device_for(world: World, device: torch.device) -> torch.device:
    """Each rank drives the GPU of its local rank."""
    if device.type == "cuda" and world.distributed:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def check_batch(world: World, batch_size: int, micro_batch_size: int | None) -> None:
    if batch_size % world.size:
        raise ConfigError(f"train.batch_size={batch_size} must divide evenly over {world.size} processes; "
                          "use a multiple of the process count")
    per_rank = batch_size // world.size
    if micro_batch_size is not None and per_rank % micro_batch_size:
        raise ConfigError(f"train.micro_batch_size={micro_batch_size} must divide the per-process batch "
                          f"{per_rank} (train.batch_size / {world.size} processes)")


def local_rows(batch: Tensor, world: World) -> Tensor:
    """This rank's contiguous slice of the global batch's rows."""
    per_rank = batch.shape[0] // world.size
    return batch[world.rank * per_rank:(world.rank + 1) * per_rank]


class LossModule(nn.Module):
    """model -> the objective's loss on a batch, as one forward (what DDP wraps)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Tensor, *, evaluate: bool = False):
        """The objective's training loss, or (evaluate=True) its eval metrics: FSDP2 gathers the sharded
        weights around this forward, so evaluation goes through it too."""
        if evaluate:
            return self.model.objective.evaluate(self.model, batch)
        return self.model.objective.loss(self.model, batch)


def wrap(model: nn.Module, world: World, device: torch.device, parallel: str,
         param_dtype: torch.dtype | None) -> nn.Module:
    """The module whose forward computes the loss: LossModule, in DDP or sharded by FSDP2 when distributed.

    FSDP2 shards each residual block and the rest (embedding, heads, an objective's own modules) as the root
    unit; with bf16 autocast the mixed-precision policy computes in bf16 and reduces gradients in float32."""
    module = LossModule(model)
    if not world.distributed:
        return module
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in model.backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def is_sharded(module: nn.Module) -> bool:
    return hasattr(module, "set_requires_gradient_sync")  # what FSDP2 adds to the modules it shards


def sync_gradients(module: nn.Module, sync: bool):
    """Gradient accumulation: skip the gradient reduction for all but the last micro-batch."""
    if is_sharded(module):
        module.set_requires_gradient_sync(sync)
    elif not sync and isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model weights without the LossModule prefix, optimizer state) as full CPU tensors; every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(module, options=options)
    return ({name.removeprefix("model."): tensor for name, tensor in weights.items()},
            get_optimizer_state_dict(module, optimizer, options=options))


def load_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Loads a full optimizer state (as full_state wrote it) into a sharded module's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def local_value(tensor: Tensor) -> Tensor:
    """A plain tensor from a possibly distributed one (FSDP2's gradient norms are DTensors)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def mean_over_ranks(value: Tensor, world: World) -> Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.size
    return value


def sum_over_ranks(totals: dict[str, float], weight: float, world: World) -> tuple[dict[str, float], float]:
    """Eval sums from every rank added up (a rank may have scored no batch: its dict is empty)."""
    summed: dict[str, float] = {}
    gathered = gather((totals, weight), world)
    for rank_totals, _ in gathered:
        for key, value in rank_totals.items():
            summed[key] = summed.get(key, 0.0) + value
    return summed, sum(rank_weight for _, rank_weight in gathered)


def any_rank(flag: bool, world: World) -> bool:
    """Whether the flag is set on any rank: a decision (e.g. out of time) every rank then takes together."""
    return any(gather(flag, world))


def gather(obj, world: World) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not world.distributed:
        return [obj]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
