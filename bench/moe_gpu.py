"""LoRA on a mixture-of-experts model on one GPU: lorakit against PEFT's `target_parameters`.

A Qwen3-30B-A3B-shaped model (hidden 2048, 128 experts of intermediate 768, top-8, 32 query and 4
key-value heads, vocabulary 151,936) with random weights and fewer layers (`--layers`, default 6),
bf16, LoRA r=16 on the attention projections and on both expert parameters. The cases train the
same tokens with AdamW, one after the other, alternated (`--rounds`), and report tokens/s and peak
memory:

    lorakit          the fast path as `lorakit train --memory auto` sets it up (fused attention
                     and loss, the experts as grouped matmuls with their LoRA terms, recompute as
                     the memory fit chose)
    lorakit-generic  the model's own forward with lorakit's layers (grouped experts, no fusion)
    peft-grouped_mm  PEFT's `target_parameters` on transformers' fastest experts implementation
                     (`experts_implementation="grouped_mm"`, one grouped kernel a projection)
    peft-grouped_mm-gc  the same with gradient checkpointing (transformers' own), for memory

Before timing, the same adapter weights are loaded into lorakit and PEFT and their losses compared.

    python3 bench/moe_gpu.py --out moe_gpu.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1000)
"""`--tiny`: the same model family at toy sizes, to try the script on a CPU."""
SHAPE: dict = {}


def moe_config(layers: int):
    from transformers import AutoConfig

    shape = dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, vocab_size=151936, max_position_embeddings=4096, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    )
    return AutoConfig.for_model("qwen3_moe", **{**shape, **SHAPE})


def build_base(layers: int, device: str, experts: str | None = None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"experts_implementation": experts} if experts else {}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(moe_config(layers), dtype=torch.bfloat16, **extra)
    return model.train()


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def with_lorakit(base):
    import lorakit

    lorakit.inject(base, lorakit.LoraConfig(r=16, alpha=32, target_modules=ATTENTION, target_parameters=EXPERTS))
    return base


def with_peft(base):
    import peft

    return peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION,
                                                     target_parameters=EXPERTS))


def with_lorakit_fast(base, tokens: int, seq_len: int):
    """lorakit's adapter on the fast path, with the settings `--memory auto` picks."""
    from lorakit.train.fastpath import enable_fast_path
    from lorakit.train.memory import fit_for_training

    model = with_lorakit(base)
    device = next(model.parameters()).device
    fitted = fit_for_training(model, device, "auto", None, tokens, seq_len) if device.type == "cuda" else None
    status = enable_fast_path(model, fitted.config if fitted else None)
    if not status.enabled:
        raise RuntimeError(f"fast path off: {status.reason}")
    return model


CASES = ("lorakit", "lorakit-generic", "peft-grouped_mm", "peft-grouped_mm-gc")


def build_case(case: str, layers: int, device: str, tokens: int, seq_len: int):
    if case == "lorakit":
        return with_lorakit_fast(build_base(layers, device), tokens, seq_len)
    if case == "lorakit-generic":
        return with_lorakit(build_base(layers, device))
    model = with_peft(build_base(layers, device, "grouped_mm"))
    if case.endswith("-gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train(model, batches, warmup: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    losses, start = [], None
    for step, ids in enumerate(batches):
        if step == warmup:
            sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()  # the first steps' compiles and autotuning are not the run's
            start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    sync()
    elapsed = time.perf_counter() - start
    tokens = sum(b.numel() for b in batches[warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"tokens_per_s": tokens / elapsed, "peak_gib": peak,
            "loss_first": losses[0], "loss_last": losses[-1], "trainable": sum(p.numel() for p in params)}


def agreement(layers: int, device: str, ids: torch.Tensor) -> dict:
    """The same adapter (lorakit's, B randomised) through lorakit and through PEFT: the loss of each."""
    import peft

    import lorakit

    ours = with_lorakit(build_base(layers, device))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        ours_loss = float(ours(input_ids=ids, labels=ids).loss)
    with tempfile.TemporaryDirectory() as directory:
        lorakit.save_adapter(ours, directory)
        del ours
        theirs = peft.PeftModel.from_pretrained(build_base(layers, device), directory)
        with torch.no_grad():
            theirs_loss = float(theirs(input_ids=ids, labels=ids).loss)
    return {"lorakit_loss": ours_loss, "peft_loss": theirs_loss, "relative": abs(ours_loss - theirs_loss) / theirs_loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="moe_gpu.jsonl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, to try the script on a CPU")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    args = parser.parse_args()
    device = args.device
    if args.tiny:
        SHAPE.update(TINY)
    vocab = SHAPE.get("vocab_size", 151936)
    out = Path(args.out)

    def record(row: dict) -> None:
        name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
        row = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": name,
               "torch": torch.__version__, **row}
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(device)
               for _ in range(args.steps)]
    record({"case": "agreement", **agreement(args.layers, device, batches[0][:1, :512])})
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for round_ in range(args.rounds):
        for name in args.cases.split(","):
            model = None
            try:
                model = build_case(name, args.layers, device, args.batch * args.seq_len, args.seq_len)
                impl = getattr(model.config, "_experts_implementation", None)
                if name.startswith("lorakit"):
                    from lorakit.adapters.experts import LoraExperts

                    grouped = [m.grouped for m in model.modules() if isinstance(m, LoraExperts)]
                    impl = "lorakit grouped" if grouped and all(grouped) else f"lorakit weights ({impl})"
                result = train(model, batches, args.warmup)
            except torch.OutOfMemoryError as err:
                result, impl = {"error": f"out of memory: {str(err)[:160]}"}, None
            record({"case": name, "round": round_, "layers": args.layers, "batch": args.batch,
                    "seq_len": args.seq_len, "experts_implementation": impl, **result})
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
