"""Serving a mixture-of-experts base with expert adapters on one GPU: lorakit's engine with 32
distinct adapters in one batch, against transformers + PEFT with a static cache and one adapter.

The model is `moe_gpu.py`'s Qwen3-30B-A3B shape with random bf16 weights and `--layers` layers;
the adapters are LoRA r=16 on the attention projections and both expert parameters, each with
its own random weights. Every case decodes `--batch` requests of `--prompt` tokens for exactly
`--new-tokens` tokens, greedy; tokens/s is the median of three timed runs after a warm-up (the
baselines report their fastest run too, and the bar divides by it).

    lorakit-32    the engine, 32 distinct adapters, one per request (mixed batch)
    lorakit-1     the engine, every request on one adapter
    lorakit-base  the engine, no adapter
    peft-static-1 transformers `generate` with `cache_implementation="static"`, PEFT's
                  `target_parameters` adapter on transformers' grouped_mm experts
    hf-static     transformers `generate`, static cache, the base alone (an anchor)

    python3 bench/moe_serve_gpu.py --out moe_serve_gpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit.adapters.files import AdapterFiles, adapter_config_dict, adapter_state_dict
from lorakit.adapters.inject import delete_adapter
from lorakit.serve import Engine, SamplingParams
from moe_gpu import ATTENTION, EXPERTS, SHAPE, TINY, build_base
from serve import byte_tokenizer


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_adapters(model, count: int, rank: int, save_first: Path) -> dict[str, AdapterFiles]:
    """`count` adapters with distinct random weights, in memory as if read from disk; the first
    one is also saved to `save_first` (for PEFT)."""
    config = lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules=ATTENTION, target_parameters=EXPERTS)
    out = {}
    for i in range(count):
        name = f"a{i}"
        lorakit.add_adapter(model, name, config)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f".{name}." in pname and "lora_B" in pname:
                    param.normal_(std=0.01)
        if i == 0:
            lorakit.save_adapter(model, save_first, adapter_name=name)
        raw = adapter_config_dict(model, name)
        out[name] = AdapterFiles(directory=Path(f"<memory>/{name}"), config=config, raw_config=raw,
                                 tensors=adapter_state_dict(model, name))
        delete_adapter(model, name)
    return out


def engine_case(engine: Engine, prompts, names, new_tokens: int) -> dict:
    engine.generate(prompts, names, SamplingParams(max_tokens=4, temperature=0))  # warm-up
    runs, outs = [], None
    for _ in range(3):
        sync()
        t = time.perf_counter()
        outs = engine.generate(prompts, names, SamplingParams(max_tokens=new_tokens, temperature=0))
        runs.append(sum(o.completion_tokens for o in outs) / (time.perf_counter() - t))
    return {"tokens_per_s": sorted(runs)[1], "runs": [round(r) for r in runs], "path": engine.decode_path,
            "first_row": outs[0].token_ids[:32]}


def hf_case(model, ids: torch.Tensor, new_tokens: int) -> dict:
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static")
    out = model.generate(input_ids=ids, **kwargs)  # warm-up (compiles for the static cache)
    runs = []
    for _ in range(3):
        sync()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, **kwargs)
        runs.append((out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - t))
    return {"tokens_per_s": sorted(runs)[1], "best": max(runs), "runs": [round(r) for r in runs],
            "first_row": out[0, ids.shape[1]:ids.shape[1] + 32].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default="moe_serve_gpu.jsonl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, to try the script on a CPU")
    args = parser.parse_args()
    if args.tiny:
        SHAPE.update(TINY)
    out = Path(args.out)

    def record(row: dict) -> None:
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        row = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": name,
               "torch": torch.__version__, "layers": args.layers, "batch": args.batch, "prompt": args.prompt,
               "new_tokens": args.new_tokens, **row}
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    model = build_base(args.layers, args.device, "grouped_mm").eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    vocab = model.config.vocab_size
    tok = byte_tokenizer(vocab)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(300, vocab, (args.batch, args.prompt), generator=gen).tolist()
    with tempfile.TemporaryDirectory() as directory, torch.no_grad():
        first = Path(directory) / "a0"
        adapters = make_adapters(model, args.adapters, args.rank, first)
        engine = Engine(model, tok, max_batch=args.batch, max_queue=100000, max_adapters_on_device=len(adapters),
                        context_length=args.prompt + args.new_tokens + 8)
        engine.eos_ids = set()  # random weights: decode exactly new_tokens
        for name, files in adapters.items():
            engine.load_adapter(name, files)
        names = [f"a{i % len(adapters)}" for i in range(args.batch)]
        with engine:
            for case, rows in (("lorakit-32", names), ("lorakit-1", ["a0"] * args.batch),
                               ("lorakit-base", [None] * args.batch)):
                record({"case": case, "adapters": len(set(rows) - {None}), **engine_case(engine, prompts, rows,
                                                                                         args.new_tokens)})
        del engine, adapters
        base = lorakit.unload(model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ids = torch.tensor(prompts, device=args.device)
        import peft

        theirs = peft.PeftModel.from_pretrained(base, str(first)).eval()
        try:
            record({"case": "peft-static-1", **hf_case(theirs, ids, args.new_tokens)})
        except Exception as err:  # recorded, not hidden: a baseline that cannot run is a result
            record({"case": "peft-static-1", "error": f"{type(err).__name__}: {str(err)[:300]}"})
        base = theirs.unload()
        record({"case": "hf-static", **hf_case(base, ids, args.new_tokens)})


if __name__ == "__main__":
    main()
