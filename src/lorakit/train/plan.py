"""`lorakit plan`: what fits on a GPU, how much memory a training run needs and how long an
epoch takes, predicted without loading any weights (the model is built on the meta device).

    lorakit plan --model ./Llama-3.1-70B --gpu 80         # fits? which base, settings, peak, speed
    lorakit plan --model meta-llama/Llama-3.1-8B --gpu H100 --tokens-per-batch 8192
    lorakit plan --model ./my-model --quantize nf4 --gpu 24 --data train.jsonl
    lorakit plan --device cpu --batch-size 8 --seq-len 256     # peak RSS of a CPU run

Memory is `lorakit.train.memory`'s arithmetic for the GPU fast path (the same numbers `--memory auto`
starts from): base weights in bf16 (or NF4 / int8), adapter, its gradients and AdamW moments,
the activations kept for the backward and the step's transient tensors, the loss's logit
chunks. Without --quantize the plan tries a bf16 base first and an NF4 base when bf16 does
not fit. It also searches the longest sequence that fits (a micro-batch of one sequence, every
layer recomputed). Time assumes the fast path's matmul efficiency fitted to the H200 measurements
(bench/RESULTS.md: about 60% of the dense bf16 peak, scaled by each GPU's peak), plus a memory-bound
cost per token and a kernel-launch cost per step, which bound small models. For --gpu given in
GiB the time is that of a representative card of that memory class (SIZE_CLASSES), named in the
output.

With `--device cpu` it predicts the peak resident memory of `lorakit train --device cpu` (a
Llama-family model, no gradient checkpointing) above
what the interpreter and the imports hold: the generic path (transformers' own layers) in the
precision the run would pick, each micro-batch in pieces of `--max-tokens` tokens, plus the
load, which maps the checkpoint while it makes a copy in another dtype. Checked against the
bundled model's measured peaks (tests/test_plan.py, bench/plan_cpu.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters.config import ALL_LINEAR, LoraConfig
from lorakit.train.memory import (
    ADAM_BYTES,
    HEADROOM,
    GiB,
    Shape,
    activation_bytes,
    choose,
    generic_activation_bytes,
    generic_logit_bytes,
    transient_bytes,
)

GPUS = {
    "H100": (79.1, 989.0),
    "H200": (139.8, 989.0),
    "A100-80": (79.1, 312.0),
    "L4": (22.0, 121.0),
}
"""name -> (GiB the device reports, dense bf16 TFLOP/s by the vendor's datasheet)."""
SIZE_CLASSES = (
    (24.0, "L4", 121.0),
    (48.0, "L40S", 362.0),
    (80.0, "H100", 989.0),
    (math.inf, "H200", 989.0),
)
"""For --gpu in GiB: (up to this many GiB, the card whose speed the time is predicted for, its
dense bf16 TFLOP/s). The 48 GB class is timed as an L40S; an RTX A6000 of the same memory has
about 155 TFLOP/s, so its matmul-bound time is about 2.3x longer."""
BASES = ("bf16", "nf4")
"""What the plan tries, in order, without --quantize: the first base that fits is picked."""
BASE_NAMES = {"bf16": "bf16", "nf4": "NF4", "int8": "int8"}
SEQUENCE_STEP = 256
"""The longest sequence that fits is searched in steps of this many tokens."""
EFFICIENCY = 0.60
"""Share of the dense bf16 peak the fast path's matmuls reach, fitted with MEMORY_S to the H200
measurements (8B, long-tailed data: 13,561 tokens/s at about 40 GFLOP per token; fixed length:
13,759 at about 38; 1B fixed length: 81,103 at about 5)."""
MEMORY_S = 9e-11
"""Seconds per token per (layer x hidden size) that no matmul hides: norms, rotary embeddings,
activations, the rank-r LoRA products, all bound by memory traffic. Without it a peak-FLOPs model
predicts nearly a million tokens/s for a 135M model; with it, the 1B is within 12% and the 8B within 8%."""
LAUNCH_S = 150e-6
"""Seconds per decoder layer per micro-batch of kernel launches (forward and backward): the floor
that bounds small models at small batches."""
MEASURED_PARAMS = 0.9e9
"""Below about the 1B's decoder parameters the speed is an extrapolation (no small model was measured)."""
USABLE = 0.92
"""Share of the device's memory a run plans for (as --memory auto does with free memory)."""
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per NF4 weight: 4 bits, an 8-bit absmax per 64 weights, an fp32 per 256 absmax blocks."""
NF4_TABLES = 4 * (16 + 256 + 1)
"""Bytes per NF4 tensor: the 16-value code, the absmax's own 256-value code and its offset (fp32)."""
CPU_RUNTIME = 48 * 2**20
"""What a CPU run holds beside its tensors (tokenizer, data, PyTorch's kernel buffers): 48 MiB
measured with the bundled model, after loading it and before its weights were read."""
CPU_RETENTION = 2.0
"""glibc's malloc keeps freed blocks under its mmap threshold (which grows to 32 MiB) in its heaps
rather than returning them, so a step's freed activations can still count in the peak RSS:
measured on the bundled model: 0.7x to 0.8x the activations in bf16, 1.25x to 1.8x in fp32 (bench/RESULTS.md)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAX_GPU_GIB = 1_048_576
"""The largest --gpu memory size accepted (1 PiB): larger is a typo, and past about 1e300 the
arithmetic overflows."""
MAX_COUNT = 2**31 - 1
"""The largest --tokens-per-batch, --rank, --seq-len, --batch-size or --max-tokens accepted."""


@dataclass
class PlanArgs:
    """Predict peak GPU memory and time per epoch of `lorakit train` without loading weights."""

    model: str | None = None
    """Base model: a local transformers directory or a hub id; omitted: the bundled SmolLM2-135M-Instruct."""
    gpu: str = "H100"
    """H100, H200, A100-80, L4, or a memory size in GiB (24, 48, 80: timed as an L4-, L40S-, H100-class card)."""
    quantize: str | None = None
    """nf4 or int8: the base quantized as `lorakit train --quantize` would; bf16: not quantized;
    omitted: bf16 if it fits, else nf4."""
    tokens_per_batch: int = 8192
    """Tokens per micro-batch (packed: --tokens-per-batch; padded: batch_size x seq_len)."""
    rank: int = 16
    """LoRA rank r."""
    targets: str = ALL_LINEAR
    """Modules to adapt (as lorakit train's --targets)."""
    data: str | None = None
    """A training data file: its tokens give the time per epoch."""
    seq_len: int = 1024
    """Maximum tokens per example (as lorakit train's --seq-len)."""
    device: str = "cuda"
    """cuda (the GPU fast path's memory, against --gpu) or cpu (peak RSS of lorakit train --device cpu)."""
    precision: str = "auto"
    """--device cpu: auto (bf16 where this CPU has native bf16, as lorakit train picks), fp32 or bf16."""
    batch_size: int = 8
    """--device cpu: sequences per micro-batch, each counted as --seq-len tokens (as lorakit train's --batch-size)."""
    max_tokens: int | None = None
    """--device cpu: tokens per piece of a micro-batch (as lorakit train's --max-tokens; default 256)."""

    def __post_init__(self) -> None:
        gpu_spec(self.gpu)  # a bad --gpu fails before anything is built
        if self.quantize not in (None, *BASE_NAMES):
            raise ValueError(f"--quantize must be nf4, int8 or bf16 (or omitted: bf16 if it fits, else nf4), "
                             f"got {self.quantize!r}")
        for name in ("tokens_per_batch", "rank", "seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 < value <= MAX_COUNT:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}; "
                                 f"at most {MAX_COUNT:,} accepted")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or not 0 < self.max_tokens <= MAX_COUNT):
            raise ValueError(f"--max-tokens must be a positive integer, got {self.max_tokens!r}; at most "
                             f"{MAX_COUNT:,} accepted")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {self.device!r}")
        from lorakit.train.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device == "cpu" and self.data is not None:
            raise ValueError(f"--data {self.data} with --device cpu: the time per epoch is predicted for GPUs "
                             "only; drop --data")
        if self.device == "cpu" and self.quantize is not None:
            raise ValueError(f"--quantize {self.quantize} with --device cpu: the CPU plan covers a full-precision "
                             "base only; drop --quantize or plan for --device cuda")


def gpu_spec(gpu: str) -> tuple[float, float | None]:
    """(GiB, dense bf16 TFLOP/s or None) of a --gpu value."""
    if gpu in GPUS:
        return GPUS[gpu]
    try:
        gib = float(gpu)
    except ValueError:
        gib = 0.0
    if not 0 < gib <= MAX_GPU_GIB:  # also refuses nan and inf
        raise ValueError(f"--gpu must be one of {', '.join(GPUS)} or a memory size in GiB, got {gpu!r}; "
                         f"a size is a number above 0 and at most {MAX_GPU_GIB:,}")
    return gib, None


def speed_card(gpu: str) -> tuple[str, float]:
    """(the card the time is predicted for, its dense bf16 TFLOP/s): a named GPU itself, a size
    in GiB the first of SIZE_CLASSES at least that large."""
    if gpu in GPUS:
        return gpu, GPUS[gpu][1]
    gib, _ = gpu_spec(gpu)
    return next((f"{name}-class", tflops) for top, name, tflops in SIZE_CLASSES if gib <= top)


def meta_model(args: PlanArgs) -> torch.nn.Module:
    """The model with its adapter, on the meta device: shapes only, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.adapters.inject import inject
    from lorakit.base.models import resolve_model
    from lorakit.train.args import parse_targets

    if (args.model or "").startswith(("/", "./", "../", "~")) and not Path(args.model).expanduser().exists():
        raise FileNotFoundError(f"--model {args.model}: no such directory; expected a transformers model directory "
                                "(its config.json is enough) or a hub id")
    config = AutoConfig.from_pretrained(resolve_model(args.model))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    inject(model, LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=parse_targets(args.targets)))
    return model


def weight_bytes(model: torch.nn.Module, quantize: str | None) -> tuple[int, int]:
    """(base, adapter) bytes on the device: a bf16 base (decoder linears in NF4 / int8 when
    quantized, as `lorakit.base.quant` stores them) and fp32 adapters."""
    base = adapter = 0
    quantized = set()
    if quantize not in (None, "bf16"):  # every frozen linear weight but the output head's
        from lorakit.adapters.layers import LoraLinear

        for layer in getattr(getattr(model, "model", None), "layers", []):
            for module in layer.modules():
                if isinstance(module, LoraLinear | torch.nn.Linear) and not module.weight.requires_grad:
                    quantized.add(id(module.weight))
    for p in model.parameters():
        if p.requires_grad:
            adapter += 4 * p.numel()
        elif id(p) in quantized:
            rows = p.shape[0]
            base += math.ceil(NF4_BYTES * p.numel()) + NF4_TABLES if quantize == "nf4" else p.numel() + 4 * rows
        else:
            base += 2 * p.numel()
    return base, adapter


def plan(args: PlanArgs, model: torch.nn.Module | None = None) -> dict:
    """The prediction, as numbers (the command prints it). `model`: `meta_model(args)` built
    already (a table of many GPUs reuses it)."""
    model = model if model is not None else meta_model(args)
    if args.device == "cpu":
        return cpu_plan(args, model)
    shape = Shape.of(model.config)
    tokens = args.tokens_per_batch
    min_tokens = min(tokens, args.seq_len)
    gib, _ = gpu_spec(args.gpu)
    budget = int(USABLE * gib * GiB)
    tried = [fit_base(model, shape, base, tokens, min_tokens, budget) for base in
             ([args.quantize] if args.quantize else BASES)]
    picked = next((t for t in tried if t["choice"] is not None), tried[-1])
    choice = picked["choice"]
    result: dict = {
        "model": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "gpu": args.gpu,
        "budget_gib": budget / GiB,
        "allowed_gib": HEADROOM * budget / GiB,
        "base": picked["base"],
        "base_asked": args.quantize is not None,
        "base_why": base_reason(args.quantize, tried, min_tokens),
        "base_gib": picked["base_bytes"] / GiB,
        "adapter_gib": picked["adapter_bytes"] / GiB,
        "optimizer_gib": ADAM_BYTES * picked["trainable"] / GiB,
        "trainable": picked["trainable"],
        "tokens_per_batch": tokens,
        "seq_len": args.seq_len,
        "activations_gib": {
            "all recomputed": activation_bytes(shape, tokens, 0) / GiB,
            "none recomputed": activation_bytes(shape, tokens, shape.layers) / GiB,
        },
        "transient_gib": transient_bytes(shape, tokens) / GiB,
        "layers": shape.layers,
        "fixed_gib": picked["fixed"] / GiB,
    }
    limit = min(MAX_COUNT, getattr(model.config, "max_position_embeddings", None) or MAX_COUNT)
    result["seq_limit"] = limit
    result["longest_seq"] = longest_sequence(shape, picked["fixed"], budget, limit)
    if args.quantize is None and picked is not tried[-1]:  # what the smaller base would allow
        result["longest_seq_nf4"] = longest_sequence(shape, tried[-1]["fixed"], budget, limit)
    if choice is None:
        result.update(fits=False, why=picked["error"], need_gib=picked["need"] / GiB,
                       short_gib=(picked["need"] - HEADROOM * budget) / GiB, min_tokens=min_tokens)
        return result
    result.update(fits=True, keep_layers=choice.keep_layers, tokens=choice.tokens, peak_gib=choice.peak / GiB,
                  why=choice.reason)
    card, card_tflops = speed_card(args.gpu)
    params = base_params(model)
    result["speed_gpu"] = card
    result["tokens_per_s"] = tokens_per_second(shape, params, choice.keep_layers, args.seq_len, card_tflops,
                                               tokens_per_step=choice.tokens)
    result["speed_extrapolated"] = params < MEASURED_PARAMS
    if args.data is not None:
        result.update(data_time(args, result["tokens_per_s"]))
    return result


def fit_base(model: torch.nn.Module, shape: Shape, base: str, tokens: int, min_tokens: int, budget: int) -> dict:
    """`choose`'s settings for one base (bf16, nf4 or int8), or why it does not fit: then `need`
    is the peak with every layer recomputed at `min_tokens` per micro-batch."""
    base_bytes, adapter = weight_bytes(model, base)
    trainable = adapter // 4
    fixed = base_bytes + adapter + ADAM_BYTES * trainable
    out = {"base": base, "base_bytes": base_bytes, "adapter_bytes": adapter, "trainable": trainable,
           "fixed": fixed, "choice": None, "error": None,
           "need": fixed + activation_bytes(shape, min_tokens, 0) + transient_bytes(shape, min_tokens)}
    try:
        out["choice"] = choose(shape, tokens, fixed, budget, min_tokens=min_tokens)
    except ValueError as err:
        out["error"] = str(err)
    return out


def base_reason(quantize: str | None, tried: list[dict], min_tokens: int) -> str:
    """Why the plan picked its base, for the report."""
    picked = next((t for t in tried if t["choice"] is not None), None)
    if quantize is not None:
        return f"--quantize {quantize}"
    if picked is tried[0]:
        return "it fits, so the base is not quantized"
    bf16 = tried[0]
    why = (f"a bf16 base needs {bf16['need'] / GiB:.1f} GiB with every layer recomputed at {min_tokens:,} tokens a "
           f"micro-batch, {bf16['fixed'] / GiB:.1f} of it weights, adapter and optimizer")
    return why if picked is None else f"{why}; NF4 fits"


def longest_sequence(shape: Shape, fixed: int, budget: int, limit: int) -> int:
    """The longest sequence, in steps of SEQUENCE_STEP tokens (or `limit`, the model's context),
    of which a micro-batch of one fits `budget` with every layer recomputed, by `choose`'s own
    test; 0 when not even min(SEQUENCE_STEP, limit) tokens fit. The peak grows with the
    tokens, so a bisection finds it."""

    def length(k: int) -> int:
        return min(k * SEQUENCE_STEP, limit)

    def fits(n: int) -> bool:
        try:
            choose(shape, n, fixed, budget, min_tokens=n)
        except ValueError:
            return False
        return True

    low, high = 0, -(-limit // SEQUENCE_STEP)  # length(low) fits (0: nothing), find the last k that does
    while low < high:
        mid = (low + high + 1) // 2
        if fits(length(mid)):
            low = mid
        else:
            high = mid - 1
    return length(low)


def base_params(model: torch.nn.Module) -> int:
    """Parameters of the decoder layers' linear weights (what every token multiplies through)."""
    layers = getattr(getattr(model, "model", None), "layers", [])
    return sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() == 2 and not p.requires_grad)


def tokens_per_second(shape: Shape, params: int, keep_layers: int, context: int, tflops: float,
                      tokens_per_step: int | None = None) -> float:
    """Forward, input-gradient backward and the recomputed layers' second forward of the
    decoder's matmuls, the output head (about two thirds of positions supervised in chat data)
    and attention over `context / 2` earlier tokens on average, at EFFICIENCY of the peak; plus
    the memory-bound work per token (MEMORY_S) and, given the tokens per micro-batch, the kernel
    launches per step (LAUNCH_S), which dominate small models."""
    recomputed = (shape.layers - keep_layers) / shape.layers
    decoder = 2 * params * (2 + recomputed)
    head = 2 * shape.hidden * shape.vocab * 2 * 0.65
    attention = shape.layers * 2 * context * shape.q_dim * (3.5 + recomputed) / 2
    seconds = (decoder + head + attention) / (EFFICIENCY * tflops * 1e12) + MEMORY_S * shape.layers * shape.hidden
    if tokens_per_step:
        seconds += LAUNCH_S * shape.layers / tokens_per_step
    return 1 / seconds


def cpu_plan(args: PlanArgs, model: torch.nn.Module) -> dict:
    """Peak RSS of `lorakit train --device cpu` above the interpreter and imports, in bytes."""
    from lorakit.adapters.layers import LoraLinear
    from lorakit.base.models import resolve_model
    from lorakit.train.args import TrainArgs
    from lorakit.train.precision import autocast_dtype_for
    from lorakit.train.recipe import CPU_MAX_TOKENS

    bf16 = autocast_dtype_for(args.precision, torch.device("cpu")) is not None
    element = 2 if bf16 else 4
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers or not hasattr(model.config, "intermediate_size"):
        raise ValueError(f"--device cpu plans Llama-family decoders (model.layers of attention and a gated MLP); "
                         f"{type(model).__name__} is not one")
    shape = Shape.of(model.config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = element * sum(p.numel() for p in model.parameters() if not p.requires_grad)
    width = args.rank * sum(isinstance(m, LoraLinear) for m in layers[0].modules())
    # a piece: whole rows of --seq-len tokens (padded, every position supervised: the worst case)
    rows = min(args.batch_size, max(1, (args.max_tokens or CPU_MAX_TOKENS) // args.seq_len))
    parts = {
        "base": base,
        "adapter": 4 * trainable,
        "optimizer": ADAM_BYTES * trainable,
        "casts": 2 * trainable if bf16 else 0,  # autocast's bf16 copies of the adapter weights
        "activations": generic_activation_bytes(shape, rows * args.seq_len, width, bf16),
        "logits": generic_logit_bytes(shape, rows * (args.seq_len - 1), TrainArgs.loss_chunk, bf16),
        "runtime": CPU_RUNTIME,
    }
    peak = sum(parts.values())
    source = resolve_model(args.model)
    # transformers maps the checkpoint: in the run's dtype its pages are the weights (read
    # as the first step touches them); in another dtype they stay mapped while the copy is made
    load = checkpoint_bytes(source, model) + base + CPU_RUNTIME if stored_element(model) != element else 0
    return {
        "model": type(model).__name__,
        "device": "cpu",
        "precision": "bf16 base and autocast, fp32 adapter" if bf16 else "fp32",
        "trainable": trainable,
        "piece_tokens": rows * args.seq_len,
        "parts_gib": {k: v / GiB for k, v in parts.items()},
        "train_peak_gib": peak / GiB,
        "load_peak_gib": load / GiB,
        "peak_gib": max(peak, load) / GiB,
        "retention_gib": CPU_RETENTION * parts["activations"] / GiB,
    }


def stored_element(model: torch.nn.Module) -> int:
    """Bytes per weight in the dtype the model's config records (fp32 when it records none)."""
    return DTYPE_BYTES.get(str(getattr(model.config, "dtype", None) or "float32").removeprefix("torch."), 4)


def checkpoint_bytes(source: str, model: torch.nn.Module) -> int:
    """Bytes of the model's safetensors files where they are local, else its parameters in the
    dtype its config records."""
    files = list(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    if files:
        return sum(f.stat().st_size for f in files)
    return stored_element(model) * sum(p.numel() for p in model.parameters() if not p.requires_grad)


def cpu_report(result: dict) -> str:
    parts = result["parts_gib"]
    lines = [
        f"{result['model']}, {result['trainable']:,} trainable parameters; on the CPU in {result['precision']}, "
        f"pieces of {result['piece_tokens']} tokens",
        f"peak RSS above the interpreter and imports (GiB): training {result['train_peak_gib']:.2f} = base "
        f"{parts['base']:.2f} | adapter {parts['adapter']:.2f} | gradients + AdamW {parts['optimizer']:.2f} | "
        f"activations {parts['activations']:.2f} | loss logits {parts['logits']:.2f} | autocast copies "
        f"{parts['casts']:.2f} | tokenizer, data, buffers {parts['runtime']:.2f}",
    ]
    if result["load_peak_gib"]:
        lines.append(f"loading: {result['load_peak_gib']:.2f} (the checkpoint stays mapped while its copy in the "
                     "run's dtype is made)")
    lines.append(f"peak: {result['peak_gib']:.2f} GiB; glibc's malloc may hold up to {result['retention_gib']:.2f} "
                 "GiB more of freed activations (MALLOC_MMAP_THRESHOLD_=131072 makes it return them)")
    return "\n".join(lines)


def data_time(args: PlanArgs, rate: float | None) -> dict:
    from transformers import AutoTokenizer

    from lorakit.base.models import resolve_model
    from lorakit.data.packing import budget_bins
    from lorakit.data.sft import load_examples

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    examples, stats = load_examples(args.data, tokenizer, args.seq_len)
    lengths = [len(e.input_ids) for e in examples]
    out = {"data_examples": len(examples), "data_tokens": stats.tokens,
           "data_batches": len(budget_bins(lengths, max(args.tokens_per_batch, args.seq_len)))}
    if rate:
        out["epoch_s"] = stats.tokens / rate
    return out


def report(result: dict) -> str:
    if result.get("device") == "cpu":
        return cpu_report(result)
    lines = [*answer(result), ""]
    lines += [
        f"{result['model']}, {result['trainable']:,} trainable parameters; {result['tokens_per_batch']} tokens per "
        f"micro-batch asked; on {result['gpu']} (planning for {result['budget_gib']:.1f} GiB)",
        f"memory (GiB): base {result['base_gib']:.2f} ({BASE_NAMES[result['base']]}) | adapter "
        f"{result['adapter_gib']:.2f} | gradients + AdamW {result['optimizer_gib']:.2f} | activations "
        f"{result['activations_gib']['all recomputed']:.2f} (every layer recomputed) to "
        f"{result['activations_gib']['none recomputed']:.2f} (none) | transient and logits {result['transient_gib']:.2f}",
    ]
    if "tokens_per_s" in result:
        text = f"speed: about {result['tokens_per_s']:,.0f} tokens/s on the GPU fast path ({result['speed_gpu']})"
        if result.get("speed_extrapolated"):
            text += " (extrapolated: the speed model is fitted to 1B and 8B measurements; smaller models are " \
                    "bound by memory traffic and kernel launches, so treat it as a rough upper bound)"
        lines.append(text)
    if "data_tokens" in result:
        text = f"data: {result['data_examples']} examples, {result['data_tokens']:,} tokens, {result['data_batches']} packed batches"
        if "epoch_s" in result:
            seconds = result["epoch_s"]
            text += f"; about {seconds / 60:.0f} minutes per epoch" if seconds >= 120 else f"; about {seconds:.0f} s per epoch"
        lines.append(text)
    return "\n".join(lines)


def answer(result: dict) -> list[str]:
    """The short block the report opens with: fits or not, with which settings, how fast, and
    the longest sequence that fits."""
    base = BASE_NAMES[result["base"]]
    longest = longest_text(result)
    if not result["fits"]:
        where = f"on {result['gpu']}" + (" GiB" if result["gpu"] not in GPUS else "")
        asked = result["base_asked"]
        even = f"{'with' if asked else 'even with'} {article(base)} {base} base"
        lines = [f"fits: no: {even} and every layer recomputed, {result['min_tokens']:,} tokens a micro-batch need "
                 f"{result['need_gib']:.1f} GiB, {result['short_gib']:.1f} GiB more than the "
                 f"{result['allowed_gib']:.1f} GiB the plan allows {where}",
                 f"  {longest}" + ("; lower --seq-len to train" if result["longest_seq"] else "")]
        if asked:
            lines.append(f"  base: {base} ({result['base_why']})")
        elif result["base"] != "bf16":
            lines.append(f"  bf16 tried first: {result['base_why']}")
        return lines
    keep, layers = result["keep_layers"], result["layers"]
    layers_text = ("no layer recomputed" if keep == layers else "every layer recomputed" if keep == 0
                   else f"recompute all but the last {keep} of {layers} layers")
    return [
        f"fits: yes: {base} base, {layers_text}, {result['tokens']:,} tokens a micro-batch (sequences up to "
        f"{result['seq_len']:,})",
        f"  peak {result['peak_gib']:.1f} GiB of {result['budget_gib']:.1f}; about {result['tokens_per_s']:,.0f} "
        f"tokens/s on {article(result['speed_gpu'])} {result['speed_gpu']}"
        f"{' card' if result['speed_gpu'].endswith('-class') else ''}; {longest}",
        f"  base: {base} ({result['base_why']})",
        f"  layers: {result['why']}",
    ]


def longest_text(result: dict) -> str:
    n = result["longest_seq"]
    text = f"longest sequence that fits: {n:,} tokens" if n else (
        f"longest sequence that fits: none (not even {min(SEQUENCE_STEP, result['seq_limit'])} tokens: the weights, "
        f"adapter and optimizer take {result['fixed_gib']:.1f} GiB of the {result['allowed_gib']:.1f} allowed)")
    if n and n == result["seq_limit"]:
        text += " (the model's context, max_position_embeddings)"
    nf4 = result.get("longest_seq_nf4", 0)
    if nf4 > n:
        text += f"; {nf4:,} with an NF4 base" + (" (the model's context)" if nf4 == result["seq_limit"] else "")
    return text


def article(name: str) -> str:
    """"an" before a name read letter by letter from a vowel sound (an H100, an NF4 base)."""
    return "an" if name[0].upper() in "AEFHILMNORSX" else "a"
