"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM, and the mixtures of experts
Qwen3-MoE and Mixtral) on the fused pieces.

`causal_lm_loss` computes exactly what `model(input_ids, labels=labels).loss` computes
for a transformers Llama-family model with lorakit adapters, but:

- Q/K/V and gate/up run as grouped fused LoRA functions with the RMSNorm in front fused in
  (`lora_linear.norm_lora_group`), and SwiGLU is fused into the down projection's function;
  the residual adds are done by the o and down projections' GEMMs;
- RoPE, the remaining RMSNorms and the loss's softmax are compiled kernels with
  hand-derived backward functions;
- attention is PyTorch's SDPA with a causal flag (cuDNN / flash attention on Hopper), no mask;
  packed rows (position ids restarting at 0 for each sequence) run padding-free through
  variable-length attention instead (`attention.packed_attention`), each sequence on its own;
- the loss is a chunked linear + cross-entropy over the supervised positions only;
- each decoder layer is recomputed in the backward (activation checkpointing) when asked,
  keeping only its input; the recompute rebuilds only what the backward reads (not the down
  projection's output); `keep_layers` of the last layers keep their activations;
- a layer that is not recomputed recomputes the cheap intermediates of its fused functions
  (normalised inputs, SwiGLU product) in the backward, or keeps them with
  `save_intermediates` (more memory, less work).

A mixture-of-experts layer runs its block's own router and then its experts as grouped
matmuls with the LoRA terms beside them (`lorakit.adapters.expert_grouped`: tokens sorted by
expert, one grouped kernel a projection, no loop over experts), after a fused RMSNorm; the
attention half of the layer, the recompute and the loss are as above.

`supported(model)` says why a model cannot take this path (None when it can).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.adapters import expert_grouped
from lorakit.adapters.experts import LoraExperts
from lorakit.adapters.layers import LoraLinear
from lorakit.base.models import ARCHITECTURES
from lorakit.train.fastpath.attention import Segments, packed_attention, segments_from_positions
from lorakit.train.fastpath.elementwise import rms_norm, rope
from lorakit.train.fastpath.lora_linear import (
    KEEP_ALL,
    KEEP_NOTHING,
    Keep,
    Projection,
    lora_group,
    norm_lora_group,
    swiglu_lora,
)
from lorakit.train.fastpath.loss import linear_cross_entropy, linear_token_logps

"""Model classes the fast path runs (SmolLM checkpoints are LlamaForCausalLM)."""

IGNORE_INDEX = -100

MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")
"""Mixture-of-experts models whose attention is the Llama family's: their expert layers run
their own router and the grouped experts."""

_PROJECTIONS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


def _linear_reason(module: nn.Module, path: str) -> str | None:
    """Why this projection cannot run fused (None when it can)."""
    if isinstance(module, LoraLinear):
        if module.fan_in_fan_out:
            return f"{path} stores its weight transposed (Conv1D)"
        if module.mixed is not None:
            return f"{path} is in a mixed-adapter batch"
        if module.disabled:
            return None
        pending = [n for n in module.active_adapters if n not in module.merged_adapters]
        if len(pending) > 1:
            return f"{path} runs {len(pending)} adapters at once ({', '.join(pending)}); the fast path runs one"
        for name in pending:
            if module.use_dora[name]:
                return f"{path}: adapter {name!r} uses DoRA"
            dropout = module.lora_dropout[name]
            if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
                return f"{path}: adapter {name!r} has dropout {dropout.p} (the fast path runs dropout 0)"
    elif not isinstance(module, nn.Linear):
        return f"{path} is a {type(module).__name__}, not a linear or LoRA layer"
    weight = module.weight
    if getattr(weight, "quant_state", None) is None and not weight.dtype.is_floating_point:
        return f"{path} has a {weight.dtype} weight (8-bit bases are not fused; 4-bit NF4/FP4 and dense are)"
    return None


def supported(model: nn.Module) -> str | None:
    """Why `model` cannot take the fast path, or None when it can."""
    name = type(model).__name__
    if name not in ARCHITECTURES + MOE_ARCHITECTURES:
        return f"{name} is not a supported architecture (supported: {', '.join(ARCHITECTURES + MOE_ARCHITECTURES)})"
    config = model.config
    if getattr(config, "output_router_logits", False):
        return "output_router_logits is on (the router's auxiliary loss is not fused)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (the fast path fuses silu)"
    inner = model.model
    if _sharded(inner.layers[0]):
        return "the decoder layers are sharded (FSDP2): their weights are gathered only by their own forward"
    head = model.lm_head
    if type(head) is not nn.Linear or head.bias is not None:
        return f"lm_head is a {type(head).__name__}; the fused loss needs a plain linear head without bias"
    for i, layer in enumerate(inner.layers):
        sparse = _sparse(layer.mlp)
        if sparse and (reason := _experts_reason(layer.mlp.experts, f"layers.{i}.mlp.experts")):
            return reason
        for parent, child in _PROJECTIONS:
            if sparse and parent == "mlp":
                continue
            module = getattr(getattr(layer, parent), child)
            reason = _linear_reason(module, f"layers.{i}.{parent}.{child}")
            if reason is not None:
                return reason
        if model.training and getattr(layer.self_attn, "attention_dropout", 0.0):
            return f"attention dropout {layer.self_attn.attention_dropout}"
    return None


def _sparse(mlp: nn.Module) -> bool:
    """Whether a layer's MLP is a mixture-of-experts block (a router and fused experts)."""
    return hasattr(mlp, "experts")


def _experts_reason(experts: nn.Module, path: str) -> str | None:
    base = experts._base_shell[0] if isinstance(experts, LoraExperts) else experts
    if not expert_grouped.supports(base):
        return f"{path} ({type(base).__name__}) is outside transformers' common experts interface"
    if isinstance(experts, LoraExperts) and experts.mixed is not None:
        return f"{path} is in a mixed-adapter batch"
    return None


def _sharded(layer: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in layer.parameters())


def _projection(module: nn.Module) -> Projection:
    if isinstance(module, LoraLinear) and not module.disabled:
        pending = [n for n in module.active_adapters if n not in module.merged_adapters]
        return Projection(module, pending[0] if pending else None)
    return Projection(module, None)


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def decoder_layer(
    layer: nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keep: Keep = KEEP_NOTHING,
    output: bool = True,
    segments: Segments | None = None,
) -> torch.Tensor:
    """One decoder layer: h (B, S, d) -> (B, S, d); `keep`: what its fused functions save;
    `segments`: the packed sequences of the B * S tokens (None: each row is one sequence).

    output=False: only the tensors saved for the backward are wanted (the returned values are
    unset), so the down projection's matmuls, whose result nothing saves, are skipped."""
    batch, seq, d = h.shape
    attn = layer.self_attn
    mlp = layer.mlp
    norm = layer.input_layernorm
    q, k, v = norm_lora_group(
        h.view(batch * seq, d),
        norm.weight,
        _eps(norm),
        (_projection(attn.q_proj), _projection(attn.k_proj), _projection(attn.v_proj)),
        keep,
    )
    head_dim = attn.head_dim
    q = q.view(batch, seq, -1, head_dim)
    k = k.view(batch, seq, -1, head_dim)
    v = v.view(batch, seq, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
        q = rms_norm(q, attn.q_norm.weight, _eps(attn.q_norm), "q")
        k = rms_norm(k, attn.k_norm.weight, _eps(attn.k_norm), "k")
    q = rope(q, cos, sin, "q")
    k = rope(k, cos, sin, "k")
    if segments is not None:
        o = packed_attention(
            q.reshape(batch * seq, -1, head_dim),
            k.reshape(batch * seq, -1, head_dim),
            v.reshape(batch * seq, -1, head_dim),
            segments,
            scale=attn.scaling,
        ).reshape(batch * seq, -1)
    else:
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=attn.scaling,
            enable_gqa=q.shape[2] != k.shape[2],
        )  # (B, H, S, D)
        o = o.transpose(1, 2).reshape(batch * seq, -1)
    # the residual adds ride in the o and down projections' GEMMs
    (h,) = lora_group(o, (_projection(attn.o_proj),), keep, residual=h.view(batch * seq, d))
    norm = layer.post_attention_layernorm
    if _sparse(mlp):  # the block's router, then the experts as grouped matmuls
        x = rms_norm(h, norm.weight, _eps(norm), "moe")
        return (h + mlp(x.view(batch, seq, d)).view(batch * seq, d)).view(batch, seq, d)
    g, u = norm_lora_group(
        h,
        norm.weight,
        _eps(norm),
        (_projection(mlp.gate_proj), _projection(mlp.up_proj)),
        keep,
    )
    h = swiglu_lora(g, u, _projection(mlp.down_proj), keep, residual=h, output=output)
    return h.view(batch, seq, d)


class _Checkpointed:
    """A decoder layer under activation checkpointing (`torch.utils.checkpoint`), which calls
    it twice: in the forward, and in the backward to rebuild the tensors the backward reads.
    The second call's output is discarded, so that call skips the down projection's matmuls
    (about a fifth of a layer's forward work)."""

    def __init__(self, layer: nn.Module, segments: Segments | None = None) -> None:
        self.layer = layer
        self.segments = segments
        self.calls = 0

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        # KEEP_ALL in both calls: the recompute must save what the first call would have
        return decoder_layer(
            self.layer, h, cos, sin, KEEP_ALL, output=self.calls == 1, segments=self.segments
        )


def _window_reason(model: nn.Module, seq: int) -> str | None:
    # a packed row's sequences are shorter than the row: checking the row is conservative
    for layer in model.model.layers:
        window = getattr(layer.self_attn, "sliding_window", None)
        if window is None and type(model).__name__ == "MistralForCausalLM":
            window = getattr(model.config, "sliding_window", None)
        if window is not None and seq > window:
            return f"sequence length {seq} exceeds the sliding window {window}"
    return None


def forward_reason(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> str | None:
    """Why this batch cannot take the fast path (None when it can)."""
    reason = supported(model) or _window_reason(model, input_ids.shape[1])
    if reason is not None:
        return reason
    if attention_mask is not None and not bool(attention_mask.all()):
        # Right padding is exact under a causal mask: real tokens only see earlier, real tokens.
        if not bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            return "the attention mask is not right-padded (left padding or packed sequences)"
    if position_ids is not None:
        if position_ids.shape != input_ids.shape:
            return f"position_ids have shape {tuple(position_ids.shape)}, input_ids {tuple(input_ids.shape)}"
        # packed rows: each position is 0 (a sequence starts) or the one before plus 1
        follows = (position_ids[:, 1:] == position_ids[:, :-1] + 1) | (position_ids[:, 1:] == 0)
        if not bool(follows.all()) or not bool((position_ids[:, 0] == 0).all()):
            return "position_ids neither count 0..S-1 nor restart at 0 for each packed sequence"
        if attention_mask is not None and not bool(attention_mask.all()) and (position_ids[:, 1:] == 0).any():
            return "packed rows with an attention mask (packed rows need no mask)"
    return None


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    recompute: bool = False,
    keep_layers: int = 0,
    save_intermediates: bool = False,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_rows: int | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of a Llama-family model, as transformers computes it.

    input_ids, labels: (B, S); labels of IGNORE_INDEX are not supervised; label t is
    predicted from position t-1 (transformers' shift). The mean is over supervised
    positions, or the sum divided by `num_items_in_batch` when given. position_ids (B, S):
    None or 0..S-1 in each row, or restarting at 0 for each packed sequence (padding-free
    packing: attention stays within each sequence, RoPE restarts with the positions); the
    first token of a packed sequence should carry no label (`lorakit.data.sft.pack` does this).

    recompute: checkpoint each decoder layer but the last `keep_layers`. save_intermediates:
    layers that are not recomputed keep their normalised inputs and SwiGLU product for the
    backward instead of recomputing them (4-bit weights are dequantized again either way:
    keeping them for every layer would hold a dense copy of the whole base).
    """
    hidden, target, _ = _supervised_hidden(
        model, input_ids, labels, recompute, keep_layers, save_intermediates, position_ids
    )
    loss = linear_cross_entropy(hidden, model.lm_head.weight, target, chunk_rows)
    if num_items_in_batch is not None:
        loss = loss * (target.numel() / num_items_in_batch)
    return loss


def causal_lm_token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    recompute: bool = False,
    keep_layers: int = 0,
    save_intermediates: bool = False,
    chunk_rows: int | None = None,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(B, S-1) log-probabilities of `labels[:, 1:]` given the tokens before (0 where the
    label is IGNORE_INDEX), at least fp32: `causal_lm_loss`'s computation kept per token, for
    objectives that score whole sequences (DPO, ORPO) or sampled tokens (GRPO: under
    log_softmax(logits / temperature), the head's input divided by the temperature, which is
    the same product). The output head must be frozen."""
    hidden, target, rows = _supervised_hidden(
        model, input_ids, labels, recompute, keep_layers, save_intermediates, position_ids
    )
    if temperature != 1.0:
        hidden = hidden / temperature
    picked = linear_token_logps(hidden, model.lm_head.weight, target, chunk_rows)
    out = picked.new_zeros(labels.shape[0] * (labels.shape[1] - 1)).index_copy(0, rows, picked)
    return out.view(labels.shape[0], labels.shape[1] - 1)


def _supervised_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    recompute: bool,
    keep_layers: int,
    save_intermediates: bool,
    position_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The final-normed hidden states at supervised positions (N, d), their targets (N,), and
    those positions' indices in the flattened (B * (S-1)) label grid (N,)."""
    inner = model.model
    # the supervised positions first: nonzero() waits for the GPU, which is idle here anyway
    target = labels[:, 1:].reshape(-1)
    rows = (target != IGNORE_INDEX).nonzero().squeeze(1)
    h = inner.embed_tokens(input_ids)
    seq = input_ids.shape[1]
    segments = None if position_ids is None else segments_from_positions(position_ids)
    if segments is None:
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0)
    cos, sin = inner.rotary_emb(h, position_ids=position_ids)  # (1 or B, S, D), in h's dtype
    layers = list(inner.layers)[: model.config.num_hidden_layers]
    first_kept = len(layers) - keep_layers
    kept = Keep(activations=save_intermediates)
    for i, layer in enumerate(layers):
        if recompute and i < first_kept and torch.is_grad_enabled():
            # what a checkpointed layer keeps (KEEP_ALL) is held for one layer at a time
            h = checkpoint(_Checkpointed(layer, segments), h, cos, sin, use_reentrant=False)
        else:
            h = decoder_layer(layer, h, cos, sin, kept, segments=segments)
    hidden = h[:, :-1].reshape(-1, h.shape[-1]).index_select(0, rows)
    hidden = rms_norm(
        hidden, inner.norm.weight, _eps(inner.norm), "final"
    )  # per row: only supervised rows
    return hidden, target.index_select(0, rows), rows
