"""The fast decode path's options side by side on one GPU (a diagnostic, not the bar).

    python bench/serve_variants.py --size 8b --cases b32:32 --variants unfolded,folded,writes,default \
        --profile default --out variants_8b.txt

For each case (`bN:P`: batch N, N requests over a pool of P adapters, as `bench/serve.py
--suite gpu` builds them) and each variant, an engine is built on the same model and reports
its warm-up time, prefill alone (1 new token), the whole request (128 new tokens, twice) and
one replayed decoding graph of the batch's size. Variants (the default path is the last):

    unfolded    the LoRA shrink as its own BGMV kernel, the cache write and RoPE outside the
                attention kernel, every size symbolic to torch.compile (the path before
                these options)
    folded      + the shrink folded into the base matmul (cuBLAS)
    writes      + the attention kernel applies RoPE and writes the step's K/V
    static      + torch.compile's automatic dynamic sizes (the weights' sizes constant)
    split-k     + the split-K matmul where `matmul.preferred` (without `DecodeTuning.wide`)
    wide        + `DecodeTuning.wide`'s tiles for the shapes `matmul.choose` gives them
    no-pdl      + the expand's tiles after a folded matmul (`DecodeTuning.folded_expand`)
    default     + the step's Triton kernels launched as programmatic dependents (`DecodeTuning.pdl`)

--profile names variants whose step and prefill kernels are listed (`serve_profile.py`'s tables).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lorakit.serve import Engine, SamplingParams  # noqa: E402
from lorakit.serve.decode.tuning import DecodeTuning  # noqa: E402
from serve import build_model, byte_tokenizer, make_adapters  # noqa: E402
from serve_gpu import Suite, _unload  # noqa: E402
from serve_profile import (  # noqa: E402
    Args,
    greedy_graph,
    kernel_table,
    line_logger,
    profile_eager_step,
    profile_prefill,
    replay_ms,
)

_OFF = dict(wide=None, folded_expand=None, pdl=False)
VARIANTS = {  # each variant adds one change to the one before it; "default" is DecodeTuning()
    "unfolded": DecodeTuning(fold=False, attention_writes=False, split_k=False, dynamic=True, **_OFF),
    "folded": DecodeTuning(fold=True, attention_writes=False, split_k=False, dynamic=True, **_OFF),
    "writes": DecodeTuning(fold=True, attention_writes=True, split_k=False, dynamic=True, **_OFF),
    "static": DecodeTuning(fold=True, attention_writes=True, split_k=False, **_OFF),
    "split-k": DecodeTuning(fold=True, **_OFF),
    "wide": DecodeTuning(fold=True, folded_expand=None, pdl=False),
    "no-pdl": DecodeTuning(fold=True, pdl=False),
    "default": DecodeTuning(fold=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8b")
    parser.add_argument("--cases", default="b32:32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", default="")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    log = line_logger(Path(args.out))

    Args.device = args.device
    suite = Suite(Args(), build_model, byte_tokenizer, make_adapters)
    if torch.cuda.is_available():
        log(f"{torch.cuda.get_device_name()} torch {torch.__version__} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    model = build_model(args.size, suite.device, torch.bfloat16 if suite.device.type == "cuda" else torch.float32)
    cases = [(int(c.split(":")[0][1:]), int(c.split(":")[1])) for c in args.cases.split(",")]
    adapters_all = suite.adapters(model, max(pool for _, pool in cases))
    names = list(adapters_all)
    for batch, pool in cases:
        adapters = {n: adapters_all[n] for n in names[:pool]}
        rows = [names[(7 * i) % pool] for i in range(batch)] if pool > batch else names[:batch]
        prompts = suite.prompts(batch, model.config.vocab_size)
        for variant in args.variants.split(","):
            engine = None
            try:
                start = time.perf_counter()
                engine = Engine(model, suite.tok, max_batch=batch, max_queue=100000, max_adapters_on_device=pool,
                                context_length=512, decode_path="fast", tuning=VARIANTS[variant])
                engine.eos_ids = set()
                decoder = engine.decoder.decoder
                for name, files in adapters.items():
                    engine.load_adapter(name, files)
                with engine:
                    engine.generate(prompts, rows, SamplingParams(max_tokens=4, temperature=0))
                    record = run_case(suite, engine, prompts, rows, batch, variant in args.profile.split(","), log)
                record.update(size=args.size, case=f"b{batch}:{pool}", variant=variant,
                              build_s=round(time.perf_counter() - start, 1),
                              mode=decoder.lora_mode(batch, 1, False, engine.decoder.lora),
                              compile_error=decoder.fused.compile_error if decoder.fused else None)
                log(json.dumps(record))
            except Exception:
                import traceback

                log(f"b{batch}:{pool} {variant} failed\n" + traceback.format_exc())
            finally:
                if engine is not None:
                    _unload(engine, adapters)
                    del engine
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


def run_case(suite: Suite, engine: Engine, prompts, rows: list[str], batch: int, profile: bool, log) -> dict:
    seconds = {}
    for label, tokens in (("prefill", 1), ("whole", 128), ("whole2", 128)):
        suite.sync()
        t = time.perf_counter()
        engine.generate(prompts, rows, SamplingParams(max_tokens=tokens, temperature=0))
        suite.sync()
        seconds[label] = time.perf_counter() - t
    best = min(seconds["whole"], seconds["whole2"])
    record = dict(prefill_ms=round(seconds["prefill"] * 1e3, 1),
                  whole_ms=[round(seconds["whole"] * 1e3, 1), round(seconds["whole2"] * 1e3, 1)],
                  tokens_per_s=round(batch * 128 / best))
    key, graph = greedy_graph(engine.decoder, batch)
    if graph is None:  # no CUDA graphs (the CPU)
        return record
    record.update(step_ms=round(replay_ms(suite, graph), 3), key=list(key))
    if profile:
        kernel_table(profile_eager_step(suite, engine.decoder, key, graph), 5, "eager step", log, top=40)
        profile_prefill(suite, engine, rows, engine.model.config.vocab_size, log)
    return record


if __name__ == "__main__":
    main()
