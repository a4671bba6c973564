"""The playground: the page at `/`, its static files, and the read-only routes it needs.

    GET /                           the page (static files under /ui/, shipped in the package)
    GET /v1/adapters                the loaded adapters with rank, targets, size, base model, chat template,
                                    and `lorakit check`'s verdict per serving target
    GET /v1/runs                    the training runs found under `lorakit serve --runs DIR`
    GET /v1/runs/{run}/metrics      rows of metrics.jsonl from a byte offset on (?offset=N), for live plots
    GET /v1/runs/{run}/samples      rows of samples.jsonl
    GET /v1/runs/{run}/report       report.html (sandboxed: no scripts) or, failing that, report.json

The `/v1/` routes sit behind the app's API key like every other `/v1/` route; the page
itself and its files do not (it asks for the key and sends it). A run is only ever
addressed by its name: the files read are fixed names inside a directory given on the
command line, and a file whose real path leaves that directory (a symlink) is refused.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from torch import nn

from lorakit.serve.api import ApiError
from lorakit.serve.engine import Engine

WEB = Path(__file__).parent / "web"

# What marks a directory as a run: any one of the files `lorakit train` (and compare) leave there.
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "report.json", "report.html", "adapter_config.json")
MAX_READ = 4 << 20  # bytes of metrics.jsonl per response; the page asks again from the new offset
MAX_SAMPLES = 500

# The page's own policy: everything from this server, nothing inline but styles, no plugins.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'"
)
# A report is the compare command's HTML: shown in a sandboxed frame, its scripts never run.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"


def run_dirs(roots: Sequence[Path]) -> dict[str, Path]:
    """{name: directory} for every run under `roots`: a root that is itself a run, and the
    runs one level below it. Looked up afresh on each request, so a run started while the
    server runs shows up. Names are directory names; a clash is told apart by its parent."""
    found: list[Path] = []
    for root in roots:
        if _is_run(root):
            found.append(root)
        if root.is_dir():
            found += sorted(p for p in root.iterdir() if p.is_dir() and _is_run(p))
    runs: dict[str, Path] = {}
    for path in dict.fromkeys(p.resolve() for p in found):
        name = path.name
        if name in runs:
            name = f"{path.parent.name}/{path.name}"
        runs[name] = path
    return runs


def _is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def _inside(run: Path, filename: str) -> Path | None:
    """The file `filename` of a run, if it exists and really lies inside the run's directory."""
    path = run / filename
    if not path.is_file():
        return None
    real = path.resolve()
    if not real.is_relative_to(run.resolve()):
        raise ApiError(403, f"{filename} of this run points outside its directory; not served", param="run")
    return real


def read_jsonl(path: Path, offset: int = 0, limit: int = MAX_READ) -> tuple[list[dict[str, Any]], int, int]:
    """(rows, next offset, lines skipped) of the complete lines from byte `offset` on.

    A line still being written (no newline yet) is left for the next call; a line that is
    not a JSON object is skipped and counted rather than failing the whole file.
    """
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read(limit)
    end = chunk.rfind(b"\n") + 1
    rows, skipped = [], 0
    for line in chunk[:end].splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, offset + end, skipped


def adapter_info(name: str, directory: Path, model_name: str, model: nn.Module | None = None) -> dict[str, Any]:
    """What the page shows about one loaded adapter, read from its directory; with the served
    `model`, the `lorakit check` verdict of each serving target too."""
    config: dict[str, Any] = {}
    config_file = directory / "adapter_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except ValueError:
            config = {}
    weights = [p for p in directory.glob("adapter_model.*") if p.is_file()]
    targets = config.get("target_modules")
    return {
        "id": name,
        "path": str(directory),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "use_dora": bool(config.get("use_dora")),
        "base_model": config.get("base_model_name_or_path"),
        "served_base": model_name,
        "size_bytes": sum(p.stat().st_size for p in weights),
        "chat_template": _chat_template(directory),
        "check": _verdicts(name, directory, model) if model is not None else None,
    }


def _verdicts(name: str, directory: Path, model: nn.Module) -> list[dict[str, Any]] | str:
    """`lorakit check`'s verdict per target (vLLM, SGLang, llama.cpp, PEFT) against the served
    base, or why there is none."""
    from lorakit.export.check import check, read_facts_on

    try:
        verdicts = check(read_facts_on(directory, model), name=name)
    except (OSError, ValueError) as err:
        return f"not checked: {err}"
    return [{"target": v.target, "verdict": v.verdict, "command": v.command,
             "reasons": [f"{f.rule}: {f.reason}" for f in v.findings] + v.notes} for v in verdicts]


def _chat_template(directory: Path) -> str | None:
    """The chat template saved beside the adapter: transformers' chat_template.jinja, or the
    `chat_template` field of tokenizer_config.json / chat_template.json."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except (ValueError, AttributeError):
                continue
            if isinstance(template, str):
                return template
    return None


def mount_ui(app: FastAPI, engine: Engine, *, model_name: str, runs: Sequence[Path] = ()) -> None:
    """Add the page and its routes to an app made by `create_app`."""
    # Module scripts must come with a JavaScript type; some systems map .js to nothing.
    mimetypes.add_type("text/javascript", ".js")
    roots = [Path(r) for r in runs]
    app.mount("/ui", StaticFiles(directory=WEB), name="ui")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html", headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/v1/adapters")
    async def adapters() -> dict[str, Any]:
        entries = []
        for name in engine.adapter_names():
            directory = engine.adapters.paths.get(name)
            if directory is not None:  # unloaded between the two lines
                entries.append(adapter_info(name, Path(directory), model_name, engine.model))
        return {"object": "list", "base": model_name, "data": entries}

    def find(run: str) -> Path:
        known = run_dirs(roots)
        if run not in known:
            names = ", ".join(known) or "(none; start the server with --runs DIR)"
            raise ApiError(404, f"no run named {run!r}; runs: {names}", param="run", kind="not_found_error")
        return known[run]

    @app.get("/v1/runs")
    async def list_runs() -> dict[str, Any]:
        data = []
        for name, path in run_dirs(roots).items():
            files = {f: (path / f).is_file() for f in RUN_FILES}
            stamps = [(path / f).stat().st_mtime for f, there in files.items() if there]
            data.append({"id": name, "path": str(path), "files": files, "updated": max(stamps, default=None)})
        return {"object": "list", "roots": [str(r) for r in roots], "data": data}

    @app.get("/v1/runs/{run:path}/metrics")
    async def metrics(run: str, offset: int = Query(default=0, ge=0)) -> dict[str, Any]:
        path = _inside(find(run), "metrics.jsonl")
        if path is None:
            return {"rows": [], "offset": 0, "reset": offset > 0, "skipped": 0, "exists": False}
        reset = offset > path.stat().st_size  # rewritten (a resumed run truncates it): start again
        rows, end, skipped = read_jsonl(path, 0 if reset else offset)
        return {"rows": rows, "offset": end, "reset": reset, "skipped": skipped, "exists": True}

    @app.get("/v1/runs/{run:path}/samples")
    async def samples(run: str) -> dict[str, Any]:
        path = _inside(find(run), "samples.jsonl")
        if path is None:
            return {"rows": [], "exists": False}
        rows, _, skipped = read_jsonl(path)
        return {"rows": rows[-MAX_SAMPLES:], "total": len(rows), "skipped": skipped, "exists": True}

    @app.get("/v1/runs/{run:path}/report")
    async def report(run: str):
        directory = find(run)
        html = _inside(directory, "report.html")
        if html is not None:
            return HTMLResponse(html.read_text(errors="replace"), headers={"Content-Security-Policy": REPORT_CSP})
        data = _inside(directory, "report.json")
        if data is not None:
            try:
                return JSONResponse(json.loads(data.read_text()))
            except ValueError as err:
                raise ApiError(422, f"report.json of run {run!r} is not valid JSON: {err}", param="run") from None
        raise ApiError(404, f"run {run!r} has no report.html or report.json", param="run", kind="not_found_error")
