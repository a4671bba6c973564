"""Mixed precision on the hardware at hand: when bf16 pays, and how a CPU runs it.

bf16 matmuls run several times faster than fp32 ones on GPUs and on CPUs with native bf16
instructions (x86 AVX512-BF16 or AMX, Arm BF16). There training runs under
`torch.autocast(dtype=bfloat16)` with the frozen base held in bf16 (half the memory, no
per-step casts; autocast would round its weights to bf16 for every matmul anyway) and the
adapter and its optimizer state in fp32, as on a GPU.

On a CPU, PyTorch's attention kernel is slower in bf16 than in fp32 (its backward most of
all), so `attention_in_fp32(model)` gives attention fp32 inputs; every matmul around it
stays in bf16.
"""

from __future__ import annotations

import platform
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
    # transformers has no public getter; its attention-interface docs read this property
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(FP32_ATTENTION, _fp32_sdpa)
    AttentionMaskInterface.register(FP32_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(FP32_ATTENTION)
    return True
