"""Serving one base model with many LoRA adapters: the batching engine and its HTTP API."""

from .adapters import AdapterMismatch
from .engine import (
    Completion,
    Engine,
    Event,
    InvalidPrompt,
    PromptTooLong,
    QueueFull,
    UnknownAdapter,
)
from .sampling import SamplingParams

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
