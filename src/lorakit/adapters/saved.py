"""Modules trained in full for some adapters (PEFT's `modules_to_save`), beside the LoRA layers."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSave(nn.Module):
    """A module trained in full for some adapters (e.g. a classifier head).

    The original module's parameters, buffers and children stay registered under their
    own names, so the base state-dict keys do not change; each adapter that trains the
    module gets a copy in `modules_to_save[adapter]`.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self._original = [original]
        for name, param in original.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in original.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        for name, child in original.named_children():
            self.add_module(name, child)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original)
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(True)

    def _current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._current()(*args, **kwargs)
