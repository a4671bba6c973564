"""lorakit: LoRA fine-tuning for language models.

A frozen base model with small trainable low-rank adapters beside chosen layers,
saved in PEFT's file format, swapped and mixed per request on one base.
"""

from lorakit.adapters.config import LoraConfig
from lorakit.adapters.embedding import LoraEmbedding
from lorakit.adapters.files import load_adapter, read_adapter, save_adapter
from lorakit.adapters.inject import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    forward_mixed,
    inject,
    merge,
    merge_and_unload,
    mixed_batch,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from lorakit.adapters.layers import LoraLinear, lora_mixed_delta

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraEmbedding",
    "LoraLinear",
    "active_adapters",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "forward_mixed",
    "inject",
    "load_adapter",
    "lora_mixed_delta",
    "merge",
    "merge_and_unload",
    "mixed_batch",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
