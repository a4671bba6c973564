"""The `lorakit` command line: train, generate, eval, merge, info, serve, compare.

Each subcommand's options are the fields of a dataclass; the field docstrings are the
`--help` text. Every option can come from a YAML file (`--config run.yaml`) and be
overridden by a later command-line option. Subcommand parsers are built on demand, so
`lorakit info` never imports the training stack and `serve` loads only when asked for.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .data import DataError

COMMANDS = {
    "train": "fine-tune a base model with LoRA on your data",
    "generate": "complete a prompt (or a chat message) with the base model, with or without an adapter",
    "eval": "loss and perplexity of a model (with or without an adapter) on a data file, as JSON",
    "merge": "fold an adapter into the base weights and save a plain transformers model",
    "info": "describe a saved adapter",
    "serve": "serve the base model and adapters over an OpenAI-compatible HTTP API",
    "compare": "what adapters learned and forgot: KL, perplexity and agreement against the base, task metric, report.html",
}


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
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")


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


@dataclass
class MergeArgs:
    """Fold an adapter into the base weights and save a full transformers model."""

    adapter: str
    """Adapter directory to merge."""
    output: str
    """Directory for the merged model (safetensors + tokenizer)."""
    model: str | None = None
    """Base model: a local transformers directory or a hub id; omitted: the bundled SmolLM2-135M-Instruct."""


# the commands -----------------------------------------------------------------------------


def run_train(args: Any) -> None:
    from .train import train

    train(args)


def _load(model: str | None, adapter: str | None, device: str | None = None, quantize: str | None = None):
    from .io import load_adapter
    from .models import load_model

    base, tokenizer = load_model(model, device=device, quantize=quantize)
    if adapter is not None:
        load_adapter(base, adapter)
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
    from .data import as_sequences, load_examples
    from .train import evaluate, log

    model, tokenizer = _load(args.model, args.adapter, args.device, args.quantize)
    device = next(model.parameters()).device
    examples, stats = load_examples(args.data, tokenizer, args.seq_len, args.loss_on, args.skip_bad)
    log(stats.summary(args.data))
    loss, tokens = evaluate(model, as_sequences(examples, args.seq_len, False), args.batch_size,
                            tokenizer.pad_token_id, device)
    print(json.dumps({"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}))


def run_merge(args: MergeArgs) -> None:
    from .inject import merge_and_unload
    from .models import DEFAULT_MODEL_NAME, cache_dir

    out_real = Path(args.output).resolve()
    base = Path(args.model) if args.model else cache_dir() / DEFAULT_MODEL_NAME
    for option, path in (("the base model's", base), ("the adapter's", Path(args.adapter))):
        if path.exists() and path.resolve() == out_real:
            raise ValueError(f"--output {args.output} is {option} directory; merging there would overwrite it; pick another")
    model, tokenizer = _load(args.model, args.adapter, "cpu")
    merged = merge_and_unload(model)
    out = Path(args.output)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out}")


def run_info(adapter: str) -> None:
    from .io import CONFIG_NAME, WEIGHTS_NAME, read_adapter

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
        "parameters": f"{files.num_parameters:,}",
        "file size": f"{size / 1e6:.2f} MB ({size:,} bytes; config in {CONFIG_NAME})",
    }
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")


# parsing ----------------------------------------------------------------------------------


def _command(name: str) -> tuple[type | None, Callable[[Any], None]]:
    """The options dataclass and the handler of a subcommand, imported on demand."""
    if name == "train":
        from .train import TrainArgs

        return TrainArgs, run_train
    if name == "generate":
        return GenerateArgs, run_generate
    if name == "eval":
        return EvalArgs, run_eval
    if name == "merge":
        return MergeArgs, run_merge
    if name == "info":
        return None, run_info
    if name == "compare":
        from .compare.command import CompareArgs, run_compare

        return CompareArgs, run_compare
    if name == "serve":
        try:
            from .serve.command import ServeArgs, run_serve
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
        is_bool = known[name] in (bool, "bool")
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
    cfg = parser.parse_args(normalize_argv(list(argv[1:]), cls))
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
        handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (DataError, ValueError, FileNotFoundError, OSError, KeyError, NotImplementedError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lorakit {name}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
