"""The DPO demo's two stages: a brief supervised adapter, then DPO from it.

DPO is tuning after SFT, as TRL's DPOTrainer is used: the first stage teaches the notes-to-JSON
format in a few steps (deliberately brief, so the adapter still makes the mistakes the
preference pairs reject, see make_data.py); the second starts from that adapter and tunes it
on the pairs, against a frozen copy of it as DPO's reference (`--init-adapter SFT_DIR
--reference init`). On the command line the same two runs are:

    lorakit train --data train.jsonl --output OUT/sft --max-steps 8 --lr 1e-3
    lorakit train --objective dpo --data train_pairs.jsonl --eval-data eval_pairs.jsonl \\
        --init-adapter OUT/sft --reference init --output OUT/dpo --max-steps 20 --lr 2e-4 --beta 0.5 --rpo-alpha 1.0

`--rpo-alpha 1.0` adds the chosen answers' mean nll per token to the DPO loss (RPO): without it,
DPO lowered the tokens that end a rejected answer, which end the chosen ones too, and the
answers stopped ending after their last field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.train.recipe import TrainArgs, train

HERE = Path(__file__).parent


@dataclass
class Stages:
    sft: TrainArgs
    """The supervised run: a fresh adapter on the notes, written to OUTPUT/sft."""
    dpo: TrainArgs
    """DPO from the supervised adapter against its frozen copy, written to OUTPUT/dpo."""


def stages(output: str | Path, *, model: str | None = None, data: str | Path = HERE / "train.jsonl",
           pairs: str | Path = HERE / "train_pairs.jsonl", eval_pairs: str | Path = HERE / "eval_pairs.jsonl",
           sft_steps: int = 8, sft_lr: float = 1e-3, steps: int = 20, lr: float = 2e-4, beta: float = 0.5,
           rpo_alpha: float = 1.0, batch_size: int = 8, seq_len: int = 512, precision: str = "auto", device: str = "cpu") -> Stages:
    """The two runs' settings (rank 16, alpha 32 as the supervised demo); nothing is trained yet."""
    out = Path(output)
    common = dict(model=model, batch_size=batch_size, seq_len=seq_len, rank=16, alpha=32, precision=precision,
                  device=device, overwrite=True)  # the demo's directories hold the demo's last run, if any
    sft = TrainArgs(data=str(data), output=str(out / "sft"), max_steps=sft_steps, lr=sft_lr,
                    log_every=max(1, sft_steps // 4), eval_every=sft_steps, **common)
    dpo = TrainArgs(data=str(pairs), eval_data=str(eval_pairs), output=str(out / "dpo"), max_steps=steps, lr=lr,
                    objective="dpo", beta=beta, rpo_alpha=rpo_alpha, init_adapter=sft.output, reference="init",
                    log_every=max(1, steps // 4), eval_every=max(1, steps // 2), **common)
    return Stages(sft, dpo)


def run(runs: Stages) -> Path:
    """Train both stages in order; returns the DPO adapter's directory."""
    train(runs.sft)
    return train(runs.dpo)
