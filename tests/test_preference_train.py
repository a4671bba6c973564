"""`lorakit train --objective dpo|orpo` end to end on a tiny model: outputs, accumulation, resume,
the starting adapter as reference, a 4-bit base, and 2 processes under torchrun."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main as cli_main
from lorakit.train import recipe
from lorakit.train.objectives import preference as objectives
from lorakit.train.recipe import TrainArgs


def pair_rows(n: int, seed: int) -> list[dict]:
    """Sums: the right answer preferred to a near miss."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + rng.randint(1, 9))})
    return rows


@pytest.fixture
def pair_data(tmp_path):
    train, held = tmp_path / "pairs.jsonl", tmp_path / "pairs_eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(16, 0)))
    held.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(6, 1)))
    return train, held


def args_for(model_dir, data, output, **overrides) -> TrainArgs:
    train, held = data
    options = dict(model=str(model_dir), data=str(train), eval_data=str(held), output=str(output), objective="dpo",
                   rank=4, alpha=8, lr=1e-2, batch_size=4, max_steps=6, log_every=1, eval_every=3, seq_len=64,
                   device="cpu", precision="fp32", beta=0.5)
    options.update(overrides)
    return TrainArgs(**options)


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_cli_run_logs_rewards_and_learns_the_preference(tmp_path, tiny_model_dir, pair_data, objective, capsys):
    out = tmp_path / objective
    cli_main(["train", "--model", str(tiny_model_dir), "--data", str(pair_data[0]), "--eval-data", str(pair_data[1]),
              "--output", str(out), "--objective", objective, "--beta", "0.5" if objective == "dpo" else "2",
              "--rank", "4", "--lr", "2e-2", "--batch-size", "4", "--max-steps", "8", "--log-every", "1",
              "--eval-every", "2", "--seq-len", "64",
              "--device", "cpu", "--precision", "fp32"])
    rows = metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert all(key in r for r in train_rows) and all("eval_" + key in r for r in evals), key
    for r in train_rows:
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
    if objective == "dpo":  # a fresh adapter is the reference: margin 0 and loss log 2 before the first update
        assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert evals[-1]["eval_rewards/margins"] > 0 and evals[-1]["eval_rewards/accuracies"] > 0.5
    else:
        assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"]
    assert (out / "loss.png").stat().st_size > 0 and (out / "adapter_model.safetensors").is_file()
    assert yaml_objective(out) == objective
    console = capsys.readouterr()
    assert "margin" in console.out + console.err


def yaml_objective(out) -> str:
    import yaml

    return yaml.safe_load((out / "train_config.yaml").read_text())["objective"]


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_model_dir, pair_data):
    for objective, rpo_alpha in (("dpo", 0.0), ("dpo", 1.0), ("orpo", 0.0)):
        name = f"{objective}-{rpo_alpha}"
        options = dict(objective=objective, rpo_alpha=rpo_alpha, max_steps=3, eval_data=None, log_every=3,
                       save_every=3)
        big = recipe.train(args_for(tiny_model_dir, pair_data, tmp_path / f"big-{name}", **options))
        small = recipe.train(args_for(tiny_model_dir, pair_data, tmp_path / f"acc-{name}", **options,
                                      batch_size=2, grad_accum=2, max_tokens=10))  # pieces of one pair too
        a, b = adapter(big), adapter(small)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
        last_big, last_small = metrics(big)[-1], metrics(small)[-1]
        for key in ("loss", "rewards/margins", "nll_loss"):
            assert (key in last_big) == (key != "nll_loss" or objective == "orpo" or rpo_alpha > 0), key
            if key in last_big:
                assert last_small[key] == pytest.approx(last_big[key], rel=1e-4, abs=1e-6), key


def test_rpo_alpha_logs_the_nll_and_keeps_the_chosen_answers_likely(tmp_path, tiny_model_dir, pair_data, capsys):
    """The logged eval nll is the chosen answers' mean nll per token (computed here from the saved
    adapter), the eval loss is DPO's plus rpo_alpha times it, and the nll term keeps the chosen
    answers more likely than plain DPO leaves them."""
    from lorakit.adapters.files import load_adapter
    from lorakit.base.models import load_model
    from lorakit.data.pairs import collate_pairs, load_pairs

    runs = {alpha: recipe.train(args_for(tiny_model_dir, pair_data, tmp_path / f"rpo-{alpha}", rpo_alpha=alpha,
                                         lr=2e-2, max_steps=6, eval_every=6))
            for alpha in (0.0, 2.0)}
    plain, rpo = metrics(runs[0.0])[-1], metrics(runs[2.0])[-1]
    console = capsys.readouterr()
    assert f"eval nll {rpo['eval_nll_loss']:.4f}" in console.out + console.err
    assert "nll_loss" in rpo and "eval_nll_loss" in rpo and "eval_nll_loss" not in plain
    model, tok = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    load_adapter(model, runs[2.0])
    pairs, _ = load_pairs(pair_data[1], tok, 64)
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        chosen = objectives.token_logps(model.eval(), batch["input_ids"][: len(pairs)], batch["labels"][: len(pairs)],
                                        batch["position_ids"][: len(pairs)])
    tokens = int((batch["labels"][: len(pairs), 1:] != -100).sum())
    assert rpo["eval_nll_loss"] == pytest.approx(float(-chosen.sum()) / tokens, rel=1e-4)
    dpo_part = rpo["eval_loss"] - 2.0 * rpo["eval_nll_loss"]
    assert 0 < dpo_part < rpo["eval_loss"]
    assert rpo["eval_logps/chosen"] > plain["eval_logps/chosen"]


def test_resume_after_interrupt_ends_with_the_same_adapter(tmp_path, tiny_model_dir, pair_data, monkeypatch):
    monkeypatch.setenv("LORAKIT_THREADS", "1")  # bit for bit needs one thread count for all three runs
    options = dict(grad_accum=2, max_steps=5, save_every=2, dropout=0.1, eval_data=None, log_every=5)
    whole = recipe.train(args_for(tiny_model_dir, pair_data, tmp_path / "whole", **options))
    calls = {"n": 0}
    real = objectives.PreferenceLoss.forward

    def interrupted(self, batch):
        calls["n"] += self.model.training
        if self.model.training and calls["n"] == 2 * 3 + 2:  # the second micro-batch of step 4
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(objectives.PreferenceLoss, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recipe.train(args_for(tiny_model_dir, pair_data, tmp_path / "cut", **options))
    assert (tmp_path / "cut" / "checkpoint-3").is_dir()
    monkeypatch.setattr(objectives.PreferenceLoss, "forward", real)
    recipe.train(args_for(tiny_model_dir, pair_data, tmp_path / "cut", resume=True, **options))
    a, b = adapter(whole), adapter(tmp_path / "cut")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_init_adapter_as_reference(tmp_path, tiny_model_dir, pair_data):
    """DPO from an SFT adapter: against its frozen copy the first loss is log 2; against the base it is not."""
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pair_rows(16, 0)]
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    short = dict(eval_data=None, max_steps=2)
    sft = recipe.train(args_for(tiny_model_dir, (sft_data, None), tmp_path / "sft", objective="sft", lr=5e-2, **short))
    init = recipe.train(args_for(tiny_model_dir, pair_data, tmp_path / "init", init_adapter=str(sft), **short))
    base = recipe.train(args_for(tiny_model_dir, pair_data, tmp_path / "base", init_adapter=str(sft),
                                 reference="base", **short))
    assert metrics(init)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(metrics(base)[0]["loss"] - math.log(2)) > 1e-3
    assert set(adapter(init)) == set(adapter(sft))  # the reference copy is never saved


def test_bad_options_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, pair_data, capsys):
    cases = [
        (["--objective", "kto"], "--objective must be one of sft, dpo, orpo, grpo, got 'kto'"),
        (["--objective", "dpo", "--beta", "0"], "--beta must be > 0, got 0.0"),
        (["--objective", "dpo", "--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5), got 0.5"),
        (["--objective", "dpo", "--reference", "init"], "--reference init needs --init-adapter DIR"),
        (["--objective", "dpo", "--reference", "sft"], "--reference must be one of auto, base, init, got 'sft'"),
        (["--objective", "orpo", "--packing"], "--packing applies to --objective sft only"),
        (["--objective", "orpo", "--label-smoothing", "0.1"], "--label-smoothing applies to --objective dpo only"),
        (["--objective", "dpo", "--rpo-alpha", "-1"], "--rpo-alpha must be a finite number >= 0 (0: off; 1.0 as in "
                                                       "the RPO paper), got -1.0"),
        (["--objective", "orpo", "--rpo-alpha", "1"], "--rpo-alpha applies to --objective dpo only (orpo has its own "
                                                      "nll term), got --objective orpo"),
        (["--rpo-alpha", "1"], "--rpo-alpha applies to --objective dpo only"),
    ]
    for extra, message in cases:
        out = tmp_path / "never"
        with pytest.raises(SystemExit):
            cli_main(["train", "--model", str(tiny_model_dir), "--data", str(pair_data[0]), "--output", str(out), *extra])
        assert message in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(ValueError, match=r"--rpo-alpha must be a finite number >= 0 .*got nan"):
        args_for(tiny_model_dir, pair_data, tmp_path / "never", rpo_alpha=float("nan"))  # a config file's .nan
    assert not (tmp_path / "never").exists()


def test_sft_data_for_dpo_names_the_file_and_writes_nothing(tmp_path, tiny_model_dir, chat_data, capsys):
    out = tmp_path / "out"
    code = cli_main(["train", "--model", str(tiny_model_dir), "--data", str(chat_data[0]), "--output", str(out),
                     "--objective", "dpo", "--device", "cpu"])
    assert code == 1
    assert f"{chat_data[0]}:1: 'chosen' is missing" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_dpo_on_a_4bit_base(tmp_path, tiny_model_dir, pair_data):
    out = recipe.train(args_for(tiny_model_dir, pair_data, tmp_path / "q", quantize="nf4", max_steps=2,
                                eval_every=2))
    rows = metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the same 4-bit base
    assert rows[-1]["mem_base_format"] == "nf4"
    assert rows[-1]["eval_rewards/margins"] != 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, tiny_model_dir, pair_data, strategy):
    common = ["train", "--model", str(tiny_model_dir), "--data", str(pair_data[0]), "--eval-data", str(pair_data[1]),
              "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--batch-size", "4", "--max-steps", "3", "--seq-len", "64",
              "--device", "cpu", "--precision", "fp32", "--objective", "dpo", "--beta", "0.5", "--eval-every", "3",
              *(["--rpo-alpha", "0.5"] if strategy == "ddp" else [])]  # the nll's token count summed over processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single = subprocess.run([sys.executable, "-m", "lorakit", *common, "--output", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(free_port()), "-m", "lorakit", *common, "--strategy", strategy,
                            "--output", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    last_one, last_two = metrics(tmp_path / "one")[-1], metrics(tmp_path / "two")[-1]
    for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/accuracies",
                *(["nll_loss", "eval_nll_loss"] if strategy == "ddp" else [])):
        assert last_two[key] == pytest.approx(last_one[key], rel=1e-4, abs=1e-6), key
