"""Serving one base model with many LoRA adapters: the batching engine and its HTTP API."""

from lorakit.serve.adapters import AdapterMismatch
from lorakit.serve.engine import (
    Completion,
    Engine,
    Event,
    InvalidPrompt,
    PromptTooLong,
    QueueFull,
    UnknownAdapter,
)
from lorakit.serve.sampling import SamplingParams

__all__ = [
    "AdapterMismatch",
    "Completion",
    "Engine",
    "Event",
    "InvalidPrompt",
    "PromptTooLong",
    "QueueFull",
    "SamplingParams",
    "UnknownAdapter",
]
