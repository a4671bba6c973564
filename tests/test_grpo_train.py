"""`lorakit train --objective grpo` end to end on a tiny model: the logged names, learning from a
reward, bit-exact resume inside a rollout, a 4-bit base, and clear errors for bad options.

The rollout source here is a plain token-by-token sampler over the model itself (`SampledRollouts`),
which keeps to the `RolloutSource` contract; the serving engine's is tested where it lives.
"""

from __future__ import annotations

import json
import random
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lorakit.cli import main as cli_main
from lorakit.train import recipe
from lorakit.train.objectives import grpo
from lorakit.train.objectives.grpo import Rollout
from lorakit.train.recipe import TrainArgs


class SampledRollouts:
    """Token by token from the live model: temperature, top-p, a torch.Generator seeded per call."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.eos = model, tokenizer.eos_token_id
        self.closed = False

    @torch.no_grad()
    def generate(self, prompts, *, num_generations, max_new_tokens, temperature, top_p, seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for prompt in prompts:
            ids = torch.tensor([prompt] * num_generations)
            tokens = [[] for _ in range(num_generations)]
            logps = [[] for _ in range(num_generations)]
            done = [False] * num_generations
            for _ in range(max_new_tokens):
                logits = self.model(input_ids=ids, use_cache=False).logits[:, -1].float()
                logp = F.log_softmax(logits / temperature, dim=-1)
                probs = logp.exp()
                ordered, order = probs.sort(dim=-1, descending=True)
                drop = ordered.cumsum(-1) - ordered > top_p  # keep the smallest set reaching top_p
                probs = probs.scatter(-1, order, ordered.masked_fill(drop, 0.0))
                picked = torch.multinomial(probs, 1, generator=g)  # (G, 1)
                for i in range(num_generations):
                    if not done[i]:
                        token = int(picked[i])
                        tokens[i].append(token)
                        logps[i].append(float(logp[i, token]))
                        done[i] = token == self.eos
                if all(done):
                    break
                ids = torch.cat([ids, picked], dim=1)
            out += [Rollout(t, lp, "stop" if d else "length") for t, lp, d in zip(tokens, logps, done, strict=True)]
        return out

    def close(self) -> None:
        self.closed = True


def letters(prompts, completions, **columns):
    """The share of a completion's characters that are ASCII letters: dense enough for a tiny model."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.isascii() and ch.isalpha() for ch in t) / max(len(t), 1) for t in texts]


@pytest.fixture(autouse=True)
def reward_module(monkeypatch):
    module = types.ModuleType("grpo_test_rewards")
    module.letters = letters
    monkeypatch.setitem(sys.modules, "grpo_test_rewards", module)


@pytest.fixture
def prompt_data(tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(12):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if i % 2:  # chat rows with a reference answer, and plain prompt rows with one
            rows.append({"messages": [{"role": "user", "content": f"{a}+{b}"}], "reference": str(a + b)})
        else:
            rows.append({"prompt": f"{a}+{b}=", "reference": str(a + b)})
    train, held = tmp_path / "prompts.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return train, held


def args_for(model_dir, data, output, **overrides) -> TrainArgs:
    train, held = data
    options = dict(model=str(model_dir), data=str(train), eval_data=str(held), output=str(output), objective="grpo",
                   reward=["grpo_test_rewards:letters", "exact"], reward_weights=[1.0, 0.5], rank=4, alpha=8,
                   lr=5e-2, batch_size=2, num_generations=4, max_completion_tokens=6, max_steps=4, log_every=1,
                   eval_every=4, seq_len=48, device="cpu", precision="fp32", warmup_steps=0, schedule="constant")
    options.update(overrides)
    return TrainArgs(**options)


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


TRL_NAMES = ("reward", "reward_std", "rewards/letters/mean", "rewards/letters/std", "rewards/exact/mean",
             "rewards/exact/std", "completions/mean_length", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "clip_ratio/region_mean", "frac_reward_zero_std", "rollout_tokens_per_s", "train_tokens_per_s")


def test_run_logs_trl_names_and_learns_the_reward(tmp_path, tiny_model_dir, prompt_data, capsys):
    made = []

    def factory(model, tokenizer):
        made.append(SampledRollouts(model, tokenizer))
        return made[-1]

    # The output head adapted too: a random tiny model's near-uniform logits move fast through it.
    out = recipe.train(args_for(tiny_model_dir, prompt_data, tmp_path / "run", max_steps=12, eval_every=6, lr=0.1,
                                batch_size=4, num_generations=8, targets="q_proj,v_proj,lm_head", beta=0.04,
                                loss_type="grpo"), rollouts=factory)
    rows = metrics(out)
    assert len(made) == 1 and made[0].closed
    for name in (*TRL_NAMES, "kl", "loss"):
        assert all(name in r for r in rows), name
    assert rows[-1]["eval_loss"] == pytest.approx(-rows[-1]["eval_reward"])
    assert "eval_exact" in rows[-1] and "eval_rewards/letters/mean" in rows[-1]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-9)  # the fresh adapter is the base
    assert rows[-1]["kl"] > 0
    first, last = (sum(r["rewards/letters/mean"] for r in part) / 3 for part in (rows[:3], rows[-3:]))
    assert first < 0.5 < 0.8 < last, (first, last)  # the policy learned to write letters
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "completion", "reward", "advantage"} <= samples[0].keys()
    assert (out / "loss.png").exists()
    console = capsys.readouterr()
    assert "reward " in console.out + console.err and "rollout " in console.out + console.err


def engine_rollouts(model, tokenizer):
    from lorakit.serve.rollouts import Rollouts

    return Rollouts(model, tokenizer)


@pytest.mark.parametrize("source", ["sampler", "engine"])
def test_resume_inside_a_rollout_ends_with_the_same_adapter(tmp_path, tiny_model_dir, prompt_data, monkeypatch,
                                                            source):
    """--updates-per-rollout 2: a checkpoint at step 3 carries rollout 1, which step 3 reuses."""
    factory = SampledRollouts if source == "sampler" else engine_rollouts
    monkeypatch.setenv("LORAKIT_THREADS", "1")  # bit for bit needs one thread count for all runs
    options = dict(max_steps=6, save_every=2, updates_per_rollout=2, grad_accum=2, beta=0.1, dropout=0.1,
                   eval_data=None, log_every=6)
    whole = recipe.train(args_for(tiny_model_dir, prompt_data, tmp_path / "whole", **options), rollouts=factory)
    calls = {"n": 0}
    real = grpo.GRPOLoss.forward

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # the second micro-batch of step 4 (0-based step 3)
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(grpo.GRPOLoss, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recipe.train(args_for(tiny_model_dir, prompt_data, tmp_path / "cut", **options), rollouts=factory)
    assert (tmp_path / "cut" / "checkpoint-3" / "objective.pt").exists()
    monkeypatch.setattr(grpo.GRPOLoss, "forward", real)
    recipe.train(args_for(tiny_model_dir, prompt_data, tmp_path / "cut", resume=True, **options),
                 rollouts=factory)
    a, b = adapter(whole), adapter(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_on_a_4bit_base_from_an_init_adapter(tmp_path, tiny_model_dir, prompt_data):
    pytest.importorskip("bitsandbytes")
    first = recipe.train(args_for(tiny_model_dir, prompt_data, tmp_path / "first", max_steps=1, eval_data=None),
                         rollouts=SampledRollouts)
    out = recipe.train(args_for(tiny_model_dir, prompt_data, tmp_path / "q", quantize="nf4", max_steps=2,
                                init_adapter=str(first), loss_type="dr_grpo", eval_data=None), rollouts=engine_rollouts)
    rows = metrics(out)
    assert rows[-1]["mem_base_format"] == "nf4" and "reward" in rows[-1]


def test_cli_runs_through_the_serving_engine(tmp_path, tiny_model_dir, prompt_data):
    """`lorakit train --objective grpo` samples through lorakit.serve.rollouts.Rollouts."""
    out = tmp_path / "cli"
    code = cli_main(["train", "--model", str(tiny_model_dir), "--data", str(prompt_data[0]), "--output", str(out),
                     "--objective", "grpo", "--reward", "grpo_test_rewards:letters", "--reward", "regex:\\d",
                     "--reward-weights", "[1, 0.5]", "--num-generations", "2", "--max-completion-tokens", "4",
                     "--batch-size", "2", "--max-steps", "2", "--log-every", "1", "--seq-len", "40",
                     "--device", "cpu", "--precision", "fp32", "--scale-rewards", "batch"])
    assert code == 0
    rows = metrics(out)
    assert "rewards/regex/mean" in rows[-1] and rows[-1]["completions/mean_length"] > 0
    assert rows[0]["clip_ratio/region_mean"] == 0  # on-policy: the engine's log-probs are the loss's


def test_serving_engine_rollouts_are_repeatable_and_their_logps_are_the_loss(tmp_path):
    """The engine's old-policy log-probs equal the loss's log-probs of the same tokens (same temperature)."""
    import lorakit.serve.rollouts as rollouts
    from conftest import tiny_llama_for_tokenizer
    from lorakit.adapters.config import LoraConfig
    from lorakit.adapters.inject import inject
    from lorakit.train.objectives.grpo import collate_rollouts, completion_logps

    model, tok = tiny_llama_for_tokenizer()
    inject(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    model.train()
    prompts = [tok("3+4=")["input_ids"], tok("12+5=")["input_ids"]]
    source = rollouts.Rollouts(model, tok, decode_path="generic")
    try:
        options = dict(num_generations=3, max_new_tokens=5, temperature=0.7, top_p=0.9)
        got = source.generate(prompts, seed=11, **options)
        again = source.generate(prompts, seed=11, **options)
    finally:
        source.close()
    assert model.training
    assert [r.completion_ids for r in got] == [r.completion_ids for r in again]
    assert len({tuple(r.completion_ids) for r in got}) > 1
    batch = collate_rollouts([p for p in prompts for _ in range(3)], [r.completion_ids for r in got], tok.pad_token_id)
    with torch.no_grad():
        ours = completion_logps(model.eval(), batch, 0.7)
    for i, r in enumerate(got):
        torch.testing.assert_close(ours[i, : len(r.logps)], torch.tensor(r.logps), rtol=1e-4, atol=1e-4)


def test_without_a_rollout_source_the_error_says_how_to_give_one(tmp_path, tiny_model_dir, prompt_data):
    with pytest.raises(ValueError, match="--objective grpo needs a rollout source"):
        recipe.train(args_for(tiny_model_dir, prompt_data, tmp_path / "none"))


@pytest.mark.parametrize("extra, message", [
    (["--num-generations", "1"], "--num-generations 1 leaves each group one completion"),
    (["--epsilon", "0.2", "--epsilon-high", "0.1"], "--epsilon-high must be a finite number >= --epsilon (0.2), got 0.1"),
    (["--loss-type", "bnpo"], "--loss-type must be one of grpo, dr_grpo, dapo, got 'bnpo'"),
    (["--scale-rewards", "mean"], "--scale-rewards must be one of group, batch, none, got 'mean'"),
    (["--reward-weights", "[1, 2]"], "--reward-weights has 2 values for 1 --reward functions"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--max-completion-tokens", "512"], "--max-completion-tokens 512 leaves no room for the prompt in --seq-len 512"),
    (["--beta", "-1"], "--beta must be a finite number >= 0 for --objective grpo"),
    (["--reward", "nonsense"], "--reward 'nonsense' is not a reward"),
    (["--strategy", "fsdp"], "--objective grpo runs under torchrun with --strategy ddp"),
])
def test_bad_options_are_refused_by_name(tmp_path, tiny_model_dir, prompt_data, capsys, extra, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        cli_main(["train", "--model", str(tiny_model_dir), "--data", str(prompt_data[0]), "--output", str(out),
                  "--objective", "grpo", "--reward", "exact", "--seq-len", "512", *extra])
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_grpo_options_elsewhere_and_beta_defaults(tmp_path, tiny_model_dir, prompt_data, capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--data", str(prompt_data[0]), "--output", str(tmp_path / "x"), "--num-generations", "4"])
    assert "--num-generations applies to --objective grpo only, got --objective sft" in capsys.readouterr().err
    assert TrainArgs(data="d", output="o", objective="dpo").beta == 0.1
    assert TrainArgs(data="d", output="o", objective="orpo").beta == 0.1
    assert TrainArgs(data="d", output="o", objective="grpo", reward=["exact"]).beta == 0.0
    assert TrainArgs(data="d", output="o", objective="grpo", reward=["exact"], epsilon=0.1).epsilon_high == 0.1


def test_two_processes_each_roll_out_their_own_prompts(tmp_path, tiny_model_dir, prompt_data):
    """torchrun DDP: each process samples its half of the step's prompts; rewards and clip ratios are
    summed over both, --scale-rewards batch takes the std of both halves."""
    import os
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    (tmp_path / "grpo_ddp_rewards.py").write_text(
        "def letters(prompts, completions, **kw):\n"
        "    texts = [c if isinstance(c, str) else c[0]['content'] for c in completions]\n"
        "    return [sum(c.isascii() and c.isalpha() for c in t) / max(len(t), 1) for t in texts]\n")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    out = tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "lorakit", "train", "--model", str(tiny_model_dir), "--data", str(prompt_data[0]),
         "--output", str(out), "--objective", "grpo", "--reward", "grpo_ddp_rewards:letters",
         "--num-generations", "4", "--max-completion-tokens", "4", "--batch-size", "4", "--max-steps", "2",
         "--log-every", "1", "--seq-len", "40", "--device", "cpu", "--precision", "fp32", "--beta", "0.1",
         "--scale-rewards", "batch", "--strategy", "ddp"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(name in rows[-1] for name in ("reward", "rewards/letters/mean", "kl", "clip_ratio/region_mean"))


def test_prompt_rows_and_their_references(tmp_path):
    from conftest import tiny_tokenizer
    from lorakit.data.files import DataError
    from lorakit.data.prompts import load_prompt_rows

    tok = tiny_tokenizer()
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "2+2=", "completion": "4", "level": 1},
            {"messages": [{"role": "user", "content": "3+3"}, {"role": "assistant", "content": "6"}]},
            {"messages": [{"role": "user", "content": "1+1"}], "reference": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, skipped, cut = load_prompt_rows(path, tok, max_prompt_tokens=12)
    assert [r.reference for r in got] == ["4", "6", "2"] and skipped == 0
    assert got[0].columns == {"completion": "4", "level": 1} and not got[0].conversational
    assert got[1].prompt == [{"role": "user", "content": "3+3"}] and got[1].conversational
    chat = tok.apply_chat_template([{"role": "user", "content": "3+3"}], tokenize=False, add_generation_prompt=True)
    full = tok(chat, add_special_tokens=False)["input_ids"]
    assert len(full) > 12 and got[1].ids == full[-12:] and cut == 2  # long prompts keep their last tokens
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="'messages' must end with a user turn"):
        load_prompt_rows(path, tok, 64)
    path.write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps({"prompt": "ok"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:1: a prompt row needs 'prompt' \(text\) or 'messages'"):
        load_prompt_rows(path, tok, 64)
    assert load_prompt_rows(path, tok, 64, skip_bad=True)[1] == 1


def test_resume_refuses_changed_grpo_settings_and_reads_older_checkpoints(tmp_path, tiny_model_dir, prompt_data,
                                                                           reward_module):
    """--resume with another --num-generations (or loss type, reward, ...) would train another
    adapter: refused, naming the setting. A checkpoint written before these settings were recorded
    cannot say what they were: it resumes as before."""
    import shutil

    out = tmp_path / "run"
    recipe.train(args_for(tiny_model_dir, prompt_data, out, max_steps=2, save_every=1, eval_every=2),
                 rollouts=SampledRollouts)
    with pytest.raises(ValueError, match=r"other settings \(num_generations: checkpoint 4, now 3\)"):
        recipe.train(args_for(tiny_model_dir, prompt_data, out, max_steps=2, num_generations=3, resume=True),
                     rollouts=SampledRollouts)
    shutil.rmtree(out / "checkpoint-2")  # resume from step 1, whose record is an older lorakit's:
    state_path = out / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    for name in ("objective", "num_generations", "loss_type", "temperature"):
        state["settings"].pop(name)
    state_path.write_text(json.dumps(state))
    recipe.train(args_for(tiny_model_dir, prompt_data, out, max_steps=2, num_generations=3, resume=True),
                 rollouts=SampledRollouts)
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    assert (out / "adapter_model.safetensors").is_file()
