"""The training recipe: loss against transformers, accumulation, resume, frozen base, outputs."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorakit
from conftest import tiny_llama, tiny_llama_for_tokenizer, tiny_tokenizer
from lorakit.data.sft import IGNORE, as_sequences, collate, load_examples
from lorakit.train import recipe
from lorakit.train.objectives import sft
from lorakit.train.objectives.sft import compute_loss
from lorakit.train.precision import attention_in_fp32
from lorakit.train.recipe import TrainArgs, lr_lambda


def base_hash(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name:
            h.update(name.encode())
            h.update(str(tensor.dtype).encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def args_for(model_dir, data, output, **overrides) -> TrainArgs:
    train, held = data
    options = dict(model=str(model_dir), data=str(train), eval_data=str(held), output=str(output),
                   rank=4, alpha=8, lr=5e-3, batch_size=4, max_steps=6, log_every=2, eval_every=3,
                   seq_len=64, device="cpu", dropout=0.1, precision="fp32")
    options.update(overrides)
    return TrainArgs(**options)


def adapter_tensors(path):
    return load_file(str(path / "adapter_model.safetensors"))


# the loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [2048, 3])
def test_compute_loss_matches_transformers_loss_and_gradients(chunk):
    model, tok = tiny_llama_for_tokenizer()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # make the adapter matter
    rows_path = [{"prompt": "12+30=", "completion": "42"}, {"text": "some plain text to learn"}]
    from lorakit.data.sft import Row, tokenize_rows

    examples, _ = tokenize_rows([Row(r, "m", i) for i, r in enumerate(rows_path)], tok, 64)
    batch = collate(as_sequences(examples, 64, False), tok.pad_token_id)

    loss_sum, count = compute_loss(model, batch, chunk=chunk)
    ours = loss_sum / count
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    # Reference: transformers' own causal-LM loss (mean over non-ignored shifted labels).
    reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    reference.backward()
    assert count == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours_grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_schedules():
    cosine = lr_lambda("cosine", warmup=2, total=10)
    assert cosine(0) == pytest.approx(1 / 3) and cosine(1) == pytest.approx(2 / 3)
    assert cosine(2) == pytest.approx(1.0)
    assert cosine(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine(10) == pytest.approx(0.0)
    linear = lr_lambda("linear", warmup=0, total=4)
    assert [linear(s) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="--batch-size must be a positive integer, got 0"):
        TrainArgs(data="d", output="o", batch_size=0)
    with pytest.raises(ValueError, match="--schedule must be one of cosine, linear, constant"):
        TrainArgs(data="d", output="o", schedule="step")
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16, got 'fp16'"):
        TrainArgs(data="d", output="o", precision="fp16")
    with pytest.raises(ValueError, match="LoraConfig.dropout must be in"):
        TrainArgs(data="d", output="o", dropout=1.5)


# the loop --------------------------------------------------------------------------------


def test_training_writes_everything_learns_and_never_touches_the_base(tmp_path, tiny_model_dir, chat_data, monkeypatch):
    held_models = []
    original = recipe.load_model

    def keep(*a, **k):
        model, tok = original(*a, **k)
        held_models.append((model, base_hash(model)))
        return model, tok

    monkeypatch.setattr(recipe, "load_model", keep)
    # bf16, as on a GPU or a CPU with native bf16: a bf16 base under autocast, fp32 adapter.
    out = recipe.train(args_for(tiny_model_dir, chat_data, tmp_path / "run", max_steps=12, lr=2e-2, dropout=0.0,
                                precision="bf16"))

    model, before = held_models[0]
    assert base_hash(model) == before  # training never modifies base weights
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "train_config.yaml"):
        assert (out / name).is_file(), name
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 3, 4, 6, 8, 9, 10, 12]
    for m in metrics:
        assert {"step", "epoch", "lr"} <= set(m)
        if m["step"] % 2 == 0:
            assert m["loss"] > 0 and m["tokens_per_s"] > 0
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 4 and evals[-1] < evals[0]
    config = yaml.safe_load((out / "train_config.yaml").read_text())
    assert config["rank"] == 4 and config["resolved"]["total_steps"] == 12
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-9"]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8
    # The saved adapter is the trained one: reloading it onto a fresh base reproduces the model.
    fresh, _ = original(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    attention_in_fp32(fresh)  # as training set up its model on a CPU
    lorakit.load_adapter(fresh, out)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.eval()
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_model_dir, chat_data):
    big = recipe.train(args_for(tiny_model_dir, chat_data, tmp_path / "big", batch_size=4, grad_accum=1, dropout=0.0))
    small = recipe.train(args_for(tiny_model_dir, chat_data, tmp_path / "acc", batch_size=2, grad_accum=2, dropout=0.0))
    a, b = adapter_tensors(big), adapter_tensors(small)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_resume_after_interrupt_ends_with_the_same_adapter(tmp_path, tiny_model_dir, chat_data, monkeypatch):
    """Ctrl-C mid-step saves a checkpoint; --resume then matches an uninterrupted run bit for bit."""
    monkeypatch.setenv("LORAKIT_THREADS", "1")  # bit for bit needs one thread count for all three runs
    options = dict(grad_accum=2, max_steps=8, save_every=3, dropout=0.1)
    whole = recipe.train(args_for(tiny_model_dir, chat_data, tmp_path / "whole", **options))

    calls = {"n": 0}
    real_loss = sft.compute_loss

    def interrupted(model, batch, chunk=2048):
        calls["n"] += model.training  # evaluation calls do not count
        if model.training and calls["n"] == 2 * 5 + 2:  # the second micro-batch of step 6 (steps count from 0)
            raise KeyboardInterrupt
        return real_loss(model, batch, chunk)

    monkeypatch.setattr(sft, "compute_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recipe.train(args_for(tiny_model_dir, chat_data, tmp_path / "cut", **options))
    cut = tmp_path / "cut"
    assert (cut / "checkpoint-5").is_dir()  # saved on Ctrl-C, as of the start of the cut step
    assert json.loads((cut / "checkpoint-5" / "trainer_state.json").read_text())["step"] == 5
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt", "adapter_model.safetensors"):
        assert (cut / "checkpoint-5" / name).is_file()

    monkeypatch.setattr(sft, "compute_loss", real_loss)
    recipe.train(args_for(tiny_model_dir, chat_data, cut, resume=True, **options))
    a, b = adapter_tensors(whole), adapter_tensors(cut)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    whole_steps = [json.loads(line)["step"] for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert steps == whole_steps


def test_loraplus_gives_b_its_own_learning_rate():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    opt = recipe.make_optimizer(model, TrainArgs(data="d", output="o", lr=1e-3, loraplus_ratio=16))
    a_group, b_group = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_A" in names[id(p)] for p in a_group["params"]) and a_group["lr"] == pytest.approx(1e-3)
    assert all("lora_B" in names[id(p)] for p in b_group["params"]) and b_group["lr"] == pytest.approx(1.6e-2)


def test_early_stopping_stops(tmp_path, tiny_model_dir, chat_data):
    # A learning rate this large makes eval loss worse after the first evaluation.
    out = recipe.train(args_for(tiny_model_dir, chat_data, tmp_path / "es", lr=5.0, max_grad_norm=None,
                                max_steps=30, eval_every=1, early_stopping=2, schedule="constant"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    best = min(e for e in evals if e == e)  # a diverged run may log NaN, which is never an improvement
    assert metrics[-1]["step"] < 30
    assert not evals[-1] <= best and not evals[-2] <= best


def test_eval_examples_are_truncated_and_counted(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c" * 50}) + "\n")
    examples, stats = load_examples(path, tok, 20)
    assert stats.truncated == 1 and len(examples[0].input_ids) == 20


def test_pieces_of_max_tokens_give_the_same_update(tmp_path, tiny_model_dir, chat_data):
    whole = recipe.train(args_for(tiny_model_dir, chat_data, tmp_path / "whole", max_tokens=10_000, dropout=0.0))
    pieces = recipe.train(args_for(tiny_model_dir, chat_data, tmp_path / "pieces", max_tokens=40, dropout=0.0))
    a, b = adapter_tensors(whole), adapter_tensors(pieces)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_split_rows_respects_the_token_budget():
    from lorakit.data.sft import TokenRow, split_rows

    rows = [TokenRow([1] * n, [1] * n, list(range(n))) for n in (30, 10, 25, 5, 12)]
    pieces = split_rows(rows, 64)  # widest row 30 -> 2 rows a piece
    assert [len(p) for p in pieces] == [2, 2, 1]
    assert [r for p in pieces for r in p] == rows
    assert split_rows(rows, None) == [rows]
    assert [len(p) for p in split_rows(rows, 8)] == [1] * 5  # never less than one row


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_sets_the_base_dtype_and_keeps_the_adapter_fp32(tmp_path, tiny_model_dir, chat_data, precision):
    run = recipe.setup(args_for(tiny_model_dir, chat_data, tmp_path / "p", precision=precision))
    base = {p.dtype for n, p in run.model.named_parameters() if "lora_" not in n}
    adapter = {p.dtype for n, p in run.model.named_parameters() if "lora_" in n}
    if precision == "fp32":
        assert run.autocast_dtype is None and base == {torch.float32}
        assert run.model.config._attn_implementation == "sdpa"
    else:
        assert run.autocast_dtype is torch.bfloat16 and base == {torch.bfloat16}
        assert run.model.config._attn_implementation == "lorakit_sdpa_fp32"  # attention in fp32 on a CPU
    assert adapter == {torch.float32}
