"""What a model with adapters knows about them: `model.lora_state`, an `AdapterState`.

Every module that manages or reads adapters (inject, the initialisations, files, serving)
looks the state up here, so none of them needs the others to find it."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorakit.adapters.config import LoraConfig


@dataclass
class AdapterState:
    """What a model with adapters knows about them."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    targets: dict[str, list[str]] = field(default_factory=dict)
    """Dotted paths of the modules each adapter sits on."""
    active: list[str] = field(default_factory=list)


def get_state(model: nn.Module) -> AdapterState:
    state = getattr(model, "lora_state", None)
    if not isinstance(state, AdapterState):
        raise ValueError(
            "this model has no LoRA adapters; call lorakit.inject(model, config) first"
        )
    return state


def has_adapters(model: nn.Module) -> bool:
    return isinstance(getattr(model, "lora_state", None), AdapterState)
