"""Run: the state of one training run, built by the recipe's setup and read by the loop and its
helpers (checkpoints, the watch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.data.pairs import Pair
from lorakit.data.sft import TokenRow
from lorakit.train.distributed import DistEnv
from lorakit.train.memory import MemoryFit


@dataclass
class Run:
    """Everything the loop works on."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    train_rows: list[TokenRow] | list[Pair]
    eval_rows: list[TokenRow] | list[Pair] | None
    total_steps: int
    warmup_steps: int
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    autocast_dtype: torch.dtype | None = None
    env: DistEnv = field(default_factory=DistEnv)
    loss_module: nn.Module | None = None
    """What the loop calls: LossModule(model), wrapped in DDP or sharded by FSDP2 under torchrun."""
    rows_per_batch: int = 1
    """Rows of train_rows per micro-batch (batch_size, or one packed row per process)."""
    memory: MemoryFit | None = None
    """What --memory auto chose, and from what (lorakit.train.memory)."""
    objective: Any = None
    """What the run optimises: an object of `objectives` (SFT, Preference for DPO and ORPO)."""
