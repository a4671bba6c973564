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

A one-projection group can take the decoder's residual stream r: y = r + x @ W.T + ..., the
add done by the base GEMM itself (its beta = 1 epilogue) rather than by a separate pass over
(T, out); r's gradient is dy.

What else a function keeps for its backward is the caller's choice (`Keep`): the
normalised x and the SwiGLU product (`activations`), and the dequantized 4-bit weights
(`dense`). Kept or recomputed, the gradients are the same; keeping costs memory from the
forward to the backward, recomputing costs one more elementwise pass (or dequantization).

`lora_group_reference` (and `swiglu_lora_reference`) is the same function written with plain autograd; the CPU
tests check the hand-derived gradients against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.train.fastpath.elementwise import (
    _rms_norm_bwd,
    _rms_norm_fwd,
    _swiglu_bwd_k,
    _swiglu_fwd_k,
    kernel,
    rms_norm_reference,
    swiglu_reference,
)

_rms_norm_fwd_k = kernel(_rms_norm_fwd, "layer")
_rms_norm_bwd_k = kernel(_rms_norm_bwd, "layer")


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


@dataclass(frozen=True)
class Keep:
    """What a fused function keeps from its forward for its backward, beyond its inputs and xa."""

    activations: bool = False
    """The normalised x of an RMSNorm + group (T, d) and the SwiGLU product (T, intermediate)."""
    dense: bool = False
    """The dequantized weights of a 4-bit base (a dense copy of them, per function)."""


KEEP_NOTHING = Keep()
KEEP_ALL = Keep(activations=True, dense=True)
"""For a checkpointed layer: its forward runs again right before its backward, so whatever it
keeps is held for one layer only (and the first forward's saved tensors are discarded)."""


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
    x: torch.Tensor,
    projections: tuple[Projection, ...],
    adapters: Sequence[torch.Tensor],
    keep_dense: bool = False,
    residual: torch.Tensor | None = None,
    output: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
    """The group's outputs, xa = x @ cat(A).T (None when no projection has an adapter), and,
    with keep_dense, the dequantized weights of the 4-bit projections (for the backward).

    `residual` (one-projection groups only) is added to the output by the base GEMM. Without
    `output` the outputs are left unset (their matmuls skipped); xa and the weights are not."""
    dtype = x.dtype
    a_list = adapters[0::2]
    xa = x @ torch.cat([a.to(dtype) for a in a_list]).t() if a_list else None  # (T, R)
    outputs = []
    dense: list[torch.Tensor] = []
    offset = 0
    b_iter = iter(adapters[1::2])
    for p in projections:
        bias = getattr(p.module, "bias", None)
        kept = keep_dense and _quantized(p)
        if kept:
            dense.append(dense_weight(p.module, dtype))
        if not output:
            outputs.append(x.new_empty(x.shape[0], p.module.out_features))
            continue
        weight = dense[-1] if kept else dense_weight(p.module, dtype)
        if residual is not None:
            y = torch.addmm(residual, x, weight.t())
            if bias is not None:
                y.add_(bias.to(dtype))
        else:
            y = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(dtype))
        del weight
        if p.adapter is not None:
            r = p.rank
            b = next(b_iter).to(dtype)
            # y += s * xa_i @ B.T, accumulated in place by the GEMM (beta = 1)
            y.addmm_(xa[:, offset : offset + r], b.t(), alpha=p.scaling)
            offset += r
        outputs.append(y)
    return outputs, xa, dense


def _quantized(p: Projection) -> bool:
    return getattr(p.module.weight, "quant_state", None) is not None


def _group_backward(
    x: torch.Tensor,
    xa: torch.Tensor | None,
    projections: tuple[Projection, ...],
    adapters: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    need_x: bool,
    dense: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """dx (when need_x) and the adapters' gradients (dA_0, dB_0, dA_1, ...), derived above.

    `dense`: the 4-bit projections' weights kept from the forward, in order (else dequantized again).
    """
    dtype = x.dtype
    dx = None
    g_parts = []
    b_grads: list[torch.Tensor] = []
    offset = 0
    b_iter = iter(adapters[1::2])
    kept = iter(dense)
    for p, dy in zip(projections, grads, strict=True):
        if dy is None:
            dy = torch.zeros(x.shape[0], p.module.out_features, dtype=dtype, device=x.device)
        if need_x:
            weight = next(kept) if dense and _quantized(p) else dense_weight(p.module, dtype)
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
        for a, db in zip(a_list, b_grads, strict=True):
            r = a.shape[0]
            adapter_grads += [da_cat[offset : offset + r].to(a.dtype), db]
            offset += r
    return dx, adapter_grads


class _LoraGroup(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        keep: Keep,
        projections: tuple[Projection, ...],
        *adapters: torch.Tensor,
    ):
        outputs, xa, dense = _group_forward(x, projections, adapters, keep.dense, residual)
        ctx.projections = projections
        ctx.n_adapters = len(adapters)
        ctx.save_for_backward(x, xa, *adapters, *dense)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, xa, *rest = ctx.saved_tensors
        adapters, dense = rest[: ctx.n_adapters], rest[ctx.n_adapters :]
        dx, adapter_grads = _group_backward(
            x, xa, ctx.projections, adapters, grads, ctx.needs_input_grad[0], dense
        )
        dr = grads[0] if ctx.needs_input_grad[1] else None  # d(residual) = dy
        return (dx, dr, None, None, *adapter_grads)


class _NormLoraGroup(torch.autograd.Function):
    """lora_group(rms_norm(h)): the normalised x is recomputed from h in the backward (one
    elementwise pass) unless `keep.activations`, when it is saved."""

    @staticmethod
    def forward(
        ctx,
        h: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        keep: Keep,
        projections: tuple[Projection, ...],
        *adapters: torch.Tensor,
    ):
        x, rstd = _rms_norm_fwd_k(h, norm_weight, eps)
        outputs, xa, dense = _group_forward(x, projections, adapters, keep.dense)
        ctx.projections = projections
        ctx.n_adapters = len(adapters)
        ctx.eps = eps
        ctx.kept_x = keep.activations
        kept = (x,) if keep.activations else ()
        ctx.save_for_backward(h, norm_weight, rstd, xa, *adapters, *kept, *dense)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        h, norm_weight, rstd, xa, *rest = ctx.saved_tensors
        adapters, rest = rest[: ctx.n_adapters], rest[ctx.n_adapters :]
        if ctx.kept_x:
            x, *dense = rest
        else:
            dense = rest
            x = _rms_norm_fwd_k(h, norm_weight, ctx.eps)[0]
        dx, adapter_grads = _group_backward(x, xa, ctx.projections, adapters, grads, True, dense)
        del x
        dh, dw = _rms_norm_bwd_k(dx, h, norm_weight, rstd)
        return (dh, dw if ctx.needs_input_grad[1] else None, None, None, None, *adapter_grads)


class _SwiGLULora(torch.autograd.Function):
    """down(silu(g) * u) with the SwiGLU product recomputed in the backward, not saved.

    Saves g, u and xa: the (T, intermediate) product h = silu(g) * u is formed in the
    forward for the matmul and again in the backward for dA and dh -> (dg, du); with
    `keep.activations`, h is saved instead (one (T, intermediate) tensor more, one pass less).
    Without `output`, the matmuls that form y are skipped and y is left unset: what is saved
    for the backward, and so the gradients, are the same.
    """

    @staticmethod
    def forward(
        ctx,
        g: torch.Tensor,
        u: torch.Tensor,
        residual: torch.Tensor | None,
        keep: Keep,
        output: bool,
        projection: Projection,
        *adapters: torch.Tensor,
    ):
        h = _swiglu_fwd_k(g, u)
        (y,), xa, dense = _group_forward(
            h, (projection,), adapters, keep.dense, residual, output
        )
        ctx.projection = projection
        ctx.n_adapters = len(adapters)
        ctx.kept_h = keep.activations
        kept = (h,) if keep.activations else ()
        ctx.save_for_backward(g, u, xa, *adapters, *kept, *dense)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u, xa, *rest = ctx.saved_tensors
        adapters, rest = rest[: ctx.n_adapters], rest[ctx.n_adapters :]
        if ctx.kept_h:
            h, *dense = rest
        else:
            dense = rest
            h = _swiglu_fwd_k(g, u)
        dh, adapter_grads = _group_backward(h, xa, (ctx.projection,), adapters, (dy,), True, dense)
        del h
        dg, du = _swiglu_bwd_k(dh, g, u)
        dr = dy if ctx.needs_input_grad[2] else None
        return (dg, du, dr, None, None, None, *adapter_grads)


def swiglu_lora(
    g: torch.Tensor,
    u: torch.Tensor,
    projection: Projection,
    keep: Keep = KEEP_NOTHING,
    residual: torch.Tensor | None = None,
    output: bool = True,
) -> torch.Tensor:
    """[residual +] projection(silu(g) * u), fused: g, u (T, intermediate) -> (T, out).

    output=False: the caller discards the result (activation checkpointing's recompute, which
    only rebuilds what the backward reads), so its matmuls are skipped and its values are unset.
    """
    return _SwiGLULora.apply(
        g, u, residual, keep, output, projection, *_adapter_tensors((projection,))
    )


def swiglu_lora_reference(
    g: torch.Tensor, u: torch.Tensor, projection: Projection, residual: torch.Tensor | None = None
) -> torch.Tensor:
    return lora_group_reference(swiglu_reference(g, u), (projection,), residual)[0]


def norm_lora_group(
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    projections: Sequence[Projection],
    keep: Keep = KEEP_NOTHING,
) -> tuple[torch.Tensor, ...]:
    """lora_group(rms_norm(h, norm_weight, eps), projections), fused; h: (T, d)."""
    projections = tuple(projections)
    return _NormLoraGroup.apply(
        h, norm_weight, eps, keep, projections, *_adapter_tensors(projections)
    )


def norm_lora_group_reference(
    h: torch.Tensor, norm_weight: torch.Tensor, eps: float, projections: Sequence[Projection]
) -> tuple[torch.Tensor, ...]:
    return lora_group_reference(rms_norm_reference(h, norm_weight, eps), projections)


def lora_group(
    x: torch.Tensor,
    projections: Sequence[Projection],
    keep: Keep = KEEP_NOTHING,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """y_i = x @ W_i.T + b_i + s_i * (x @ A_i.T) @ B_i.T for each projection, fused.

    x: (T, in) in the compute dtype; returns one (T, out_i) tensor per projection.
    residual: (T, out), added to the output of a one-projection group.
    """
    projections = tuple(projections)
    if residual is not None and len(projections) != 1:
        raise ValueError(f"a residual is added to one projection's output, not {len(projections)}")
    return _LoraGroup.apply(x, residual, keep, projections, *_adapter_tensors(projections))


def lora_group_reference(
    x: torch.Tensor, projections: Sequence[Projection], residual: torch.Tensor | None = None
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
    if residual is not None:
        outputs[0] = residual + outputs[0]
    return tuple(outputs)
