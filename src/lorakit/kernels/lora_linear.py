"""Fused LoRA linear: base matmul and LoRA path in one autograd function, grouped.

Several projections that read the same input (Q/K/V, or gate/up) run as one group:

    xa      = x @ cat(A_0, ..., A_n).T                       # (T, R), R = sum of ranks
    y_i     = x @ W_i.T + b_i + s_i * xa[:, i] @ B_i.T       # (T, out_i)

The backward is derived by hand so that only x and the small xa are kept, and no
gradient is ever formed for the frozen W (autograd through `nn.Linear` + PEFT keeps
the fp32 copy of x that the adapter's dtype cast makes, and the LoRA branch's
intermediate, per projection):

    dx      = sum_i dy_i @ W_i + (sum_i s_i * dy_i @ B_i) @ A_i   # via one cat'd matmul
    g_i     = s_i * dy_i @ B_i                                    # (T, r_i)
    dA_i    = g_i.T @ x                                           # (r_i, in)
    dB_i    = s_i * dy_i.T @ xa_i                                 # (out_i, r_i)

Matmuls run in x's dtype (bf16 on GPU) with fp32 accumulation; the adapter weights
(fp32 when the base is bf16) are cast to x's dtype for the matmuls and their gradients
are returned in the adapter's own dtype. A 4-bit base (bitsandbytes `Params4bit`,
which carries its `quant_state`) is dequantized inside the function, in the forward
and again in the backward, so the dense weight never outlives one matmul.

`swiglu_lora` is the down projection with SwiGLU in front, `down(silu(g) * u)`, where the
(T, intermediate) product is recomputed in the backward rather than saved.

`lora_group_reference` (and `swiglu_lora_reference`) is the same function written with plain autograd; the CPU
tests check the hand-derived gradients against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .elementwise import _swiglu_bwd_k, _swiglu_fwd_k, swiglu_reference


@dataclass(frozen=True)
class Projection:
    """One projection of a group: its module, and the adapter (if any) to run on it."""

    module: nn.Module
    adapter: str | None

    @property
    def rank(self) -> int:
        return self.module.r[self.adapter] if self.adapter is not None else 0

    @property
    def scaling(self) -> float:
        return self.module.scaling[self.adapter] if self.adapter is not None else 0.0

    def lora_a(self) -> torch.Tensor:
        return self.module.lora_A[self.adapter].weight

    def lora_b(self) -> torch.Tensor:
        return self.module.lora_B[self.adapter].weight


def dense_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The module's base weight as a dense (out, in) tensor of `dtype`.

    A bitsandbytes 4-bit weight is dequantized (a temporary, freed after its matmul).
    """
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        dense = bnbf.dequantize_4bit(weight.data, state)
        return dense.to(dtype) if dense.dtype != dtype else dense
    return weight if weight.dtype == dtype else weight.to(dtype)


def _adapter_tensors(projections: Sequence[Projection]) -> list[torch.Tensor]:
    flat: list[torch.Tensor] = []
    for p in projections:
        if p.adapter is not None:
            flat += [p.lora_a(), p.lora_b()]
    return flat


def _group_forward(
    x: torch.Tensor, projections: tuple[Projection, ...], adapters: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The group's outputs and xa = x @ cat(A).T (None when no projection has an adapter)."""
    dtype = x.dtype
    a_list = adapters[0::2]
    xa = x @ torch.cat([a.to(dtype) for a in a_list]).t() if a_list else None  # (T, R)
    outputs = []
    offset = 0
    b_iter = iter(adapters[1::2])
    for p in projections:
        bias = getattr(p.module, "bias", None)
        weight = dense_weight(p.module, dtype)
        y = torch.nn.functional.linear(x, weight, bias.to(dtype) if bias is not None else None)
        del weight
        if p.adapter is not None:
            r = p.rank
            b = next(b_iter).to(dtype)
            # y += s * xa_i @ B.T, accumulated in place by the GEMM (beta = 1)
            y.addmm_(xa[:, offset : offset + r], b.t(), alpha=p.scaling)
            offset += r
        outputs.append(y)
    return outputs, xa


def _group_backward(
    x: torch.Tensor,
    xa: torch.Tensor | None,
    projections: tuple[Projection, ...],
    adapters: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    need_x: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """dx (when need_x) and the adapters' gradients (dA_0, dB_0, dA_1, ...), derived above."""
    dtype = x.dtype
    dx = None
    g_parts = []
    b_grads: list[torch.Tensor] = []
    offset = 0
    b_iter = iter(adapters[1::2])
    for p, dy in zip(projections, grads, strict=False):
        if dy is None:
            dy = torch.zeros(x.shape[0], p.module.out_features, dtype=dtype, device=x.device)
        if need_x:
            weight = dense_weight(p.module, dtype)
            if dx is None:
                dx = dy @ weight
            else:
                dx.addmm_(dy, weight)
            del weight
        if p.adapter is not None:
            r = p.rank
            b = next(b_iter)
            g_parts.append((dy @ b.to(dtype)).mul_(p.scaling))  # (T, r)
            db = (dy.t() @ xa[:, offset : offset + r]).mul_(p.scaling)  # (out, r)
            b_grads.append(db.to(b.dtype))
            offset += r
    adapter_grads: list[torch.Tensor] = []
    if g_parts:
        a_list = adapters[0::2]
        g = torch.cat(g_parts, dim=1) if len(g_parts) > 1 else g_parts[0]  # (T, R)
        a_cat = torch.cat([a.to(dtype) for a in a_list])
        if need_x:
            dx.addmm_(g, a_cat)
        da_cat = g.t() @ x  # (R, in)
        offset = 0
        for a, db in zip(a_list, b_grads, strict=False):
            r = a.shape[0]
            adapter_grads += [da_cat[offset : offset + r].to(a.dtype), db]
            offset += r
    return dx, adapter_grads


class _LoraGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, projections: tuple[Projection, ...], *adapters: torch.Tensor):
        outputs, xa = _group_forward(x, projections, adapters)
        ctx.projections = projections
        ctx.save_for_backward(x, xa, *adapters)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, xa, *adapters = ctx.saved_tensors
        dx, adapter_grads = _group_backward(
            x, xa, ctx.projections, adapters, grads, ctx.needs_input_grad[0]
        )
        return (dx, None, *adapter_grads)


class _SwiGLULora(torch.autograd.Function):
    """down(silu(g) * u) with the SwiGLU product recomputed in the backward, never saved.

    Saves g, u and xa: the (T, intermediate) product h = silu(g) * u is formed once in
    the forward for the matmul and once in the backward for dA and dh -> (dg, du).
    """

    @staticmethod
    def forward(
        ctx, g: torch.Tensor, u: torch.Tensor, projection: Projection, *adapters: torch.Tensor
    ):
        h = _swiglu_fwd_k(g, u)
        (y,), xa = _group_forward(h, (projection,), adapters)
        ctx.projection = projection
        ctx.save_for_backward(g, u, xa, *adapters)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u, xa, *adapters = ctx.saved_tensors
        h = _swiglu_fwd_k(g, u)
        dh, adapter_grads = _group_backward(h, xa, (ctx.projection,), adapters, (dy,), True)
        del h
        dg, du = _swiglu_bwd_k(dh, g, u)
        return (dg, du, None, *adapter_grads)


def swiglu_lora(g: torch.Tensor, u: torch.Tensor, projection: Projection) -> torch.Tensor:
    """projection(silu(g) * u), fused: g, u (T, intermediate) -> (T, out)."""
    return _SwiGLULora.apply(g, u, projection, *_adapter_tensors((projection,)))


def swiglu_lora_reference(g: torch.Tensor, u: torch.Tensor, projection: Projection) -> torch.Tensor:
    return lora_group_reference(swiglu_reference(g, u), (projection,))[0]


def lora_group(x: torch.Tensor, projections: Sequence[Projection]) -> tuple[torch.Tensor, ...]:
    """y_i = x @ W_i.T + b_i + s_i * (x @ A_i.T) @ B_i.T for each projection, fused.

    x: (T, in) in the compute dtype; returns one (T, out_i) tensor per projection.
    """
    projections = tuple(projections)
    return _LoraGroup.apply(x, projections, *_adapter_tensors(projections))


def lora_group_reference(
    x: torch.Tensor, projections: Sequence[Projection]
) -> tuple[torch.Tensor, ...]:
    """The same function through plain autograd: the reference for `lora_group`."""
    dtype = x.dtype
    outputs = []
    for p in projections:
        bias = getattr(p.module, "bias", None)
        y = torch.nn.functional.linear(
            x,
            dense_weight(p.module, dtype).detach(),
            None if bias is None else bias.detach().to(dtype),
        )
        if p.adapter is not None:
            a = p.lora_a().to(dtype)
            b = p.lora_b().to(dtype)
            y = y + ((x @ a.t()) @ b.t()) * p.scaling
        outputs.append(y)
    return tuple(outputs)
