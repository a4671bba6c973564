"""The fast path's pure-PyTorch references on the CPU: hand-derived gradients against
autograd, the chunked loss against full cross-entropy, the patched model against the
unpatched one (loss and adapter gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit.train.fastpath import FastPathConfig, disable_fast_path, enable_fast_path, supported
from lorakit.train.fastpath.elementwise import (
    rms_norm,
    rms_norm_reference,
    rope,
    rope_reference,
    swiglu,
    swiglu_reference,
)
from lorakit.train.fastpath.lora_linear import (
    KEEP_ALL,
    KEEP_NOTHING,
    Keep,
    Projection,
    lora_group,
    lora_group_reference,
    norm_lora_group,
    norm_lora_group_reference,
    swiglu_lora,
    swiglu_lora_reference,
)
from lorakit.train.fastpath.loss import linear_cross_entropy, linear_cross_entropy_reference

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
    assert err < tol, f"relative error {err:.3e} >= {tol:.0e}"


def _grads_match(fn, ref, inputs: list[torch.Tensor], tol: float = 1e-10) -> None:
    """fn and ref agree in value and in the gradients of every input that requires grad."""
    gen = torch.Generator().manual_seed(7)
    out, out_ref = fn(*inputs), ref(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    refs = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(
        sum((o * w).sum() for o, w in zip(outs, weights, strict=False)), leaves
    )
    want = torch.autograd.grad(
        sum((o * w).sum() for o, w in zip(refs, weights, strict=False)), leaves
    )
    for o, r in zip(outs, refs, strict=False):
        _close(o, r, tol)
    for g, w in zip(got, want, strict=False):
        _close(g, w, tol)


def test_rms_norm_backward_matches_autograd():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    _grads_match(
        lambda a, b: rms_norm(a, b, 1e-6), lambda a, b: rms_norm_reference(a, b, 1e-6), [x, w]
    )


def test_rms_norm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(16, eps=1e-5)
    nn.init.normal_(norm.weight)
    x = torch.randn(4, 16)
    _close(rms_norm(x, norm.weight, 1e-5), norm(x), 1e-6)


def test_swiglu_backward_matches_autograd():
    g = torch.randn(4, 7, 24, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 7, 24, dtype=torch.float64, requires_grad=True)
    _grads_match(swiglu, swiglu_reference, [g, u])
    _close(swiglu(g, u), F.silu(g) * u)


def test_rope_backward_matches_autograd_and_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, s, h, d = 2, 6, 3, 8
    x = torch.randn(b, s, h, d, dtype=torch.float64, requires_grad=True)
    angle = torch.randn(1, s, d // 2, dtype=torch.float64)
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    _grads_match(lambda t: rope(t, cos, sin), lambda t: rope_reference(t, cos, sin), [x])
    expected, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    _close(rope(x, cos, sin), expected.transpose(1, 2))


def _lora_layers(biases: tuple[bool, ...], ranks: tuple[int, ...], dtype=torch.float64):
    torch.manual_seed(0)
    outs = (12, 6, 6)[: len(ranks)]
    mods = []
    for out, r, bias in zip(outs, ranks, biases, strict=False):
        layer = lorakit.LoraLinear(nn.Linear(10, out, bias=bias, dtype=dtype))
        layer.weight.requires_grad_(False)
        if r:
            layer.add(
                "default", r=r, alpha=2 * r + 1, dropout=0.0, use_rslora=False, use_dora=False
            )
            nn.init.normal_(layer.lora_B["default"].weight)  # B = 0 would hide errors in dA
            layer.set_active(["default"])
        mods.append(layer)
    return [Projection(m, "default" if r else None) for m, r in zip(mods, ranks, strict=False)]


@pytest.mark.parametrize(
    "ranks,biases",
    [((4, 2, 3), (False, False, False)), ((4, 0, 3), (True, True, False)), ((5,), (False,))],
)
def test_lora_group_backward_matches_autograd(ranks, biases):
    projections = _lora_layers(biases, ranks)
    x = torch.randn(9, 10, dtype=torch.float64, requires_grad=True)
    params = [x] + [t for p in projections if p.adapter for t in (p.lora_a(), p.lora_b())]

    def fused(*_):
        return lora_group(x, projections)

    def reference(*_):
        return lora_group_reference(x, projections)

    _grads_match(fused, reference, params)


@pytest.mark.parametrize("bias", [False, True])
def test_residual_rides_in_the_projection(bias):
    # y = r + x @ W.T + b + s * x A.T B.T, with r's gradient dy: one projection, then SwiGLU + down
    (projection,) = _lora_layers((bias,), (3,))
    x = torch.randn(9, 10, dtype=torch.float64, requires_grad=True)
    r = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    params = [x, r, projection.lora_a(), projection.lora_b()]
    _grads_match(
        lambda *_: lora_group(x, [projection], residual=r),
        lambda *_: lora_group_reference(x, [projection], r),
        params,
    )
    _close(lora_group(x, [projection], residual=r)[0], r + projection.module(x))
    g = torch.randn(9, 10, dtype=torch.float64, requires_grad=True)
    _grads_match(
        lambda *_: swiglu_lora(g, x, projection, Keep(activations=True), residual=r),
        lambda *_: swiglu_lora_reference(g, x, projection, r),
        [g] + params,
    )


def test_residual_needs_a_one_projection_group():
    projections = _lora_layers((False, False), (2, 2))
    x = torch.randn(3, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="one projection's output, not 2"):
        lora_group(x, projections, residual=torch.zeros(3, 12, dtype=torch.float64))


@pytest.mark.parametrize("keep", [KEEP_NOTHING, Keep(activations=True)])
@pytest.mark.parametrize("rank", [3, 0])
def test_swiglu_lora_backward_matches_autograd(rank, keep):
    (projection,) = _lora_layers((False,), (rank,))
    g = torch.randn(9, 10, dtype=torch.float64, requires_grad=True)
    u = torch.randn(9, 10, dtype=torch.float64, requires_grad=True)
    params = [g, u] + ([projection.lora_a(), projection.lora_b()] if rank else [])
    _grads_match(
        lambda *_: swiglu_lora(g, u, projection, keep),
        lambda *_: swiglu_lora_reference(g, u, projection),
        params,
    )


@pytest.mark.parametrize("keep", [KEEP_NOTHING, Keep(activations=True), KEEP_ALL])
def test_norm_lora_group_backward_matches_autograd(keep):
    projections = _lora_layers((False, True, False), (4, 2, 0))
    h = torch.randn(9, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64, requires_grad=True)
    params = [h, w] + [t for p in projections if p.adapter for t in (p.lora_a(), p.lora_b())]
    # the normalised x kept rather than recomputed: same gradients
    _grads_match(
        lambda *_: norm_lora_group(h, w, 1e-6, projections, keep),
        lambda *_: norm_lora_group_reference(h, w, 1e-6, projections),
        params,
    )


@pytest.mark.parametrize("keep", [KEEP_NOTHING, Keep(activations=True), Keep(dense=True), KEEP_ALL])
def test_nf4_base_is_dequantized_inside_the_fused_functions(keep):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layer = lorakit.LoraLinear(nn.Linear(64, 32, bias=False))
    layer.add("default", r=4, alpha=8, dropout=0.0, use_rslora=False, use_dora=False)
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.set_active(["default"])
    layer.quantize_base("nf4", torch.float32)
    projection = Projection(layer, "default")
    x = torch.randn(6, 64, requires_grad=True)
    g = torch.randn(6, 64, requires_grad=True)
    u = torch.randn(6, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    params = [x, g, u, projection.lora_a(), projection.lora_b()]
    _grads_match(
        lambda *_: (
            lora_group(x, [projection], keep)[0],
            swiglu_lora(g, u, projection, keep),
            norm_lora_group(x, w, 1e-6, [projection], keep)[0],
        ),
        lambda *_: (
            lora_group_reference(x, [projection])[0],
            swiglu_lora_reference(g, u, projection),
            norm_lora_group_reference(x, w, 1e-6, [projection])[0],
        ),
        params + [w],
        tol=1e-5,
    )
    (y,) = lora_group(x, [projection])
    _close(y, layer(x), 1e-5)  # the layer's own 4-bit forward (bitsandbytes' matmul)


def test_lora_group_matches_lora_linear_forward():
    projections = _lora_layers((True,), (4,), dtype=torch.float32)
    x = torch.randn(5, 10)
    (y,) = lora_group(x, projections)
    _close(y, projections[0].module(x), 1e-6)


def test_lora_group_bf16_grads_are_adapter_dtype():
    # A bf16 base keeps fp32 adapters: the matmuls run in bf16, gradients come back in fp32.
    torch.manual_seed(0)
    layer = lorakit.LoraLinear(nn.Linear(32, 16, bias=False, dtype=torch.bfloat16))
    layer.add("default", r=4, alpha=8, dropout=0.0, use_rslora=False, use_dora=False)
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.set_active(["default"])
    x = torch.randn(8, 32, dtype=torch.bfloat16, requires_grad=True)
    (y,) = lora_group(x, [Projection(layer, "default")])
    y.float().square().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16
    _close(y.float(), layer(x).float(), 1e-2)


@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_cross_entropy_equals_full(chunk):
    torch.manual_seed(0)
    h = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 37, (11,))
    _grads_match(
        lambda a, b: linear_cross_entropy(a, b, t, chunk),
        lambda a, b: linear_cross_entropy_reference(a, b, t),
        [h, w],
    )
    _close(linear_cross_entropy(h, w, t, chunk), F.cross_entropy(h @ w.t(), t))


def test_chunked_cross_entropy_without_grad_matches():
    torch.manual_seed(1)
    h, w = torch.randn(7, 8, dtype=torch.float64), torch.randn(37, 8, dtype=torch.float64)
    t = torch.randint(0, 37, (7,))
    with torch.no_grad():
        _close(linear_cross_entropy(h, w, t, 3), F.cross_entropy(h @ w.t(), t))


def _adapted_llama(dtype=torch.float32, targets=ALL):
    model = tiny_llama(dtype=dtype).train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so every adapter gradient is exercised
            nn.init.normal_(p, std=0.1)
    return model


def _batch(seed: int = 0, batch: int = 3, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not supervised
    return ids, labels


@pytest.mark.parametrize(
    "config", [FastPathConfig(), FastPathConfig(recompute="all", keep_layers=1)]
)
def test_patched_model_matches_unpatched(config):
    model = _adapted_llama(torch.float64)
    ids, labels = _batch()
    reference = copy.deepcopy(model)
    ref_loss = reference(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    status = enable_fast_path(model, config)
    assert status.enabled, status.reason
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None  # the fused loss never builds the logits
    out.loss.backward()
    # transformers computes the loss in fp32 even for an fp64 model: compare at fp32 precision
    _close(out.loss, ref_loss, 1e-6)
    ref_grads = dict(reference.named_parameters())
    count = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            _close(p.grad, ref_grads[name].grad, 1e-5)
            count += 1
    assert count == 2 * 7 * 2  # A and B on 7 projections in 2 layers


def test_right_padding_and_num_items_match_unpatched():
    model = _adapted_llama(torch.float64, targets=["q_proj", "v_proj"])
    ids, labels = _batch(seed=3)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels[1, 6:] = -100
    ref = copy.deepcopy(model)(
        input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=17
    ).loss
    assert enable_fast_path(model).enabled
    got = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=17).loss
    _close(got, ref, 1e-6)


def test_calls_without_labels_use_the_original_forward():
    model = _adapted_llama()
    ids, _ = _batch()
    before = model(input_ids=ids).logits
    enable_fast_path(model)
    _close(model(input_ids=ids).logits, before, 1e-12)
    left = torch.ones_like(ids)
    left[0, :2] = 0  # left padding: generic path, same loss as before patching
    ref = model._lorakit_generic_forward(input_ids=ids, attention_mask=left, labels=ids).loss
    _close(model(input_ids=ids, attention_mask=left, labels=ids).loss, ref, 1e-12)
    disable_fast_path(model)
    assert "forward" not in model.__dict__


def test_unsupported_setups_are_refused_with_a_reason():
    from conftest import tiny_gpt2

    gpt2 = tiny_gpt2()
    status = enable_fast_path(gpt2)
    assert not status.enabled and "GPT2LMHeadModel" in status.reason
    assert "forward" not in gpt2.__dict__
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert "DoRA" in supported(model)
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], dropout=0.1))
    assert "dropout" in supported(model)
    model.eval()
    assert supported(model) is None  # dropout is off in eval mode


def test_qwen3_matches_unpatched():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(config).double().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    ids, labels = _batch()
    ref = copy.deepcopy(model)(input_ids=ids, labels=labels).loss
    assert enable_fast_path(model).enabled
    _close(model(input_ids=ids, labels=labels).loss, ref, 1e-6)


def test_training_loss_sum_matches_generic_path():
    from lorakit.data.sft import IGNORE
    from lorakit.train.objectives.sft import compute_loss

    model = _adapted_llama(torch.float64)
    ids, labels = _batch(seed=5)
    labels[labels == -100] = IGNORE
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    reference = copy.deepcopy(model)
    ref_sum, ref_count = compute_loss(reference, batch)
    assert enable_fast_path(model).enabled
    got_sum, got_count = compute_loss(model, batch)
    assert got_count == ref_count
    _close(got_sum, ref_sum, 1e-6)
    # packed rows: the fast path's variable-length attention, the generic path's block mask
    packed = dict(batch, position_ids=torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5]).expand_as(ids))
    from lorakit.train.fastpath import fused_loss_sum

    ref_packed, _ = compute_loss(reference, packed)
    got_packed = fused_loss_sum(model, ids, labels, packed["position_ids"])
    _close(got_packed, ref_packed, 1e-6)
    assert float((got_packed - got_sum).abs()) > 1e-3  # the packing changed the loss


_FSDP_SCRIPT = """
import os, torch, torch.distributed as dist
from conftest import tiny_llama
import lorakit
from lorakit.train.fastpath import supported
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
model = tiny_llama().train()
lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
assert supported(model) is None
for layer in model.model.layers:
    fully_shard(layer)
print("REASON", supported(model))
dist.destroy_process_group()
"""


def test_fsdp2_sharded_layers_take_the_generic_path(tmp_path):
    # The fused decoder calls the layers' pieces directly, so FSDP2's per-layer all-gather
    # (a forward hook of each layer) would never run: sharded layers must be refused.
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tests = Path(__file__).parent
    path = os.pathsep.join(p for p in (str(tests), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PORT": str(port), "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-c", _FSDP_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REASON the decoder layers are sharded (FSDP2)" in out.stdout


def _fast_path_run(config: FastPathConfig | None, nf4: bool):
    """Loss and every adapter gradient of one step; config None: the unpatched model."""
    dtype = torch.float32 if nf4 else torch.float64
    model = _adapted_llama(dtype)  # same seeds: the same weights on every call
    if nf4:
        from lorakit.base.quant import quantize_model

        quantize_model(model, "nf4", compute_dtype=torch.float32)
    if config is not None:
        assert enable_fast_path(model, config).enabled
    ids, labels = _batch(seed=11)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 7 * 2 and all(g is not None for g in grads.values())
    return loss.detach(), grads


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize(
    "recompute,keep_layers", [("none", 0), ("all", 0), ("all", 1)], ids=["none", "all", "keep1"]
)
def test_save_intermediates_gives_the_same_loss_and_gradients(recompute, keep_layers, nf4):
    if nf4:
        pytest.importorskip("bitsandbytes")
    ref_loss, ref_grads = _fast_path_run(None, nf4)
    runs = {
        save: _fast_path_run(
            FastPathConfig(recompute=recompute, keep_layers=keep_layers, save_intermediates=save),
            nf4,
        )
        for save in (None, True, False)
    }
    # kept or recomputed, the same ops on the same inputs: bit for bit the same
    for save in (None, True):
        assert torch.equal(runs[save][0], runs[False][0])
        for name, grad in runs[False][1].items():
            assert torch.equal(runs[save][1][name], grad), name
    # and the generic path (bitsandbytes' own 4-bit matmul for NF4; transformers' fp32 loss)
    tol = 1e-5 if nf4 else 1e-6
    _close(runs[True][0], ref_loss, tol)
    for name, grad in runs[True][1].items():
        _close(grad, ref_grads[name], 10 * tol)


def _saved_bytes(config: FastPathConfig) -> int:
    """Bytes the autograd graph saves outside checkpointed layers during one forward."""
    model = _adapted_llama()
    assert enable_fast_path(model, config).enabled
    ids, labels = _batch()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels).loss.backward()
    return total


def test_save_intermediates_keeps_more_only_where_asked():
    none = {
        s: _saved_bytes(FastPathConfig(recompute="none", save_intermediates=s))
        for s in (None, True, False)
    }
    # per layer: the normalised x twice (T x d) and the SwiGLU product (T x intermediate), fp32
    tokens, d, inter, layers = 3 * 9, 32, 64, 2
    assert none[True] - none[False] == layers * tokens * (2 * d + inter) * 4
    assert none[None] == none[True]  # auto keeps them when nothing is recomputed
    keep1 = {
        s: _saved_bytes(FastPathConfig(recompute="all", keep_layers=1, save_intermediates=s))
        for s in (None, True, False)
    }
    assert keep1[True] - keep1[False] == tokens * (2 * d + inter) * 4  # the one kept layer
    assert keep1[None] == keep1[False]  # with checkpointing on, auto does not


@pytest.mark.parametrize("nf4", [False, True])
def test_recompute_skips_the_down_projection_and_changes_no_gradient(nf4, monkeypatch):
    # checkpoint's recompute rebuilds what the backward reads; the down projection's output
    # is not among it, so its base matmul (with the residual add) runs once per layer, in
    # the forward only, while the gradients equal those of a run that recomputes nothing
    if nf4:
        pytest.importorskip("bitsandbytes")
    from lorakit.train.fastpath import lora_linear

    calls = {"down": 0}
    addmm = torch.addmm

    def counting(residual, x, weight_t, *args, **kwargs):
        if x.shape[1] == 64:  # (T, intermediate) @ (intermediate, d): the down projection
            calls["down"] += 1
        return addmm(residual, x, weight_t, *args, **kwargs)

    monkeypatch.setattr(lora_linear.torch, "addmm", counting)
    plain_loss, plain_grads = _fast_path_run(FastPathConfig(recompute="none"), nf4)
    assert calls["down"] == 2  # two layers
    calls["down"] = 0
    loss, grads = _fast_path_run(FastPathConfig(recompute="all"), nf4)
    assert calls["down"] == 2  # not four: the recompute skipped them
    assert torch.equal(loss, plain_loss)
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name


def test_save_intermediates_rejects_other_values():
    with pytest.raises(ValueError, match="save_intermediates .* got 'yes'"):
        FastPathConfig(save_intermediates="yes")
