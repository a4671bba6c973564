"""The options of `lorakit train`: one dataclass whose field docstrings are the CLI's --help.

Everything is validated when the dataclass is made, before any file is read or written; an
error names the option, the bad value and what is accepted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from lorakit.adapters.config import ALL_LINEAR, LoraConfig
from lorakit.evaluation.metrics import parse_metric
from lorakit.train import distributed
from lorakit.train.memory import check_memory_args
from lorakit.train.objectives import OBJECTIVES, grpo, preference
from lorakit.train.precision import PRECISIONS
from lorakit.train.track import parse_report_to

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainArgs:
    """Fine-tune a causal language model with LoRA."""

    data: str
    """Training data: a .jsonl/.json/.csv/.parquet file or a datasets directory, with rows
    {"text"}, {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}; with --objective
    dpo|orpo: {"prompt", "chosen", "rejected"} or {"chosen": [messages], "rejected": [messages]}; with --objective
    grpo: {"prompt"} or {"messages"} ending with a user turn, other columns passed to the --reward functions."""
    output: str
    """Output directory: adapter, metrics.jsonl, loss.png, train_config.yaml, checkpoints."""
    model: str | None = None
    """Base model: a local transformers directory or a hub id; omitted: the bundled SmolLM2-135M-Instruct."""
    eval_data: str | None = None
    """Held-out data (same formats) for eval_loss."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: str = ALL_LINEAR
    """Modules to adapt: all-linear, comma-separated module names (q_proj,v_proj), or a regex."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(rank) (rank-stabilised LoRA)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    lr: float = 2e-4
    """Peak learning rate."""
    loraplus_ratio: float = 1.0
    """LoRA+: learning rate of the B matrices = lr * ratio (16 is the paper's choice; 1 = plain LoRA)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""
    warmup_steps: int | None = None
    """Linear warmup steps (default: 3% of the steps)."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_tokens: int | None = None
    """Run each micro-batch in pieces of at most this many (padded) tokens: the same update with
    a fraction of the activation memory (default: 256 on CPU, whole micro-batches elsewhere)."""
    seq_len: int = 1024
    """Maximum tokens per sequence; longer examples are truncated (and counted in the log)."""
    packing: bool | None = None
    """Pack examples end to end, never attending to each other (default: on the CUDA fast path, when lengths vary)."""
    tokens_per_batch: int | None = None
    """Packed on the CUDA fast path: micro-batches of whole examples up to this many tokens, padding-free (batch_size * seq_len)."""
    loss_on: str = "completion"
    """completion: loss on completions / assistant turns only; all: on every token."""
    skip_bad: bool = False
    """Skip bad data rows (and report how many) instead of stopping at the first."""
    special_tokens_in_content: bool = False
    """Read special-token text in the data (<|im_start|> typed in a message, a prompt or a text row) as
    control tokens, for data that really holds them; by default it is plain text, so a row cannot forge turns."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; None disables clipping."""
    precision: str = "auto"
    """auto (bf16 autocast on a GPU or CPU with native bf16 arithmetic, fp32 elsewhere), fp32 or bf16.
    Adapter weights and optimizer state stay fp32 either way."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    seed: int = 0
    """Seed for adapter initialisation, data order and dropout."""
    log_every: int = 10
    """Log (metrics.jsonl and the console) every N steps."""
    eval_every: int | None = None
    """Evaluate every N steps (default: about 5 times per run, and at the end)."""
    save_every: int | None = None
    """Save a checkpoint every N steps (default: at each evaluation, and at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (oldest are deleted); 0 keeps all."""
    early_stopping: int | None = None
    """Stop after this many evaluations without a better eval_loss."""
    eval_samples: int = 0
    """At each eval, greedy answers to the first N held-out prompts: samples.jsonl and a console table."""
    metric: str | None = None
    """Task metric on held-out answers at each eval: exact, json, regex:PATTERN or MODULE:FUNCTION."""
    metric_rows: int | None = None
    """Held-out rows --metric answers at each eval (default: all)."""
    save_best: str | None = None
    """Keep the adapter of the best eval in OUTPUT/best/: eval_loss, the --metric's name, or kl."""
    track_forgetting: bool = False
    """At each eval, KL to the base (adapter disabled) on the base's own text for general prompts."""
    report_to: str | None = None
    """Trackers fed with every record: tensorboard, mlflow, wandb (comma-separated; lorakit[track])."""
    resume: bool = False
    """Continue from the latest checkpoint in the output directory (its settings must match these)."""
    overwrite: bool = False
    """Replace the run already in the output directory (a non-empty directory is refused otherwise)."""
    quantize: str | None = None
    """Quantize the frozen base while loading: nf4 (4-bit NormalFloat, QLoRA) or int8 (bitsandbytes, CPU or GPU)."""
    device: str | None = None
    """cpu, cuda, cuda:1 ... (default: cuda when available)."""
    loss_chunk: int = 2048
    """Supervised positions per chunk of the output head + cross-entropy (bounds the logits' memory)."""
    strategy: str = "auto"
    """Under torchrun: ddp (replicated base, adapter gradients all-reduced), fsdp (FSDP2: base
    sharded across processes) or auto (ddp). batch_size is the global batch, split across processes."""
    fast_path: bool = True
    """On CUDA, train Llama-family models through lorakit's fused GPU kernels (lorakit.train.fastpath); false: the generic path."""
    memory: str = "auto"
    """CUDA fast path: auto fits the recomputed layers and micro-batch to free memory (or --memory-limit); off: as --gradient-checkpointing."""
    memory_limit: float | None = None
    """GiB the run may allocate on the device with --memory auto (default: what is free)."""
    objective: str = "sft"
    """sft; preference tuning on chosen/rejected pairs: dpo (against a reference) or orpo (no reference);
    or grpo, reinforcement learning from --reward functions on prompt rows (docs/training.md, GRPO)."""
    beta: float | None = None
    """DPO: strength of the pull towards the reference (default 0.1); ORPO: weight of the odds-ratio term
    (default 0.1); GRPO: weight of the KL to the base, TRL's k3 estimate (default 0: no reference pass)."""
    label_smoothing: float = 0.0
    """DPO: the assumed share of flipped preference labels (conservative DPO), in [0, 0.5)."""
    rpo_alpha: float = 0.0
    """DPO: add this times the mean nll per token of the chosen answers (RPO; TRL's rpo_alpha); 0: off, 1.0 typical."""
    init_adapter: str | None = None
    """Start from this adapter directory (e.g. an SFT run's output) instead of a fresh adapter."""
    reference: str = "auto"
    """DPO's reference: base (the model with its adapter disabled), init (a frozen copy of
    --init-adapter) or auto (init when --init-adapter is given, else base)."""
    reward: list[str] | None = None
    """GRPO: a reward function, repeatable: exact, json, regex:PATTERN (scored as --metric, against the row's
    reference answer) or MODULE:FUNCTION, TRL's func(prompts, completions, **columns) -> list[float | None]."""
    reward_weights: list[float] | None = None
    """GRPO: one weight per --reward, in order (default: 1 each); e.g. --reward-weights [1.0,0.5]."""
    num_generations: int = 8
    """GRPO: completions sampled per prompt (G). A step takes batch_size * grad_accum prompts; a micro-batch
    is batch_size prompts x G completions."""
    max_completion_tokens: int = 256
    """GRPO: most tokens of a sampled completion (prompts keep their last seq_len - this many tokens)."""
    temperature: float = 1.0
    """GRPO: sampling temperature of the rollouts (the loss scores tokens at the same temperature)."""
    top_p: float = 1.0
    """GRPO: nucleus sampling of the rollouts: sample from the smallest set of tokens holding this probability."""
    scale_rewards: str = "group"
    """GRPO: divide advantages by the std of the prompt's group (group), of the whole step (batch), or not (none)."""
    loss_type: str = "dapo"
    """GRPO: grpo (mean per completion, then over completions), dr_grpo (sum / (completions * max_completion_tokens))
    or dapo (sum / the step's completion tokens); TRL's meanings."""
    epsilon: float = 0.2
    """GRPO: clip the importance ratio below at 1 - epsilon."""
    epsilon_high: float | None = None
    """GRPO: clip the importance ratio above at 1 + epsilon_high (default: epsilon; DAPO suggests 0.28)."""
    updates_per_rollout: int = 1
    """GRPO: optimizer steps on each rollout before sampling again (TRL's num_iterations)."""
    resolved: dict[str, Any] | None = None
    """Ignored: the facts a run records in its train_config.yaml (device, steps, ...), accepted so that
    file can be passed back with --config; the new run records its own."""

    def __post_init__(self) -> None:
        positive = {"rank": self.rank, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "seq_len": self.seq_len, "log_every": self.log_every, "loss_chunk": self.loss_chunk}
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("max_steps", "eval_every", "save_every", "early_stopping", "max_tokens", "tokens_per_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer or omitted, got {value!r}")
        rules = {"epochs": "> 0", "lr": "> 0", "loraplus_ratio": "> 0", "max_grad_norm": "> 0", "weight_decay": ">= 0", "alpha": ""}
        for name, rule in rules.items():
            value = getattr(self, name)
            if name == "max_grad_norm" and value is None:
                continue  # no clipping
            finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not finite or (rule == "> 0" and value <= 0) or (rule == ">= 0" and value < 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number {rule}".rstrip() + f", got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.loss_on not in ("completion", "all"):
            raise ValueError(f"--loss-on must be completion or all, got {self.loss_on!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps!r}")
        if self.strategy not in distributed.STRATEGIES:
            raise ValueError(f"--strategy must be one of {', '.join(distributed.STRATEGIES)}, got {self.strategy!r}")
        check_memory_args(self.memory, self.memory_limit)
        if self.keep_checkpoints < 0:
            raise ValueError(f"--keep-checkpoints must be >= 0, got {self.keep_checkpoints!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "grpo":
            if self.beta is None:
                self.beta = 0.0
            grpo.check_grpo_args(self)
        else:
            if self.beta is None:
                self.beta = 0.1
            grpo.check_unused(self)
            preference.check_preference_args(self.objective, self.reference, self.init_adapter, self.beta,
                                             self.label_smoothing, self.packing, self.rpo_alpha)
        self.lora_config()  # validates rank, alpha, dropout and targets early
        _check_watching(self)

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=parse_targets(self.targets),
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
        )


def parse_targets(text: str) -> list[str] | str:
    """all-linear, a comma-separated list of module names, or (anything else) a regex."""
    text = text.strip()
    if text == ALL_LINEAR:
        return ALL_LINEAR
    if re.fullmatch(r"[A-Za-z0-9_.]+(\s*,\s*[A-Za-z0-9_.]+)*", text):
        return [t.strip() for t in text.split(",")]
    return text


def _check_watching(args: TrainArgs) -> None:
    """Validate the watching options of `lorakit train` ."""
    if not isinstance(args.eval_samples, int) or args.eval_samples < 0:
        raise ValueError(f"--eval-samples must be an integer >= 0, got {args.eval_samples!r}")
    if args.metric_rows is not None and (not isinstance(args.metric_rows, int) or args.metric_rows <= 0):
        raise ValueError(f"--metric-rows must be a positive integer or omitted, got {args.metric_rows!r}")
    metric = parse_metric(args.metric) if args.metric is not None else None
    parse_report_to(args.report_to)
    if args.save_best is not None:
        accepted = ["eval_loss"] + ([metric.name] if metric else []) + (["kl"] if args.track_forgetting else [])
        accepted += ["eval_reward", "eval_exact"] if args.objective == "grpo" else []
        if args.save_best not in accepted:
            raise ValueError(f"--save-best {args.save_best!r} is not logged by this run; accepted: "
                             f"{', '.join(accepted)} (a task metric needs --metric, kl needs --track-forgetting)")
    if args.objective == "grpo" and (args.eval_samples or metric or args.track_forgetting):
        raise ValueError("--eval-samples, --metric and --track-forgetting do not apply to --objective grpo: it logs "
                         "eval_reward and eval_exact on greedy answers to --eval-data, samples.jsonl and kl itself")
    if args.objective != "sft" and (args.eval_samples or metric):
        raise ValueError(f"--eval-samples and --metric generate from prompt/completion eval rows; "
                         f"--objective {args.objective} evaluates pairs (its rewards and accuracy are logged)")
    needs_eval = [o for o, on in (("--eval-samples", args.eval_samples), ("--metric", metric),
                                  ("--save-best", args.save_best), ("--track-forgetting", args.track_forgetting)) if on]
    if needs_eval and not args.eval_data:
        raise ValueError(f"{needs_eval[0]} acts at each evaluation, and a run evaluates only with --eval-data")
