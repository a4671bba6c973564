"""`lorakit` end to end on a GPU, through the command line, in one invocation.

    PYTHONPATH=src python3 bench/cli_gpu.py [--steps 40]

Builds a small random-init Llama (byte-level tokenizer, as in the tests) in a local model
directory, then runs the commands a user would, on CUDA:

1. `lorakit train` on the bundled demo data with the GPU fast path (the default on CUDA),
2. the same run with `--fast-path false` (the generic path): the two loss curves must agree,
3. `lorakit train --quantize nf4` (QLoRA),
4. `lorakit info`, `lorakit eval` with and without the adapter, `lorakit generate --chat`,
5. `lorakit merge`, then the merged directory loads with AutoModelForCausalLM and gives the
   adapted model's logits.

Prints each command's output tail and a summary table; exits non-zero when a check fails.

    PYTHONPATH=src python3 bench/cli_gpu.py --packed [--expect TOKENS_PER_S]

instead trains the 1B shape of `bench/train_gpu.py` (random init, its vocabulary, a byte-level
tokenizer) with plain `lorakit train` on long-tailed chat data (`bench/longtail.py`), where the
defaults on CUDA pack it padding-free and fit the memory, and compares the run's tokens/s with
the bench's `1b-lorakit-packed` figure (`--expect`, or read from $OUT/train_gpu.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "src" / "lorakit" / "demo"


def build_model(directory: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY_VOCAB, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)


def lorakit(*args: str) -> str:
    command = [sys.executable, "-m", "lorakit", *args]
    print("$ lorakit " + " ".join(args), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
    print(tail + "\n", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"lorakit {args[0]} failed with exit code {done.returncode}")
    return done.stdout


def packed(expect: float | None, out: Path) -> None:
    """`lorakit train` with its CUDA defaults on long-tailed data, against the bench's figure."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "bench"))
    from transformers import LlamaConfig, LlamaForCausalLM

    import longtail
    from conftest import tiny_tokenizer

    if expect is None and (out / "train_gpu.jsonl").exists():
        rows = [json.loads(line) for line in (out / "train_gpu.jsonl").read_text().splitlines() if line.strip()]
        expect = next((r["tokens_per_s"] for r in rows if r.get("case") == "1b-lorakit-packed" and "tokens_per_s" in r), None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tiny_tokenizer()
        config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                             rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        with torch.device("cuda"):
            LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        torch.cuda.empty_cache()
        stats = longtail.write_jsonl(tmp / "longtail.jsonl", 540)
        print("data:", json.dumps(stats), flush=True)
        command = [sys.executable, "-m", "lorakit", "train", "--model", str(tmp / "model"), "--data",
                   str(tmp / "longtail.jsonl"), "--output", str(tmp / "run"), "--seq-len", "4096",
                   "--tokens-per-batch", "16384", "--epochs", "3", "--rank", "16", "--alpha", "16",
                   "--log-every", "5", "--save-every", "1000", "--device", "cuda"]
        print("$ lorakit " + " ".join(command[3:]), flush=True)
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        text = done.stdout + done.stderr
        (out / "cli_gpu_packed.log").write_text(text)
        for line in text.splitlines():
            if any(k in line for k in ("packed", "memory auto", "fast path", "train data", "tokens_per_s", "Error")):
                print(line, flush=True)
        if done.returncode != 0:
            raise SystemExit(f"lorakit train failed with exit code {done.returncode}")
        records = losses(tmp / "run")
    # the first window holds the compile of the fused kernels; the rest is the steady state
    steady = [r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r]
    import statistics

    rate = statistics.median(steady)
    result = {"cli_tokens_per_s": rate, "windows": [r.get("tokens_per_s") for r in records],
              "bench_tokens_per_s": expect, "data": stats}
    if expect:
        result["ratio"] = rate / expect
    (out / "cli_gpu_packed.json").write_text(json.dumps(result))
    print(json.dumps(result), flush=True)
    if expect and abs(rate / expect - 1) > 0.10:
        raise SystemExit(f"FAILED: lorakit train ran {rate:,.0f} tokens/s, the bench {expect:,.0f} (more than 10% apart)")


def losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself")
    parser.add_argument("--packed", action="store_true", help="the long-tailed data run against the bench's figure")
    parser.add_argument("--expect", type=float, help="with --packed: the bench's tokens/s for the same settings")
    opts = parser.parse_args()
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = opts.device
    out = Path(os.environ.get("OUT", "bench/out"))
    out.mkdir(parents=True, exist_ok=True)
    if opts.packed:
        packed(opts.expect, out)
        return
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        build_model(model)
        common = ["--model", str(model), "--data", str(DEMO / "train.jsonl"), "--eval-data", str(DEMO / "eval.jsonl"),
                  "--max-steps", str(opts.steps), "--lr", "2e-3", "--batch-size", "8", "--seq-len", "1024",
                  "--log-every", "5", "--eval-every", "20", "--device", device]
        runs = {"fast": tmp / "fast", "generic": tmp / "generic", "qlora": tmp / "qlora"}
        lorakit("train", *common, "--output", str(runs["fast"]))
        lorakit("train", *common, "--output", str(runs["generic"]), "--fast-path", "false")
        lorakit("train", *common, "--output", str(runs["qlora"]), "--quantize", "nf4")

        fast, generic = losses(runs["fast"]), losses(runs["generic"])
        print(f"{'step':>5s} {'fast loss':>10s} {'generic loss':>12s} {'fast tok/s':>11s} {'generic tok/s':>13s}")
        worst = 0.0
        for a, b in zip(fast, generic, strict=True):
            if "loss" in a and "loss" in b:
                worst = max(worst, abs(a["loss"] - b["loss"]) / b["loss"])
                print(f"{a['step']:5d} {a['loss']:10.4f} {b['loss']:12.4f} {a['tokens_per_s']:11.0f} {b['tokens_per_s']:13.0f}")
        print(f"largest relative loss difference, fast vs generic: {worst:.2e}")
        if worst > 0.02:
            failures.append(f"fast and generic loss curves differ by {worst:.2e} (> 2e-2)")
        first, last = fast[0]["loss"], fast[-1]["loss"]
        if not last < first:
            failures.append(f"fast-path loss did not fall ({first:.4f} -> {last:.4f})")
        qlora = losses(runs["qlora"])
        if not qlora[-1]["loss"] < qlora[0]["loss"]:
            failures.append(f"QLoRA loss did not fall ({qlora[0]['loss']:.4f} -> {qlora[-1]['loss']:.4f})")

        lorakit("info", str(runs["fast"]))
        eval_args = ["--model", str(model), "--data", str(DEMO / "eval.jsonl"), "--device", device]
        base = json.loads(lorakit("eval", *eval_args))
        adapted = json.loads(lorakit("eval", *eval_args, "--adapter", str(runs["fast"])))
        print(f"eval loss: base {base['loss']:.4f}, with the adapter {adapted['loss']:.4f}")
        if not adapted["loss"] < base["loss"]:
            failures.append("the adapter does not lower the held-out loss")
        lorakit("generate", "--model", str(model), "--adapter", str(runs["fast"]), "--chat", "Note: met Ana Ruiz",
                "--max-new-tokens", "24", "--device", device)

        merged = tmp / "merged"
        lorakit("merge", "--model", str(model), "--adapter", str(runs["fast"]), "--output", str(merged))
        from transformers import AutoModelForCausalLM

        import lorakit as lk
        from lorakit.base.models import load_model

        ids = torch.arange(3, 40, device=device).unsqueeze(0)
        reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to(device).eval()
        with_adapter, _ = load_model(str(model), device=device, dtype=torch.float32)
        lk.load_adapter(with_adapter, runs["fast"])
        with torch.no_grad():
            diff = (reloaded(ids).logits - with_adapter.eval()(ids).logits).abs().max().item()
        print(f"merged model vs base + adapter, fp32 logits: max |difference| {diff:.2e}")
        if diff > 1e-3:
            failures.append(f"merged model differs from base + adapter by {diff:.2e}")
        (out / "cli_gpu_metrics.json").write_text(json.dumps({"fast": fast, "generic": generic, "qlora": qlora}))
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))
    print("all CLI checks passed on", torch.cuda.get_device_name() if device == "cuda" else device)


if __name__ == "__main__":
    main()
