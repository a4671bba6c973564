"""LoRA / QLoRA training speed on one GPU: lorakit's fast path against PEFT, side by side.

    python bench/train_gpu.py                 # the issue's cases (about 7 minutes on an H200), then the table
    python bench/train_gpu.py --cases 8b-peft,8b-lorakit --steps 8 --warmup 3
    python bench/train_gpu.py --cases 8b-qlora-lorakit-keep16,profile:8b-qlora-lorakit-keep16 --diagnose

Random-init Llama-shaped models built on the GPU (nothing is downloaded): 8B (hidden 4096,
MLP 14336, 32 layers, 32/8 heads, vocab 128256; batch 4 x 2048; gradient checkpointing)
and 1B (hidden 2048, MLP 8192, 16 layers, 32/8 heads; batch 8 x 2048; no checkpointing).
LoRA r=16, alpha 16, dropout 0 on q,k,v,o,gate,up,down; bf16 base, AdamW; tokens/s is
the median over `--steps` steps after `--warmup` steps; peak GiB is
torch.cuda.max_memory_allocated over the training steps (weights included).
Cases run in three processes: PEFT eager then PEFT + Liger (Liger patches transformers
globally, so it goes last), PEFT + whole-model compile, lorakit (and `check`); the per-layer
compile cases, when asked for, in a fourth. `*-peft-compile` compiles each decoder layer;
`*-peft-compile-model` compiles the whole PeftModel (`torch.compile(model)`, the issue's
baseline; minutes of compile, in the warm-up steps). `-keepK`: the last K layers keep their
activations; `1b-lorakit-nosave`: layers recompute their normalised inputs and SwiGLU
product in the backward (`FastPathConfig.save_intermediates=False`).
`8b-lorakit-keep9-varlen` warms up on shorter batches first, as training on rows of
varied length does, so its compiled kernels are the ones compiled for any length.
`--cases compile-bar` runs only the long-tailed bar against PEFT + whole-model compile:
`8b-lorakit-packed` and `8b-peft-compile-model-padded-b4-buckets`, PEFT's batches grouped by
length (transformers' `group_by_length`) and padded to a few fixed widths (`BUCKETS`), compiled
with `dynamic=False` and warmed up twice per width, so that nothing compiles while timed.
Compiled kernels are cached on disk (`--compile-cache`), so a second invocation on the same
machine skips most of the compile time.
`--cases check` compares the fused GPU kernels with their PyTorch references and the
loss curve of the fast path with lorakit's generic path; `profile:<case>` profiles two
steps of a case; `--diagnose` adds, per case, the host's time to issue a step, the
allocator's device allocations and frees, and the synchronizing calls of one step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, batch=4, checkpointing=True
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, batch=8, checkpointing=False
    ),
}
SEQ = 2048
VOCAB = 128256
DEVICE = "cuda"  # the CPU only for a dry run of this script (tiny shapes, see --dry-run)
COMPILE_BACKEND = "inductor"  # the dry run checks the plumbing only: aot_eager, no C++ build

# name -> (shape, stack, quantized, options); the order is the run order
CASES = {
    "8b-peft": ("8b", "peft", False, {}),
    "8b-peft-compile": ("8b", "peft", False, {"compile": True}),
    "8b-peft-compile-model": ("8b", "peft", False, {"compile": "model"}),
    "8b-peft-liger": ("8b", "peft", False, {"liger": True}),
    "8b-lorakit-eager": ("8b", "lorakit", False, {"compile": False}),
    "8b-lorakit": ("8b", "lorakit", False, {}),
    "8b-lorakit-keep1": ("8b", "lorakit", False, {"keep_layers": 1}),
    "8b-lorakit-keep6": ("8b", "lorakit", False, {"keep_layers": 6}),
    "8b-lorakit-keep8": ("8b", "lorakit", False, {"keep_layers": 8}),
    "8b-lorakit-keep9": ("8b", "lorakit", False, {"keep_layers": 9}),
    "8b-lorakit-keep10": ("8b", "lorakit", False, {"keep_layers": 10}),
    "8b-lorakit-keep14": ("8b", "lorakit", False, {"keep_layers": 14}),
    "8b-lorakit-keep9-varlen": ("8b", "lorakit", False, {"keep_layers": 9, "varlen": True}),
    "8b-qlora-peft": ("8b", "peft", True, {}),
    "8b-qlora-peft-liger": ("8b", "peft", True, {"liger": True}),
    "8b-qlora-lorakit": ("8b", "lorakit", True, {}),
    "8b-qlora-lorakit-keep1": ("8b", "lorakit", True, {"keep_layers": 1}),
    "8b-qlora-lorakit-keep14": ("8b", "lorakit", True, {"keep_layers": 14}),
    "8b-qlora-lorakit-keep16": ("8b", "lorakit", True, {"keep_layers": 16}),
    "1b-peft": ("1b", "peft", False, {}),
    "1b-peft-compile": ("1b", "peft", False, {"compile": True}),
    "1b-peft-compile-model": ("1b", "peft", False, {"compile": "model"}),
    "1b-lorakit-eager": ("1b", "lorakit", False, {"compile": False}),
    # FastPathConfig's default with checkpointing off keeps the normalised inputs and the
    # SwiGLU product; -nosave recomputes them in the backward (less memory)
    "1b-lorakit": ("1b", "lorakit", False, {}),
    "1b-lorakit-nosave": ("1b", "lorakit", False, {"save_intermediates": False}),
    # Long-tailed chat lengths (bench/longtail.py), loss on replies, tokens/s counting real
    # tokens only. PEFT: a plain loop over padded batches of `batch` random examples (right
    # padding, attention mask); -compile-model pads to a multiple of 256 (fewer recompiles).
    # lorakit: `lorakit train`'s own path: padding-free token-budget batches (lorakit.data.packing),
    # settings from --memory auto under `memory_limit` GiB (lorakit.train.memory), the recipe's loss.
    "8b-peft-padded-b2": ("8b", "peft", False, {"data": "longtail", "batch": 2}),
    "8b-peft-padded-b4": ("8b", "peft", False, {"data": "longtail", "batch": 4}),
    "8b-peft-padded-b8": ("8b", "peft", False, {"data": "longtail", "batch": 8}),
    "8b-peft-compile-model-padded-b4": ("8b", "peft", False, {"data": "longtail", "batch": 4, "compile": "model"}),
    # the same, compiled once per padded width (BUCKETS) in the warm-up: batches grouped by length
    "8b-peft-compile-model-padded-b4-buckets": (
        "8b", "peft", False, {"data": "longtail", "batch": 4, "compile": "model", "buckets": True}),
    "8b-lorakit-packed": ("8b", "lorakit", False, {"data": "longtail", "memory_limit": 24.0, "tokens": 8192}),
    "8b-lorakit-packed-16k": ("8b", "lorakit", False, {"data": "longtail", "memory_limit": 24.0, "tokens": 16384}),
    # the fixed-length case (4 x 2048) with --memory auto under PEFT's 31.3 GiB
    "8b-lorakit-auto": ("8b", "lorakit", False, {"memory_limit": 31.3}),
    "1b-peft-padded-b4": ("1b", "peft", False, {"data": "longtail", "batch": 4}),
    "1b-peft-padded-b8": ("1b", "peft", False, {"data": "longtail", "batch": 8}),
    "1b-peft-padded-b16": ("1b", "peft", False, {"data": "longtail", "batch": 16}),
    "1b-lorakit-packed": ("1b", "lorakit", False, {"data": "longtail", "tokens": 16384}),
}

# `--cases all`: the stacks, the lorakit rows the bars pick (the fastest within each
# stack's memory) and the kernel check; about 7 minutes on an H200. The other cases
# (per-layer compile, eager lorakit, keep 0 and other keeps) run by name.
ALL = [
    "8b-peft",
    "8b-peft-liger",
    "8b-qlora-peft",
    "8b-qlora-peft-liger",
    "1b-peft",
    "8b-peft-compile-model",
    "1b-peft-compile-model",
    "8b-lorakit-keep1",
    "8b-lorakit-keep8",
    "8b-lorakit-keep9",
    "8b-lorakit-keep14",
    "8b-qlora-lorakit-keep1",
    "8b-qlora-lorakit-keep16",
    "1b-lorakit",
    "check",
]

# `--cases compile-bar`: the long-tailed data's bar against PEFT + whole-model compile, alone
COMPILE_BAR = ["8b-lorakit-packed", "8b-peft-compile-model-padded-b4-buckets"]
BUCKETS = (512, 1024, 2048, 4096)
"""Padded widths of the bucketed compiled baseline (4,096: the longest example). With batches
grouped by length, 50% of its padded tokens are real on the timed examples, against 46% for
random batches padded to a multiple of 256 (the other compiled case)."""
MEGABATCH = 50
"""Batches per length-sorted group, as transformers' LengthGroupedSampler forms them."""

# (lorakit rows, the stack compared with, the bar)
BARS = [
    ("8b-lorakit", "8b-peft", 2.0),
    ("8b-lorakit", "8b-peft-compile", 1.4),
    ("8b-lorakit", "8b-peft-compile-model", 1.4),
    ("8b-lorakit", "8b-peft-liger", 1.5),
    ("8b-qlora-lorakit", "8b-qlora-peft", 2.0),
    ("8b-qlora-lorakit", "8b-qlora-peft-liger", 1.5),
    ("1b-lorakit", "1b-peft", 2.0),
    ("1b-lorakit", "1b-peft-compile", 1.4),
    ("1b-lorakit", "1b-peft-compile-model", 1.4),
]
# the long-tailed data's bars: (lorakit row, PEFT rows (the best within `limit` GiB), bar, limit)
DATA_BARS = [
    ("8b-lorakit-packed", "8b-peft-padded-b", 3.0, 40.0),
    ("8b-lorakit-packed", "8b-peft-compile-model-padded-b", 2.0, 40.0),
    ("8b-lorakit-auto", "8b-peft", 2.0, None),
    ("1b-lorakit-packed", "1b-peft-padded-b", 2.5, None),
]
DATA_SEED = 0


def bucket_width(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `length` tokens."""
    for width in buckets:
        if length <= width:
            return width
    raise ValueError(f"a batch of {length} tokens is longer than the largest bucket ({buckets[-1]})")


def length_grouped(lengths: list[int], batch: int, seed: int, megabatch: int = MEGABATCH) -> list[list[int]]:
    """Indices in batches of `batch`, grouped by length as transformers' Trainer does with
    group_by_length=True: a seeded shuffle cut into groups of `megabatch` batches, each group
    sorted longest first, so a batch's rows have similar lengths (little padding)."""
    import torch

    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    size = megabatch * batch
    batches = []
    for start in range(0, len(order), size):
        group = sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches += [group[i : i + batch] for i in range(0, len(group), batch)]
    return batches


def build_model(shape: str, quantized: bool, liger: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    s = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=SEQ,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    if quantized:
        quantize_nf4(model)
    model.train()
    return model


def drop_input_grad_hooks(model) -> None:
    """Remove the hook transformers and PEFT each put on the embeddings, which calls
    requires_grad_() on their output: a graph break for torch.compile, and not needed with
    non-reentrant checkpointing (each enable_input_require_grads() call adds one and
    forgets the last, so this runs after each)."""
    try:
        model.disable_input_require_grads()
    except AttributeError:  # older transformers raise when none is registered
        pass


def quantize_nf4(model) -> None:
    """NF4, double-quantized, bf16 compute: every linear layer of the decoder (not the head)."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                # Params4bit quantizes when moved to the GPU (its data is still the bf16 weight)
                q.weight = bnb.nn.Params4bit(
                    child.weight.data,
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                ).to("cuda")
                setattr(parent, name, q)
    torch.cuda.empty_cache()


def run_case(
    name: str, steps: int, warmup: int, profile: bool = False, diagnose: bool = False
) -> dict:
    import torch

    shape, stack, quantized, opts = CASES[name]
    if opts.get("data") or opts.get("memory_limit"):
        return run_data_case(name, warmup, diagnose)
    s = SHAPES[shape]
    model = build_model(shape, quantized and stack == "peft", opts.get("liger", False))
    info = ""
    if stack == "peft":
        import peft

        whole = opts.get("compile") == "model"
        if s["checkpointing"]:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            if whole:
                drop_input_grad_hooks(model)
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
            ),
        )
        if whole:
            drop_input_grad_hooks(model.base_model.model)
            # the baseline: the whole PeftModel, which is what the step below calls
            # (PeftModel -> LoraModel -> LlamaForCausalLM, each through __call__); compile time
            # falls in the warm-up steps
            # use_cache off: transformers' "use_cache=True is incompatible with gradient
            # checkpointing" warning is a graph break inside PEFT's forward-hook context
            # manager, which makes dynamo run PeftModel's whole forward frame eagerly
            model.config.use_cache = False
            model = torch.compile(model, backend=COMPILE_BACKEND)
            info = "whole-model torch.compile"
        elif opts.get("compile"):
            for layer in model.base_model.model.model.layers:
                layer.compile(backend=COMPILE_BACKEND)
            info = "per-layer torch.compile"
    else:
        import lorakit
        from lorakit.train.fastpath import FastPathConfig, enable_fast_path

        for p in model.parameters():
            p.requires_grad_(False)
        lorakit.inject(
            model, lorakit.LoraConfig(r=16, alpha=16, dropout=0.0, target_modules=TARGETS)
        )
        if quantized:  # lorakit's own NF4 base (double-quantized, bf16 compute), under the adapters
            from lorakit.base.quant import quantize_model

            quantize_model(model, "nf4", compute_dtype=torch.bfloat16)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        config = FastPathConfig(
            recompute="all" if s["checkpointing"] else "none",
            keep_layers=opts.get("keep_layers", 0),
            compile=opts.get("compile", True),
            save_intermediates=opts.get("save_intermediates"),
        )
        status = enable_fast_path(model, config)
        if not status.enabled:
            raise SystemExit(f"fast path refused: {status.reason}")
        info = status.reason
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ids = torch.randint(0, VOCAB, (s["batch"], SEQ), device=DEVICE, generator=g)
    cuda = DEVICE == "cuda"

    def step(length: int = SEQ) -> torch.Tensor:
        loss = model(input_ids=ids[:, :length], labels=ids[:, :length]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, issued, losses = [], [], []
    for i in range(warmup + steps):
        if i == warmup and cuda:
            stats0 = torch.cuda.memory_stats()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # -varlen: the warm-up steps see other lengths first, as batches padded to their
        # longest row do; the compiled kernels then serve any length
        varied = opts.get("varlen") and i < warmup
        length = max(SEQ // 2, SEQ - 32 * (warmup - i)) if varied else SEQ
        loss = step(length)
        issued.append(time.perf_counter() - t0)  # the host has queued the whole step
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    step_s = statistics.median(times[warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    result = {
        "case": name,
        "tokens_per_s": s["batch"] * SEQ / step_s,
        "peak_gib": peak,
        "step_s": step_s,
        "host_s": statistics.median(issued[warmup:]),
        "first_step_s": times[0],
        "loss0": losses[0],
        "losses": losses,
        "trainable": sum(p.numel() for p in trainable),
        "info": info,
    }
    if diagnose and cuda:
        stats1 = torch.cuda.memory_stats()
        for key in ("num_device_alloc", "num_device_free", "num_alloc_retries"):
            result[key] = stats1.get(key, 0) - stats0.get(key, 0)
        result["sync_sites"] = sync_sites(step)
    if profile:
        write_profile(name, step)
    return result


def peft_model(model, checkpointing: bool, whole_compile: bool, dynamic: bool | None = True):
    """PEFT as its documentation sets it up: bf16 base, fp32 adapters, non-reentrant
    gradient checkpointing (which makes PEFT call enable_input_require_grads)."""
    import peft
    import torch

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if whole_compile:
            drop_input_grad_hooks(model)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    if whole_compile:
        drop_input_grad_hooks(model.base_model.model)
        model.config.use_cache = False
        # dynamic=True: padded batches come in many widths; False: a few fixed widths (buckets),
        # each compiled once
        model = torch.compile(model, backend=COMPILE_BACKEND, dynamic=dynamic)
    return model


def run_data_case(name: str, warmup: int, diagnose: bool = False) -> dict:
    """A case on long-tailed chat lengths (or, with only `memory_limit`, the fixed-length
    batch under --memory auto): warm-up batches from one draw of examples, then every batch of
    another draw, timed as a whole; tokens/s counts real (non-pad) tokens."""
    import torch

    import longtail
    import lorakit
    from lorakit.data.packing import layout
    from lorakit.data.sft import collate
    from lorakit.train.fastpath import enable_fast_path
    from lorakit.train.memory import after_first_step, fit_for_training
    from lorakit.train.objectives.sft import compute_loss

    shape, stack, _quantized, opts = CASES[name]
    s = SHAPES[shape]
    cuda = DEVICE == "cuda"
    model = build_model(shape, False, False)
    measure = {"8b": 240, "1b": 480}[shape] if cuda else 12
    if opts.get("data"):
        # every stack times the same examples (draws 60 .. 60 + measure) after warming up on the
        # first 60; lorakit on 140 more: its compiled kernels settle on dynamic shapes after a
        # few distinct batch lengths
        extra = 140 if stack == "lorakit" else 0
        examples = longtail.token_examples(60 + measure + extra, DATA_SEED, VOCAB, clip=2 * SEQ)  # 4096 on the GPU
        timed, warm = examples[60 : 60 + measure], examples[:60] + examples[60 + measure :]
    else:  # the fixed-length batch: rows of SEQ tokens, all supervised
        from lorakit.data.sft import Example

        g = torch.Generator().manual_seed(1)
        rows = [torch.randint(0, VOCAB, (SEQ,), generator=g).tolist() for _ in range(s["batch"] * (warmup + 8))]
        examples = [Example(r, list(r)) for r in rows]
        warm, timed = examples[: s["batch"] * warmup], examples[s["batch"] * warmup :]
    fitted = None
    if stack == "peft":
        whole = opts.get("compile") == "model"
        buckets = tuple(max(8, w * SEQ // 2048) for w in BUCKETS) if opts.get("buckets") else None  # dry run: smaller
        model = peft_model(model, s["checkpointing"], whole, dynamic=False if buckets else True)
        info = "PEFT" + (" + whole-model torch.compile" if whole else "") + (", checkpointing" if s["checkpointing"] else "")
        if buckets:
            info += f", batches grouped by length, padded to {', '.join(map(str, buckets))}"
        multiple = 256 if whole else 1

        def batches(exs, widths=None):
            b = opts["batch"]
            if buckets and widths is None:
                groups = length_grouped([len(e.input_ids) for e in exs], b, DATA_SEED)
            else:
                groups = [list(range(i, min(i + b, len(exs)))) for i in range(0, len(exs), b)]
            for k, members in enumerate(widths or groups):
                if widths is not None:  # the warm-up: a batch at each of `widths`, rows cut to fit
                    # (every token supervised: a cut row may have lost its whole reply)
                    rows = exs[k * b : (k + 1) * b] if (k + 1) * b <= len(exs) else exs[:b]
                    group = [lorakit.data.sft.TokenRow(e.input_ids[:members], e.input_ids[:members], list(range(len(e.input_ids[:members]))))
                             for e in rows]
                else:
                    group = [lorakit.data.sft.TokenRow(exs[i].input_ids, exs[i].labels, list(range(len(exs[i].input_ids))))
                             for i in members]
                longest = max(len(r.input_ids) for r in group)
                width = members if widths is not None else (
                    bucket_width(longest, buckets) if buckets else -(-longest // multiple) * multiple)
                batch = collate(group, pad_id=0)
                pad = width - batch["input_ids"].shape[1]
                mask = torch.zeros((len(group), width), dtype=torch.long)
                for j, r in enumerate(group):
                    mask[j, : len(r.input_ids)] = 1
                ids = torch.nn.functional.pad(batch["input_ids"], (0, pad))
                labels = torch.nn.functional.pad(batch["labels"], (0, pad), value=-100)
                yield {"input_ids": ids, "attention_mask": mask, "labels": labels}

        def step(batch):
            batch = {k: v.to(DEVICE, non_blocking=True) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            return loss
    else:
        model.requires_grad_(False)
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=16, dropout=0.0, target_modules=TARGETS))
        tokens = opts.get("tokens", s["batch"] * SEQ)
        fast_config = None
        if cuda:
            torch.cuda.empty_cache()
            fitted = fit_for_training(model, torch.device(DEVICE), "auto", opts.get("memory_limit"), tokens, SEQ)
            fast_config = fitted.config
        status = enable_fast_path(model, fast_config)
        if not status.enabled:
            raise SystemExit(f"fast path refused: {status.reason}")
        info = status.reason + (f"; {fitted.summary()}" if fitted else "")
        packed = bool(opts.get("data"))
        cap = fitted.choice.tokens if fitted else None

        def batches(exs):
            if not packed:
                for i in range(0, len(exs), s["batch"]):
                    group = exs[i : i + s["batch"]]
                    yield collate([lorakit.data.sft.TokenRow(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in group], 0)
                return
            plan = layout(exs, packing=None, tokens_per_batch=tokens, seq_len=SEQ * 2, batch_size=1, seed=DATA_SEED,
                          padding_free=True, budget_cap=cap)
            for row in plan.rows:
                yield collate([row], 0)

        def step(batch):
            batch = {k: v.to(DEVICE, non_blocking=True) for k, v in batch.items()}
            loss_sum, count = compute_loss(model, batch)
            loss = loss_sum / max(count, 1)
            loss.backward()
            return loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    losses, t_first, compiled_at_start = [], time.perf_counter(), compile_count()
    # the bucketed baseline warms up twice per width (the first step at each compiles); the others on `warm`
    warm_batches = batches(warm, widths=2 * list(buckets)) if stack == "peft" and buckets else batches(warm)
    for i, batch in enumerate(warm_batches):
        losses.append(float(step(batch)))
        optimizer_step()
        if i == 0:
            first_step_s = time.perf_counter() - t_first
            if fitted is not None:
                after_first_step(fitted, torch.device(DEVICE), batch["input_ids"].numel())
    if cuda:
        torch.cuda.synchronize()
    compiled_before = compile_count()
    real = sum(len(e.input_ids) for e in timed)
    supervised = sum(sum(1 for x in e.labels[1:] if x != -100) for e in timed)
    padded = 0
    t0 = time.perf_counter()
    n = 0
    for batch in batches(timed):
        padded += batch["input_ids"].numel()
        losses.append(float(step(batch)))
        optimizer_step()
        n += 1
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {
        "case": name,
        "tokens_per_s": real / wall,
        "peak_gib": peak,
        "step_s": wall / max(n, 1),
        "steps": n,
        "real_tokens": real,
        "supervised_tokens": supervised,
        "padded_tokens": padded,
        "first_step_s": first_step_s,
        "loss0": losses[0],
        "losses": losses,
        "trainable": sum(p.numel() for p in trainable),
        "keep_layers": fitted.choice.keep_layers if fitted else None,
        "tokens_per_batch": fitted.choice.tokens if fitted else None,
        "compiled_in_warmup": compiled_before - compiled_at_start,
        "compiled_while_timed": compile_count() - compiled_before,
        "info": info,
    }


def compile_count() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def sync_sites(step) -> dict[str, int]:
    """Where one step makes the host wait for the GPU: call sites of synchronizing CUDA calls."""
    import warnings
    from collections import Counter

    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return dict(
        Counter(
            f"{Path(w.filename).name}:{w.lineno}"
            for w in caught
            if "synchroniz" in str(w.message).lower()
        )
    )


def write_profile(name: str, step) -> None:
    """Two steps under the profiler: kernels by total GPU time, time per kind of kernel, and
    how much of the steps' wall time the GPU was busy."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = max(sum(e.self_device_time_total for e in events), 1)
    kinds: dict[str, float] = {}
    for e in events:
        key = e.key.lower()
        kind = (
            "attention"
            if ("flash" in key or "fmha" in key or "cudnn" in key or "attention" in key)
            else "gemm"
            if (
                "gemm" in key
                or "sm90" in key
                or "cutlass" in key
                or "xmma" in key
                or "matmul" in key
            )
            else "triton (fused elementwise)"
            if "triton" in key
            else "other"
        )
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total
    lines = [
        f"profile of {name}: 2 steps, {total / 2e3:.1f} ms GPU time per step in "
        f"{wall * 500:.1f} ms of wall time per step (profiled)"
    ]
    lines += [
        f"  {k:28s} {v / 2e3:8.1f} ms/step  {100 * v / total:5.1f}%"
        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
    ]
    lines.append(
        prof.key_averages().table(
            sort_by="self_device_time_total", row_limit=30, max_name_column_width=90
        )
    )
    print("\n".join("PROFILE " + line for line in lines), flush=True)
    text = "\n".join(lines)
    out = Path(os.environ.get("OUT", "bench/out"))
    (out / f"profile-{name}.txt").write_text(text)


def attention_backends() -> dict:
    """SDPA forward + backward at the 8B shape (4 x 2048, 32 query / 8 KV heads, head 128) per backend."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(4, 32, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(4, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(4, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = {}
    for label, backend, gqa in (
        ("flash_gqa", SDPBackend.FLASH_ATTENTION, True),
        ("flash_expanded", SDPBackend.FLASH_ATTENTION, False),
        ("cudnn_gqa", SDPBackend.CUDNN_ATTENTION, True),
        ("cudnn_expanded", SDPBackend.CUDNN_ATTENTION, False),
    ):

        def step(gqa=gqa, backend=backend):
            kk, vv = (k, v) if gqa else (k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
            o.backward(torch.ones_like(o))

        try:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                step()
            torch.cuda.synchronize()
            out[label + "_ms"] = (time.perf_counter() - t0) * 100
        except Exception as exc:  # report which backends refuse this shape
            out[label + "_ms"] = f"refused: {str(exc)[:100]}"
    return out


def check() -> dict:
    """Fused GPU kernels against their PyTorch references (fp32 on upcast inputs), and loss curves."""
    import torch
    from torch import nn

    import lorakit
    from lorakit.train.fastpath.elementwise import (
        rms_norm,
        rms_norm_reference,
        rope,
        rope_reference,
        swiglu,
        swiglu_reference,
    )
    from lorakit.train.fastpath.lora_linear import (
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

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    def grads(fn, inputs):
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(5)
        w = [torch.randn_like(o) for o in outs]
        leaves = [t for t in inputs if t.requires_grad]
        gs = torch.autograd.grad(
            sum((o.float() * x.float()).sum() for o, x in zip(outs, w, strict=False)), leaves
        )
        return outs, gs

    def compare(name, fused, ref, inputs):
        up = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
        o1, g1 = grads(fused, inputs)
        o2, g2 = grads(ref, up)
        errs = [rel(a, b) for a, b in zip(o1, o2, strict=False)] + [
            rel(a, b) for a, b in zip(g1, g2, strict=False)
        ]
        results[name] = max(errs)

    results: dict[str, float] = {}
    dev, bf = DEVICE, torch.bfloat16
    D, F, S = (4096, 14336, 2048) if DEVICE == "cuda" else (128, 256, 64)  # dry run: small
    torch.manual_seed(0)
    x = torch.randn(D, D, device=dev, dtype=bf, requires_grad=True)
    w = torch.randn(D, device=dev, dtype=bf, requires_grad=True)
    compare(
        "rms_norm",
        lambda a, b: rms_norm(a, b, 1e-5),
        lambda a, b: rms_norm_reference(a, b, 1e-5),
        [x, w],
    )
    gt = torch.randn(D, F, device=dev, dtype=bf, requires_grad=True)
    ut = torch.randn(D, F, device=dev, dtype=bf, requires_grad=True)
    compare("swiglu", swiglu, swiglu_reference, [gt, ut])
    q = torch.randn(2, S, 32, 128, device=dev, dtype=bf, requires_grad=True)
    ang = torch.rand(1, S, 64, device=dev) * 100
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    compare(
        "rope",
        lambda t: rope(t, cos.to(bf), sin.to(bf)),
        lambda t: rope_reference(t, cos, sin),
        [q],
    )
    h = torch.randn(3000, D, device=dev, dtype=bf, requires_grad=True)
    head = (torch.randn(VOCAB, D, device=dev) * 0.02).to(bf)
    tgt = torch.randint(0, VOCAB, (3000,), device=dev)
    compare(
        "linear_cross_entropy",
        lambda a: linear_cross_entropy(a, head, tgt),
        lambda a: linear_cross_entropy_reference(a, head.float(), tgt),
        [h],
    )

    for quantized in (False, True):
        mods = []
        for out in (D, D // 4, D // 4):
            lin = nn.Linear(D, out, bias=False, device=dev, dtype=bf)
            nn.init.normal_(lin.weight, std=0.02)
            if quantized:
                import bitsandbytes as bnb

                q4 = bnb.nn.Linear4bit(
                    D, out, bias=False, compute_dtype=bf, quant_type="nf4", device="meta"
                )
                q4.weight = bnb.nn.Params4bit(
                    lin.weight.data.cpu(), requires_grad=False, quant_type="nf4"
                ).to(dev)
                lin = q4
            layer = lorakit.LoraLinear(lin)
            layer.add("default", r=16, alpha=16, dropout=0.0, use_rslora=False, use_dora=False)
            nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
            layer.set_active(["default"])
            mods.append(Projection(layer, "default"))
        xin = torch.randn(D, D, device=dev, dtype=bf, requires_grad=True)
        params = [xin] + [t for p in mods for t in (p.lora_a(), p.lora_b())]
        up = xin.detach().float().requires_grad_()
        o1, g1 = grads(lambda *_, xin=xin, mods=mods: lora_group(xin, mods), params)
        o2, g2 = grads(
            lambda *_, up=up, mods=mods: lora_group_reference(up, mods), [up] + params[1:]
        )
        results["lora_group_qkv" + ("_nf4" if quantized else "")] = max(
            [rel(a, b) for a, b in zip(o1, o2, strict=False)]
            + [rel(a, b) for a, b in zip(g1, g2, strict=False)]
        )
    down = mods[0]  # a (D -> D) projection with an adapter, NF4 base
    gg = torch.randn(D, D, device=dev, dtype=bf, requires_grad=True)
    uu = torch.randn(D, D, device=dev, dtype=bf, requires_grad=True)
    up_g, up_u = gg.detach().float().requires_grad_(), uu.detach().float().requires_grad_()
    hh = torch.randn(D, D, device=dev, dtype=bf, requires_grad=True)
    nw = (1 + 0.1 * torch.randn(D, device=dev)).to(bf).requires_grad_()
    up_h, up_w = hh.detach().float().requires_grad_(), nw.detach().float().requires_grad_()
    # "_kept": the normalised x and the SwiGLU product saved rather than recomputed
    for suffix, keep in (("", KEEP_NOTHING), ("_kept", Keep(activations=True))):
        params = [gg, uu, down.lora_a(), down.lora_b()]
        o1, g1 = grads(lambda *_, keep=keep: swiglu_lora(gg, uu, down, keep), params)
        o2, g2 = grads(
            lambda *_: swiglu_lora_reference(up_g, up_u, down), [up_g, up_u] + params[2:]
        )
        results["swiglu_lora_nf4" + suffix] = max(
            [rel(a, b) for a, b in zip(o1, o2, strict=True)]
            + [rel(a, b) for a, b in zip(g1, g2, strict=True)]
        )
        params = [hh, nw] + [t for p in mods for t in (p.lora_a(), p.lora_b())]
        o1, g1 = grads(lambda *_, keep=keep: norm_lora_group(hh, nw, 1e-5, mods, keep), params)
        o2, g2 = grads(
            lambda *_: norm_lora_group_reference(up_h, up_w, 1e-5, mods),
            [up_h, up_w] + params[2:],
        )
        results["norm_lora_group_nf4" + suffix] = max(
            [rel(a, b) for a, b in zip(o1, o2, strict=True)]
            + [rel(a, b) for a, b in zip(g1, g2, strict=True)]
        )
    results.update(packed_checks())
    results.update(loss_curves())
    return results


def packed_checks() -> dict:
    """Packed attention on the device (varlen FlashAttention where available) against each
    sequence alone (fp32 on upcast inputs), and the fast path's loss and adapter gradients on a
    packed row against the model run on each sequence alone (bf16 both, relative to fp32 noise)."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    import longtail
    import lorakit
    from lorakit.data.packing import pack_to_budget
    from lorakit.data.sft import collate
    from lorakit.train.fastpath import FastPathConfig, enable_fast_path, fused_loss_sum
    from lorakit.train.fastpath.attention import (
        Segments,
        backend,
        packed_attention,
        packed_attention_reference,
    )

    out: dict = {"packed_backend": backend(torch.device(DEVICE))}
    lengths = [700, 3, 1200, 45, 2000, 148] if DEVICE == "cuda" else [7, 3, 12, 5]
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)
    seg = Segments(cu, tuple(lengths))
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(total, 32, 128, device=DEVICE, generator=g, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 8, 128, device=DEVICE, generator=g, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 8, 128, device=DEVICE, generator=g, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(total, 32, 128, device=DEVICE, generator=g)
    o = packed_attention(q, k, v, seg, 0.088)
    grads = torch.autograd.grad((o.float() * w).sum(), (q, k, v))
    up = [t.detach().float().requires_grad_() for t in (q, k, v)]
    o_ref = packed_attention_reference(*up, seg, 0.088)
    grads_ref = torch.autograd.grad((o_ref * w).sum(), up)

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm())

    out["packed_attention"] = max([rel(o, o_ref)] + [rel(a, b) for a, b in zip(grads, grads_ref, strict=True)])

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.requires_grad_(False)
    torch.manual_seed(1)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=16, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    examples = longtail.token_examples(12, 3, 32000, clip=2048 if DEVICE == "cuda" else 24)

    alone = 0
    for ex in examples:  # the unpatched model, one sequence at a time
        ids = torch.tensor([ex.input_ids], device=DEVICE)
        logits = model(input_ids=ids).logits[0, :-1].float()
        alone = alone + F.cross_entropy(logits, torch.tensor(ex.labels[1:], device=DEVICE), reduction="sum")
    ref_grads = torch.autograd.grad(alone, [p for p in model.parameters() if p.requires_grad])
    assert enable_fast_path(model, FastPathConfig(recompute="all", keep_layers=1)).enabled
    batch = {k: t.to(DEVICE) for k, t in collate(pack_to_budget(examples, 16384), 0).items()}
    loss = fused_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"])
    got = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    out["packed_loss_vs_alone"] = abs(float(loss) - float(alone)) / abs(float(alone))
    out["packed_grads_vs_alone"] = max(rel(a, b) for a, b in zip(got, ref_grads, strict=True))
    out["packed_tokens"] = int(batch["input_ids"].numel())
    return out


def loss_curves(steps: int = 30) -> dict:
    """A 4-layer 1B-wide model learns one repeated batch: fast path vs lorakit's generic path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.train.fastpath import FastPathConfig, enable_fast_path

    curves = {}
    for fast in (False, True):
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=4,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.requires_grad_(False)
        torch.manual_seed(1)
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=16, target_modules=TARGETS))
        model.train()
        if fast:
            assert enable_fast_path(model, FastPathConfig(recompute="all")).enabled
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        g = torch.Generator(device=DEVICE).manual_seed(2)
        seq = 1024 if DEVICE == "cuda" else 32
        ids = torch.randint(0, 32000, (4, seq), device=DEVICE, generator=g)
        labels = ids.clone()
        labels[:, : seq // 10] = -100
        losses = []
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        curves["fast" if fast else "generic"] = losses
    pairs = list(zip(curves["fast"], curves["generic"], strict=True))
    return {
        # relative to the generic loss, and absolute (the curve falls to near zero: relative
        # differences of tiny losses are bf16 noise)
        "loss_curve_max_rel_diff": max(abs(a - b) / max(abs(b), 0.1) for a, b in pairs),
        "loss_curve_max_abs_diff": max(abs(a - b) for a, b in pairs),
        "loss_curves": curves,
        "loss_first_last_generic": [curves["generic"][0], curves["generic"][-1]],
        "loss_first_last_fast": [curves["fast"][0], curves["fast"][-1]],
    }


def table(rows: list[dict]) -> str:
    by = {r["case"]: r for r in rows if "tokens_per_s" in r}
    lines = [
        "| case | tokens/s | peak GiB | step s | host s | loss0 | vs PEFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error'][:80]} | | | | | |")
            continue
        shape = r["case"].split("-")[0]
        base = by.get(f"{shape}-qlora-peft" if "qlora" in r["case"] else f"{shape}-peft")
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        lines.append(
            f"| {r['case']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {r['step_s']:.3f} "
            f"| {r.get('host_s', float('nan')):.3f} | {r['loss0']:.4f} | {ratio} |"
        )
    lines += [
        "",
        "| bar | lorakit row (fastest within the memory) | ratio | needed | met |",
        "|---|---|---|---|---|",
    ]
    for row, ref, need in BARS:
        if ref not in by:
            continue
        family = [
            r for c, r in by.items() if c.startswith(row) and r["peak_gib"] <= by[ref]["peak_gib"]
        ]
        if not family:
            lines.append(
                f"| {row} vs {ref} | none within {by[ref]['peak_gib']:.1f} GiB | | {need}x | no |"
            )
            continue
        best = max(family, key=lambda r: r["tokens_per_s"])
        ratio = best["tokens_per_s"] / by[ref]["tokens_per_s"]
        lines.append(
            f"| {row} vs {ref} | {best['case']} ({best['peak_gib']:.1f} <= {by[ref]['peak_gib']:.1f} GiB) | {ratio:.2f}x | {need}x | {'yes' if ratio >= need else 'no'} |"
        )
    return "\n".join(lines)


def best_rate(rows: list[dict]) -> float:
    return max(r["tokens_per_s"] for r in rows)


def data_table(rows: list[dict]) -> str:
    """The long-tailed data's rows and bars (real tokens/s; PEFT's best batch within the limit)."""
    by = {r["case"]: r for r in rows if "tokens_per_s" in r}
    lines = [
        "| case | real tokens/s | peak GiB | steps | real / padded tokens | keep_layers | tokens per batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["case"] in CASES and (CASES[r["case"]][3].get("data") or CASES[r["case"]][3].get("memory_limit")):
            if "error" in r:
                lines.append(f"| {r['case']} | failed: {r['error'][:80]} | | | | | |")
                continue
            lines.append(
                f"| {r['case']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {r['steps']} "
                f"| {r['real_tokens'] / max(r['padded_tokens'], 1):.2f} | {r.get('keep_layers')} | {r.get('tokens_per_batch')} |"
            )
    lines += ["", "| bar | lorakit | PEFT (best within the limit) | ratio | needed | met |", "|---|---|---|---|---|---|"]
    for row, ref, need, limit in DATA_BARS:
        peft = [r for c, r in by.items() if (c.startswith(ref) if ref.endswith("-b") else c == ref)
                and (limit is None or r["peak_gib"] <= limit)]
        if row not in by or not peft or not best_rate(peft):
            continue
        best = max(peft, key=lambda r: r["tokens_per_s"])
        ratio = by[row]["tokens_per_s"] / best["tokens_per_s"]
        lines.append(
            f"| {row} vs {ref}* | {by[row]['tokens_per_s']:,.0f} at {by[row]['peak_gib']:.1f} GiB "
            f"| {best['case']}: {best['tokens_per_s']:,.0f} at {best['peak_gib']:.1f} GiB | {ratio:.2f}x | {need}x "
            f"| {'yes' if ratio >= need else 'no'} |"
        )
    return "\n".join(lines)


def dry_run() -> None:
    global DEVICE, SEQ, VOCAB, COMPILE_BACKEND
    DEVICE, SEQ, VOCAB, COMPILE_BACKEND = "cpu", 32, 256, "aot_eager"
    for shape in SHAPES.values():
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, batch=2)


def process_group(name: str) -> str:
    """Which process runs a case. PEFT eager and PEFT + Liger share one (Liger patches
    transformers for the rest of the process, so its cases run last there); the compiled PEFT
    cases run apart from everything else, so their compile caches start empty."""
    if name in ("check", "packed-check", "attention") or name.startswith("profile:"):
        return "lorakit"
    shape, stack, quantized, opts = CASES[name]
    if stack == "peft":
        if opts.get("compile") == "model":
            return "peft-compile-model"
        return "peft-compile" if opts.get("compile") else "peft"
    return "lorakit"


def run_in_this_process(names: list[str], steps: int, warmup: int, diagnose: bool) -> None:
    import gc
    import traceback

    last_shape = None
    for name in names:
        t0 = time.time()
        case = name.removeprefix("profile:")
        shape = CASES[case][0] if case in CASES else case
        if case in CASES and CASES[case][3].get("varlen"):
            shape += "-varlen"  # from empty caches, so that its own warm-up decides the kernels
        if shape != last_shape and DEVICE == "cuda":
            # torch.compile remembers the sizes it has seen per function, and compiles a
            # function it sees at new sizes again for any size (slower, dynamic-shape
            # kernels): a 1B case after an 8B one, or the small models of `check`, would run
            # such kernels. Each model shape starts from empty compile caches instead.
            import torch

            torch._dynamo.reset()
        last_shape = shape
        try:
            if name == "check":
                result = check()
            elif name == "packed-check":
                result = packed_checks()
            elif name == "attention":
                result = attention_backends()
            elif name != case:  # profile:<case>
                result = run_case(case, 1, 2, profile=True)
            else:
                result = run_case(name, steps, warmup, diagnose=diagnose)
        except Exception as exc:  # one failing case must not hide the others' numbers
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        result["case"] = name
        result["wall_s"] = time.time() - t0
        print("RESULT " + json.dumps(result), flush=True)
        gc.collect()
        if DEVICE == "cuda":
            import torch

            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cases", default="all", help="comma-separated case names, 'all', 'compile-bar', 'check' or 'attention'"
    )
    ap.add_argument(
        "--compile-cache",
        default=str(Path(__file__).resolve().parent / "out" / "compile-cache"),
        help="torch.compile's on-disk caches (inductor, Triton): a later invocation on the same machine "
        "reuses what an earlier one compiled",
    )
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument(
        "--timeout",
        type=int,
        default=420,
        help="seconds per process (a group of cases; each *-compile-model case is a group of its "
        "own, whose whole-model compile runs in its warm-up steps)",
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU, to check the script itself"
    )
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="per case: allocator device allocations/frees and the synchronizing call sites of one step",
    )
    args = ap.parse_args()
    if args.dry_run:
        dry_run()
    out_dir = Path(os.environ.get("OUT", "bench/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(args.compile_cache)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    if args.one:
        run_in_this_process(args.one.split(","), args.steps, args.warmup, args.diagnose)
        return
    aliases = {"all": ALL, "compile-bar": COMPILE_BAR}
    names = [n for name in args.cases.split(",") for n in aliases.get(name, [name])]
    unknown = [
        n
        for n in names
        if n not in ("check", "packed-check", "attention") and n.removeprefix("profile:") not in CASES
    ]
    if unknown:
        ap.error(
            f"unknown case(s) {', '.join(unknown)}; known: all, compile-bar, check, packed-check, attention, "
            f"profile:<case>, {', '.join(CASES)}"
        )
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(process_group(name), []).append(name)
    for members in groups.values():  # Liger last in its process (stable otherwise)
        members.sort(key=lambda n: n in CASES and CASES[n][3].get("liger", False))
    rows = []
    for group, members in groups.items():
        cmd = [
            sys.executable,
            __file__,
            "--one",
            ",".join(members),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        cmd += ["--dry-run"] if args.dry_run else []
        cmd += ["--diagnose"] if args.diagnose else []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            stdout, stderr = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            stderr = f"group {group} timed out after {args.timeout}s"
        found = {}
        for line in stdout.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
                found[result["case"]] = result
            elif line.startswith("PROFILE "):
                print(line[8:], flush=True)
        if any("error" in r for r in found.values()) or len(found) < len(members):
            with open(out_dir / "errors.txt", "a") as f:
                f.write(f"==== {group}\n{stdout[-3000:]}\n{stderr[-8000:]}\n")
        for name in members:
            result = found.get(name) or {
                "case": name,
                "error": (stderr.strip().splitlines() or ["no output"])[-1][:200],
            }
            rows.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
            with open(out_dir / "train_gpu.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
    order = {n: i for i, n in enumerate(CASES)}
    timed = sorted((r for r in rows if r["case"] in CASES), key=lambda r: order[r["case"]])
    if timed:
        print(table([r for r in timed if not (CASES[r["case"]][3].get("data") or CASES[r["case"]][3].get("memory_limit"))]))
        print(data_table(timed))


if __name__ == "__main__":
    main()
