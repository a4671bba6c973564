"""Sampling on the device, inside a captured decoding step: no host sync, no generators.

`sample_rows` keeps the generic path's rules (`lorakit.serve.sampling.sample`): greedy
rows (temperature 0) take the argmax; sampled rows divide by their temperature, keep their
top_k tokens and their top_p nucleus (the most likely token always survives) and draw from
what is left. The draw is the Gumbel-max trick with noise from a counter-based hash of
(row's seed, position, rank): a row's token depends on its own logits, seed and position
only, never on the rest of the batch or on how many steps ran before, so the same seed
gives the same output. The fast path draws different (equally distributed) numbers than
the generic path's torch.Generator, so a seeded request's sampled text depends on the path.
"""

from __future__ import annotations

import math

import torch

_MASK = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 values in [0, 2**32) (the low 32 bits of each
    product are exact whether or not the int64 multiplication wraps)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, position: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, width) float32 in (0, 1), a function of (seed[i], position[i], column) only."""
    column = torch.arange(width, device=seed.device, dtype=torch.int64)
    x = _mix((seed & _MASK) ^ ((position * 0x9E3779B1) & _MASK)).unsqueeze(1)
    x = _mix((x + column * 0x27D4EB2F) & _MASK)
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    position: torch.Tensor,
) -> torch.Tensor:
    """The next token of every row; logits (rows, vocab), the rest (rows,); returns (rows,) int64."""
    greedy = logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    sampled = temperature > 0
    scaled = logits.float() / torch.where(sampled, temperature, 1.0).unsqueeze(1)
    ordered, order = scaled.sort(dim=-1, descending=True)  # (rows, vocab)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = rank >= torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    probs = ordered.masked_fill(drop, -math.inf).softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p.
    drop = drop | ((probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1))
    drop[:, 0] = False
    logp = ordered.masked_fill(drop, -math.inf).log_softmax(dim=-1)
    gumbel = -torch.log(-torch.log(uniform(seed, position, vocab)))
    pick = (logp + gumbel).argmax(dim=-1, keepdim=True)
    return torch.where(sampled, order.gather(1, pick).squeeze(1), greedy)


def token_logprobs(logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each row's log-prob of its token, (rows,): log_softmax(logits / temperature)[token],
    logits alone where the temperature is 0 (greedy); top_k and top_p are not applied (the
    generic path's `lorakit.serve.sampling.token_logprobs`, with no host sync)."""
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scaled = scaled / torch.where(temperature > 0, temperature, 1.0).to(scaled.dtype).unsqueeze(1)
    return scaled.log_softmax(dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
