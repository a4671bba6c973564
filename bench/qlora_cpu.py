"""CPU benchmark: fp32 LoRA vs NF4 QLoRA on the bundled default model (SmolLM2-135M-Instruct).

Each configuration runs in its own process, so peak memory (the process's peak RSS) is
its own. Measured per configuration: peak RSS right after loading with every weight
touched (and its growth over the imports alone), base linear weight bytes, training
tokens/s over timed steps after warm-up, peak RSS after training, and lorakit's memory
report.

    .venv/bin/python bench/qlora_cpu.py                     # all configurations, a markdown table
    .venv/bin/python bench/qlora_cpu.py --steps 4 --seq 128 # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {
    "fp32 LoRA": {"quantize": None, "loader": "transformers"},
    "NF4 QLoRA (layer-by-layer load)": {"quantize": "nf4", "loader": "streaming"},
    "NF4 QLoRA (load fp32, then quantize)": {"quantize": "nf4", "loader": "transformers"},
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(name: str, steps: int, warmup: int, batch: int, seq: int, rank: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.base import quant
    from lorakit.base.models import default_model_path

    torch.set_num_threads(threads)
    spec = CONFIGS[name]
    path = default_model_path()
    quant.qweights.bitsandbytes()  # imported in every configuration, so baselines match
    baseline = peak_rss_mib()
    t0 = time.perf_counter()
    if spec["loader"] == "streaming":
        model = quant.load_quantized(path, spec["quantize"], compute_dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if spec["quantize"]:
            quant.quantize_model(model, spec["quantize"], compute_dtype=torch.float32)
    # transformers maps the checkpoint and reads pages on first touch; touch every weight
    # (training would) so each configuration's load is counted in full.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_mib()
    resident = rss_mib()
    stored, fp32 = quant.linear_weight_bytes(model)

    lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    model.train()
    timed = 0.0
    for step in range(warmup + steps):
        t = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            timed += time.perf_counter() - t
    report = quant.memory_report(model, optimizer)
    return {
        "config": name,
        "load_s": round(load_s, 2),
        "rss_after_imports_mib": round(baseline, 1),
        "peak_rss_after_load_mib": round(load_peak, 1),
        "load_growth_mib": round(load_peak - baseline, 1),
        "resident_after_load_mib": round(resident, 1),
        "linear_weights_mib": round(stored / 2**20, 1),
        "linear_weights_fp32_mib": round(fp32 / 2**20, 1),
        "train_tokens_per_s": round(batch * seq * steps / timed, 1),
        "peak_rss_after_train_mib": round(peak_rss_mib(), 1),
        "final_loss": round(loss.item(), 4),
        "memory_report": str(report),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = (args.steps, args.warmup, args.batch, args.seq, args.rank, args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, *sizes)))
        return
    rows = []
    for name in CONFIGS:
        command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--rank",
                   str(args.rank), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    keys = ["load_s", "load_growth_mib", "peak_rss_after_load_mib", "linear_weights_mib",
            "train_tokens_per_s", "peak_rss_after_train_mib"]
    print("| config | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for row in rows:
        print(f"| {row['config']} | " + " | ".join(str(row[k]) for k in keys) + " |")
    fp, q = rows[0], rows[1]
    print()
    print(f"NF4/fp32: linear weights {q['linear_weights_mib'] / fp['linear_weights_mib']:.3f}x, "
          f"load growth {q['load_growth_mib'] / fp['load_growth_mib']:.2f}x, "
          f"peak RSS after training {q['peak_rss_after_train_mib'] / fp['peak_rss_after_train_mib']:.2f}x, "
          f"training tokens/s {q['train_tokens_per_s'] / fp['train_tokens_per_s']:.2f}x")
    for row in rows:
        print(f"- {row['config']}: {row['memory_report']}")


if __name__ == "__main__":
    main()
