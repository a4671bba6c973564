"""The DPO demo's two stages (lorakit.demo.dpo) on a tiny model: a supervised adapter first, then
DPO from it (with the chosen answers' nll, rpo_alpha 1), with that adapter, frozen, as the
reference for every step."""

from __future__ import annotations

import json
import math
import random

import torch
from safetensors.torch import load_file

from lorakit.adapters.files import load_adapter
from lorakit.base.models import load_model
from lorakit.demo import dpo as demo_dpo
from lorakit.train.objectives import preference as objectives


def chat_pairs(n: int, seed: int) -> list[dict]:
    """Sums as chat: the right answer preferred to a near miss."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        prompt = [{"role": "user", "content": f"{a}+{b}"}]
        rows.append({"chosen": [*prompt, {"role": "assistant", "content": str(a + b)}],
                     "rejected": [*prompt, {"role": "assistant", "content": str(a + b + rng.randint(1, 9))}]})
    return rows


def write(rows: list[dict], path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dpo_stage_starts_from_the_sft_adapter_and_uses_it_frozen_as_reference(tmp_path, tiny_model_dir, chat_data,
                                                                              monkeypatch):
    pairs = write(chat_pairs(16, 0), tmp_path / "pairs.jsonl")
    eval_pairs = write(chat_pairs(4, 1), tmp_path / "pairs_eval.jsonl")
    runs = demo_dpo.stages(tmp_path / "demo", model=str(tiny_model_dir), data=chat_data[0], pairs=pairs,
                           eval_pairs=eval_pairs, sft_steps=3, sft_lr=5e-2, steps=4, lr=5e-2, beta=0.5,
                           batch_size=4, seq_len=64, precision="fp32")
    assert (runs.dpo.init_adapter, runs.dpo.reference, runs.dpo.rpo_alpha) == (runs.sft.output, "init", 1.0)

    # Record every reference computation of the DPO stage: the batch and the log-probabilities.
    seen: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
    real = objectives.sequence_logps

    def recording(model, batch, chunk=2048):
        out = real(model, batch, chunk)
        seen.append(({k: v.clone() for k, v in batch.items()}, out.clone()))
        return out

    monkeypatch.setattr(objectives, "sequence_logps", recording)
    final = demo_dpo.run(runs)
    monkeypatch.setattr(objectives, "sequence_logps", real)

    train_batches = 4  # one per step (4 pairs a step, batch 4); the rest are the evals' batches
    assert len(seen) > train_batches
    sft_model, _ = load_model(str(tiny_model_dir), device="cpu")
    load_adapter(sft_model, runs.sft.output)
    base_model, _ = load_model(str(tiny_model_dir), device="cpu")
    dpo_model, _ = load_model(str(tiny_model_dir), device="cpu")
    load_adapter(dpo_model, final)
    with torch.no_grad():
        for batch, reference in seen:
            torch.testing.assert_close(reference, real(sft_model, batch), rtol=1e-5, atol=1e-5)
            assert (reference - real(base_model, batch)).abs().max() > 1e-2  # the SFT adapter is not the base
        last_batch, last_reference = seen[-1]
        assert (real(dpo_model, last_batch) - last_reference).abs().max() > 1e-2  # DPO moved the adapter

    rows = [json.loads(line) for line in (final / "metrics.jsonl").read_text().splitlines()]
    # The first step's policy is the SFT adapter itself: margin 0, DPO's loss log 2, plus the nll term.
    assert rows[0]["step"] == 1 and rows[0]["rewards/margins"] == 0
    assert rows[0]["nll_loss"] > 0.1 and abs(rows[0]["loss"] - math.log(2) - rows[0]["nll_loss"]) < 1e-5
    saved_sft, saved_dpo = load_file(f"{runs.sft.output}/adapter_model.safetensors"), load_file(
        f"{final}/adapter_model.safetensors")
    assert set(saved_dpo) == set(saved_sft)  # the frozen reference copy is not saved
