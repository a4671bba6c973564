"""Adapter initialisations beyond the default (A Kaiming-uniform, B zero).

- gaussian: A ~ N(0, 1/r^2), B zero. The layer still starts as the base.
- PiSSA (Meng et al. 2024): with W = U S V^T, A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s),
  and the base becomes the residual W - s B A, so W_res + s B A == W at step 0 while the
  adapter starts on the principal directions.
- OLoRA (Büyükakyüz 2024): with W = Q R (QR decomposition), B = Q[:, :r], A = R[:r], and
  the base becomes W - s B A.

PiSSA and OLoRA change the base weight by definition (the residual); `disable_adapters`
then gives the residual model. Saved PiSSA/OLoRA adapters record their init in
adapter_config.json, and loading one recomputes the residual from the original base,
which is PEFT's convention too.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LoraConfig
from .layers import LoraLinear


def initialise(model: nn.Module, name: str, config: LoraConfig) -> None:
    """Apply `config.init` to adapter `name` on every layer it sits on."""
    if config.init == "default":
        return
    from .inject import get_state

    for path in get_state(model).targets[name]:
        layer = model.get_submodule(path)
        if not isinstance(layer, LoraLinear):
            continue  # embeddings keep their no-op init (A zero, B normal)
        if config.init == "gaussian":
            gaussian(layer, name)
        elif config.init == "pissa":
            pissa(layer, name)
        elif config.init == "olora":
            olora(layer, name)
        if layer.use_dora[name]:
            layer.reset_dora_magnitude(name)


@torch.no_grad()
def gaussian(layer: LoraLinear, name: str) -> None:
    nn.init.normal_(layer.lora_A[name].weight, std=1.0 / layer.r[name])
    nn.init.zeros_(layer.lora_B[name].weight)


@torch.no_grad()
def pissa(layer: LoraLinear, name: str) -> None:
    r, scaling = layer.r[name], layer.scaling[name]
    weight = layer.base_weight_oi().float()  # (out, in)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    a = root.unsqueeze(1) * vh[:r]  # (r, in)
    b = u[:, :r] * root.unsqueeze(0)  # (out, r)
    _set_and_residualise(layer, name, a, b)


@torch.no_grad()
def olora(layer: LoraLinear, name: str) -> None:
    r = layer.r[name]
    weight = layer.base_weight_oi().float()  # (out, in)
    q, rr = torch.linalg.qr(weight)
    _set_and_residualise(layer, name, rr[:r].contiguous(), q[:, :r].contiguous())


def _set_and_residualise(layer: LoraLinear, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if a.shape != lora_a.shape or b.shape != lora_b.shape:
        raise ValueError(
            f"rank {layer.r[name]} is larger than this layer allows ({min(layer.in_features, layer.out_features)})"
        )
    lora_a.copy_(a.to(lora_a.dtype))
    lora_b.copy_(b.to(lora_b.dtype))
    residual = layer.base_weight_oi().float() - layer.delta_oi(name)
    layer.write_base_weight(residual)
