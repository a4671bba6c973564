"""The GRPO demo (lorakit.demo.grpo) on a tiny model: its reward, and its two stages, a supervised
adapter first, then GRPO from it with rollouts sampled by the serving engine."""

from __future__ import annotations

import json
import random

import pytest
from safetensors.torch import load_file

from lorakit.demo import grpo as demo_grpo
from lorakit.demo.__main__ import held_out_reward
from lorakit.serve import rollouts as serve_rollouts

REFERENCE = {"contact": "Nora Iyer", "company": "Acme", "topic": "demo", "amount_usd": 1200, "follow_up": "Friday"}


@pytest.mark.parametrize(("answer", "score"), [
    ("not json", 0.0),
    ('["a list"]', 0.0),
    ('{"contact": "Nora Iyer", "company": "Acme"', 0.0),  # cut short
    ("{}", 0.25),
    ('{"contact": "Acme", "company": "Nora Iyer", "usd": 1200}', 0.25),  # swapped, misnamed: nothing right
    ('{"contact": "Nora Iyer", "company": "Acme", "topic": "demo", "amount_usd": 12000, "follow_up": "fri"}', 0.7),
    (json.dumps(REFERENCE), 1.0),
    (json.dumps({**REFERENCE, "extra": 1}), 0.875),  # an extra key costs as a wrong one
])
def test_field_score(answer, score) -> None:
    assert demo_grpo.field_score(answer, json.dumps(REFERENCE)) == pytest.approx(score)


def test_json_fields_takes_trl_completions_and_rows_without_a_reference() -> None:
    ref = json.dumps(REFERENCE)
    completions = [[{"role": "assistant", "content": f" {ref}\n"}], "nope", ref]
    assert demo_grpo.json_fields(["p"] * 3, completions, reference=[ref, ref, None]) == [1.0, 0.0, None]
    rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ref}]}] * 2
    assert held_out_reward([ref, "{}"], rows) == pytest.approx(0.625)


def json_sums(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        rows.append({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                  {"role": "assistant", "content": json.dumps({"a": a, "sum": a + b})}]})
    return rows


def write(rows: list[dict], path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_grpo_stage_starts_from_the_sft_adapter_and_samples_through_the_engine(tmp_path, tiny_model_dir,
                                                                               monkeypatch) -> None:
    data, held = write(json_sums(16, 0), tmp_path / "train.jsonl"), write(json_sums(4, 1), tmp_path / "eval.jsonl")
    runs = demo_grpo.stages(tmp_path / "demo", model=str(tiny_model_dir), data=data, eval_data=held, sft_steps=2,
                            sft_lr=5e-2, steps=2, lr=5e-2, num_generations=3, batch_size=2, max_completion_tokens=6,
                            seq_len=64, precision="fp32")
    assert (runs.grpo.init_adapter, runs.grpo.objective, runs.grpo.reward) == (
        runs.sft.output, "grpo", ["lorakit.demo.grpo:json_fields"])
    control = runs.control  # the supervised loss instead, from the same adapter, steps, notes and lr
    assert (control.init_adapter, control.objective, control.max_steps, control.batch_size, control.lr) == (
        runs.sft.output, "sft", runs.grpo.max_steps, runs.grpo.batch_size, runs.grpo.lr)

    calls: list[tuple[int, int, str]] = []  # (prompts, completions, decode path) of every rollout
    real = serve_rollouts.Rollouts.generate

    def recording(self, prompts, **kwargs):
        out = real(self, prompts, **kwargs)
        calls.append((len(prompts), len(out), self.decode_path))
        return out

    monkeypatch.setattr(serve_rollouts.Rollouts, "generate", recording)
    # A random tiny model writes no JSON, so every completion would score 0 and GRPO would have
    # nothing to learn from: score the text's length instead, through the demo's reward function.
    scored: list[str] = []
    monkeypatch.setattr(demo_grpo, "field_score", lambda answer, reference: scored.append(answer) or len(answer) % 3)
    final = demo_grpo.run(runs)

    assert [c[:2] for c in calls] == [(2, 6), (2, 6)]  # one rollout a step: 2 prompts x 3 completions
    assert len(scored) >= 12  # every completion was scored by json_fields (and the eval's answers too)
    assert all(path.startswith("generic") for _, _, path in calls)  # on the CPU
    rows = [json.loads(line) for line in (final / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2] and "eval_reward" in rows[-1]
    saved_sft = load_file(f"{runs.sft.output}/adapter_model.safetensors")
    saved_grpo = load_file(f"{final}/adapter_model.safetensors")
    assert set(saved_grpo) == set(saved_sft)
    assert any((saved_grpo[k] - saved_sft[k]).abs().max() > 0 for k in saved_sft)  # GRPO moved the SFT adapter
