"""Distributed training plumbing, applied from outside the model: the process group from torchrun's
environment, rank/world helpers, DDP or FSDP2 wrapping, gradient-sync control for gradient
accumulation, and full (unsharded) state dicts for checkpoints.

    info = init_distributed("cuda")          # reads RANK / LOCAL_RANK / WORLD_SIZE set by torchrun
    model = parallelize(model, "fsdp", device, param_dtype=torch.bfloat16)   # on the meta device, then
    model.to_empty(device=device); model.init_weights()
    with grad_sync(model, last_micro_step): loss.backward()

One process (no WORLD_SIZE, or WORLD_SIZE=1) needs no process group; every helper then works locally.
Backends: nccl on CUDA, gloo on CPU. FSDP2 (`fully_shard`) shards each block, then the root, with a
MixedPrecisionPolicy (parameters gathered in the compute dtype, gradients reduced in fp32).
Checkpoints use `torch.distributed.checkpoint.state_dict`: every rank takes part in the gather,
rank 0 gets the full CPU tensors, and every rank loads full state dicts.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

log = logging.getLogger(__name__)

PARALLEL = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    initialized_here: bool = False  # whether init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an int, got {v!r}") from None


def launched_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 without torchrun; before init_distributed."""
    return _env_int("WORLD_SIZE", 1)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    Without WORLD_SIZE > 1 this does nothing. An already initialized group is reused (and not destroyed
    by `shutdown`).
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), _env_int("LOCAL_RANK", 0), dist.get_world_size(), False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    log.info("process group: backend %s, rank %d of %d", backend, rank, world)
    return DistInfo(rank, local_rank, world, True)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if `init_distributed` created it. Garbage is collected first: FSDP's module state
    is cyclic, and what it holds (gloo's pending work objects among it) would otherwise be freed during the
    interpreter's finalization, where gloo's threads can abort the process (SIGABRT after a finished run)."""
    if info.initialized_here and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place (a no-op in one process); returns it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def resolve_parallel(parallel: str, world: int) -> str:
    """'auto' -> 'none' in one process, 'ddp' in more (DDP is the fastest when the model fits a GPU)."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel: expected one of {PARALLEL}, got {parallel!r}")
    if parallel == "auto":
        return "ddp" if world > 1 else "none"
    if parallel in ("ddp", "fsdp") and world <= 1:
        log.warning("parallel=%r with a single process: running without a wrapper", parallel)
        return "none"
    return parallel


def parallelize(model: nn.Module, parallel: str, device: torch.device, *, param_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True, bucket_mb: int = 100) -> nn.Module:
    """Wrap `model` for data parallelism; `parallel` must already be resolved. Build the optimizer afterwards.

    'none': returned as is. 'ddp': DistributedDataParallel over a materialised model (the gradient
    all-reduce runs in `bucket_mb` buckets during the backward, overlapping it; gradients are views into
    the buckets). 'fsdp': FSDP2 `fully_shard` on each block, then on the root (embedding, final norm,
    head), in place; works on a model still on the meta device (materialise it afterwards with
    `to_empty` and `init_weights()`). `param_dtype` (e.g. bf16 under bf16 autocast): the dtype the
    parameters are gathered and computed in, gradients reduced in fp32 (a MixedPrecisionPolicy);
    `reshard_after_forward=False` keeps each block's gathered parameters from its forward to its
    backward (one all-gather per step instead of two; more memory)."""
    if parallel == "none":
        return model
    if not is_distributed():
        raise ValueError(f"parallel: {parallel!r} needs an initialized process group (launch with torchrun)")
    if parallel == "ddp":
        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=bucket_mb,
                                                   gradient_as_bucket_view=True)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        # the root's parameters (embedding / tied head) are used last in the forward, first in the backward
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        return model
    raise ValueError(f"parallel: expected 'none', 'ddp' or 'fsdp', got {parallel!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 changes the model in place, so it is its own inside)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Gradient reduction on (last micro-step) or off (the others) for the backward passes inside."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with contextlib.nullcontext() if enabled else model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        # between micro-batches: no reduce-scatter, and the gathered parameters stay (no re-gather)
        model.set_requires_gradient_sync(enabled)
        model.set_reshard_after_backward(enabled)
        yield
    else:
        yield


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on CPU, keyed by parameter names. Collective: every rank
    calls it; under FSDP only rank 0 receives tensors (the others get empty dicts)."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                          optim_state: dict | None) -> None:
    """Load full state dicts (every rank passes the same full dicts) into a possibly sharded model."""
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
