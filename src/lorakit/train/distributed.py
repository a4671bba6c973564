"""Several processes, PyTorch's own engine: torchrun, DistributedDataParallel, FSDP2.

    torchrun --nproc-per-node 2 -m lorakit train --strategy ddp  ...
    torchrun --nproc-per-node 2 -m lorakit train --strategy fsdp ...

Only LoRA parameters get gradients, so DDP all-reduces adapter gradients alone and
FSDP2 (`fully_shard`) shards the frozen base across ranks while the adapters train.
Every rank sees a disjoint, deterministic slice of each global batch; metrics are
summed across ranks; files are written by rank 0 from full (gathered) tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lorakit.adapters import qweights
from lorakit.adapters.layers import LoraLinear

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(strategy: str, device: torch.device) -> DistEnv:
    """Join the process group torchrun set up (a no-op for a single process).

    gloo serves CPU runs; NCCL serves CUDA. `strategy` "auto" means DDP when launched
    on several processes.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    world = launched_world_size()
    if world == 1:
        return DistEnv(strategy="none")
    if strategy == "auto":
        strategy = "ddp"
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise RuntimeError("--strategy on CUDA needs NCCL, which this PyTorch build lacks")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, strategy)


def check_batch(batch_size: int, env: DistEnv) -> int:
    """The per-rank batch: the global batch must split evenly across ranks."""
    if batch_size % env.world_size:
        raise ValueError(
            f"--batch-size {batch_size} does not divide across {env.world_size} processes; "
            f"use a multiple of {env.world_size} (the batch size is the global batch)"
        )
    return batch_size // env.world_size


def shard(items: list, env: DistEnv) -> list:
    """This rank's slice of a global batch: items rank, rank + world, ... (disjoint, deterministic)."""
    return items[env.rank :: env.world_size]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the largest ModuleList of same-typed modules."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                best = list(module)
    return best


def wrap(model: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """DDP around the model, or FSDP2 shards per block; returns the module to call."""
    if not env.enabled:
        return model
    if env.strategy == "ddp":
        device_ids = [env.local_rank] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (env.world_size,))
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(
            "--strategy fsdp needs a model with repeated blocks (a ModuleList of layers)"
        )
    # FSDP2 all-gathers one flat buffer per block, so its parameters must share a dtype: a
    # half-precision base with fp32 adapters is gathered in the base's dtype, gradients
    # reduced in fp32, and the sharded adapter weights stay fp32 for the optimizer.
    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    policy = MixedPrecisionPolicy()
    half = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    if len(dtypes) > 1 and half:
        policy = MixedPrecisionPolicy(param_dtype=half[0], reduce_dtype=torch.float32)
    # bitsandbytes keeps a quantized weight's state on the parameter object, which FSDP2 replaces
    # by a shard. 4-bit weights become plain packed bytes (sharded like any frozen weight) with the
    # state kept on their LoRA layer; int8 weights stay whole on every process.
    for module in model.modules():
        if isinstance(module, LoraLinear) and module.quantized in ("nf4", "fp4"):
            module.release_4bit_storage()
    quantized = {p for p in model.parameters() if qweights.kind_of(p)}
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=quantized or None)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=quantized or None)
    return model


def fast_path_blocked(env: DistEnv) -> str | None:
    """Why the GPU fast path cannot run under this strategy (None: it can, on every decoder layer).

    The fused decoder runs all layers from one forward; under FSDP2 each block's weights are
    gathered only by that block's own forward, so every batch would take transformers' forward.
    DDP keeps whole layers on each process, and the fast path runs them as on one process.
    """
    if env.enabled and env.strategy == "fsdp":
        return ("FSDP2 shards the decoder layers, and each gathers its weights only in its own forward: "
                "every layer runs transformers' forward")
    return None


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum numbers across ranks (loss sums, token counts)."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


# optimizer state that does not depend on the number of processes ------------------------


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW state keyed by parameter name, whole tensors on CPU (a collective under FSDP)."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    state = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            entry = optimizer.state.get(param)
            if not entry:
                continue
            state[names[id(param)]] = {
                k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
                if torch.is_tensor(v)
                else v
                for k, v in entry.items()
            }
    # Group settings (the scheduler's current lr among them), without the parameter lists.
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Put a `full_optimizer_state` back, re-sharding it for this run's processes."""
    by_name = dict(unwrap(model).named_parameters())
    groups = saved.get("param_groups", [])
    if groups and len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint optimizer has {len(groups)} parameter groups, this run has {len(optimizer.param_groups)}"
        )
    for group, settings in zip(optimizer.param_groups, groups, strict=False):
        group.update(settings)
    missing = [n for n in saved["state"] if n not in by_name]
    if missing:
        raise ValueError(
            f"checkpoint optimizer state names parameters this model lacks, e.g. {missing[0]!r}"
        )
    for name, entry in saved["state"].items():
        param = by_name[name]
        restored = {}
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and isinstance(param, DTensor):
                restored[key] = distribute_tensor(
                    value.to(param.device), param.device_mesh, param.placements
                )
            elif torch.is_tensor(value) and value.dim() > 0:
                restored[key] = value.to(param.device)
            else:
                restored[key] = value
        optimizer.state[param] = restored
