"""The playground: the page at `/`, its static files, and the read-only routes it needs.

    GET /                           the page (static files under /ui/, shipped in the package)
    GET /v1/adapters                the loaded adapters with rank, targets, size, base model, chat template,
                                    and `lorakit check`'s verdict per serving target
    GET /v1/runs                    the training runs found under `lorakit serve --runs DIR`
    GET /v1/runs/{run}/metrics      rows of metrics.jsonl from a byte offset on (?offset=N), for live plots
    GET /v1/runs/{run}/samples      the last rows of samples.jsonl
    GET /v1/runs/{run}/report       report.html (sandboxed: no scripts) or, failing that, report.json

The `/v1/` routes sit behind the app's API key like every other `/v1/` route; the page
itself and its files do not (it asks for the key and sends it). A run is only ever
addressed by its id: the files read are fixed names inside a directory given on the
command line (or one level below it), and a run directory or file whose real path leaves
that directory (a symlink) is refused, as is an adapter file that links out of the
adapter's directory. Reading is bounded (`MAX_READ` bytes a response; a longer line is
skipped and counted) and runs on worker threads, never on the event loop that streams
completions and answers /health.
"""

from __future__ import annotations

import json
import mimetypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from torch import nn

from lorakit.adapters.files import CONFIG_NAME, WEIGHTS_NAME
from lorakit.serve.adapters import OutsideAdapter, confined_file, links_out, saved_template
from lorakit.serve.api import ApiError
from lorakit.serve.engine import Engine

WEB = Path(__file__).parent / "web"

# What marks a directory as a run: any one of the files `lorakit train` (and compare) leave there.
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "report.json", "report.html", "adapter_config.json")
MAX_READ = 4 << 20  # bytes of a .jsonl file per response; a line longer than this is skipped
MAX_SKIP = 16 * MAX_READ  # bytes of over-long lines passed over per response; the page asks again
MAX_SAMPLES = 500

# The page's own policy: everything from this server, nothing inline but styles, no plugins.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'"
)
# A report is the compare command's HTML: shown in a sandboxed frame, its scripts never run.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"


def run_dirs(roots: Sequence[Path]) -> dict[str, Path]:
    """{id: directory} for every run under `roots`: a root that is itself a run, and the runs
    one level below it whose real path stays inside the root (a link out of it is no run of
    it). Looked up afresh on each request, so a run started while the server runs shows up.

    An id is the directory's name. A run whose name is taken by one found before it (roots
    in the order given, names sorted) is told apart by its parent's name ("runs/one"), and
    if that is taken too, by the position of its root among `roots` ("runs/one~2"): no run
    hides another, and the same directories always get the same ids.
    """
    found: list[tuple[int, Path]] = []
    for index, root in enumerate(roots, 1):
        real_root = Path(os.path.realpath(root))
        if _is_run(real_root):
            found.append((index, real_root))
        if not real_root.is_dir():
            continue
        for entry in sorted(real_root.iterdir()):
            real = Path(os.path.realpath(entry))
            if real_root in real.parents and _is_run(real):
                found.append((index, real))
    runs: dict[str, Path] = {}
    for index, path in found:
        if path in runs.values():
            continue
        run_id = path.name if path.name not in runs else f"{path.parent.name}/{path.name}"
        base, n = run_id, index
        while run_id in runs:
            run_id, n = f"{base}~{n}", n + 1
        runs[run_id] = path
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


@dataclass
class Lines:
    """Rows read from a .jsonl file, and what was passed over."""

    rows: list[dict[str, Any]]
    offset: int
    """Where the next read starts (metrics); where the rows read began (samples)."""
    skipped: int = 0
    """Lines passed over: not a JSON object, or longer than a whole read."""
    skipped_bytes: int = 0
    """Bytes passed over: the over-long lines (metrics); the start of the file not read (samples)."""
    total: int = 0
    """Rows in the part of the file read (samples; `rows` holds the last of them)."""

    def parse(self, chunk: bytes) -> None:
        for line in chunk.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                self.skipped += 1
                continue
            if isinstance(row, dict):
                self.rows.append(row)
            else:
                self.skipped += 1


def read_jsonl(path: Path, offset: int = 0, limit: int = MAX_READ) -> Lines:
    """The complete lines from byte `offset` on, at most `limit` bytes of them.

    A line still being written (no newline yet) is left for the next call; a line that is
    not a JSON object is skipped and counted rather than failing the whole file; a line
    longer than `limit` is skipped and counted (in lines and bytes) and reading goes on
    after it, so one huge line never hides the rows that follow. An offset inside a line
    (the rest of an over-long line, still being passed over) goes on to the next line.
    """
    out = Lines([], offset)
    budget = MAX_SKIP
    with path.open("rb") as f:
        if offset > 0 and _byte_at(f, offset - 1) != b"\n":
            offset, done = _past_line(f, offset, budget)
            out.skipped_bytes += offset - out.offset
            budget -= offset - out.offset
            if not done:
                out.offset = offset
                return out
        while True:
            f.seek(offset)
            chunk = f.read(limit)
            end = chunk.rfind(b"\n") + 1
            if end or len(chunk) < limit:
                break
            if budget <= 0:  # enough passed over for one response: this line is the next one's
                out.offset = offset
                return out
            # A whole read without a newline: a line too long to show. Pass over it.
            start = offset
            offset, done = _past_line(f, offset, budget)
            out.skipped += 1
            out.skipped_bytes += offset - start
            budget -= offset - start
            if not done:
                out.offset = offset
                return out
        out.parse(chunk[:end])
    out.offset = offset + end
    return out


def _byte_at(f: BinaryIO, position: int) -> bytes:
    f.seek(position)
    return f.read(1)


def _past_line(f: BinaryIO, start: int, budget: int) -> tuple[int, bool]:
    """(the offset after the line that holds byte `start`, True), or, when its end is not
    reached within `budget` bytes or the file ends first, (how far was read, False)."""
    f.seek(start)
    position = start
    while position - start < budget:
        block = f.read(min(1 << 20, budget - (position - start)))
        if not block:
            break
        newline = block.find(b"\n")
        if newline >= 0:
            return position + newline + 1, True
        position += len(block)
    return position, False


def tail_jsonl(path: Path, rows: int = MAX_SAMPLES, limit: int = MAX_READ) -> Lines:
    """The last `rows` rows among the complete lines in the last `limit` bytes of the file.

    Read from the end, so a file of any size shows its newest rows; what lies before the
    part read is counted in `skipped_bytes`, the rows of the part read in `total`.
    """
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = max(0, size - limit)
        f.seek(start)
        chunk = f.read(size - start)
        chunk = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits
        if start > 0 and _byte_at(f, start - 1) != b"\n":
            cut = chunk.find(b"\n") + 1  # the end of a line that began before the part read
            chunk, start = chunk[cut:], start + cut
    out = Lines([], start, skipped_bytes=start)
    out.parse(chunk)
    out.total = len(out.rows)
    out.rows = out.rows[-rows:]
    return out


def adapter_info(name: str, directory: Path, model_name: str, model: nn.Module | None = None) -> dict[str, Any]:
    """What the page shows about one loaded adapter, read from its directory; with the served
    `model`, the `lorakit check` verdict of each serving target too. A file that links out of
    the adapter's directory is not read; it is named in `refused`."""
    refused = links_out(directory)
    config: Any = {}
    config_file = _confined(directory, CONFIG_NAME)
    if config_file is not None:
        try:
            config = json.loads(config_file.read_text())
        except ValueError:
            config = {}
    if not isinstance(config, dict):
        config = {}
    weights = [w for p in sorted(directory.glob("adapter_model.*")) if (w := _confined(directory, p.name)) is not None]
    try:
        template = saved_template(directory)
    except OutsideAdapter:
        template = None
    targets = config.get("target_modules")
    if CONFIG_NAME in refused or WEIGHTS_NAME in refused:
        check: list[dict[str, Any]] | str | None = f"not checked: {CONFIG_NAME} or {WEIGHTS_NAME} links out of the adapter directory"
    else:
        check = _verdicts(name, directory, model) if model is not None else None
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
        "chat_template": template,
        "refused": refused,
        "check": check,
    }


def _confined(directory: Path, name: str) -> Path | None:
    """`confined_file`, with a file that links out of the adapter's directory taken as absent."""
    try:
        return confined_file(directory, name)
    except OutsideAdapter:
        return None


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


def mount_ui(app: FastAPI, engine: Engine, *, model_name: str, runs: Sequence[Path] = ()) -> None:
    """Add the page and its routes to an app made by `create_app`.

    The `/v1/` routes here are plain functions, which FastAPI runs on worker threads: listing
    thousands of runs or reading a large file never holds up the event loop.
    """
    # Module scripts must come with a JavaScript type; some systems map .js to nothing.
    mimetypes.add_type("text/javascript", ".js")
    roots = [Path(r) for r in runs]
    app.mount("/ui", StaticFiles(directory=WEB), name="ui")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html", headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/v1/adapters")
    def adapters() -> dict[str, Any]:
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
    def list_runs() -> dict[str, Any]:
        data = []
        for name, path in run_dirs(roots).items():
            files = {f: (path / f).is_file() for f in RUN_FILES}
            stamps = [(path / f).stat().st_mtime for f, there in files.items() if there]
            data.append({"id": name, "path": str(path), "files": files, "updated": max(stamps, default=None)})
        return {"object": "list", "roots": [str(r) for r in roots], "data": data}

    @app.get("/v1/runs/{run:path}/metrics")
    def metrics(run: str, offset: int = Query(default=0, ge=0)) -> dict[str, Any]:
        path = _inside(find(run), "metrics.jsonl")
        if path is None:
            return {"rows": [], "offset": 0, "reset": offset > 0, "skipped": 0, "skipped_bytes": 0, "exists": False}
        reset = offset > path.stat().st_size  # rewritten (a resumed run truncates it): start again
        lines = read_jsonl(path, 0 if reset else offset)
        return {"rows": lines.rows, "offset": lines.offset, "reset": reset, "skipped": lines.skipped,
                "skipped_bytes": lines.skipped_bytes, "exists": True}

    @app.get("/v1/runs/{run:path}/samples")
    def samples(run: str) -> dict[str, Any]:
        path = _inside(find(run), "samples.jsonl")
        if path is None:
            return {"rows": [], "exists": False}
        lines = tail_jsonl(path)
        return {"rows": lines.rows, "total": lines.total, "skipped": lines.skipped,
                "skipped_bytes": lines.skipped_bytes, "exists": True}

    @app.get("/v1/runs/{run:path}/report")
    def report(run: str):
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
