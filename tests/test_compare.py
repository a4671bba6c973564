"""`lorakit compare`: KL, perplexity and agreement against a direct computation with
transformers + PEFT, exact zeros with the adapter disabled, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lorakit
from conftest import make_serve_adapter, tiny_llama_for_tokenizer
from lorakit.cli import main
from lorakit.data.sft import IGNORE, TokenRow
from lorakit.demo.__main__ import EVAL as EVAL_PATH
from lorakit.evaluation.measure import divergence, general_prompts, generated_reference


def _rows(seed: int = 0, n: int = 5) -> list[TokenRow]:
    """Rows of random byte tokens; the loss positions are each row's second half."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 10 + 3 * i
        ids = torch.randint(0, 256, (length,), generator=g).tolist()
        labels = [IGNORE] * (length // 2) + ids[length // 2:]
        rows.append(TokenRow(ids, labels, list(range(length))))
    return rows


def _adapter(directory, seed: int, scale: float) -> object:
    """An all-linear r=4 adapter with random A and B of standard deviation `scale`."""
    model, _ = tiny_llama_for_tokenizer()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    return lorakit.save_adapter(model, directory)


def _direct(base_logits: torch.Tensor, adapted_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The definitions written out, on one row's logits (T, V) and labels (T)."""
    mask = labels[1:] != IGNORE
    p = torch.softmax(base_logits[:-1][mask].double(), -1)
    q = torch.softmax(adapted_logits[:-1][mask].double(), -1)
    target = labels[1:][mask]
    return {
        "kl": (p * (p.log() - q.log())).sum(-1),
        "nll_base": -p.log()[torch.arange(len(target)), target],
        "nll_adapted": -q.log()[torch.arange(len(target)), target],
        "agree": (p.argmax(-1) == q.argmax(-1)).double(),
    }


def test_divergence_matches_a_direct_computation_with_transformers_and_peft(tmp_path):
    from peft import PeftModel

    adapter_dir = _adapter(tmp_path / "a", seed=3, scale=0.1)  # moves some argmaxes, not all
    rows = _rows()
    # The reference: a plain transformers base, and the same base with the adapter through PEFT.
    reference_base, _ = tiny_llama_for_tokenizer()
    peft_model = PeftModel.from_pretrained(tiny_llama_for_tokenizer()[0], str(adapter_dir)).eval()
    parts: dict[str, list[torch.Tensor]] = {"kl": [], "nll_base": [], "nll_adapted": [], "agree": []}
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row.input_ids])
            direct = _direct(reference_base(ids).logits[0], peft_model(input_ids=ids).logits[0], torch.tensor(row.labels))
            for key, value in direct.items():
                parts[key].append(value)
    ref = {k: torch.cat(v).numpy() for k, v in parts.items()}

    model, tok = tiny_llama_for_tokenizer()
    lorakit.load_adapter(model, adapter_dir)
    [got] = divergence(model, rows, ["default"], tok.pad_token_id, batch_size=2)
    assert got.tokens == len(ref["kl"])
    assert ref["kl"].mean() > 1e-3  # the adapter really moves the model
    assert got.kl_mean == pytest.approx(ref["kl"].mean(), rel=1e-4)
    assert got.kl_p95 == pytest.approx(np.percentile(ref["kl"], 95), rel=1e-4)
    assert got.perplexity_base == pytest.approx(np.exp(ref["nll_base"].mean()), rel=1e-5)
    assert got.perplexity_adapted == pytest.approx(np.exp(ref["nll_adapted"].mean()), rel=1e-5)
    assert got.agreement == ref["agree"].mean()
    assert 0 < got.agreement < 1


def test_disabled_adapter_gives_kl_zero_and_agreement_one_exactly(tmp_path):
    model, tok = tiny_llama_for_tokenizer()
    lorakit.load_adapter(model, make_serve_adapter(tmp_path / "a", seed=4))
    disabled, enabled = divergence(model, _rows(), [None, "default"], tok.pad_token_id, batch_size=3)
    assert disabled.kl_mean == 0.0 and disabled.kl_p95 == 0.0
    assert disabled.agreement == 1.0
    assert disabled.perplexity_adapted == disabled.perplexity_base
    assert enabled.kl_mean > 0 and enabled.agreement < 1
    assert lorakit.active_adapters(model) == ["default"]  # the active adapter is restored


def test_generated_reference_is_the_bases_own_greedy_text():
    model, tok = tiny_llama_for_tokenizer()
    prompts = general_prompts(3)
    ref = generated_reference(model, tok, prompts, max_new_tokens=5, sampled=1, seed=0)
    assert ref.how == ["greedy"] * 3 + ["sampled"] * 3
    for row, prompt in zip(ref.rows[:3], prompts, strict=True):
        text = tok.apply_chat_template(prompt["messages"], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0].tolist()
        assert row.input_ids == greedy[: len(row.input_ids)]
        assert row.labels[: ids.shape[1]] == [IGNORE] * ids.shape[1]
        assert row.labels[ids.shape[1]:] == row.input_ids[ids.shape[1]:]


def test_compare_command_end_to_end(tmp_path, tiny_model_dir, chat_data, capsys):
    _, held = chat_data
    zero = tmp_path / "run" / "zero"  # a fresh adapter (B = 0) computes the base exactly
    model, _ = tiny_llama_for_tokenizer()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    lorakit.save_adapter(model, zero)
    moved = make_serve_adapter(tmp_path / "run" / "moved", seed=5)
    out = tmp_path / "report"
    threads = torch.get_num_threads()
    code = main(["compare", "--model", str(tiny_model_dir), "--adapter", str(zero), "--adapter", str(moved),
                 "--data", str(held), "--prompts", "3", "--max-new-tokens", "6", "--show", "2",
                 "--output", str(out), "--kl-threshold", "0.005", "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out.splitlines()
    # The CPU thread count is measured as train measures it, and torch's own is restored after.
    assert "CPU threads: " in captured.err and torch.get_num_threads() == threads
    report = json.loads((out / "report.json").read_text())
    zero_entry, moved_entry = report["adapters"]
    assert zero_entry["kl_mean"] == 0.0 and zero_entry["agreement"] == 1.0 and zero_entry["verdict"] == "kept"
    assert moved_entry["kl_mean"] > report["kl_threshold"] and moved_entry["verdict"] == "changed"
    assert printed[0] == zero_entry["headline"] and "general behaviour kept" in printed[0]
    assert "past --kl-threshold 0.005" in printed[1]
    # The task: the zero adapter answers exactly as the base does, with the base's loss.
    task = report["task"]
    assert task["rows"] == 8 and task["metric_name"] == "exact"
    assert task["adapters"]["zero"]["loss"] == pytest.approx(task["base"]["loss"], rel=1e-6)
    assert [s["adapters"]["zero"] for s in task["samples"]] == [s["base"] for s in task["samples"]]
    assert len(report["generations"]) == 2 and report["reference"]["rows"] == 6
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "moved" in page and "learning-forgetting" in page
    assert not list(out.glob(".*.tmp"))


def test_compare_refuses_bad_input_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    adapter = make_serve_adapter(tmp_path / "a", seed=6)
    before = sorted(p.name for p in adapter.iterdir())
    cases = [
        (["--metric", "nonsense"], "--metric 'nonsense' is not a metric; accepted: exact, json, regex:PATTERN, MODULE:FUNCTION"),
        (["--metric", "regex:("], "--metric 'regex:(': not a valid regular expression"),
        (["--kl-threshold", "0"], "--kl-threshold must be > 0 (nats per token), got 0.0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
        (["--answer-batch-size", "0"], "--answer-batch-size must be a positive integer, got 0"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            main(["compare", "--model", str(tiny_model_dir), "--adapter", str(adapter), *extra])
        assert message in capsys.readouterr().err
    missing = tmp_path / "nope"
    assert main(["compare", "--model", str(tiny_model_dir), "--adapter", str(missing), "--device", "cpu"]) == 1
    assert str(missing) in capsys.readouterr().err
    assert sorted(p.name for p in adapter.iterdir()) == before  # no report written anywhere
    assert not missing.exists()


def test_compare_on_the_users_reference_file(tmp_path, tiny_model_dir, capsys):
    from lorakit.base.models import load_model
    from lorakit.data.sft import load_examples
    from lorakit.evaluation.measure import file_reference

    reference = tmp_path / "general.jsonl"
    rows = [{"prompt": "The sky is ", "completion": "blue."}, {"text": "Water boils at 100 degrees."}]
    reference.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = _adapter(tmp_path / "a", seed=7, scale=0.1)
    assert main(["compare", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--reference", str(reference),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    report = json.loads((adapter / "report.json").read_text())  # beside the adapter by default
    assert report["generations"] == [] and report["task"] is None
    # Measured where train puts the loss: the completion (with EOS) and every token of the text row.
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    examples, _ = load_examples(reference, tok, 1024)
    ref = file_reference(reference, tok, 1024)
    assert [r.labels for r in ref.rows] == [e.labels for e in examples]
    lorakit.load_adapter(model, adapter)
    [div] = divergence(model, ref.rows, ["default"], tok.pad_token_id)
    [entry] = report["adapters"]
    assert entry["tokens"] == div.tokens == sum(e.supervised for e in examples) - 1  # a text row's first token has no prediction
    assert entry["kl_mean"] == div.kl_mean and entry["agreement"] == div.agreement


def test_the_demo_ends_with_compares_headline_for_its_adapter(tmp_path, monkeypatch, capsys):
    """`make demo`'s last step: `lorakit compare` on the demo adapter, its headline printed and
    report.html written beside the adapter. A tiny random model stands in for the bundled one
    (placed where the bundled model's converted copy is looked up), so this takes seconds."""
    from lorakit.base.models import DEFAULT_MODEL_NAME
    from lorakit.demo.__main__ import main as demo

    model, tok = tiny_llama_for_tokenizer()
    cache = tmp_path / "cache"
    model.save_pretrained(cache / DEFAULT_MODEL_NAME)
    tok.save_pretrained(cache / DEFAULT_MODEL_NAME)
    monkeypatch.setenv("LORAKIT_CACHE", str(cache))
    shipped = general_prompts
    monkeypatch.setattr("lorakit.evaluation.measure.general_prompts", lambda limit=None: shipped(3))
    # One thread: a tiny model gains nothing from more, and loses much on a CPU that is busy.
    monkeypatch.setenv("LORAKIT_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path / "demo"
    try:
        demo(["--output", str(out), "--steps", "2", "--held-out", "2"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.splitlines()
    report = json.loads((out / "report.json").read_text())
    [entry] = report["adapters"]
    assert entry["name"] == "demo" and entry["path"] == str(out) and entry["kl_mean"] > 0
    assert report["task"]["rows"] == 2 and report["task"]["metric_name"] == "exact"
    assert f"forgetting    {entry['headline']}" in printed
    assert f"report        {out / 'report.html'} (lorakit compare --adapter {out} --data {EVAL_PATH})" in printed
    assert "data:image/png;base64," in (out / "report.html").read_text()
