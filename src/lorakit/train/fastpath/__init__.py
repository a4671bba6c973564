"""The GPU fast path for LoRA / QLoRA training of Llama-family models.

    status = lorakit.train.fastpath.enable_fast_path(model)   # FastPathStatus(enabled, reason)
    loss = model(input_ids=ids, labels=labels).loss     # now fused, chunked, checkpointed

`enable_fast_path` swaps the model's `forward` for one that, on a training-style call
(input_ids + labels, right-padded or no mask, no cache; position ids 0..S-1 or
restarting for each packed sequence), computes the loss through the
fused pieces and returns it with `logits=None`; every other call, and every model or
adapter setup the fast path does not cover, goes through the original forward
unchanged. Each fused piece sits beside its pure-PyTorch reference:

    lora_linear.py   grouped base + LoRA matmuls with a hand-derived backward (4-bit base too),
                     with RMSNorm (before Q/K/V, gate/up) or SwiGLU (before down) fused in
    elementwise.py   RMSNorm, SwiGLU, RoPE: hand-derived backward, torch.compile'd on CUDA
    loss.py          chunked linear + cross-entropy over supervised positions only (or the
                     log-probability of each, for DPO and ORPO)
    attention.py     padding-free attention over packed sequences (varlen FlashAttention)
    llama.py         the decoder on those pieces, activation checkpointing per layer
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.train.fastpath.decoder import (
    causal_lm_loss,
    causal_lm_token_logps,
    forward_reason,
    supported,
)
from lorakit.train.fastpath.elementwise import set_compile

__all__ = [
    "FastPathConfig",
    "FastPathStatus",
    "causal_lm_loss",
    "disable_fast_path",
    "enable_fast_path",
    "fused_loss_sum",
    "fused_token_logps",
    "supported",
]


@dataclass
class FastPathConfig:
    """How the fast path trades memory for speed."""

    recompute: str = "auto"
    """Activation checkpointing of decoder layers: auto (as model.is_gradient_checkpointing), all, none."""
    keep_layers: int = 0
    """With recompute on, this many of the last decoder layers keep their activations (faster, more memory)."""
    compile: bool = True
    """Compile the fused elementwise kernels with torch.compile on CUDA."""
    loss_chunk_rows: int | None = None
    """Rows per chunk of the fused linear + cross-entropy (None: about 256 MiB of fp32 logits)."""
    save_intermediates: bool | None = None
    """Layers that are not recomputed keep their normalised inputs and SwiGLU product for the backward instead of recomputing them (more memory, less work); None: keep them when recompute is off."""

    def __post_init__(self) -> None:
        if self.recompute not in ("auto", "all", "none"):
            raise ValueError(
                f"FastPathConfig.recompute must be auto, all or none; got {self.recompute!r}"
            )
        if self.keep_layers < 0:
            raise ValueError(f"FastPathConfig.keep_layers must be >= 0, got {self.keep_layers}")
        if self.save_intermediates not in (None, True, False):
            raise ValueError(
                "FastPathConfig.save_intermediates must be true, false or None (auto); "
                f"got {self.save_intermediates!r}"
            )


@dataclass
class FastPathStatus:
    enabled: bool
    reason: str
    """Why the fast path is off, or what it runs when on."""


_ORIGINAL = "_lorakit_generic_forward"
_CONFIG = "_lorakit_fast_path"


def enable_fast_path(model: nn.Module, config: FastPathConfig | None = None) -> FastPathStatus:
    """Route the model's training forward through the fused path, when the model supports it.

    Returns the status; an unsupported model is left unchanged, and the reason says why.
    """
    config = config or FastPathConfig()
    reason = supported(model)
    if reason is not None:
        return FastPathStatus(False, reason)
    set_compile(config.compile)
    original = model.__dict__.get(_ORIGINAL) or model.forward
    setattr(model, _ORIGINAL, original)
    setattr(model, _CONFIG, config)

    def forward(
        self: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        num_items = kwargs.pop("num_items_in_batch", None)
        plain = (
            input_ids is not None
            and labels is not None
            and not any(
                v is not None and v is not False
                for k, v in kwargs.items()
                if k not in ("return_dict", "use_cache")
            )
        )
        if plain and forward_reason(self, input_ids, attention_mask, position_ids) is None:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            loss = _loss(self, config, input_ids, labels, num_items, position_ids)
            return CausalLMOutputWithPast(loss=loss, logits=None)
        if num_items is not None:
            kwargs["num_items_in_batch"] = num_items
        return original(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            position_ids=position_ids,
            **kwargs,
        )

    model.forward = types.MethodType(forward, model)
    return FastPathStatus(
        True,
        f"fused {type(model).__name__} (recompute={config.recompute}, keep_layers={config.keep_layers}, "
        f"save_intermediates={config.save_intermediates})",
    )


def _loss(
    model: nn.Module,
    config: FastPathConfig,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    num_items: Any,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    return _run(causal_lm_loss, model, config, input_ids, labels, position_ids, num_items_in_batch=num_items)


def _run(fn: Any, model: nn.Module, config: FastPathConfig, input_ids: torch.Tensor, labels: torch.Tensor,
         position_ids: torch.Tensor | None, **extra: Any) -> torch.Tensor:
    """`fn` (causal_lm_loss or causal_lm_token_logps) with the config's settings for this model now."""
    recompute, save = _settings(model, config)
    # The model's own dtype decides the compute dtype; an outer autocast would only add casts.
    with torch.autocast(input_ids.device.type, enabled=False):
        return fn(
            model,
            input_ids,
            labels,
            recompute=recompute,
            keep_layers=config.keep_layers,
            save_intermediates=save,
            chunk_rows=config.loss_chunk_rows,
            position_ids=position_ids,
            **extra,
        )


def _settings(model: nn.Module, config: FastPathConfig) -> tuple[bool, bool]:
    """(recompute, save_intermediates) for this model now."""
    recompute = config.recompute == "all" or (config.recompute == "auto" and _checkpointing(model))
    recompute = recompute and model.training
    save = config.save_intermediates
    if save is None:
        # Auto keeps them only when no layer is recomputed: whoever turned checkpointing off
        # has chosen speed over memory. They cost 2 d + intermediate values per token and
        # layer (on the 1B shape, keeping the SwiGLU product alone measured 22.4 vs 16.4 GiB
        # and 81.4k vs 75.6k tokens/s). With checkpointing on, memory is the constraint and
        # `keep_layers` already buys speed with it; 8B's would grow by ~350 MiB per kept layer.
        save = not recompute
    return recompute, save


def fused_loss_sum(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The summed next-token loss through the fast path, or None when this model or batch cannot take it.

    For training loops that normalise the loss themselves (e.g. over gradient accumulation).
    """
    config = model.__dict__.get(_CONFIG)
    if config is None or forward_reason(model, input_ids, None, position_ids) is not None:
        return None
    return _loss(model, config, input_ids, labels, 1, position_ids)


def fused_token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor | None:
    """(B, S-1) log-probabilities of the labelled tokens through the fast path (0 elsewhere),
    under log_softmax(logits / temperature); None when this model or batch cannot take it, or
    its output head is trained."""
    config = model.__dict__.get(_CONFIG)
    if config is None or forward_reason(model, input_ids, None, position_ids) is not None:
        return None
    if model.lm_head.weight.requires_grad:
        return None
    return _run(causal_lm_token_logps, model, config, input_ids, labels, position_ids, temperature=temperature)


def _checkpointing(model: nn.Module) -> bool:
    # transformers 5.2x renamed is_gradient_checkpointing; both are public
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if name in dir(type(model)):
            return bool(getattr(model, name))
    return False


def disable_fast_path(model: nn.Module) -> None:
    """Give the model its original forward back."""
    model.__dict__.pop(_CONFIG, None)
    original = model.__dict__.pop(_ORIGINAL, None)
    if original is not None:
        model.__dict__.pop("forward", None)
