"""Serving one base model with many LoRA adapters: the batching engine and its HTTP API."""

from .adapters import AdapterMismatch
from .engine import Completion, Engine, Event, PromptTooLong, QueueFull, UnknownAdapter
from .sampling import SamplingParams

__all__ = [
    "AdapterMismatch",
    "Completion",
    "Engine",
    "Event",
    "PromptTooLong",
    "QueueFull",
    "SamplingParams",
    "UnknownAdapter",
]
