"""Where a fast-path decoding step spends its device time (a diagnostic, not a benchmark).

    python bench/serve_profile.py --out profile.txt [--sizes 1b,8b]

For each shape (1B batch 32 with 32 adapters, 1B batch 128 with 128 of a pool of 256,
8B batch 32 with 32 adapters) it builds the engine's fast path as `bench/serve.py --suite
gpu` does, then reports:

- the offline split: wall time of prefill alone (max_tokens=1) against the whole request
  (128 new tokens), so the share of prefill in the offline tokens/s is visible;
- one captured decoding graph replayed alone (ms per step);
- the same step's kernels under torch.profiler, run eagerly (the compiled layers without
  the graph), grouped by kernel name: count per step and device time per step, the sum of
  all kernels' device time against the graph's wall time (the gap is launch overhead);
- one prefill as the engine admits it (32 prompts of 128 tokens): its wall time and its
  kernels the same way (the gap between them is host work).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lorakit.serve import SamplingParams  # noqa: E402
from serve import build_model, byte_tokenizer, make_adapters  # noqa: E402
from serve_gpu import Suite, _unload  # noqa: E402


class Args:
    rank = 16
    prompt_tokens = 128
    new_tokens = 128
    out = None
    device = "cuda"
    size = "1b"
    cases = ()
    budget_s = 1e9


def profile_case(suite: Suite, model, adapters: dict, rows: list[str], batch: int, log) -> None:
    try:
        _profile_case(suite, model, adapters, rows, batch, log)
    except Exception:
        import traceback

        log(traceback.format_exc())


def _profile_case(suite: Suite, model, adapters: dict, rows: list[str], batch: int, log) -> None:
    engine = suite.engine(model, adapters, batch=batch)
    with engine:
        prompts = suite.prompts(len(rows), model.config.vocab_size)
        engine.generate(prompts, rows, SamplingParams(max_tokens=4, temperature=0))
        for label, tokens in (("prefill only (1 token)", 1), ("whole request (128 tokens)", 128)):
            suite.sync()
            t = time.perf_counter()
            engine.generate(prompts, rows, SamplingParams(max_tokens=tokens, temperature=0))
            suite.sync()
            seconds = time.perf_counter() - t
            log(f"  {label}: {seconds * 1e3:.1f} ms ({len(rows) * tokens / seconds:,.0f} tokens/s)")
        decoder = engine.decoder
        key, graph = greedy_graph(decoder, batch)
        log(f"  graph {key}: {replay_ms(suite, graph):.3f} ms per step")
        steps = 5
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                graph.graph.replay()
            suite.sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        log(f"  profiler saw {len(kernels) / steps:.0f} kernels per replayed step")
        # the same step eagerly (compiled layers, no graph): every kernel visible
        kernel_table(profile_eager_step(suite, decoder, key, graph, steps), steps, "eager step", log)
        profile_prefill(suite, engine, rows, model.config.vocab_size, log)
        if len(rows) > 32:
            profile_prefill(suite, engine, rows, model.config.vocab_size, log, n=len(rows))
    _unload(engine, adapters)
    torch.cuda.empty_cache()


def greedy_graph(decoder, batch: int):
    """(key, captured step) of the greedy decoding graph for `batch` rows with the fewest keys,
    or None where no graph was captured (no CUDA)."""
    graphs = {k: g for k, g in decoder._graphs.items() if k[0] == batch and k[2] and g.graph is not None}
    if not graphs:
        return None, None
    key = min(graphs, key=lambda k: k[1])
    return key, graphs[key]


def replay_ms(suite: Suite, graph, times: int = 50) -> float:
    """Milliseconds per replay of a captured decoding step."""
    suite.sync()
    t = time.perf_counter()
    for _ in range(times):
        graph.graph.replay()
    suite.sync()
    return (time.perf_counter() - t) / times * 1e3


def profile_eager_step(suite: Suite, decoder, key, graph, steps: int = 5):
    """torch.profiler over `steps` runs of the graph's step run eagerly (after two warm-ups)."""
    rows, key_length, greedy = key
    for _ in range(2):
        decoder.step(rows, key_length, greedy, graph.ints.clone(), graph.floats.clone())
    suite.sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step(rows, key_length, greedy, graph.ints.clone(), graph.floats.clone())
        suite.sync()
    return prof


def line_logger(out: Path):
    """A function that prints a line and appends it to `out`."""

    def log(line: str) -> None:
        print(line, flush=True)
        with out.open("a") as f:
            f.write(line + "\n")

    return log


def kernel_table(prof, runs: int, label: str, log, top: int = 30) -> float:
    """The profiled CUDA kernels grouped by name, per run; returns the kernel time per run (ms)."""
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name].append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    total = sum(sum(v) for v in by_name.values()) / runs
    count = sum(len(v) for v in by_name.values()) / runs
    log(f"  {label}: {count:.0f} kernels, {total / 1e3:.3f} ms of kernel time per run")
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
        log(f"    {sum(times) / runs / 1e3:7.3f} ms  {len(times) / runs:6.1f}x  {name[:150]}")
    return total / 1e3


def profile_prefill(suite: Suite, engine, rows: list[str], vocab: int, log, runs: int = 3, n: int = 32) -> None:
    """One prefill of `n` prompts of 128 tokens, each with its adapter, into free slots (32:
    as the engine admits them by default): wall time against kernel time (the gap is host work)."""
    decoder = engine.decoder
    n = min(n, len(rows), decoder.max_batch)
    length = suite.args.prompt_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, length), generator=g).to(suite.device)
    slots = torch.arange(n, device=suite.device)
    index = torch.tensor(decoder.lora.index(rows[:n]), device=suite.device)
    positions = torch.arange(length, device=suite.device).expand(n, -1)

    def run() -> torch.Tensor:
        hidden = decoder.decoder.forward(ids, positions, decoder.cache, slots, length, decoder.lora, index, causal=True)
        return decoder.decoder.logits(hidden[:, -1])

    with torch.no_grad():
        for _ in range(2):
            run()
        suite.sync()
        t = time.perf_counter()
        for _ in range(runs):
            run()
        suite.sync()
        wall = (time.perf_counter() - t) / runs * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                run()
            suite.sync()
    log(f"  prefill of {n} x {length} tokens: {wall:.1f} ms wall ({n * length / wall * 1e3:,.0f} tokens/s)")
    kernel_table(prof, runs, "prefill", log, top=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="1b,8b")
    args = parser.parse_args()
    log = line_logger(Path(args.out))

    suite = Suite(Args(), build_model, byte_tokenizer, make_adapters)
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if "1b" in args.sizes:
        model = build_model("1b", suite.device, torch.bfloat16)
        adapters = suite.adapters(model, 256)
        names = list(adapters)
        log("1B, batch 32, 32 adapters")
        profile_case(suite, model, {n: adapters[n] for n in names[:32]}, names[:32], 32, log)
        log("1B, batch 128, 128 of 256 adapters")
        profile_case(suite, model, adapters, [names[(7 * i) % 256] for i in range(128)], 128, log)
        del model, adapters
        torch.cuda.empty_cache()
    if "8b" in args.sizes:
        model = build_model("8b", suite.device, torch.bfloat16)
        adapters = suite.adapters(model, 32)
        log("8B, batch 32, 32 adapters")
        profile_case(suite, model, adapters, list(adapters), 32, log)


if __name__ == "__main__":
    main()
