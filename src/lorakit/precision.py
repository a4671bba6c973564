"""Mixed precision on the hardware at hand: when bf16 autocast pays, and how a CPU runs it.

bf16 matmuls run several times faster than fp32 ones on GPUs and on CPUs with native bf16
instructions (x86 AVX512-BF16 or AMX, Arm BF16). Training keeps the adapter and its
optimizer in fp32 and runs the model under `torch.autocast(dtype=bfloat16)`, as on a GPU.

On a CPU two things make autocast cheaper without changing its arithmetic:

- `frozen_weights_as(model, bf16)`: autocast casts every frozen fp32 weight to bf16 for
  each matmul, again for every micro-batch. Casting them once for a whole optimizer step
  gives the matmuls the same bf16 values (rounding is the same) and skips the repeats; the
  fp32 weights are put back afterwards, bit for bit.
- `attention_in_fp32(model)`: PyTorch's CPU attention kernel is slower in bf16 than in
  fp32 (its backward most of all), so attention takes fp32 inputs; every matmul around it
  stays in bf16.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")

_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
"""/proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX, Arm's BF16 extension."""

FP32_ATTENTION = "lorakit_sdpa_fp32"
"""The attention implementation `attention_in_fp32` registers with transformers."""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 matmuls natively (False where that cannot be told)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if platform.system() != "Linux" or not path.is_file():
            return False
        cpuinfo = path.read_text(errors="replace")
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and _BF16_CPU_FLAGS & set(value.split()):
            return True
    return False


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32.

    auto: bf16 on a GPU that supports it and on a CPU with native bf16, fp32 elsewhere.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def _frozen_matmul_weights(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Frozen fp32 2-D weights of the model's matmul layers (not embeddings, not tied to one)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        weight = module._parameters.get("weight")
        if (
            weight is None
            or weight.requires_grad
            or weight.dtype != torch.float32
            or weight.dim() != 2
            or id(weight) in embedding_weights  # a tied output head: the lookup stays fp32
            or id(weight) in seen
        ):
            continue
        seen.add(id(weight))
        found.append((module, "weight", weight))
    return found


@contextlib.contextmanager
def frozen_weights_as(model: nn.Module, dtype: torch.dtype | None) -> Iterator[int]:
    """Hold the model's frozen matmul weights in `dtype` inside the block; yields how many.

    For use under `torch.autocast(dtype=dtype)`, whose matmuls would cast those weights to
    `dtype` anyway. The original fp32 parameters are restored on exit, even on error.
    """
    if dtype is None or dtype == torch.float32:
        yield 0
        return
    swapped = _frozen_matmul_weights(model)
    try:
        for module, name, weight in swapped:
            module._parameters[name] = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        yield len(swapped)
    finally:
        for module, name, weight in swapped:
            module._parameters[name] = weight


def _fp32_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if query.dtype == torch.float32 or query.device.type != "cpu":
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def attention_in_fp32(model: nn.Module) -> bool:
    """Run a transformers model's SDPA attention on fp32 inputs on a CPU; True if switched.

    Only models on transformers' "sdpa" implementation are switched (masks are built as for
    sdpa); any other model is left as it is.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(FP32_ATTENTION, _fp32_sdpa)
    AttentionMaskInterface.register(FP32_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(FP32_ATTENTION)
    return True
