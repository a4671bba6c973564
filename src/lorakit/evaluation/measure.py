"""How far an adapter moved its base, measured on text the base itself would write.

The reference text is the base model's own greedy and sampled continuations of general
prompts (shipped in `lorakit/prompts/general.jsonl`), or a user's file. On it, per adapter:

    KL(base || adapted)   per token: sum_v p_base(v) * (log p_base(v) - log p_adapted(v)),
                          at every position that predicts a reference token; mean and p95
    perplexity            exp(mean negative log-likelihood of the reference tokens), under
                          the base and under the adapted model
    top-1 agreement       the share of those positions where both models' most likely next
                          token is the same

The base is the same weights with the adapter disabled (`lorakit.disable_adapters`), so no
second copy of the model is held. With the adapter disabled, KL is 0 and agreement 1 exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lorakit.adapters.inject import disable_adapters, set_adapter
from lorakit.data.sft import IGNORE, TokenRow, as_sequences, collate, eval_batches, load_examples

PROMPTS = Path(__file__).resolve().parent.parent / "prompts" / "general.jsonl"
BUNDLED_REFERENCE = PROMPTS.with_name("general_bundled_reference.json")
"""The bundled model's own continuations of the general prompts at `compare`'s default settings,
as token ids (`demo/make_reference.py` writes it; `make test-experiment` checks it against a
fresh generation): `compare` on the bundled model reads them instead of generating them again."""


@dataclass
class Reference:
    """Reference text: one row per continuation; loss positions are the continuation's tokens."""

    rows: list[TokenRow]
    prompts: list[str]
    """The prompt each row continues (for people), or the file's row location."""
    continuations: list[str]
    how: list[str]
    """greedy, sampled, or file."""


@dataclass
class Divergence:
    """The per-token comparison of an adapted model with its base on reference text."""

    kl_mean: float
    kl_p95: float
    perplexity_base: float
    perplexity_adapted: float
    agreement: float
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {"kl_mean": self.kl_mean, "kl_p95": self.kl_p95, "perplexity_base": self.perplexity_base,
                "perplexity_adapted": self.perplexity_adapted, "agreement": self.agreement, "tokens": self.tokens}


def general_prompts(limit: int | None = None) -> list[dict]:
    """The shipped general prompts: {"kind", "messages"} rows."""
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    return rows[:limit]


def prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """A conversation through the chat template (with the generation prompt), or its raw text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(messages[-1]["content"], add_special_tokens=True)["input_ids"])


def _until_end(ids: list[int], stop: set[int]) -> list[int]:
    """Generated ids up to and including the first end-of-sequence token."""
    for i, token in enumerate(ids):
        if token in stop:
            return ids[: i + 1]
    return ids


@torch.no_grad()
def continue_prompts(model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int,
                     temperature: float = 0.0, seed: int = 0, batch_size: int = 16,
                     autocast_dtype: torch.dtype | None = None) -> list[list[int]]:
    """Continuations (token ids, cut after the end-of-sequence token) of each prompt.

    temperature 0 is greedy decoding; otherwise sampling at that temperature, seeded.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    stop = {t for t in (tokenizer.eos_token_id, pad) if t is not None}
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    torch.manual_seed(seed)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, **sampling)
        out += [_until_end(row.tolist(), stop) for row in gen[:, width:]]
    return out


def generated_reference(model: Any, tokenizer: Any, prompts: Sequence[dict], max_new_tokens: int,
                        sampled: int = 1, temperature: float = 1.0, seed: int = 0, batch_size: int = 16,
                        autocast_dtype: torch.dtype | None = None) -> Reference:
    """The base model's greedy continuation of each prompt and `sampled` sampled ones.

    Call it with the adapter disabled (or before any is loaded): the text must be the base's own.
    """
    return _reference_from([prompt_ids(tokenizer, p["messages"]) for p in prompts],
                           [p["messages"][-1]["content"] for p in prompts],
                           generated_continuations(model, tokenizer, prompts, max_new_tokens, sampled, temperature,
                                                   seed, batch_size, autocast_dtype), tokenizer)


def generated_continuations(model: Any, tokenizer: Any, prompts: Sequence[dict], max_new_tokens: int,
                            sampled: int = 1, temperature: float = 1.0, seed: int = 0, batch_size: int = 16,
                            autocast_dtype: torch.dtype | None = None) -> list[list[list[int]]]:
    """The token ids of `generated_reference`'s passes: [greedy, sampled...][prompt]."""
    ids = [prompt_ids(tokenizer, p["messages"]) for p in prompts]
    return [continue_prompts(model, tokenizer, ids, max_new_tokens, 0.0 if k == 0 else temperature, seed + k,
                             batch_size, autocast_dtype)
            for k in range(1 + sampled)]


def _reference_from(ids: Sequence[list[int]], texts: Sequence[str], continuations: Sequence[Sequence[list[int]]],
                    tokenizer: Any) -> Reference:
    """Reference rows from each prompt's continuations: continuations[k][i] is pass k (0: greedy,
    then sampled) of prompt i; empty continuations are left out."""
    ref = Reference([], [], [], [])
    for k, conts in enumerate(continuations):
        for prompt, text, cont in zip(ids, texts, conts, strict=True):
            if not cont:
                continue
            seq = prompt + cont
            ref.rows.append(TokenRow(seq, [IGNORE] * len(prompt) + cont, list(range(len(seq)))))
            ref.prompts.append(text)
            ref.continuations.append(tokenizer.decode(cont, skip_special_tokens=True).strip())
            ref.how.append("greedy" if k == 0 else "sampled")
    return ref


def reference_settings(prompts: Sequence[dict], max_new_tokens: int, sampled: int, temperature: float, seed: int,
                       batch_size: int) -> dict[str, Any]:
    """What a generated reference depends on besides the model (the key of the shipped one)."""
    return {"prompts": [p["messages"] for p in prompts], "max_new_tokens": max_new_tokens, "sampled": sampled,
            "temperature": temperature, "seed": seed, "batch_size": batch_size}


def bundled_model_key() -> dict[str, Any]:
    """Which weights a shipped reference was generated from: the bundled model's converted
    safetensors file, by size and the SHA-256 of its first MiB (its header, which names every
    tensor and its place, and the first weights)."""
    import hashlib

    from lorakit.base.models import default_model_path

    path = default_model_path() / "model.safetensors"
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(2**20)).hexdigest()
    return {"bytes": path.stat().st_size, "sha256_first_mib": head}


def shipped_reference(tokenizer: Any, settings: dict[str, Any], path: Path = BUNDLED_REFERENCE) -> Reference | None:
    """The bundled model's continuations shipped in `path`, when they were made with `settings`
    from the installed bundled model file (None otherwise: generate them)."""
    if not path.is_file():
        return None
    try:
        shipped = json.loads(path.read_text())
        if shipped["settings"] != json.loads(json.dumps(settings)) or shipped["model"] != bundled_model_key():
            return None
    except (OSError, ValueError, KeyError, FileNotFoundError):
        return None
    ids = [prompt_ids(tokenizer, messages) for messages in settings["prompts"]]
    texts = [messages[-1]["content"] for messages in settings["prompts"]]
    return _reference_from(ids, texts, shipped["continuations"], tokenizer)


def file_reference(path: str | Path, tokenizer: Any, seq_len: int) -> Reference:
    """A user's reference text: any data file `train` reads; the loss positions are measured."""
    examples, _ = load_examples(path, tokenizer, seq_len, "completion")
    rows = as_sequences(examples, seq_len, False)
    text = [tokenizer.decode([t for t in r.labels if t != IGNORE], skip_special_tokens=True) for r in rows]
    return Reference(rows, [f"{path} row {i + 1}" for i in range(len(rows))], text, ["file"] * len(rows))


@torch.no_grad()
def divergence(model: Any, rows: Sequence[TokenRow], adapters: Sequence[str | None], pad_id: int,
               batch_size: int = 8, autocast_dtype: torch.dtype | None = None) -> list[Divergence]:
    """Compare each adapter (None: the adapter disabled) with the base on `rows`.

    One base forward per batch serves every adapter; the active adapter is restored afterwards.
    """
    from lorakit.adapters.inject import active_adapters

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    previous = active_adapters(model)
    kls: list[list[torch.Tensor]] = [[] for _ in adapters]
    nll_adapted = [0.0 for _ in adapters]
    agree = [0 for _ in adapters]
    nll_base, count = 0.0, 0

    def log_probs(batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return F.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # (N, vocab)

    try:
        for seqs in eval_batches(list(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(seqs, pad_id).items()}
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE  # (B, T-1): position t predicts token t+1
            wanted = targets[mask].unsqueeze(1)  # (N, 1)
            with disable_adapters(model):
                base = log_probs(batch, mask)
            nll_base -= float(base.gather(1, wanted).sum())
            count += int(mask.sum())
            for i, name in enumerate(adapters):
                if name is None:
                    with disable_adapters(model):
                        adapted = log_probs(batch, mask)
                else:
                    set_adapter(model, name)
                    adapted = log_probs(batch, mask)
                # KL(base || adapted) per position: sum_v p_base * (log p_base - log p_adapted).
                kls[i].append(F.kl_div(adapted, base, reduction="none", log_target=True).sum(-1))
                nll_adapted[i] -= float(adapted.gather(1, wanted).sum())
                agree[i] += int((adapted.argmax(-1) == base.argmax(-1)).sum())
    finally:
        if previous:
            set_adapter(model, previous if len(previous) > 1 else previous[0])
        model.train(was_training)
    if count == 0:
        raise ValueError("the reference text has no tokens to measure (every row is prompt only)")
    out = []
    for i in range(len(adapters)):
        per_token = torch.cat(kls[i]).double()
        out.append(Divergence(
            kl_mean=float(per_token.mean()),
            kl_p95=float(torch.quantile(per_token, 0.95)),
            perplexity_base=math.exp(min(nll_base / count, 700.0)),
            perplexity_adapted=math.exp(min(nll_adapted[i] / count, 700.0)),
            agreement=agree[i] / count,
            tokens=count,
        ))
    return out
