"""What `lorakit train` watches at each eval (samples, task metric, KL to the base, best/) and
the trackers it feeds, read back through each tracker's own reader. One tiny run serves all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import chat_rows, tiny_llama_for_tokenizer
from lorakit.cli import main
from lorakit.evaluation.measure import divergence, general_prompts, generated_reference
from lorakit.evaluation.metrics import load_prompts

STEPS, EVAL_EVERY = 8, 2


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("watched")
    model, tok = tiny_llama_for_tokenizer()
    model_dir = root / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    train, held = root / "train.jsonl", root / "eval.jsonl"
    # Long answers: mostly letters, so a few steps teach the tiny model to write some (not only EOS).
    for path, rows in ((train, chat_rows(24)), (held, chat_rows(6, seed=1))):
        for row in rows:
            question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
            row["messages"][1]["content"] = f"the sum of {question} is {answer}"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A user metric with graded values, so "best" is a real choice between evaluations.
    (root / "overlap_metric.py").write_text(
        "def overlap(prediction, reference):\n"
        "    return len(set(prediction) & set(reference)) / max(len(set(prediction) | set(reference)), 1)\n")
    sys.path.insert(0, str(root))
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    saved = {k: os.environ.get(k) for k in [*env, "MLFLOW_TRACKING_URI"]}
    os.environ.update(env)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    out = root / "run"
    try:
        code = main(["train", "--model", str(model_dir), "--data", str(train), "--eval-data", str(held),
                     "--output", str(out), "--rank", "4", "--alpha", "8", "--max-steps", str(STEPS),
                     "--eval-every", str(EVAL_EVERY), "--log-every", "2", "--lr", "2e-2", "--batch-size", "4",
                     "--seq-len", "64", "--device", "cpu", "--precision", "fp32", "--keep-checkpoints", "0",
                     "--eval-samples", "2", "--metric", "overlap_metric:overlap", "--save-best", "overlap",
                     "--track-forgetting", "--report-to", "tensorboard,mlflow,wandb"])
    finally:
        sys.path.remove(str(root))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "model_dir": model_dir, "held": held, "records": records, "root": root}


def _evals(records):
    return [r for r in records if "eval_loss" in r]


def test_metric_and_best_adapter_agree_with_metrics_jsonl(watched_run):
    out, records = watched_run["out"], watched_run["records"]
    evals = _evals(records)
    assert [r["step"] for r in evals] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    values = [r["overlap"] for r in evals]
    assert all(0 <= v <= 1 for v in values) and len(set(values)) > 1  # graded, and it moved
    best_step = evals[values.index(max(values))]["step"]  # the first of equals stays best
    info = json.loads((out / "best" / "best.json").read_text())
    assert info == {"metric": "overlap", "value": max(values), "step": best_step}
    checkpoint = lorakit.read_adapter(out / f"checkpoint-{best_step}")
    best = lorakit.read_adapter(out / "best")
    assert best.tensors.keys() == checkpoint.tensors.keys()
    assert all(torch.equal(best.tensors[k], checkpoint.tensors[k]) for k in best.tensors)


def test_samples_are_the_adapters_greedy_answers(watched_run):
    out, records = watched_run["out"], watched_run["records"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [s for r in _evals(records) for s in (r["step"],) * 2]
    # The last evaluation's answers, regenerated one prompt at a time by transformers from the
    # final adapter, and the metric recomputed over all held-out rows.
    model, tok = lorakit.base.models.load_model(str(watched_run["model_dir"]), device="cpu")
    lorakit.load_adapter(model, out)
    prompts = load_prompts(watched_run["held"], tok)
    answers = []
    for p in prompts:
        ids = torch.tensor([p.ids])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(gen[0, len(p.ids):], skip_special_tokens=True).strip())
    last = [s for s in samples if s["step"] == STEPS]
    assert [s["prompt"] for s in last] == [p.text for p in prompts[:2]]
    assert [s["reference"] for s in last] == [p.reference for p in prompts[:2]]
    for sample, answer in zip(last, answers, strict=False):
        assert answer.startswith(sample["output"])  # training generates as far as the references need


def test_forgetting_kl_matches_compares_measurement(watched_run):
    out, records = watched_run["out"], watched_run["records"]
    evals = _evals(records)
    assert all(r["kl"] > 0 and 0 <= r["agreement"] <= 1 and r["kl_p95"] >= 0 for r in evals)
    model, tok = lorakit.base.models.load_model(str(watched_run["model_dir"]), device="cpu")
    reference = generated_reference(model, tok, general_prompts(), 32, sampled=0)
    lorakit.load_adapter(model, out)
    [div] = divergence(model, reference.rows, ["default"], tok.pad_token_id)
    assert evals[-1]["kl"] == pytest.approx(div.kl_mean, rel=1e-4)
    assert evals[-1]["agreement"] == pytest.approx(div.agreement, abs=1e-9)


def test_loss_png_gains_metric_and_kl_panels(watched_run):
    import matplotlib.image

    height, width = matplotlib.image.imread(watched_run["out"] / "loss.png").shape[:2]
    assert (width, height) == (700, int((4 + 2 * 2.2) * 100))


def _tracked(records):
    """Every numeric value of metrics.jsonl, as {key: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, int | float):
                out.setdefault(k, {})[r["step"]] = float(v)
    return out


def test_tensorboard_events_read_back(watched_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(watched_run["out"] / "tensorboard"))
    acc.Reload()
    expected = _tracked(watched_run["records"])
    assert set(acc.Tags()["scalars"]) == set(expected)
    for key, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got.keys() == by_step.keys()
        assert all(got[s] == pytest.approx(v, rel=1e-6) for s, v in by_step.items())  # stored as float32
    [config] = acc.Tensors("config/text_summary")
    assert "lr: 0.02" in config.tensor_proto.string_val[0].decode()


def test_mlflow_file_store_reads_back(watched_run):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    out = watched_run["out"]
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("lorakit")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.02" and run.data.params["metric"] == "overlap_metric:overlap"
    for key, by_step in _tracked(watched_run["records"]).items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == by_step, key
    artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "adapter"))
    assert artifacts == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    local = client.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors", str(out.parent))
    assert open(local, "rb").read() == (out / "adapter_model.safetensors").read_bytes()


def test_wandb_offline_run_reads_back(watched_run):
    out = watched_run["out"]
    [run_dir] = list((out / "wandb").glob("offline-run-*"))
    wandb_cli = str(Path(sys.executable).with_name("wandb"))
    printed = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                             text=True, check=True, timeout=120).stdout
    records = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    history: dict[str, dict[int, float]] = {}
    for r in records:
        if r["type"] == "history":
            step = int(r["history"]["step"]["num"])
            for k, v in r["history"]["item"].items():
                if not k.startswith("_"):
                    history.setdefault(k, {})[step] = v
    assert history == _tracked(watched_run["records"])
    [run_record] = [r["run"] for r in records if r["type"] == "run"]
    assert run_record["config"]["update"]["lr"] == 0.02 and run_record["project"] == "lorakit"
    assert run_record["telemetry"]["feature"]["offline"] is True
    assert any(r["type"] == "artifact" and r["artifact"]["type"] == "model" for r in records)


def test_watching_options_are_refused_with_reasons(tmp_path, tiny_model_dir, chat_data, capsys):
    train, held = chat_data
    base = ["train", "--model", str(tiny_model_dir), "--data", str(train), "--output", str(tmp_path / "o")]
    cases = [
        (["--eval-data", str(held), "--save-best", "exact"],
         "--save-best 'exact' is not logged by this run; accepted: eval_loss (a task metric needs --metric"),
        (["--metric", "exact"], "--metric acts at each evaluation, and a run evaluates only with --eval-data"),
        (["--eval-data", str(held), "--report-to", "tensorboard,comet"],
         "--report-to: unknown tracker 'comet'; accepted: tensorboard, mlflow, wandb (comma-separated) or none"),
        (["--eval-data", str(held), "--eval-samples", "-1"], "--eval-samples must be an integer >= 0, got -1"),
        (["--eval-data", str(held), "--metric", "regex:[", "--eval-samples", "2"], "not a valid regular expression"),
        (["--eval-data", str(held), "--objective", "dpo", "--eval-samples", "2"],
         "--eval-samples and --metric generate from prompt/completion eval rows; --objective dpo evaluates pairs"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            main(base + extra)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_a_resumed_run_keeps_the_samples_up_to_its_checkpoint(tmp_path):
    from lorakit.train.watch import _drop_after

    path = tmp_path / "samples.jsonl"
    lines = [json.dumps({"step": s, "prompt": "p", "reference": "r", "output": "o"}) for s in (2, 2, 4, 6)]
    path.write_text("".join(line + "\n" for line in lines))
    _drop_after(path, 4)  # resumed from checkpoint-4: the step-6 samples were logged after it
    assert path.read_text() == "".join(line + "\n" for line in lines[:3])
    _drop_after(path, 0)  # a fresh run in the same directory starts the file anew
    assert not path.exists()


def test_overwrite_removes_the_previous_runs_samples_best_and_report(tmp_path):
    from types import SimpleNamespace

    from lorakit.train.rundir import prepare_output

    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "adapter_model.safetensors").write_bytes(b"old")
    for name in ("samples.jsonl", "report.json", "report.html", "metrics.jsonl"):
        (out / name).write_text("old\n")
    (out / "notes.txt").write_text("the user's own file\n")
    args = SimpleNamespace(output=str(out), resume=False, overwrite=False)
    with pytest.raises(ValueError, match="already holds files"):
        prepare_output(args)
    assert (out / "best" / "adapter_model.safetensors").exists()  # refused: nothing removed
    args.overwrite = True
    prepare_output(args)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
