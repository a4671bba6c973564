"""Multi-GPU scaling of LoRA training: 1 GPU vs DDP vs FSDP2 on the same host.

    python bench/distributed_gpu.py --all            # runs every case, prints the table

Model: a random-init Llama-shaped model (8B: hidden 4096, MLP 14336, 32 layers, 32/8 heads,
vocab 128256), bf16, LoRA r=16 alpha 16 on q,k,v,o,gate,up,down, gradient checkpointing,
AdamW, batch 4 x 2048 tokens per GPU. Scaling efficiency = tokens/s on N GPUs / (N x tokens/s
on 1 GPU), the median of the timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SHAPES = {
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def one_run(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.train import distributed

    cuda = torch.cuda.is_available()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cuda
        else torch.device("cpu")
    )
    env = distributed.init(args.strategy if args.strategy != "single" else "auto", device)
    dtype = torch.bfloat16 if cuda else torch.float32
    config = LlamaConfig(
        **SHAPES[args.shape], max_position_embeddings=max(4096, args.seq), tie_word_embeddings=False
    )
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=16, target_modules=TARGETS))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    model = distributed.wrap(model, env, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(1 + env.rank)
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g).to(device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    tokens = args.batch * args.seq * env.world_size
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    peak = max(distributed.all_sum([peak], env)[0] / env.world_size, 0.0)
    if env.is_main:
        print(
            "RESULT "
            + json.dumps(
                dict(
                    strategy=args.strategy,
                    gpus=env.world_size,
                    shape=args.shape,
                    tokens_per_s=tokens / step_time,
                    step_s=step_time,
                    peak_gib=peak,
                    loss=float(loss),
                )
            ),
            flush=True,
        )
    distributed.cleanup(env)


def run_all(args: argparse.Namespace) -> None:
    gpus = torch.cuda.device_count() or 2
    here = os.path.abspath(__file__)
    common = [
        "--shape",
        args.shape,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
    ]
    cases = [("single", [sys.executable, here, "--strategy", "single", *common])]
    for strategy in ("ddp", "fsdp"):
        cases.append(
            (
                strategy,
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    f"--nproc-per-node={gpus}",
                    here,
                    "--strategy",
                    strategy,
                    *common,
                ],
            )
        )
    results = {}
    for name, cmd in cases:
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            print(f"{name}: failed (exit {out.returncode})\n{out.stderr[-3000:]}")
            continue
        results[name] = json.loads(lines[-1][len("RESULT ") :])
    base = results.get("single")
    print("\n| case | GPUs | tokens/s | peak GiB/GPU | scaling efficiency |\n|---|---|---|---|---|")
    for name, r in results.items():
        eff = r["tokens_per_s"] / (r["gpus"] * base["tokens_per_s"]) if base else float("nan")
        print(
            f"| {name} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {eff:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--all", action="store_true", help="run single, DDP and FSDP2 and print the table"
    )
    parser.add_argument("--strategy", default="single", choices=["single", "ddp", "fsdp"])
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    run_all(args) if args.all else one_run(args)


if __name__ == "__main__":
    main()
