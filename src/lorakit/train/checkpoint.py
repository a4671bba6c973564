"""Checkpoints of a training run: everything a resumed run needs to end with the same adapter as
an uninterrupted one (adapter, optimizer, scheduler, RNG states and the data position).

Tensors and plain values only: every `.pt` file is read with `torch.load(weights_only=True)`,
so a checkpoint directory from someone else cannot run code. Each checkpoint records the
run it belongs to (`run_id`), and rotation only ever deletes that run's checkpoints.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorakit.adapters.files import save_adapter
from lorakit.train import distributed

if TYPE_CHECKING:
    from lorakit.train.run import Run


def checkpoint_dirs(output: Path, run_id: str | None = None) -> list[Path]:
    """Checkpoints in `output`, oldest first; with `run_id`, only that run's."""
    found = [p for p in output.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    if run_id is not None:
        found = [p for p in found if checkpoint_run_id(p) == run_id]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_run_id(path: Path) -> str | None:
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def save_checkpoint(run: Run, output: Path, step: int, state: dict[str, Any], rng: dict[str, Any], keep: int) -> Path:
    """Adapter, optimizer, scheduler, RNG states (as of the start of `step`) and the data position.

    Written to a temporary directory and renamed, so an interrupted save never leaves a
    checkpoint that looks complete.
    """
    final = output / f"checkpoint-{step}"
    tmp = output / f".checkpoint-{step}.tmp"
    main = run.env.is_main
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    # Collectives under FSDP: every process gathers, one writes. The optimizer state is keyed by
    # parameter name and whole, so a checkpoint resumes on any number of processes.
    save_adapter(run.model, tmp, write=main)
    optimizer_state = distributed.full_optimizer_state(run.model, run.optimizer)
    # An objective's own state (GRPO's rollout between its updates), one file per process: each
    # process holds its own. The same on every process whether there is one, so the barriers match.
    extra = run.objective.state_dict(step) if hasattr(run.objective, "state_dict") else None
    if not main:
        distributed.barrier(run.env)
        if extra is not None:
            torch.save(extra, final / objective_file(run.env.rank))
            distributed.barrier(run.env)
        return final
    if extra is not None:
        torch.save(extra, tmp / objective_file(0))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng, tmp / "rng_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep:
        for old in checkpoint_dirs(output, state.get("run_id"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(run.env)
    if extra is not None and run.env.enabled:
        distributed.barrier(run.env)  # the other processes' files are in place
    return final


def objective_file(rank: int) -> str:
    return "objective.pt" if rank == 0 else f"objective-rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_tensors(path: Path) -> Any:
    """A `.pt` file of tensors and plain values; anything else is refused unread, never run."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"{path} holds objects other than tensors and plain values, which lorakit does not load "
            f"(they could run code): {first}"
        ) from None


def load_checkpoint(run: Run, path: Path) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from `path` (the adapter was loaded in setup).

    Every file is read and checked before anything is restored.
    """
    optimizer = load_tensors(path / "optimizer.pt")
    scheduler = load_tensors(path / "scheduler.pt")
    rng = load_tensors(path / "rng_state.pt")
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    extra = None
    if hasattr(run.objective, "load_state_dict"):
        file = path / objective_file(run.env.rank)
        extra = load_tensors(file) if file.exists() else None
    distributed.load_optimizer_state(run.model, run.optimizer, optimizer)
    run.scheduler.load_state_dict(scheduler)
    set_rng_state(rng)
    if hasattr(run.objective, "load_state_dict"):
        run.objective.load_state_dict(extra, trainer_state["step"])
    return trainer_state
