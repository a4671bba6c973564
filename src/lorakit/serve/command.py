"""`lorakit serve`: load the base model and adapters, then run the HTTP API under uvicorn."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


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
    port: int = 8000
    """Port to listen on."""
    max_batch: int = 32
    """Most requests decoded together; more wait in the queue."""
    max_queue: int = 1024
    """Most requests waiting to join the batch; beyond that the server answers 429."""
    max_adapters_on_device: int = 32
    """Adapters kept on the compute device at once; the least recently used go back to CPU memory."""
    max_adapters_on_cpu: int = 128
    """Adapters kept read in CPU memory; the rest are read from disk again when needed."""
    context_length: int | None = None
    """Longest prompt + output in tokens (default: the model's max_position_embeddings)."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on /v1/ routes (default: $LORAKIT_API_KEY, else no key)."""
    device: str | None = None
    """cpu, cuda, ... (default: cuda when available)."""
    runs: list[str] = field(default_factory=list)
    """Training output directories to show in the page's Runs view (a run directory, or a directory of runs; repeatable)."""
    log_level: str = "info"
    """uvicorn's log level: critical, error, warning, info, debug."""

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in ("nf4", "int8"):
            raise ValueError(f"--quantize must be nf4 or int8, got {self.quantize!r}")
        for option in ("max_batch", "max_queue", "max_adapters_on_device"):
            if getattr(self, option) < 1:
                raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(self, option)}")
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

    from ..models import DEFAULT_MODEL_NAME, load_model
    from .adapters import AdapterMismatch
    from .api import create_app
    from .engine import Engine
    from .ui import mount_ui

    model, tokenizer = load_model(args.model, device=args.device, quantize=args.quantize)
    engine = Engine(
        model,
        tokenizer,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_adapters_on_device=args.max_adapters_on_device,
        max_adapters_on_cpu=args.max_adapters_on_cpu,
        context_length=args.context_length,
    )
    for name, path in args.adapters().items():
        try:
            engine.load_adapter(name, path)
        except (OSError, ValueError, AdapterMismatch) as err:
            raise SystemExit(f"lorakit serve: cannot load adapter {name!r} from {path}: {err}") from None
    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    key = args.api_key if args.api_key is not None else os.environ.get("LORAKIT_API_KEY")
    app = create_app(engine, model_name=name, api_key=key or None)
    mount_ui(app, engine, model_name=name, runs=[Path(r) for r in args.runs])
    adapters = ", ".join(engine.adapter_names()) or "(none)"
    print(f"lorakit serve: base {name!r}, adapters: {adapters}; http://{args.host}:{args.port}/v1, playground http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
