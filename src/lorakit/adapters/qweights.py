"""Quantized weights through bitsandbytes: encode, decode, multiply. No model knowledge.

The formats are bitsandbytes' own, so layers loaded by transformers with a
`BitsAndBytesConfig` and layers quantized here are the same objects:

- nf4: 4-bit NormalFloat codes, two per byte, one fp32 absmax per block of 64 weights;
  with double quantization (QLoRA's default, used here) the absmaxes are themselves
  8-bit quantized in blocks of 256. Storage: 0.5 + 1/64 + 4/(64*256) bytes per weight.
- int8: LLM.int8() row-wise absmax int8 (one fp32 scale per output row).

bitsandbytes is imported on first use only: a model without quantized layers never
pays for it, and `kind_of` can tell a quantized weight without importing it (nothing
can hold a bitsandbytes parameter before bitsandbytes is imported).
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType

import torch
from torch import nn

KINDS = ("nf4", "int8")
"""Quantized base formats lorakit writes."""
NF4_BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256  # bitsandbytes' fixed block for double-quantized absmax


class QuantizationUnavailable(NotImplementedError):
    """bitsandbytes cannot quantize or run a quantized layer on this platform/device."""


def bitsandbytes() -> ModuleType:
    """The bitsandbytes module, or QuantizationUnavailable saying why it cannot be used."""
    module = sys.modules.get("bitsandbytes")
    if module is not None:
        return module
    # Its CPU backend logs a warning about an optional kernel package on import; that package
    # only speeds up CPU inference, so the message is noise for lorakit's users.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes as module
    except Exception as err:  # an ImportError, or a native library that fails to load
        raise QuantizationUnavailable(
            f"4-bit/8-bit base weights need bitsandbytes, which cannot be imported here ({err}); "
            "install bitsandbytes>=0.46 (CPU, CUDA, XPU and ROCm builds exist) or drop --quantize"
        ) from None
    finally:
        cpu_ops.setLevel(level)
    return module


def kind_of(weight: torch.Tensor | None) -> str | None:
    """'nf4', 'fp4' or 'int8' for a bitsandbytes quantized parameter, else None."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or weight is None:
        return None
    if isinstance(weight, bnb.nn.Params4bit):
        return str(weight.quant_type)
    if isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8:
        return "int8"
    return None


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"quantize must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


# encode ------------------------------------------------------------------------------


def quantize(weight_oi: torch.Tensor, kind: str, like: torch.Tensor | None = None) -> nn.Parameter:
    """A frozen bitsandbytes parameter holding `weight_oi` (out, in), on its device.

    `like`: an existing quantized parameter whose format (block size, quant type,
    storage, double quantization, dequantized dtype) the new one copies.
    """
    bnb = bitsandbytes()
    weight_oi = weight_oi.detach()
    if kind == "int8":
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight_oi.to(torch.float16).contiguous())
        return bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
    if like is not None:
        blocksize, nested = like.blocksize, like.compress_statistics
        quant_type, storage = like.quant_type, like.quant_storage
        dtype = like.quant_state.dtype
    else:
        blocksize, nested, quant_type, storage = NF4_BLOCKSIZE, True, check_kind(kind), torch.uint8
        dtype = weight_oi.dtype if weight_oi.dtype.is_floating_point else torch.float32
    codes, state = bnb.functional.quantize_4bit(
        weight_oi.to(dtype).contiguous(),
        blocksize=blocksize,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
    )
    return bnb.nn.Params4bit(
        codes,
        requires_grad=False,
        quant_state=state,
        blocksize=blocksize,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
        bnb_quantized=True,
    )


def quantized_linear(
    weight_oi: torch.Tensor,
    bias: torch.Tensor | None,
    kind: str,
    compute_dtype: torch.dtype | None,
) -> nn.Linear:
    """bitsandbytes' Linear4bit / Linear8bitLt holding `weight_oi` quantized (built without
    ever allocating a second full-precision copy)."""
    bnb = bitsandbytes()
    out_features, in_features = weight_oi.shape
    has_bias = bias is not None
    layer: nn.Linear
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias, has_fp16_weights=False, device="meta")
    else:
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type=check_kind(kind),
            device="meta",
        )
        # On AVX512-bf16 CPUs bitsandbytes repacks a weight on its first no-grad eval forward,
        # rounding the absmax to bf16: eval would then disagree with training (and the repack
        # fails on layers narrower than a block). Keep the one format that training uses.
        layer.support_avx512bf16_for_cpu = False
    attach(layer, quantize(weight_oi, kind))
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer


def attach(layer: nn.Module, weight: nn.Parameter) -> None:
    """Make `weight` the quantized weight of bitsandbytes layer `layer`."""
    layer.weight = weight
    if kind_of(weight) == "int8":
        # Linear8bitLt moves CB/SCB from the weight into its state on the next forward.
        layer.state.CB = None
        layer.state.SCB = None
    else:
        weight.module = layer
        layer.quant_state = weight.quant_state


# decode --------------------------------------------------------------------------------


def int8_scales(weight: torch.Tensor, layer: nn.Module | None) -> torch.Tensor:
    """Row scales of an int8 weight: on the weight until its first forward, then in the layer's state."""
    scales = getattr(weight, "SCB", None)
    if scales is None and layer is not None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    if scales is None:
        raise ValueError("this int8 weight has no row scales (SCB); it was never quantized by bitsandbytes")
    return scales


def dequantize(weight: torch.Tensor, layer: nn.Module | None = None) -> torch.Tensor:
    """The fp32 (out, in) values a quantized parameter stands for."""
    bnb = bitsandbytes()
    kind = kind_of(weight)
    if kind == "int8":
        return bnb.functional.int8_vectorwise_dequant(weight.data, int8_scales(weight, layer)).float()
    if kind is None:
        raise TypeError(f"not a bitsandbytes quantized weight: {type(weight).__name__}")
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks weights for its CPU inference kernel; its public route back
        # to values is the matmul itself: I @ W.T = W.T.
        eye = torch.eye(state.shape[1], dtype=torch.float32, device=weight.device)
        return bnb.matmul_4bit(eye, weight, quant_state=state).t().float().contiguous()
    return bnb.functional.dequantize_4bit(weight.data, state).float()


def matmul_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype | None,
    quant_state: object | None = None,
) -> torch.Tensor:
    """x @ W.T + bias with W 4-bit, computed in `compute_dtype` (x's dtype when None), returned in x's dtype.

    `quant_state` defaults to the one bitsandbytes keeps on `weight`; pass it when `weight` is
    plain packed bytes (a weight gathered by FSDP2). Autograd flows to x (bitsandbytes
    dequantizes W for the backward); W gets no gradient.
    """
    bnb = bitsandbytes()
    dtype = compute_dtype or x.dtype
    if bias is not None:
        bias = bias.to(dtype)
    state = quant_state if quant_state is not None else weight.quant_state
    return bnb.matmul_4bit(x.to(dtype), weight, quant_state=state, bias=bias).to(x.dtype)


def storage_bytes(weight: torch.Tensor) -> int:
    """Bytes a weight occupies, quantization statistics included."""
    kind = kind_of(weight)
    if kind is None:
        return weight.numel() * weight.element_size()
    total = weight.data.numel() * weight.data.element_size()
    if kind == "int8":
        scales = getattr(weight, "SCB", None)
        return total + (scales.numel() * scales.element_size() if scales is not None else 4 * weight.shape[0])
    state = weight.quant_state
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return total + sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
