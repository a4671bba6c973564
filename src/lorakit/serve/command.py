"""`lorakit serve`: load the base model and adapters, then run the HTTP API under uvicorn."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.serve.bodies import DEFAULT_MAX_PROMPTS
from lorakit.serve.guards import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES

SHUTDOWN_GRACE_S = 3
"""On SIGTERM / Ctrl-C, open connections get this long to finish before the server stops anyway."""
KEEP_ALIVE_S = 5
"""An idle keep-alive connection is closed after this many seconds without a new request."""


@dataclass
class ServeArgs:
    """Serve one base model and many LoRA adapters over an OpenAI-compatible HTTP API."""

    model: str | None = None
    """Base model: a local transformers directory or a hub id; omitted: the bundled SmolLM2-135M-Instruct."""
    quantize: str | None = None
    """Quantize the base weights: nf4 or int8 (needs a CUDA GPU); omitted: full precision."""
    adapter: list[str] = field(default_factory=list)
    """Adapters to load at start, as NAME=DIR (repeat the option or give a list); the `model` field of a request names one."""
    served_model_name: str | None = None
    """Name of the base model in /v1/models and in requests' `model` field (default: the --model value)."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface)."""
    allow_host: list[str] = field(default_factory=list)
    """Host header names to answer besides the default ones (repeatable; '*': any). Default: the --host
    address, plus localhost, 127.0.0.1 and ::1 when it is a loopback address; bound to 0.0.0.0 or ::,
    any IP address, localhost and this machine's names. Others get 400 (a guard against DNS rebinding)."""
    port: int = 8000
    """Port to listen on."""
    max_batch: int = 32
    """Most requests decoded together; more wait in the queue."""
    max_queue: int = 1024
    """Most requests waiting to join the batch; beyond that the server answers 429."""
    max_adapters_on_device: int = 32
    """Adapters kept on the compute device at once; the least recently used go back to CPU memory."""
    max_adapters_on_cpu: int = 128
    """Adapters kept read in CPU memory (at least 1); the rest are read from disk again when needed."""
    context_length: int | None = None
    """Longest prompt + output in tokens (default: the model's max_position_embeddings)."""
    adapter_root: list[str] = field(default_factory=list)
    """Directories POST /v1/adapters may load from (repeat the option); paths outside them, symlinks
    included, are refused. Omitted: loading by path over HTTP is off."""
    max_request_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body accepted; larger ones get 413 before they are read."""
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    """Seconds a client has to send a whole request body; a slower one gets 408 and its connection closed."""
    header_timeout: float = 10.0
    """Seconds a client has to send a request's line and headers; a slower one has its connection closed."""
    max_prompts: int = DEFAULT_MAX_PROMPTS
    """Most prompts in one /v1/completions request (a `prompt` list); more get 400."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on /v1/ routes (default: $LORAKIT_API_KEY, else no key)."""
    device: str | None = None
    """cpu, cuda, ... (default: cuda when available)."""
    decode_path: str = "auto"
    """auto, fast or generic. fast: the Llama-family decode path (slot KV cache, batched LoRA, CUDA graphs on a GPU); auto takes it for Llama-family models on a GPU and runs generic elsewhere."""
    runs: list[str] = field(default_factory=list)
    """Training output directories to show in the page's Runs view (a run directory, or a directory of runs; repeatable)."""
    log_level: str = "info"
    """uvicorn's log level: critical, error, warning, info, debug."""
    special_tokens_in_content: bool = False
    """Read special-token text in prompts and messages (<|im_start|> typed by a user) as control tokens,
    as training does with the same option; by default it is plain text, so a request cannot forge turns."""

    def __post_init__(self) -> None:
        if self.decode_path not in ("auto", "fast", "generic"):
            raise ValueError(f"--decode-path must be auto, fast or generic, got {self.decode_path!r}")
        if self.quantize is not None and self.quantize not in ("nf4", "int8"):
            raise ValueError(f"--quantize must be nf4 or int8, got {self.quantize!r}")
        for option in ("max_batch", "max_queue", "max_adapters_on_device", "max_adapters_on_cpu", "max_request_bytes",
                       "max_prompts"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{option.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.context_length is not None and (
            isinstance(self.context_length, bool) or not isinstance(self.context_length, int) or self.context_length < 2
        ):
            raise ValueError(
                f"--context-length must be an integer >= 2 (a prompt token and one to generate), got {self.context_length!r}"
            )
        if isinstance(self.body_timeout, bool) or not isinstance(self.body_timeout, (int, float)) or not (
            0 < self.body_timeout < float("inf")
        ):
            raise ValueError(f"--body-timeout must be a number of seconds > 0, got {self.body_timeout!r}")
        if isinstance(self.header_timeout, bool) or not isinstance(self.header_timeout, (int, float)) or not (
            0 < self.header_timeout < float("inf")
        ):
            raise ValueError(f"--header-timeout must be a number of seconds > 0, got {self.header_timeout!r}")
        if isinstance(self.allow_host, str):
            self.allow_host = [self.allow_host]
        for name in self.allow_host:
            if not name or any(c.isspace() or c in "/@" for c in name):
                raise ValueError(f"--allow-host takes a host name or address (or '*'), got {name!r}")
        if isinstance(self.adapter_root, str):
            self.adapter_root = [self.adapter_root]
        for root in self.adapter_root:
            if not Path(root).is_dir():
                raise ValueError(f"--adapter-root {root} is not a directory")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if isinstance(self.adapter, str):
            self.adapter = [self.adapter]
        self.adapters()  # reject a malformed NAME=DIR now
        if isinstance(self.runs, str):
            self.runs = [self.runs]
        for run in self.runs:
            if not Path(run).is_dir():
                raise ValueError(f"--runs takes a training output directory (or a directory of them); {run!r} is not a directory")

    def adapters(self) -> dict[str, Path]:
        """--adapter NAME=DIR options as {name: directory}."""
        out: dict[str, Path] = {}
        for item in self.adapter:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--adapter takes NAME=DIR, got {item!r}")
            if name in out:
                raise ValueError(f"--adapter names {name!r} twice")
            out[name] = Path(path)
        return out


def run_serve(args: ServeArgs) -> None:
    """Load everything, then serve until interrupted."""
    import uvicorn

    from lorakit.base.models import DEFAULT_MODEL_NAME, load_model
    from lorakit.base.templates import template_warning
    from lorakit.serve.adapters import AdapterMismatch
    from lorakit.serve.api import create_app
    from lorakit.serve.connections import header_timeout_protocol
    from lorakit.serve.engine import Engine
    from lorakit.serve.hosts import host_policy
    from lorakit.serve.ui import mount_ui

    model, tokenizer = load_model(args.model, device=args.device, quantize=args.quantize)
    if next(model.parameters()).device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        from lorakit.base.threads import serving_threads

        serving_threads(log=lambda line: print(f"lorakit serve: {line}", file=sys.stderr))
    engine = Engine(
        model,
        tokenizer,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_adapters_on_device=args.max_adapters_on_device,
        max_adapters_on_cpu=args.max_adapters_on_cpu,
        context_length=args.context_length,
        decode_path=args.decode_path,
    )
    for name, path in args.adapters().items():
        try:
            engine.load_adapter(name, path)
        except (OSError, ValueError, AdapterMismatch) as err:
            raise SystemExit(f"lorakit serve: cannot load adapter {name!r} from {path}: {err}") from None
        warning = template_warning(tokenizer, path)
        if warning:
            print(f"lorakit serve: warning: adapter {name!r}: {warning}", file=sys.stderr)
    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    key = args.api_key if args.api_key is not None else os.environ.get("LORAKIT_API_KEY")
    app = create_app(engine, model_name=name, api_key=key or None, adapter_roots=args.adapter_root,
                     max_body_bytes=args.max_request_bytes, body_timeout_s=args.body_timeout,
                     max_prompts=args.max_prompts, hosts=host_policy(args.host, args.allow_host),
                     special_tokens_in_content=args.special_tokens_in_content)
    mount_ui(app, engine, model_name=name, runs=[Path(r) for r in args.runs])
    adapters = ", ".join(engine.adapter_names()) or "(none)"
    print(f"lorakit serve: base {name!r}, adapters: {adapters}; http://{args.host}:{args.port}/v1, "
          f"playground http://{args.host}:{args.port}/", file=sys.stderr)
    print(f"lorakit serve: decode path: {engine.decode_path}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S, timeout_keep_alive=KEEP_ALIVE_S,
                http=header_timeout_protocol(args.header_timeout))
