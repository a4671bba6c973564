"""Where a command's output goes: the one rule every command that writes files follows.

- An output that exists is refused unless it is a previous output of the same command, or
  `--overwrite` is given. A directory output carries `MARKER` (`.lorakit-output.json`: the
  command and the files it wrote); a file output is recognised by its writer (a GGUF export
  records its command in its metadata).
- `--overwrite` replaces only what the command writes, plus what its own previous output (by
  the marker) holds; nothing else in a directory is removed, and a file is never replaced by
  a directory.
- An output may not be, or contain, any of the command's inputs (resolved paths, and the same
  file under another name), with or without `--overwrite`.
- Everything is written under a temporary name in the output's own folder
  (`.NAME.lorakit-COMMAND-PID.tmp`) and renamed into place, so a killed run leaves no
  half-written output; the next run of the command removes the temporaries of runs whose
  process is gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MARKER = ".lorakit-output.json"
"""In a directory a command wrote: {"command": ..., "files": [names]}."""
MAX_MARKER_BYTES = 2**20


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path.expanduser()))


Input = tuple[str, Path]
"""(what it is, for messages: "the adapter's directory"; its path)."""


def input_paths(*paths: str | os.PathLike | tuple[str, str | os.PathLike | None] | None) -> list[Input]:
    """The inputs to protect: each existing path, and the files directly inside a directory. A path
    may come with what it is, `("the adapter's directory", path)`, to name it in a refusal."""
    out: list[Input] = []
    for item in paths:
        label, path = item if isinstance(item, tuple) else (None, item)
        if path is None or not Path(path).expanduser().exists():
            continue
        path = Path(path).expanduser()
        label = label or f"an input of this command ({path})"
        out.append((label, path))
        if path.is_dir():
            out += [(f"{p.name} in {label}", p) for p in path.iterdir() if p.is_file()]
    return out


def check_not_input(output: str | os.PathLike, inputs: Iterable[Input | Path], option: str = "--output") -> None:
    """Refuse an output that is an input (by resolved path, or the same file under another name)
    or contains one; `output` is named as given."""
    path = Path(output).expanduser()
    out = _resolved(path)
    for item in inputs:
        label, where = item if isinstance(item, tuple) else (f"an input of this command ({item})", item)
        real = _resolved(where)
        if out == real or (path.exists() and where.exists() and os.path.samefile(path, where)):
            raise ValueError(f"{option} {output} is {label}; writing there would overwrite it; pick another path")
        if out in real.parents:
            raise ValueError(f"{option} {output} contains {label} ({where}); writing there could destroy it; "
                             "pick a path that holds none of the inputs")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slug(command: str) -> str:
    """A command as it goes into a file name: "export --format gguf" -> "export-format-gguf"."""
    return re.sub(r"[^A-Za-z0-9]+", "-", command).strip("-")


def _temporary(path: Path, command: str, kind: str) -> Path:
    return path.with_name(f".{path.name}.lorakit-{_slug(command)}-{os.getpid()}.{kind}")


def clean_stale(path: Path, command: str) -> None:
    """Remove the temporaries a killed run of `command` left beside `path` (their pid is gone)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.lorakit-{re.escape(_slug(command))}-(\d+)\.(tmp|old)")
    if not path.parent.is_dir():
        return
    for item in path.parent.iterdir():
        match = pattern.fullmatch(item.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


def read_marker(directory: Path, command: str) -> list[str] | None:
    """The files `command` wrote into `directory`, by its marker; None when it holds no marker of it."""
    marker = directory / MARKER
    try:
        if not marker.is_file() or marker.stat().st_size > MAX_MARKER_BYTES:
            return None
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("command") != command or not isinstance(data.get("files"), list):
        return None
    # Plain names only: a marker never points outside its directory.
    return [n for n in data["files"] if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..", MARKER)]


@dataclass
class Output:
    """A checked output of one command (see `claim`); write it with `staged()`."""

    path: Path
    command: str
    directory: bool

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """A temporary directory (or file path) beside the output to write into; on a clean
        exit it is renamed into place, on an error removed."""
        tmp = _temporary(self.path, self.command, "tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.directory:
            tmp.mkdir()
        try:
            yield tmp
            if self.directory:
                _install_directory(tmp, self.path, self.command)
            else:
                os.chmod(tmp, 0o666 & ~_umask())
                os.replace(tmp, self.path)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()


def _umask() -> int:
    from lorakit.adapters.files import current_umask

    return current_umask()


def claim(path: str | os.PathLike, command: str, *, overwrite: bool, inputs: Iterable[Input | Path],
          directory: bool = True, ours: Callable[[Path], bool] | None = None, option: str = "--output") -> Output:
    """Check an output before any work: refuse an input, a file where a directory goes (or the
    reverse), and an existing output this command did not write unless `overwrite`."""
    check_not_input(path, inputs, option)
    path = Path(path).expanduser()
    clean_stale(path, command)
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; `lorakit {command}` writes a directory; pick a directory path")
    if not directory and path.is_dir():
        raise ValueError(f"{option} {path} is a directory; `lorakit {command}` writes one file; give a file path")
    if path.exists() and not overwrite:
        if directory:
            previous = read_marker(path, command) is not None or not any(path.iterdir())
        else:
            previous = ours is not None and ours(path)
        if not previous:
            raise ValueError(f"{option} {path} already exists and is not the output of an earlier `lorakit {command}`; "
                             "pass --overwrite to replace what this command writes there, or pick another path")
    return Output(path, command, directory)


def _install_directory(staging: Path, output: Path, command: str) -> None:
    """Rename the staged directory into place: whole when the old output holds only what this
    command wrote, else file by file (the marker last), leaving every other file alone."""
    names = sorted(p.name for p in staging.iterdir())
    (staging / MARKER).write_text(json.dumps({"command": command, "files": names}, indent=1) + "\n")
    if not output.exists():
        os.rename(staging, output)
        return
    previous = read_marker(output, command) or []
    entries = list(output.iterdir())
    only_ours = not output.is_symlink() and all(
        (e.name in previous or e.name == MARKER) and e.is_file() and not e.is_symlink() for e in entries)
    if only_ours:
        old = _temporary(output, command, "old")
        os.rename(output, old)
        os.rename(staging, output)
        shutil.rmtree(old, ignore_errors=True)
        return
    # A reader never sees the old marker beside new files: it goes first and comes back last.
    (output / MARKER).unlink(missing_ok=True)
    for name in names:
        target = output / name
        if target.is_dir() and not target.is_symlink():
            raise ValueError(f"{target} is a directory; `lorakit {command}` writes a file there; move it away")
        os.replace(staging / name, target)
    for name in set(previous) - set(names):
        stale = output / name
        if stale.is_file() or stale.is_symlink():
            stale.unlink()
    os.replace(staging / MARKER, output / MARKER)


@contextmanager
def staged_files(directory: Path, command: str) -> Iterator[Path]:
    """A temporary directory inside `directory` to write some files into; on a clean exit each is
    renamed into `directory` (replacing the file of its name, and nothing else), on an error
    removed. For a command that adds files to a directory it does not own (compare's report)."""
    anchor = directory / _slug(command)
    clean_stale(anchor, command)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(anchor, command, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for item in sorted(tmp.iterdir()):
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
