"""What an adapter covers: its layers by kind (attention, dense MLP, experts, embeddings) and
the share of the model's projection weights it leaves out, so a partial adapter is never silent.

"Projection weights" are the weights of every linear layer but the output head, plus every
fused expert parameter: the weights LoRA is meant to act on. A target spec that leaves most of
them unadapted (an attention-only adapter on a mixture-of-experts model, where the experts hold
nearly all of the weights) gets a warning that names what was skipped and how to include it.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from lorakit.adapters.experts import LoraExperts, expert_parameters
from lorakit.adapters.layers import LoraLayer
from lorakit.adapters.state import get_state
from lorakit.adapters.targets import LINEAR_TYPES, base_modules, output_head, unwrap_shell

KINDS = ("attention", "dense MLP", "experts", "embeddings", "other")

WARN_BELOW = 0.5
"""An adapter covering less than this share of the projection weights is reported loudly."""


class PartialAdapterWarning(UserWarning):
    """An adapter leaves most of the model's projection weights unadapted."""


def kind_of(path: str, module: nn.Module) -> str:
    """The kind of layer at `path`: attention, dense MLP, experts, embeddings or other."""
    base = unwrap_shell(module) if isinstance(module, LoraLayer) else module
    if isinstance(module, LoraExperts) or expert_parameters(base):
        return "experts"
    if isinstance(base, nn.Embedding):
        return "embeddings"
    parts = path.lower().split(".")
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    if any(p in ("mlp", "feed_forward", "ffn", "shared_expert", "shared_experts") or "mlp" in p for p in parts):
        return "dense MLP"
    return "other"


@dataclass
class Coverage:
    """One adapter's layers by kind and the projection weights it adapts and skips (values)."""

    layers: Counter = field(default_factory=Counter)
    adapted: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    @property
    def share(self) -> float:
        total = sum(self.adapted.values()) + sum(self.skipped.values())
        return sum(self.adapted.values()) / total if total else 1.0

    def summary(self) -> str:
        by_kind = ", ".join(f"{self.layers[k]} {k}" for k in KINDS if self.layers[k])
        text = f"adapted {by_kind or 'nothing'}; {self.share:.0%} of the projection weights"
        skipped = [k for k in KINDS if self.skipped[k]]
        if skipped:
            text += "; not adapted: " + ", ".join(f"{k} ({self.skipped[k]:,} values)" for k in skipped)
        return text

    def advice(self) -> str:
        hints = []
        if self.skipped["experts"]:
            hints.append("--targets all-linear (or target_parameters such as 'mlp.experts.gate_up_proj', "
                         "'mlp.experts.down_proj') adapts the experts")
        if self.skipped["dense MLP"] or self.skipped["attention"] or self.skipped["other"]:
            hints.append("--targets all-linear adapts every linear layer")
        return "; ".join(hints)


def coverage(model: nn.Module, adapter_name: str) -> Coverage:
    """What `adapter_name` adapts on `model`, and the projection weights it leaves out."""
    state = get_state(model)
    adapted_paths = set(state.targets[adapter_name])
    head = output_head(model)
    result = Coverage()
    for path, module in base_modules(model):
        if not path:
            continue
        base = unwrap_shell(module) if isinstance(module, LoraLayer) else module
        kind = kind_of(path, module)
        if path in adapted_paths:
            result.layers[kind] += 1
        if base is head:
            continue
        if isinstance(module, LoraExperts):
            for param in module.expert_params:
                counter = result.adapted if param in module.targets.get(adapter_name, ()) else result.skipped
                counter[kind] += math.prod(module.shape_of(param))
        elif expert_parameters(base):
            result.skipped[kind] += sum(getattr(base, p).numel() for p in expert_parameters(base))
        elif isinstance(base, LINEAR_TYPES):
            counter = result.adapted if path in adapted_paths else result.skipped
            counter[kind] += base.weight.numel()
    return result


def report(model: nn.Module, adapter_name: str, stacklevel: int = 2) -> str:
    """The one-line summary of what the adapter covers; warns when it covers under half the
    projection weights, naming what was skipped and how to include it."""
    found = coverage(model, adapter_name)
    if found.share < WARN_BELOW:
        warnings.warn(
            f"adapter {adapter_name!r} leaves {1 - found.share:.0%} of the model's projection weights unadapted "
            f"({found.summary()}). {found.advice()}",
            PartialAdapterWarning,
            stacklevel=stacklevel + 1,
        )
    return found.summary()
