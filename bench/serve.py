"""Serving with many adapters: lorakit's engine against PEFT's mixed-batch generate.

For 1, 8 and 32 distinct adapters (and the base alone), at most 32 requests decoding
together, requests arriving as a Poisson process: generated tokens per second and p50 /
p99 request latency (arrival to last token, queueing included). The arrival rate is the
same for every case: `--rate-factor` (2) times the one-adapter capacity measured in a warm-up,
so the engine stays saturated and tokens/s is its capacity.

PEFT has no continuous batching: its numbers are one static batch of 32 requests through
`model.generate(adapter_names=...)`, every request's latency being the whole batch's.

    python bench/serve.py --device cpu                 # small Llama-shaped model, minutes on 2 cores
    python bench/serve.py --device cuda --size 1b      # Llama-3.2-1B-shaped, random init, bf16
    python bench/serve.py --suite gpu --out r.jsonl    # the fast decode path's GPU suite (serve_gpu.py)

`--decode-path` picks the engine's path (auto: fast on a GPU, generic on the CPU).

Prints a table and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import lorakit
from lorakit.adapters.files import AdapterFiles, adapter_config_dict, adapter_state_dict
from lorakit.adapters.inject import delete_adapter
from lorakit.serve import Engine, SamplingParams
from serve_gpu import CASES, Suite, bars

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "small": (256, 688, 4, 8, 4, 4096),
    "135m": (576, 1536, 30, 9, 3, 49152),  # SmolLM2-135M's shape
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),  # Llama-3-8B's shape
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def byte_tokenizer(words: int = max(v[-1] for v in SIZES.values())):
    """A byte-level tokenizer built offline: text encodes to its 256 byte tokens, and every
    id below `words` decodes to text (ids past the bytes to a space and a word of their
    own), as a real model's vocabulary does. A random-weight model's output then costs the
    detokenizer what real text costs it (an id that decodes to nothing would keep growing
    the window the detokenizer re-decodes each step)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(len(alphabet), words):
        word, n = "", i
        while True:
            word, n = chr(ord("a") + n % 26) + word, n // 26
            if n == 0:
                break
        vocab["\u0120" + word] = i  # "Ġ": ByteLevel's space
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>")


def build_model(size: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        tie_word_embeddings=size in ("135m", "1b"), pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_adapters(model, count: int, rank: int) -> dict[str, AdapterFiles]:
    """`count` adapters with distinct random weights, read into memory as if from disk."""
    out = {}
    config = lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules=TARGETS)
    for i in range(count):
        name = f"a{i}"
        lorakit.add_adapter(model, name, config)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f"lora_B.{name}." in pname:
                    param.normal_(std=0.01)
        tensors = adapter_state_dict(model, name)
        raw = adapter_config_dict(model, name)
        out[name] = AdapterFiles(directory=Path(f"<memory>/{name}"), config=config, raw_config=raw, tensors=tensors)
        delete_adapter(model, name)
    return out


@dataclass
class Result:
    case: str
    tokens_per_s: float
    p50_s: float
    p99_s: float
    requests: int
    mean_batch: float
    tokens_per_cpu_s: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def poisson_run(engine: Engine, prompts: list[list[int]], adapters: list[str | None], max_tokens: int, rate: float, seed: int) -> tuple[float, list[float], float]:
    """Submit with exponential gaps; returns (tokens/s, latencies, tokens per CPU second).

    Tokens per CPU second (this process's CPU time) is the work each token costs, which a
    busy shared machine disturbs far less than wall-clock throughput.
    """
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    finished: dict[int, float] = {}
    arrived: dict[int, float] = {}
    tokens = [0] * len(prompts)
    done = threading.Event()
    lock = threading.Lock()

    def listener(i: int):
        def notify(event) -> None:
            if event.finish_reason is not None:
                with lock:
                    finished[i] = time.perf_counter()
                    tokens[i] = event.completion_tokens
                    if len(finished) == len(prompts):
                        done.set()
        return notify

    start = time.perf_counter()
    cpu_start = time.process_time()
    due = start
    for i, (ids, name) in enumerate(zip(prompts, adapters, strict=True)):
        due += rng.expovariate(rate)
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrived[i] = time.perf_counter()
        engine.submit(ids, name, params, listener(i))
    done.wait()
    cpu = time.process_time() - cpu_start
    end = max(finished.values())
    latencies = [finished[i] - arrived[i] for i in range(len(prompts))]
    return sum(tokens) / (end - start), latencies, sum(tokens) / cpu


def engine_cases(model, tok, adapters, args, prompts) -> tuple[list[Result], float]:
    engine = Engine(model, tok, max_batch=32, max_queue=100000, max_adapters_on_device=len(adapters), context_length=4096,
                    decode_path=args.decode_path)
    engine.eos_ids = set()  # random weights: decode exactly max_tokens
    for name, files in adapters.items():
        engine.load_adapter(name, files)
    results = []
    with engine:
        # Warm-up and calibration: 32 one-adapter requests at once give the capacity.
        engine.generate(prompts[:8], "a0", SamplingParams(max_tokens=4, temperature=0))
        t = time.perf_counter()
        outs = engine.generate(prompts[:32], "a0", SamplingParams(max_tokens=args.max_tokens, temperature=0))
        capacity = sum(o.completion_tokens for o in outs) / (time.perf_counter() - t)
        rate = args.rate_factor * capacity / args.max_tokens
        print(f"calibration: {capacity:.0f} tokens/s with 32 requests on one adapter; arrivals {rate:.2f} requests/s")
        names = list(adapters)
        cases = [("engine, 1 adapter", 1), ("engine, 8 adapters", 8), ("engine, 32 adapters", 32), ("engine, base only", 0)]
        runs: dict[str, list[tuple[float, list[float], float, float]]] = {label: [] for label, _ in cases}
        # Round-robin repeats in a rotating order, so drift in the machine's load hits every
        # case alike; the median run counts.
        for repeat in range(args.repeats):
            for label, distinct in cases[repeat % 4 :] + cases[: repeat % 4]:
                row_names = [names[i % distinct] if distinct else None for i in range(len(prompts))]
                steps, rows = engine.stats.decode_steps, engine.stats.batch_rows
                tps, lat, per_cpu = poisson_run(engine, prompts, row_names, args.max_tokens, rate, seed=repeat)
                mean_batch = (engine.stats.batch_rows - rows) / max(engine.stats.decode_steps - steps, 1)
                runs[label].append((tps, lat, mean_batch, per_cpu))
                print(f"  {label} (run {repeat + 1}): {tps:.0f} tokens/s, {per_cpu:.0f} tokens/CPU-s")
        for label, _ in cases:
            tps, lat, mean_batch, _ = sorted(runs[label], key=lambda run: run[0])[len(runs[label]) // 2]
            per_cpu = sorted(run[3] for run in runs[label])[len(runs[label]) // 2]
            results.append(Result(label, tps, percentile(lat, 50), percentile(lat, 99), len(prompts), mean_batch, per_cpu))
    return results, rate


def peft_cases(model, adapters, args, prompts) -> list[Result]:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    base = lorakit.unload(model) if hasattr(model, "lora_state") else model
    config = PeftConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
    names = list(adapters)
    peft_model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    peft_model.eval()
    device = next(base.parameters()).device
    batch = prompts[:32]
    length = max(map(len, batch))
    ids = torch.zeros((32, length), dtype=torch.long)
    mask = torch.zeros((32, length), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, length - len(p):] = torch.tensor(p)
        mask[i, length - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    results = []
    with torch.no_grad():
        peft_model.generate(input_ids=ids[:4], attention_mask=mask[:4], adapter_names=names[:4], max_new_tokens=2, min_new_tokens=2, do_sample=False)
        runs: dict[int, list[tuple[float, float, float]]] = {1: [], 8: [], 32: []}
        for _ in range(args.peft_repeats):
            for distinct in runs:
                row_names = [names[i % distinct] for i in range(32)]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t, cpu = time.perf_counter(), time.process_time()
                out = peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=row_names,
                                          max_new_tokens=args.peft_tokens, min_new_tokens=args.peft_tokens, do_sample=False)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
                generated = (out.shape[1] - length) * 32
                runs[distinct].append((generated / seconds, seconds, generated / cpu))
                print(f"  PEFT generate, {distinct} adapters: {generated / seconds:.0f} tokens/s, {generated / cpu:.0f} tokens/CPU-s")
        for distinct, measured in runs.items():
            tps, seconds, _ = sorted(measured)[len(measured) // 2]
            per_cpu = sorted(m[2] for m in measured)[len(measured) // 2]
            label = f"PEFT generate, {distinct} adapter{'s' if distinct > 1 else ''}"
            results.append(Result(label, tps, seconds, seconds, 32, 32.0, per_cpu))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--requests", type=int, default=96, help="requests per engine case")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--peft-tokens", type=int, default=32, help="tokens per request in PEFT's static batch")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 64), help="prompt length range")
    parser.add_argument("--rate-factor", type=float, default=2.0, help="arrival rate / one-adapter capacity")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each engine case (the median is reported)")
    parser.add_argument("--peft-repeats", type=int, default=1, help="runs of each PEFT case (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="base dtype (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--decode-path", choices=["auto", "fast", "generic"], default="auto", help="the engine's decode path")
    parser.add_argument("--suite", choices=["online", "gpu"], default="online",
                        help="online: the Poisson cases above; gpu: serve_gpu.py's offline, anchor and online cases")
    parser.add_argument("--cases", default=",".join(CASES), help="gpu suite: comma-separated cases to run")
    parser.add_argument("--new-tokens", type=int, default=128, help="gpu suite: tokens generated per request")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="gpu suite: prompt length")
    parser.add_argument("--budget-s", type=float, default=1e9, help="gpu suite: start no case after this many seconds")
    args = parser.parse_args()
    if args.suite == "gpu":
        args.cases = args.cases.split(",")
        unknown = [c for c in args.cases if c not in CASES]
        if unknown:
            parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
        suite = Suite(args, build_model, byte_tokenizer, make_adapters)
        try:
            suite.run()
        finally:
            print("\n".join(bars(suite.results)))
        return

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cpu":
        # One intra-op thread: the engine thread, the arrival thread and other processes
        # share the cores, and spinning OpenMP workers on a busy machine stall every op.
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_model(args.size, device, dtype)
    tok = byte_tokenizer()
    adapters = make_adapters(model, 32, args.rank)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(*args.prompt_len))] for _ in range(args.requests)]
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{args.size} model ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {dtype}), 32 adapters r={args.rank} on {', '.join(TARGETS)}; "
          f"{hardware}; setup {time.perf_counter() - t0:.0f}s")

    results, rate = engine_cases(model, tok, adapters, args, prompts)
    if not args.skip_peft:
        try:
            results += peft_cases(model, adapters, args, prompts)
        except Exception as err:  # keep the engine's numbers even if the reference breaks
            print(f"PEFT reference failed: {type(err).__name__}: {err}")

    one = next(r.tokens_per_s for r in results if r.case == "engine, 1 adapter")
    print()
    print("| case | tokens/s | vs engine 1 adapter | tokens/CPU-s | vs engine 1 adapter | p50 latency s | p99 latency s | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    one_cpu = next(r.tokens_per_cpu_s for r in results if r.case == "engine, 1 adapter")
    for r in results:
        print(f"| {r.case} | {r.tokens_per_s:.0f} | {r.tokens_per_s / one:.2f} | {r.tokens_per_cpu_s:.0f} | {r.tokens_per_cpu_s / one_cpu:.2f} "
              f"| {r.p50_s:.2f} | {r.p99_s:.2f} | {r.mean_batch:.1f} |")
    summary = {
        "size": args.size, "device": hardware, "dtype": str(dtype), "rank": args.rank,
        "requests": args.requests, "max_tokens": args.max_tokens, "peft_tokens": args.peft_tokens,
        "arrival_rate": rate, "results": [r.__dict__ for r in results],
    }

    def ratio(case: str, base: str, key: str) -> float | None:
        found = {r.case: getattr(r, key) for r in results}
        return found[case] / found[base] if case in found and base in found else None

    for key, what in (("tokens_per_s", "tokens/s"), ("tokens_per_cpu_s", "tokens per CPU-second")):
        engine_ratio = ratio("engine, 32 adapters", "engine, 1 adapter", key)
        peft_ratio = ratio("PEFT generate, 32 adapters", "PEFT generate, 1 adapter", key)
        summary[f"engine_32_vs_1_{key}"], summary[f"peft_32_vs_1_{key}"] = engine_ratio, peft_ratio
        print(f"{what}: the engine with 32 distinct adapters keeps {engine_ratio:.0%} of its one-adapter figure"
              + (f"; PEFT keeps {peft_ratio:.0%}" if peft_ratio is not None else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
