"""lorakit: LoRA fine-tuning for language models.

A frozen base model with small trainable low-rank adapters beside chosen layers,
saved in PEFT's file format, swapped and mixed per request on one base.

    model, tokenizer = lorakit.load_model()       # the bundled SmolLM2-135M-Instruct, or a path
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))

The package's layers, bottom up (docs/architecture.md): adapters/ (the LoRA core), base/
(base models, quantization, templates), data/, evaluation/ and export/, train/, then
compare/ and serve/, and cli.py on top.
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
from lorakit.base.models import load_model

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
    "load_model",
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
