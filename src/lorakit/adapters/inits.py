"""Adapter initialisations beyond the default (A Kaiming-uniform, B zero).

- gaussian: A ~ N(0, 1/r^2), B zero. The layer still starts as the base.
- PiSSA (Meng et al. 2024): with W = U S V^T, A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s),
  and the base becomes the residual W - s B A, so W_res + s B A == W at step 0 while the
  adapter starts on the principal directions.
- OLoRA (Büyükakyüz 2024): with W = Q R (QR decomposition), B = Q[:, :r], A = R[:r], and
  the base becomes W - s B A.
- LoftQ (Li et al. 2023): starting from B A = 0, alternate Q = NF4(W - s B A) and
  s B A = the rank-r SVD of W - Q; the base becomes Q, so Q + s B A approximates W
  better than Q alone. With one iteration Q = NF4(W), the base `--quantize nf4` gives,
  so a LoftQ adapter also loads on a plainly quantized base.

PiSSA and OLoRA change the base weight by definition (the residual); `disable_adapters`
then gives the residual model. Saved PiSSA/OLoRA adapters record their init in
adapter_config.json, and loading one recomputes the residual from the original base,
which is PEFT's convention too.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters import qweights
from lorakit.adapters.config import LoraConfig
from lorakit.adapters.layers import LoraLinear, init_on_cpu
from lorakit.adapters.state import get_state


def initialise(model: nn.Module, name: str, config: LoraConfig) -> None:
    """Apply `config.init` to adapter `name` on every layer it sits on."""
    if config.init == "default":
        return
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
        elif config.init == "loftq":
            loftq(layer, name, config.loftq_iters)
        if layer.use_dora[name]:
            layer.reset_dora_magnitude(name)


@torch.no_grad()
def gaussian(layer: LoraLinear, name: str) -> None:
    init_on_cpu(layer.lora_A[name].weight, lambda t: nn.init.normal_(t, std=1.0 / layer.r[name]))
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


@torch.no_grad()
def loftq(layer: LoraLinear, name: str, iters: int = 1) -> None:
    if layer.quantized or layer.fan_in_fan_out:
        raise ValueError(
            "init='loftq' needs a full-precision nn.Linear base to approximate: inject it on the "
            "unquantized model (LoftQ quantizes the targeted layers to NF4 itself), then "
            "quantize the remaining layers with lorakit.base.quant.quantize_model"
        )
    r, scaling = layer.r[name], layer.scaling[name]
    weight = layer.base_weight_oi().float()  # (out, in)
    a = weight.new_zeros(r, layer.in_features)
    b = weight.new_zeros(layer.out_features, r)
    for _ in range(iters):
        source = weight - scaling * (b @ a)
        quantized = qweights.dequantize(qweights.quantize(source, "nf4"))
        u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        a = root.unsqueeze(1) * vh[:r]  # (r, in)
        b = u[:, :r] * root.unsqueeze(0)  # (out, r)
    if a.shape != layer.lora_A[name].weight.shape:
        raise ValueError(f"rank {r} is larger than this layer allows ({min(layer.in_features, layer.out_features)})")
    layer.quantize_base("nf4", weight_oi=source)
    layer.lora_A[name].weight.copy_(a)
    layer.lora_B[name].weight.copy_(b)


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
