"""The output directory of a training run: one run per directory.

- A directory that already holds files is refused unless the run continues what is
  there (`--resume`) or replaces it (`--overwrite`, which removes only what a run writes), so
  two runs never mix. It may not be, or hold, the run's inputs (--model, --data, --eval-data,
  --init-adapter).
- `--resume` continues only a run with the same settings: every setting that changes
  the result is recorded in each checkpoint and compared, and the differences are named.
- Every checkpoint carries its run's id, so rotation never deletes another run's.
- A run holds an exclusive lock on the output directory itself (flock, taken without waiting)
  for the rest of its process, so a second run on the same directory fails at once instead of
  mixing files; no lock file is left in the directory.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lorakit.adapters.outputs import check_not_input, input_paths
from lorakit.train.checkpoint import checkpoint_dirs, load_tensors

RESUME_SETTINGS = (
    "model", "data", "eval_data", "rank", "alpha", "dropout", "targets", "use_rslora", "use_dora",
    "epochs", "max_steps", "lr", "loraplus_ratio", "weight_decay", "schedule", "warmup_steps",
    "batch_size", "grad_accum", "seq_len", "packing", "loss_on", "max_grad_norm", "precision",
    "seed", "quantize",
    "objective", "beta", "label_smoothing", "rpo_alpha", "reference",
    "reward", "reward_weights", "num_generations", "max_completion_tokens", "temperature", "top_p",
    "scale_rewards", "loss_type", "epsilon", "epsilon_high", "updates_per_rollout",
)
"""TrainArgs fields a resumed run must share with the run it continues: each changes the adapter.
A checkpoint that does not record one (made before it was listed here) is not checked for it."""

RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "train_config.yaml",
             "samples.jsonl", "report.json", "report.html")
"""What a run writes beside its checkpoints (what --overwrite removes)."""


_held: dict[Path, int] = {}
"""Output directory -> the open, locked descriptor of it: held until the process ends or release_output."""


def _holder_pid(directory: Path) -> str:
    """The pid holding a flock on `directory`, read from /proc/locks (Linux); 'unknown' elsewhere."""
    try:
        info = directory.stat()
        inode = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and len(fields) > 5 and fields[-3] == inode:
                return fields[-4]
    except (OSError, ValueError):
        pass
    return "unknown"


def lock_output(output: Path) -> None:
    """Lock the output directory itself (flock, exclusive, without waiting) for this process;
    ValueError naming the holder's pid when another process has it. Nothing is written into
    the directory. Taking it again in the same process is a no-op. Under torchrun the
    processes of one run share the directory: the first (RANK 0) holds the lock for them all."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no lock
        return
    output.mkdir(parents=True, exist_ok=True)
    key = output.resolve()
    held = _held.get(key)
    if held is not None:
        try:
            if os.path.samestat(os.fstat(held), os.stat(output)):
                return
        except OSError:
            pass
        release_output(output)  # the directory was removed and made again: lock the new one
    fd = os.open(output, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(f"another lorakit run is writing to {output} (pid {_holder_pid(output)}); wait for it "
                         "to finish or pick another --output") from None
    _held[key] = fd


def release_output(output: str | os.PathLike) -> None:
    """Give up this process's lock on `output` (a run that ends releases it by exiting)."""
    fd = _held.pop(Path(output).resolve(), None)
    if fd is not None:
        os.close(fd)


def settings(args: Any) -> dict[str, Any]:
    values = asdict(args)
    return {name: values[name] for name in RESUME_SETTINGS if name in values}


def prepare_output(args: Any) -> tuple[Path | None, str]:
    """Check (and with --overwrite, clear) the output directory; returns (checkpoint to resume, run id).

    Raises ValueError, changing nothing, when the directory holds another run's files
    and neither --resume nor --overwrite was given, or when --resume's checkpoint was
    made with different settings.
    """
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; give a directory")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --output and --overwrite replaces it; give one of them")
    # The run's inputs are read after --overwrite clears the directory: one inside it would be lost.
    inputs = [(f"--{name.replace('_', '-')} {getattr(args, name)}", getattr(args, name, None))
              for name in ("model", "data", "eval_data", "init_adapter") if getattr(args, name, None)]
    check_not_input(args.output, input_paths(*inputs))
    contents = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    lock_output(output)  # after the checks that change nothing, before anything is read or removed
    if args.resume:
        found = checkpoint_dirs(output)
        if found:
            check_resume(args, found[-1])
            return found[-1], _state(found[-1]).get("run_id") or uuid.uuid4().hex
        if contents:
            raise ValueError(
                f"--resume: {output} holds no checkpoint to continue, but holds other files "
                f"({', '.join(contents[:6])}); pass --overwrite to replace them or pick an empty directory"
            )
        return None, uuid.uuid4().hex
    if contents and not args.overwrite:
        raise ValueError(
            f"--output {output} already holds files ({', '.join(contents[:6])}{', ...' if len(contents) > 6 else ''}); "
            "pass --resume to continue that run, --overwrite to replace it, or pick an empty directory"
        )
    if contents:
        for path in checkpoint_dirs(output):
            shutil.rmtree(path, ignore_errors=True)
        for path in output.glob(".checkpoint-*.tmp"):
            shutil.rmtree(path, ignore_errors=True)
        for name in RUN_FILES:
            (output / name).unlink(missing_ok=True)
        shutil.rmtree(output / "best", ignore_errors=True)  # --save-best's adapter
    return None, uuid.uuid4().hex


def _state(checkpoint: Path) -> dict[str, Any]:
    import json

    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--resume: {checkpoint / 'trainer_state.json'} is missing or unreadable: {err}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"--resume: {checkpoint / 'trainer_state.json'} has no step; the checkpoint is incomplete")
    return state


def check_resume(args: Any, checkpoint: Path) -> None:
    """Refuse a checkpoint whose run had other settings, or whose files are not plain tensors."""
    state = _state(checkpoint)
    saved = state.get("settings")
    if not isinstance(saved, dict):
        raise ValueError(
            f"--resume: {checkpoint} does not record its run's settings, so lorakit cannot tell whether "
            "this command continues it; pass --overwrite to start over"
        )
    wanted = settings(args)
    # A checkpoint written before a setting was recorded cannot say what it was: not compared.
    differ = [f"{name}: checkpoint {saved[name]!r}, now {wanted[name]!r}"
              for name in RESUME_SETTINGS if name in wanted and name in saved and saved[name] != wanted[name]]
    if differ:
        raise ValueError(
            f"--resume: {checkpoint} was made with other settings ({'; '.join(differ)}); "
            "run with the checkpoint's settings, or pass --overwrite to start a new run"
        )
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        load_tensors(checkpoint / name)
