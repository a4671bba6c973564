"""What a training run leaves and prints: a train_config.yaml that runs again, full console
records, and a clean --resume of a finished run."""

from __future__ import annotations

import json

import yaml

from lorakit.cli import main
from lorakit.train import recipe
from lorakit.train.recipe import TrainArgs
from lorakit.train.runlog import format_record


def args_for(model_dir, data, output, **overrides) -> TrainArgs:
    train, held = data
    options = dict(model=str(model_dir), data=str(train), eval_data=str(held), output=str(output),
                   rank=4, alpha=8, lr=5e-3, batch_size=4, max_steps=2, log_every=1, eval_every=2,
                   seq_len=64, device="cpu", precision="fp32")
    options.update(overrides)
    return TrainArgs(**options)


def test_saved_train_config_trains_again_with_config(tmp_path, tiny_model_dir, chat_data):
    first = tmp_path / "first"
    recipe.train(args_for(tiny_model_dir, chat_data, first, overwrite=True))
    saved = yaml.safe_load((first / "train_config.yaml").read_text())
    assert saved["overwrite"] is False and saved["resume"] is False
    assert saved["resolved"]["total_steps"] == 2  # the run's facts stay recorded

    other = tmp_path / "other"
    code = main(["train", "--config", str(first / "train_config.yaml"), "--output", str(other), "--max-steps", "1"])
    assert code == 0
    assert (other / "adapter_model.safetensors").is_file()
    again = yaml.safe_load((other / "train_config.yaml").read_text())
    assert again["rank"] == 4 and again["max_steps"] == 1 and again["resolved"]["total_steps"] == 1
    assert [json.loads(line)["step"] for line in (other / "metrics.jsonl").read_text().splitlines()] == [1]


def test_format_record_shows_task_metric_and_kl():
    record = {"step": 4, "epoch": 0.5, "lr": 1e-4, "loss": 1.25, "eval_loss": 1.5, "exact": 0.375,
              "kl": 0.0123, "kl_p95": 0.05, "agreement": 0.9, "tokens_per_s": 321.0, "mem_peak_bytes": 1000}
    line = format_record(record, 10)
    assert "eval_loss 1.5000" in line
    assert "exact 0.3750" in line
    assert "kl 0.0123" in line and "kl_p95 0.0500" in line and "agreement 0.9000" in line
    assert "mem_" not in line and "321 tok/s" in line
    assert line.index("eval_loss") < line.index("exact") < line.index("kl ") < line.index("lr ")
    # a record without them is printed as before
    assert format_record({"step": 1, "epoch": 0.1, "lr": 1e-4, "loss": 2.0}, 10) == \
        "step 1/10  epoch 0.10  loss 2.0000  lr 1.00e-04"


def test_resume_of_a_finished_run_says_so_and_trains_nothing(tmp_path, tiny_model_dir, chat_data, capsys):
    out = tmp_path / "run"
    recipe.train(args_for(tiny_model_dir, chat_data, out))
    adapter = (out / "adapter_model.safetensors").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert recipe.train(args_for(tiny_model_dir, chat_data, out, resume=True)) == out
    captured = capsys.readouterr()
    shown = " ".join((captured.out + captured.err).split())  # the console may wrap long lines
    assert "already complete (step 2 of 2); nothing to train" in shown
    assert "nan" not in shown and "tok/s" not in shown
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert (out / "metrics.jsonl").read_text() == metrics
