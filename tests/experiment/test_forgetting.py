"""Learning vs forgetting on the bundled SmolLM2-135M-Instruct and the demo task, on CPU.

A gentle adapter (the demo's settings) and an over-trained one (OVER: more steps at a higher
learning rate) both learn the task; `lorakit compare` measures a clearly larger KL from the
base for the over-trained one. The gentle run also checks `--metric exact --save-best exact`
against its own metrics.jsonl. Minutes of CPU, so `make test` leaves it out:
`make test-experiment` runs it (the `experiment` marker).
"""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.demo.__main__ import EVAL, TRAIN

pytestmark = pytest.mark.experiment

COMMON = ["--data", str(TRAIN), "--batch-size", "8", "--seq-len", "512", "--rank", "16", "--alpha", "32",
          "--device", "cpu", "--log-every", "10"]
GENTLE = ["--max-steps", "30", "--lr", "1e-3"]  # python -m lorakit.demo's settings
OVER = ["--max-steps", "90", "--lr", "3e-3", "--warmup-steps", "9"]
TASK_ROWS = 16  # held-out notes the compare's exact match generates answers for
REACHED = 0.75  # exact match that counts as having learned the task (the base scores 0)
KL_RATIO = 2.0  # the over-trained adapter's mean KL is at least this many times the gentle one's (measured: 2.6)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("forgetting")
    gentle, over = root / "gentle", root / "over"
    assert main(["train", *COMMON, *GENTLE, "--output", str(gentle), "--eval-data", str(EVAL),
                 "--eval-every", "10", "--metric", "exact", "--metric-rows", "8", "--save-best", "exact",
                 "--keep-checkpoints", "0"]) == 0
    assert main(["train", *COMMON, *OVER, "--output", str(over)]) == 0
    assert main(["compare", "--adapter", str(gentle), "--adapter", str(over), "--data", str(EVAL),
                 "--task-rows", str(TASK_ROWS), "--prompts", "12", "--sampled", "1", "--max-new-tokens", "48",
                 "--output", str(root), "--device", "cpu"]) == 0
    report = json.loads((root / "report.json").read_text())
    return {"gentle": gentle, "over": over, "report": report}


def test_the_over_trained_adapter_learns_the_task_and_moves_clearly_further_from_the_base(experiment):
    report = experiment["report"]
    by_name = {a["name"]: a for a in report["adapters"]}
    gentle, over = by_name["gentle"], by_name["over"]
    print(f"\nbase: task loss {report['task']['base']['loss']:.4f}, exact {report['task']['base']['metric']:.1%}; "
          f"reference {report['reference']['tokens']} tokens")
    for a in (gentle, over):
        print(f"{a['name']}: KL {a['kl_mean']:.3f} (p95 {a['kl_p95']:.3f}), agreement {a['agreement']:.1%}, "
              f"perplexity {a['perplexity_base']:.2f} -> {a['perplexity_adapted']:.2f}, "
              f"task loss {a['task_loss']:.4f}, exact {a['task_metric']:.1%}")
    print(f"KL ratio over/gentle {over['kl_mean'] / gentle['kl_mean']:.2f}")
    assert report["task"]["rows"] == TASK_ROWS and report["task"]["base"]["metric"] == 0.0
    # Both learned the task, the over-trained one about as well as the gentle one.
    assert gentle["task_metric"] >= REACHED and over["task_metric"] >= REACHED
    assert over["task_metric"] >= gentle["task_metric"] - 2 / TASK_ROWS
    assert over["task_loss"] < report["task"]["base"]["loss"] / 10
    # ...and the over-trained one moved clearly further from the base on the base's own text.
    assert over["kl_mean"] > KL_RATIO * gentle["kl_mean"]
    # The default --kl-threshold (1.0 nats/token) keeps the gentle one and flags the over-trained one.
    assert report["kl_threshold"] == 1.0 and (gentle["verdict"], over["verdict"]) == ("kept", "changed")
    assert over["agreement"] < gentle["agreement"]
    assert over["perplexity_adapted"] > gentle["perplexity_adapted"] > gentle["perplexity_base"]


def test_save_best_holds_the_checkpoint_with_the_highest_exact_match(experiment):
    out = experiment["gentle"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "exact" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    values = [r["exact"] for r in evals]
    best_step = evals[values.index(max(values))]["step"]  # the first of equals stays best
    assert json.loads((out / "best" / "best.json").read_text()) == {"metric": "exact", "value": max(values),
                                                                      "step": best_step}
    best, checkpoint = lorakit.read_adapter(out / "best"), lorakit.read_adapter(out / f"checkpoint-{best_step}")
    assert best.tensors.keys() == checkpoint.tensors.keys()
    assert all(torch.equal(best.tensors[k], checkpoint.tensors[k]) for k in best.tensors)
