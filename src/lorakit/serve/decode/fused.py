"""A decoder layer of the fast decode path as two pure functions, compiled once for all layers.

Eager PyTorch runs a decoding step of a Llama-family layer as about ninety small kernels
(RMSNorm alone is six), and at decode batch sizes each costs more to launch than to run:
a captured 1B step spent 4.7 ms on an H200 whose weights stream in 0.5 ms. Here a layer is

    attention_inputs(h, ...) -> q, k, v      RMSNorm, Q/K/V with the rows' adapters, RoPE
    (the caller writes k, v into the slot cache and attends: `attend`, or on CUDA when
    decoding, `attention.py`'s kernel, which also writes k, v and applies RoPE itself)
    layer_rest(h, out, ...) -> h             o, residual, RMSNorm, gate/up, SwiGLU, down,
                                             residual

Both take every weight as an argument and touch no module, so `torch.compile` traces each
once and every layer reuses the compiled code (the guards see equal shapes, not which
layer's tensors they are); Inductor fuses the elementwise work between the matmuls.
Projections that read the same input run as one matmul: Q/K/V, and gate/up, are
concatenated once (`layer_weights`), and the modules' own weights become views of the
concatenated tensor, so the values exist once and the generic path reads the same numbers.
A decoding step may also fold its LoRA shrink into these matmuls (`DecoderModel.fold_slots`
appends every adapter slot's A to the group's weight); its expand kernels then also run
SwiGLU after gate/up and the residual add after down (`_projections`). With
`compile=False` the same functions run eagerly (the CPU tests check them against the
module-by-module forward). Only dense bases take this path: a 4-bit base keeps the
module-by-module forward, whose matmuls call bitsandbytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.layers import LoraLinear
from lorakit.serve.decode.lora import (
    FOLDED_MODES,
    GROUPS,
    batched_lora,
    epilogue,
    folded_lora,
    split,
)
from lorakit.serve.decode.ops.attention import decode_attention

Dense = tuple[torch.Tensor, torch.Tensor | None]
Group = tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]
"""A projection group as one matmul: (weight, bias) concatenated along outputs, and each
projection's output size."""

log = logging.getLogger(__name__)


@dataclass
class LayerWeights:
    """One layer's dense weights: norms, and one concatenated `Group` per entry of GROUPS."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    groups: tuple[Group, ...]


def dense_weight(module: nn.Module) -> Dense | None:
    """(weight, bias) of a projection whose base is a plain dense matrix; None otherwise."""
    if isinstance(module, LoraLinear):
        if module.base_quant_state is not None or module.quantized or module.fan_in_fan_out:
            return None
        return module.weight, module.bias
    if type(module) is nn.Linear:
        return module.weight, module.bias
    return None


@torch.no_grad()
def concatenate(dense: Sequence[Dense]) -> Group:
    """The projections' weights (and biases) as one tensor along outputs; each module's
    weight (and bias) becomes a view of it, so no second copy stays alive."""
    sizes = tuple(int(w.shape[0]) for w, _ in dense)
    if len(dense) == 1:
        weight, bias = dense[0]
        return weight, bias, sizes
    weight = torch.cat([w for w, _ in dense])
    bias = None
    if any(b is not None for _, b in dense):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in dense])
    start = 0
    for (w, b), size in zip(dense, sizes, strict=True):
        w.data = weight[start : start + size]
        if b is not None and bias is not None:
            b.data = bias[start : start + size]
        start += size
    return weight, bias, sizes


def layer_weights(layer: nn.Module) -> LayerWeights | None:
    """The layer's weights for the fused functions, or None when a projection is not dense.
    Q/K/V and gate/up are concatenated (`concatenate`): their modules' weights become views."""
    groups = []
    for parent, projs in GROUPS:
        owner = getattr(layer, parent)
        modules = [getattr(owner, p) for p in projs]
        if any(dense_weight(m) is None for m in modules):
            return None
    for parent, projs in GROUPS:
        owner = getattr(layer, parent)
        modules = [getattr(owner, p) for p in projs]
        groups.append(concatenate([dense_weight(m) for m in modules]))  # type: ignore[misc]
    attn = layer.self_attn
    norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
    return LayerWeights(
        layer.input_layernorm.weight,
        layer.post_attention_layernorm.weight,
        *(n.weight if n is not None else None for n in norms),
        tuple(groups),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm, step for step (float32 inside, scale after the cast)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it (rotate_half)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scaling: float,
           causal: bool = False, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (rows, T, heads, D) over keys, values (rows, kv heads, L, D) under mask
    (rows, 1, group * T, L); (rows, T, heads * D). The query heads that share a K/V head
    become more queries of that head (transformers' repeat_kv order), so K/V are not repeated.

    causal=True promises what the first chunk of a prefill has: every row's queries sit at
    positions 0..T-1 and L == T, so the mask is the causal triangle. SDPA then runs with
    is_causal and grouped-query heads instead of a materialised mask over folded heads, which
    lets it take its flash kernels (mask may be None).

    positions (rows,), given when decoding: each row's query position, for `attention.py`'s
    Triton kernel, which reads each row's keys only up to its position (mask may be None).

    One query per row (decoding): scores = q K^T in the cache's dtype, a float32 softmax, then
    the weights times V, as transformers' eager attention does (float64 stays float64); both matmuls read the cache
    in place (a (rows * kv heads) batch of small matmuls), where a fused attention kernel
    pays for query tiles that decoding leaves almost empty. Several (prefill): PyTorch's SDPA."""
    rows, steps, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    if causal and steps > 1:
        # enable_gqa is a constant: `group > 1` is symbolic under torch.compile, which SDPA
        # rejects, and with one query head per K/V head it changes nothing
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), is_causal=True,
                                             scale=scaling, enable_gqa=True)  # (rows, heads, T, D)
        return out.transpose(1, 2).reshape(rows, steps, heads * head_dim)
    q = q.view(rows, steps, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(rows, kv_heads, group * steps, head_dim)
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    if steps == 1 and positions is not None:
        out = decode_attention(q, keys, values, positions, scaling)
    elif steps == 1:
        assert mask is not None
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scaling  # (rows, kv heads, group, L)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
        out = torch.matmul(weights, values)
    else:
        assert mask is not None
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    return out.view(rows, kv_heads, group, steps, head_dim).permute(0, 3, 1, 2, 4).reshape(rows, steps, heads * head_dim)


def _projections(
    x: torch.Tensor,
    group: Group,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    index: torch.Tensor | None,
    mode: str,
    residual: torch.Tensor | None = None,
    glu: bool = False,
) -> list[torch.Tensor]:
    """A group's projections' outputs; with residual or glu, [`lora.epilogue` of them], which a
    folded decoding step runs inside its expand kernel (no kernel of its own, no round trip of
    the group's output)."""
    weight, bias, sizes = group
    total = sum(sizes)
    lora = a is not None and b is not None and index is not None
    then = glu or residual is not None
    if lora and mode in FOLDED_MODES and weight.shape[0] > total:  # weight is [W; A of every slot]
        inside = then and bias is None
        flat = residual.reshape(-1, total) if inside and residual is not None else None
        y = folded_lora(x.reshape(-1, x.shape[-1]), weight, b, sizes, index, mode, flat, glu and inside)  # type: ignore[arg-type]
        if inside:
            return [y.view(*x.shape[:-1], y.shape[-1])]
        y = y.view(*x.shape[:-1], total)
        parts = split(y if bias is None else y + bias, sizes)
    else:
        y = F.linear(x, weight[:total], bias)
        if lora:
            y = y + batched_lora(x, a, b, sizes, index, FOLDED_MODES.get(mode, mode)).to(y.dtype)  # type: ignore[arg-type]
        parts = split(y, sizes)
    return [epilogue(parts, residual, glu)] if then else parts


def attention_inputs(
    h: torch.Tensor,
    norm: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    qkv: Group,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    index: torch.Tensor | None,
    mode: str,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    rope: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (rows, T, heads, D) and k, v (rows, T, kv heads, D), RoPE applied unless rope=False
    (the decode attention kernel applies it); cos, sin: (rows, T, 1, D)."""
    rows, steps, _ = h.shape
    x = rms_norm(h, norm, eps)
    q, k, v = _projections(x, qkv, a, b, index, mode)
    q = q.view(rows, steps, heads, head_dim)
    k = k.view(rows, steps, kv_heads, head_dim)
    v = v.view(rows, steps, kv_heads, head_dim)
    if q_norm is not None and k_norm is not None:  # Qwen3: RMSNorm over each head before RoPE
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    if not rope:
        return q, k, v
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def layer_rest(
    h: torch.Tensor,
    out: torch.Tensor,
    post_norm: torch.Tensor,
    eps: float,
    o: Group,
    mlp: Group,
    down: Group,
    loras: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]],
    index: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """The layer's output hidden state from h and attention's output (rows, T, heads * D);
    loras: (A, Bs) of the o, gate/up and down groups (None where no resident adapter has
    them); mode: `batched_lora`'s (or a folded one, see `_projections`)."""
    (attended,) = _projections(out, o, *loras[0], index, mode)
    h = h + attended
    x = rms_norm(h, post_norm, eps)
    (act,) = _projections(x, mlp, *loras[1], index, mode, glu=True)  # silu(gate) * up
    (y,) = _projections(act, down, *loras[2], index, mode, residual=h)  # h + down
    return y


class FusedLayers:
    """The two functions, compiled by `backend` (None: run eagerly), and each layer's weights."""

    def __init__(self, layers: Sequence[LayerWeights], eps: float, backend: str | Callable | None,
                 dynamic: bool | None = None) -> None:
        self.layers = list(layers)
        self.eps = eps
        self.backend = backend
        if backend is not None:
            # One trace per kind of call (decode or prefill, a batch of one or more, adapters
            # or none) serves every layer and every batch bucket. Sizes are static at first
            # and a size that changes between calls (rows, tokens) turns dynamic (dynamic=None):
            # the weights' sizes stay constants, so Inductor's kernels index with constants
            # (with every size symbolic, an 8B prefill of 32 x 128 tokens took 129 ms on an
            # H200, against 106 ms so). `dynamic` True (DecodeTuning.dynamic) makes every size
            # symbolic, for comparing the two.
            limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
            self._compiled = (
                torch.compile(attention_inputs, backend=backend, dynamic=dynamic, fullgraph=True),
                torch.compile(layer_rest, backend=backend, dynamic=dynamic, fullgraph=True),
            )
        self.compile_error: str | None = None

    def _call(self, which: int, *args):
        if self.backend is not None:
            try:
                return self._compiled[which](*args)
            except Exception as err:  # compiling is an optimisation: keep serving eagerly
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                self.compile_error = f"{type(err).__name__}: {err}"
                self.backend = None
                log.warning("the fused decode layers did not compile and run eagerly from now on: %s",
                            self.compile_error)
        return (attention_inputs, layer_rest)[which](*args)

    def attention_inputs(self, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._call(0, *args)

    def layer_rest(self, *args) -> torch.Tensor:
        return self._call(1, *args)
