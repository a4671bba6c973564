"""The `lorakit` command line: train, generate, eval, merge, info, serve, compare.

Each subcommand's options are the fields of a dataclass; the field docstrings are the
`--help` text. Every option can come from a YAML file (`--config run.yaml`) and be
overridden by a later command-line option. Subcommand parsers are built on demand, so
`lorakit info` never imports the training stack and `serve` loads only when asked for.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lorakit.data.sft import DataError

COMMANDS = {
    "train": "fine-tune a base model with LoRA on your data",
    "generate": "complete a prompt (or a chat message) with the base model, with or without an adapter",
    "eval": "loss and perplexity of a model (with or without an adapter) on a data file, as JSON",
    "merge": "fold an adapter into the base weights and save a plain transformers model",
    "info": "describe a saved adapter",
    "check": "will vLLM, SGLang, llama.cpp, PEFT load this adapter and act on it? a verdict per target",
    "convert": "rewrite an adapter as plain LoRA (one rank and alpha, no DoRA or modules_to_save) that every target accepts",
    "export": "write an adapter for llama.cpp / Ollama: --format gguf-lora, gguf (merged) or ollama",
    "data": "show training rows as the model sees them: --preview N rows, supervised tokens marked",
    "serve": "serve the base model and adapters over an OpenAI-compatible HTTP API",
    "plan": "what fits on a GPU: a training run's memory, settings and speed, predicted without loading weights",
    "compare": "what adapters learned and forgot: KL, perplexity and agreement against the base, task metric, report.html",
}


MAX_COUNT = 2**31 - 1
"""The largest token count or batch size an option accepts."""


def _positive(**values: int) -> None:
    """Refuse a count that is not a positive integer of at most MAX_COUNT, naming its option."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_COUNT:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}; "
                             f"at most {MAX_COUNT:,} accepted")


@dataclass
class GenerateArgs:
    """Complete a prompt with the base model, with or without an adapter."""

    model: str | None = None
    """Base model: a local transformers directory or a hub id; omitted: the bundled SmolLM2-135M-Instruct."""
    adapter: str | None = None
    """Adapter directory (adapter_config.json + adapter_model.safetensors)."""
    prompt: str | None = None
    """Raw text to continue."""
    chat: str | None = None
    """A user message, wrapped in the tokenizer's chat template."""
    system: str | None = None
    """A system message for --chat."""
    max_new_tokens: int = 128
    """Most tokens to generate."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""
    seed: int = 0
    """Seed for sampling."""
    quantize: str | None = None
    """Quantize the frozen base while loading: nf4 (4-bit NormalFloat) or int8 (bitsandbytes, CPU or GPU)."""
    device: str | None = None
    """cpu, cuda, ... (default: cuda when available)."""

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.chat is None):
            raise ValueError("give exactly one of --prompt TEXT or --chat TEXT")
        if self.max_new_tokens <= 0:
            raise ValueError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")


@dataclass
class EvalArgs:
    """Loss and perplexity of a model on a data file, printed as JSON."""

    data: str
    """Data file or datasets directory (the formats and shapes `train` accepts)."""
    model: str | None = None
    """Base model: a local transformers directory or a hub id; omitted: the bundled SmolLM2-135M-Instruct."""
    adapter: str | None = None
    """Adapter directory; omitted: the base model alone."""
    seq_len: int = 1024
    """Maximum tokens per example (longer ones are truncated)."""
    batch_size: int = 8
    """Examples per forward pass."""
    loss_on: str = "completion"
    """completion: loss on completions / assistant turns only; all: on every token."""
    skip_bad: bool = False
    """Skip bad rows (and report how many) instead of stopping."""
    quantize: str | None = None
    """Quantize the frozen base while loading: nf4 (4-bit NormalFloat) or int8 (bitsandbytes, CPU or GPU)."""
    device: str | None = None
    """cpu, cuda, ... (default: cuda when available)."""

    def __post_init__(self) -> None:
        _positive(seq_len=self.seq_len, batch_size=self.batch_size)


@dataclass
class MergeArgs:
    """Fold an adapter into the base weights and save a full transformers model."""

    adapter: str
    """Adapter directory to merge."""
    output: str
    """Directory for the merged model (safetensors + tokenizer); an existing one only when an earlier
    merge wrote it (or with --overwrite)."""
    model: str | None = None
    """Base model: a local transformers directory or a hub id; omitted: the bundled SmolLM2-135M-Instruct."""
    overwrite: bool = False
    """Write into an existing --output that merge did not write; only the files merge writes are replaced."""


@dataclass
class DataArgs:
    """Show the first rows of a data file as training renders them, supervised tokens marked."""

    data: str
    """Data file or datasets directory (the formats and shapes `train` accepts)."""
    preview: int = 5
    """How many rows to show."""
    model: str | None = None
    """Base model whose tokenizer renders the rows; omitted: the bundled SmolLM2-135M-Instruct."""
    adapter: str | None = None
    """Render with the chat template saved beside this adapter instead of the base model's."""
    seq_len: int = 1024
    """Maximum tokens per example (longer ones are truncated, as in training)."""
    loss_on: str = "completion"
    """completion: loss on completions / assistant turns only; all: on every token."""
    special_tokens_in_content: bool = False
    """Read special-token text in the data as control tokens, as `lorakit train --special-tokens-in-content` does."""

    def __post_init__(self) -> None:
        if self.preview <= 0:
            raise ValueError(f"--preview must be a positive number of rows, got {self.preview}")
        _positive(seq_len=self.seq_len)
        if self.loss_on not in ("completion", "all"):
            raise ValueError(f"--loss-on must be completion or all, got {self.loss_on!r}")


@dataclass
class CheckArgs:
    """A verdict per serving target (loads and acts / loads with warnings / refused), with reasons."""

    adapter: str
    """Adapter directory (also accepted as the first argument: lorakit check ADAPTER)."""
    target: str = "all"
    """vllm, sglang, llama.cpp, peft, a comma-separated list of them, or all."""
    model: str | None = None
    """Base model to check against (default: the one recorded in adapter_config.json)."""

    def __post_init__(self) -> None:
        from lorakit.export.check import parse_targets

        parse_targets(self.target)


@dataclass
class ConvertArgs:
    """Rewrite an adapter as plain LoRA, reporting the error per module and the greedy-token agreement."""

    adapter: str
    """Adapter directory (also accepted as the first argument: lorakit convert ADAPTER)."""
    to: str = "plain-lora"
    """What to convert to: plain-lora (one rank and alpha for every module, no DoRA, no modules_to_save), or
    per-expert (LoRA on fused MoE experts written expert by expert, as the model's Hub checkpoints name them)."""
    rank: int | None = None
    """The common rank (default: the adapter's largest); DoRA and modules_to_save go through a rank-R SVD."""
    max_error: float = 0.05
    """Refuse (and write nothing) when a module's relative error ||dW' - dW|| / ||dW|| is above this."""
    output: str | None = None
    """Directory for the converted adapter (default: ADAPTER-plain beside it); an existing one only when
    an earlier convert wrote it (or with --overwrite). It may not be or hold the adapter or the base."""
    model: str | None = None
    """Base model (default: the one recorded in adapter_config.json)."""
    overwrite: bool = False
    """Write into an existing --output that convert did not write; only the files convert writes are
    replaced, nothing else there is removed."""

    def __post_init__(self) -> None:
        if self.to not in ("plain-lora", "per-expert"):
            raise ValueError(f"--to must be plain-lora or per-expert, got {self.to!r}")
        if self.rank is not None and self.rank <= 0:
            raise ValueError(f"--rank must be a positive integer, got {self.rank}")
        if not (math.isfinite(self.max_error) and self.max_error >= 0):
            raise ValueError(f"--max-error must be a finite number >= 0, got {self.max_error}")


EXPORT_FORMATS = ("gguf-lora", "gguf", "ollama")


@dataclass
class ExportArgs:
    """Write an adapter for llama.cpp or Ollama, through the gguf library."""

    adapter: str
    """Adapter directory (also accepted as the first argument: lorakit export ADAPTER)."""
    format: str
    """gguf-lora: a llama.cpp LoRA adapter (llama-server --lora FILE); gguf: base + adapter merged into
    one GGUF; ollama: a merged GGUF and a Modelfile whose TEMPLATE and stops come from the adapter's chat template."""
    output: str | None = None
    """File (gguf-lora, gguf) or directory (ollama); default: beside the adapter, ADAPTER.gguf,
    ADAPTER-DTYPE.gguf or ADAPTER-ollama/."""
    dtype: str | None = None
    """gguf-lora: f32 (default) or f16; gguf and ollama: q8_0 (default), f16 or bf16."""
    model: str | None = None
    """Base model (default: the one recorded in adapter_config.json)."""
    overwrite: bool = False
    """Replace an existing --output that an earlier export of this --format did not write (ollama: only
    model.gguf and Modelfile in it); never the adapter's or the base model's files."""

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        accepted = ("f32", "f16") if self.format == "gguf-lora" else ("q8_0", "f16", "bf16")
        self.dtype = self.dtype or accepted[0]
        if self.dtype not in accepted:
            raise ValueError(f"--dtype for --format {self.format} must be one of {', '.join(accepted)}, got {self.dtype!r}")


# the commands -----------------------------------------------------------------------------


def run_train(args: Any) -> None:
    from lorakit.train.recipe import train

    rollouts = None
    if args.objective == "grpo":  # GRPO samples through the serving engine, reading the live adapter
        try:
            from lorakit.serve.rollouts import Rollouts
        except ImportError as err:
            raise ValueError(f"--objective grpo samples through lorakit's serving engine, which is not "
                             f"available in this installation ({err})") from None
        # a prompt and its completion fit in --seq-len: the engine's KV cache needs no more
        rollouts = functools.partial(Rollouts, context_length=args.seq_len)
    train(args, rollouts=rollouts)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, a finished run leaves without interpreter teardown: the adapter,
        # metrics and trackers are written and the processes synchronised by now, and gloo's
        # threads occasionally abort a process in C++ static destruction ("terminate called
        # without an active exception"), which would report a finished run as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _load(model: str | None, adapter: str | None, device: str | None = None, quantize: str | None = None,
          warn: bool = True):
    """Base model and tokenizer, with the adapter and the chat template saved beside it."""
    from lorakit.adapters.files import load_adapter
    from lorakit.base.models import load_model
    from lorakit.base.templates import use_adapter_template

    base, tokenizer = load_model(model, device=device, quantize=quantize)
    if adapter is not None:
        load_adapter(base, adapter)
        warning = use_adapter_template(tokenizer, adapter)
        if warning and warn:
            print(f"warning: {warning}", file=sys.stderr)
    return base, tokenizer


def run_generate(args: GenerateArgs) -> None:
    import torch

    model, tokenizer = _load(args.model, args.adapter, args.device, args.quantize)
    device = next(model.parameters()).device
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.chat}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def run_eval(args: EvalArgs) -> None:
    from lorakit.data.sft import as_sequences, load_examples
    from lorakit.train.objectives.sft import evaluate
    from lorakit.train.runlog import log

    model, tokenizer = _load(args.model, args.adapter, args.device, args.quantize, warn=False)
    device = next(model.parameters()).device
    examples, stats = load_examples(args.data, tokenizer, args.seq_len, args.loss_on, args.skip_bad)
    log(stats.summary(args.data))
    loss, tokens = evaluate(model, as_sequences(examples, args.seq_len, False), args.batch_size,
                            tokenizer.pad_token_id, device)
    print(json.dumps({"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}))


def run_merge(args: MergeArgs) -> None:
    from lorakit.adapters.inject import merge_and_unload
    from lorakit.adapters.outputs import claim, input_paths
    from lorakit.base.models import DEFAULT_MODEL_NAME, cache_dir

    base = Path(args.model) if args.model else cache_dir() / DEFAULT_MODEL_NAME
    inputs = input_paths(("the adapter's directory", args.adapter), ("the base model's directory", base))
    target = claim(args.output, "merge", overwrite=args.overwrite, inputs=inputs)
    model, tokenizer = _load(args.model, args.adapter, "cpu", warn=False)
    merged = merge_and_unload(model)
    # Weights and tokenizer go into one staging directory renamed into place: a killed merge
    # never leaves a model without its tokenizer.
    with target.staged() as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    print(f"merged model written to {target.path}")


def run_plan(args: Any) -> None:
    from lorakit.train.plan import plan, report

    print(report(plan(args)))


def run_info(adapter: str) -> None:
    from lorakit.adapters.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter

    files = read_adapter(adapter)
    config = files.config
    targets = config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    size = (Path(adapter) / WEIGHTS_NAME).stat().st_size
    lines = {
        "adapter": str(Path(adapter)),
        "base model": config.base_model_name_or_path or "(not recorded)",
        "targets": targets,
        "rank": config.r,
        "alpha": f"{config.alpha:g}",
        "scaling": f"{config.scaling_for(''):g}",
        "dropout": config.dropout,
        "dora": config.use_dora,
        "chat template": _template_summary(adapter),
        "parameters": f"{files.num_parameters:,}",
        "file size": f"{size / 1e6:.2f} MB ({size:,} bytes; config in {CONFIG_NAME})",
    }
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")


def _template_summary(adapter: str) -> str:
    from lorakit.base.templates import TEMPLATE_FILE, saved_chat_template

    template = saved_chat_template(adapter)
    if template is None:
        return "(not saved; the base model's is used)"
    first = template.strip().splitlines()[0] if template.strip() else ""
    return f"{TEMPLATE_FILE} ({len(template)} chars): {first[:60]}{'...' if len(first) > 60 else ''}"


def run_check(args: CheckArgs) -> int:
    from lorakit.export.check import REFUSED, check, format_verdicts, parse_targets, read_facts

    verdicts = check(read_facts(args.adapter, args.model), parse_targets(args.target))
    print(format_verdicts(verdicts))
    return 1 if any(v.verdict == REFUSED for v in verdicts) else 0


def run_convert(args: ConvertArgs) -> None:
    from lorakit.export.convert import convert_to_plain

    output = args.output or f"{str(Path(args.adapter)).rstrip('/')}-{'plain' if args.to == 'plain-lora' else args.to}"
    if args.to == "per-expert":
        from lorakit.export.per_expert import convert_to_per_expert

        path, modules = convert_to_per_expert(args.adapter, output, args.model, overwrite=args.overwrite)
        return print(f"per-expert adapter ({modules:,} expert projections, exact) written to {path}")
    result = convert_to_plain(args.adapter, output, args.model, args.rank, args.max_error, overwrite=args.overwrite)
    errors = sorted(result.errors.items(), key=lambda kv: -kv[1])
    width = max(len(p) for p, _ in errors)
    print("relative error per module (||dW' - dW||_F / ||dW||_F), largest first:")
    for path, error in errors:
        print(f"  {path:<{width}}  {error:.2e}")
    print(f"greedy-token agreement with the original: {result.agreement:.1%}")
    print(f"plain LoRA (rank {result.rank}, alpha {result.alpha:g}) written to {result.output}")


def run_export(args: ExportArgs) -> None:
    stem = str(Path(args.adapter)).rstrip("/")

    def wrote(file: Path) -> None:
        size = file.stat().st_size
        print(f"wrote {file} ({size:,} bytes, {size / 2**20:.1f} MiB)")

    if args.format == "gguf-lora":
        from lorakit.export.gguf_lora import write_gguf_lora

        path = write_gguf_lora(args.adapter, args.output or f"{stem}.gguf", args.model, args.dtype or "f32",
                               overwrite=args.overwrite)
        wrote(path)
        print(f"llama.cpp LoRA adapter written to {path} (llama-server -m BASE.gguf --lora {path})")
    elif args.format == "gguf":
        from lorakit.export.gguf_model import write_gguf_model

        path = write_gguf_model(args.adapter, args.output or f"{stem}-{args.dtype}.gguf", args.model, args.dtype or "q8_0",
                                overwrite=args.overwrite)
        wrote(path)
        print(f"merged model written to {path} (llama-cli -m {path})")
    else:
        from lorakit.export.ollama import write_ollama

        path = write_ollama(args.adapter, args.output or f"{stem}-ollama", args.model, args.dtype or "q8_0",
                            overwrite=args.overwrite)
        for name in ("model.gguf", "Modelfile"):
            wrote(path / name)
        print(f"Ollama model written to {path} (cd {path} && ollama create NAME -f Modelfile)")


def run_data(args: DataArgs) -> None:
    from transformers import AutoTokenizer

    from lorakit.base.models import resolve_model
    from lorakit.base.templates import use_adapter_template
    from lorakit.data.preview import run_preview

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    if args.adapter is not None:
        use_adapter_template(tokenizer, args.adapter)
    run_preview(args.data, tokenizer, args.preview, args.seq_len, args.loss_on, args.special_tokens_in_content)


# parsing ----------------------------------------------------------------------------------


def _command(name: str) -> tuple[type | None, Callable[[Any], None]]:
    """The options dataclass and the handler of a subcommand, imported on demand."""
    if name == "train":
        from lorakit.train.args import TrainArgs

        return TrainArgs, run_train
    if name == "generate":
        return GenerateArgs, run_generate
    if name == "eval":
        return EvalArgs, run_eval
    if name == "merge":
        return MergeArgs, run_merge
    if name == "info":
        return None, run_info
    if name == "plan":
        from lorakit.train.plan import PlanArgs

        return PlanArgs, run_plan
    if name == "data":
        return DataArgs, run_data
    if name == "check":
        return CheckArgs, run_check
    if name == "export":
        return ExportArgs, run_export
    if name == "convert":
        return ConvertArgs, run_convert
    if name == "compare":
        from lorakit.compare.command import CompareArgs, run_compare

        return CompareArgs, run_compare
    if name == "serve":
        try:
            from lorakit.serve.command import ServeArgs, run_serve
        except ImportError as err:
            raise SystemExit(f"lorakit serve is not available in this installation ({err})") from None
        return ServeArgs, run_serve
    raise KeyError(name)


_UNDERSCORED = re.compile(r"--([a-z0-9]+(?:_[a-z0-9]+)+)")


def build_parser(name: str):
    """The jsonargparse parser of one subcommand."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    class Parser(ArgumentParser):
        # Options are spelled with dashes on the command line (--max-steps); the dataclass
        # fields and YAML keys keep underscores.
        def format_help(self) -> str:
            return _UNDERSCORED.sub(lambda m: "--" + m.group(1).replace("_", "-"), super().format_help())

        def format_usage(self) -> str:
            return _UNDERSCORED.sub(lambda m: "--" + m.group(1).replace("_", "-"), super().format_usage())

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    cls, _ = _command(name)
    parser = Parser(prog=f"lorakit {name}", description=COMMANDS[name], exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    if cls is None:  # info: one positional directory
        parser.add_argument("adapter", type=str, help="adapter directory")
    else:
        parser.add_class_arguments(cls, fail_untyped=True, sub_configs=True)
    return parser


def normalize_argv(argv: list[str], cls: type | None) -> list[str]:
    """--max-steps -> --max_steps, a bare boolean flag (--resume) -> --resume true, and a
    list option given one item at a time (--adapter a=DIR --adapter b=DIR) -> appends."""
    known = {f.name: f.type for f in fields(cls)} if cls is not None else {}
    known["print_config"] = None
    out: list[str] = []
    for i, token in enumerate(argv):
        if not token.startswith("--") or token == "--":
            out.append(token)
            continue
        option, eq, value = token[2:].partition("=")
        name = option.replace("-", "_")
        if name not in known:
            out.append(token)
            continue
        following = argv[i + 1] if i + 1 < len(argv) else None
        given = value if eq else following
        if str(known[name]).startswith("list[") and given is not None and not given.lstrip().startswith("["):
            # A repeatable list option (serve's --adapter NAME=DIR): each use appends one item.
            out.extend([f"--{name}+", given] if eq else [f"--{name}+"])
            continue
        out.append(f"--{name}{eq}{value}")
        is_bool = known[name] in (bool, "bool", "bool | None")
        if is_bool and not eq and (following is None or following.lower() not in ("true", "false")):
            out.append("true")
    return out


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: lorakit COMMAND [options]   (lorakit COMMAND --help for its options)",
        "",
        "LoRA fine-tuning for language models.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def parse(argv: Sequence[str]) -> tuple[str, Any]:
    """(command, its options object) from a command line."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    name = argv[0]
    if name not in COMMANDS:
        print(f"lorakit: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    cls, _ = _command(name)
    parser = build_parser(name)
    rest = list(argv[1:])
    if name in ("check", "export", "convert") and rest and not rest[0].startswith("-"):
        rest = ["--adapter", *rest]  # lorakit check ADAPTER ...
    cfg = parser.parse_args(normalize_argv(rest, cls))
    if cls is None:
        return name, cfg.adapter
    values = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg}
    try:
        return name, cls(**values)
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name, args = parse(argv)
    _, handler = _command(name)
    try:
        code = handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (DataError, ValueError, FileNotFoundError, OSError, KeyError, NotImplementedError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lorakit {name}: error: {message}", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
