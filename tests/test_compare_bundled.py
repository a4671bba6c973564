"""The experiment on the bundled SmolLM2-135M-Instruct and the demo task (a few minutes on CPU):
a gentle adapter and an over-trained one both learn the task, and `compare` finds a clearly
larger KL from the base for the over-trained one. `--metric exact --save-best exact` keeps the
checkpoint with the highest exact match, checked against metrics.jsonl.

Smaller than bench/compare_forgetting.py (figures of both in bench/RESULTS.md): 10 and 20
steps, 8 held-out rows instead of 32, 8 general prompts instead of 24."""

from __future__ import annotations

import json

import torch

import lorakit
from lorakit.cli import main
from lorakit.demo.__main__ import EVAL, TRAIN

HELD_OUT = 8


def _train(out, steps: int, lr: float) -> list[dict]:
    assert main(["train", "--data", str(TRAIN), "--eval-data", str(EVAL), "--output", str(out),
                 "--max-steps", str(steps), "--lr", str(lr), "--batch-size", "8", "--seq-len", "512",
                 "--eval-every", "5", "--keep-checkpoints", "0", "--device", "cpu",
                 "--metric", "exact", "--metric-rows", str(HELD_OUT), "--save-best", "exact"]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_gentle_vs_over_trained_adapter_on_the_bundled_model(tmp_path, capsys):
    gentle, over = tmp_path / "gentle", tmp_path / "over"
    records = _train(gentle, 10, 1e-3)
    _train(over, 20, 3e-3)  # 2x the steps at 3x the learning rate (10 steps at 10x did not learn the task)

    # best/ holds the checkpoint with the highest exact match in metrics.jsonl (the first of equals).
    evals = [r for r in records if "exact" in r]
    assert [r["step"] for r in evals] == [5, 10]
    best = max(evals, key=lambda r: r["exact"])
    assert json.loads((gentle / "best" / "best.json").read_text()) == {"metric": "exact", "value": best["exact"],
                                                                       "step": best["step"]}
    saved, checkpoint = lorakit.read_adapter(gentle / "best"), lorakit.read_adapter(gentle / f"checkpoint-{best['step']}")
    assert all(torch.equal(saved.tensors[k], checkpoint.tensors[k]) for k in checkpoint.tensors)

    capsys.readouterr()
    assert main(["compare", "--adapter", str(gentle), "--adapter", str(over), "--data", str(EVAL),
                 "--task-rows", str(HELD_OUT), "--prompts", "8", "--max-new-tokens", "48",
                 "--output", str(tmp_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    g, o = report["adapters"]
    print(json.dumps({"gentle": g, "over": o, "base": report["task"]["base"]}, indent=1))
    assert report["task"]["base"]["metric"] == 0.0  # the base alone never writes the exact JSON
    assert g["task_metric"] >= 0.5 and o["task_metric"] >= 0.5  # both reach the task
    assert o["kl_mean"] > 2 * g["kl_mean"] > 0  # the over-trained one moved the base much further
    assert o["agreement"] < g["agreement"]
    assert g["headline"] in printed and o["headline"] in printed
