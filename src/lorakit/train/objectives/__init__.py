"""What a run optimises: one object per objective, which the recipe (`recipe.py`) runs.

    sft.py         SFT: cross-entropy over the supervised tokens of rows
    preference.py  Preference: DPO and ORPO on preference pairs
    grpo.py        GRPO: reinforcement learning from reward functions on prompt rows
                   (grpo_loss.py: its advantages and token loss, in plain torch)

An objective (a `TrainArgs` in hand) answers the recipe's questions, in the order it asks:

    load_data(tokenizer)            -> (training data, eval rows or None)
    setup_model(model)              once the adapter is in place (DPO's reference adapter)
    batch_tokens()                  tokens of one micro-batch, for --memory auto
    plan(data, padding_free=, env=, budget_cap=) -> (training rows, rows per micro-batch)
    loss_module(model)              the module the loop calls on a batch: a summed loss
    step_batches(rows, rows_per_batch, step, env, pad_id, max_tokens) -> this process's batches
    count(batch)                    what the summed loss is divided by (tokens, pairs, completions)
    prepare_step(batches, step_count, env)   before the backward passes of a step
    train_stats(loss_module, env)   extra figures of the training window, for the log
    evaluate(run, loss_module, pad_id) -> {"eval_loss": ..., ...}

and, where an objective has them (GRPO does):

    updates_per_batch               optimizer steps each batch of rows serves (epochs count them)
    fast_path                       False: the run takes the generic path on a GPU
    state_dict(step) / load_state_dict(state, step)   what a checkpoint carries beyond the recipe's
    close()                         at the end of the run

A new objective is a new module here and a line in `for_args`.
"""

from __future__ import annotations

from typing import Any

from lorakit.train.objectives import preference
from lorakit.train.objectives.grpo import GRPO, RolloutFactory, RolloutSource
from lorakit.train.objectives.preference import Preference
from lorakit.train.objectives.sft import SFT

OBJECTIVES = (*preference.OBJECTIVES, "grpo")

__all__ = ["GRPO", "OBJECTIVES", "SFT", "Preference", "RolloutFactory", "RolloutSource", "for_args"]


def for_args(args: Any, rollouts: RolloutFactory | None = None) -> SFT | Preference | GRPO:
    """The objective `args.objective` names; GRPO samples through `rollouts(model, tokenizer)`."""
    if args.objective == "sft":
        return SFT(args)
    if args.objective in ("dpo", "orpo"):
        return Preference(args)
    if args.objective == "grpo":
        return GRPO(args, rollouts)
    raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {args.objective!r}")
