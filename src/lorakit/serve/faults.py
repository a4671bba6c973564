"""Ending only the rows that a failed decoding step belongs to.

A decoding step runs every row of the running batch in one forward pass and one sampling
call, so a fault that belongs to one row (NaN in its logits, a sampling setting that
cannot be used, an adapter op that fails for its adapter) raises for all of them.
`run_step` then puts the batch back as it was before the step, runs the step for each
row alone to learn which rows fail, ends those with their error and runs the step again
for the others. The others' output is exactly what it would have been without the
failing rows: nothing of the failed step is kept, and each row's random generator is
put back to where it stood before it.

A fault that no row raises alone (one that needs the whole batch, or comes and goes) is
raised to the caller, which ends the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from lorakit.serve.batch import Batch

T = TypeVar("T")


def _generator_states(rows: list[Any]) -> list[tuple[torch.Generator, torch.Tensor]]:
    """(generator, state) of the rows that draw random numbers (a seeded, sampled row)."""
    return [(row.generator, row.generator.get_state()) for row in rows if getattr(row, "generator", None) is not None
            and not row.params.greedy]


def _restore(batch: Batch, saved: tuple, generators: list[tuple[torch.Generator, torch.Tensor]]) -> None:
    batch.restore(saved)
    for generator, state in generators:
        generator.set_state(state)


def error_text(err: BaseException) -> str:
    return f"decoding this request failed ({type(err).__name__}: {err}); the other requests of its batch went on"


def failing_rows(batch: Batch, step: Callable[[Batch], object]) -> dict[int, str]:
    """Run `step` for each row of `batch` alone; {row index: error text} of the rows that raise.

    The batch and the rows' generators are left exactly as they were."""
    saved, generators = batch.save(), _generator_states(batch.rows)
    failed: dict[int, str] = {}
    try:
        for i in range(len(batch)):
            _restore(batch, saved, generators)
            batch.keep([i])
            try:
                step(batch)
            except Exception as err:
                failed[i] = error_text(err)
    finally:
        _restore(batch, saved, generators)
    return failed


def run_step(batch: Batch, step: Callable[[Batch], T], end: Callable[[list[Any], str], None]) -> T | None:
    """`step(batch)`; when it raises, `end([row], error)` for each row that fails alone (which
    must remove the row from `batch`) and run the step again for the rest.

    Returns the step's result for the rows left, or None when none is left. Raises the step's
    error when no row fails alone."""
    while batch.rows:
        saved, generators = batch.save(), _generator_states(batch.rows)
        try:
            return step(batch)
        except Exception:
            _restore(batch, saved, generators)
            failed = failing_rows(batch, step)
            if not failed:
                raise
            rows = list(batch.rows)
            for i, error in failed.items():
                end([rows[i]], error)
    return None
