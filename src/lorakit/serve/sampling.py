"""Choosing the next token for a batch whose rows ask for different decoding, and
turning token ids back into text with stop strings.

Every row carries its own `SamplingParams`; a seeded row draws from its own generator,
so its output does not depend on which other requests share the batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 16
"""Most stop strings one request may give: each is searched for at every new token."""
MAX_STOP_CHARS = 256
"""Longest stop string, in characters: the output held back from a stream is as long."""


@dataclass
class SamplingParams:
    """How one request decodes (OpenAI's names; `top_k` as in vLLM)."""

    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 decodes greedily; higher flattens the distribution."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Seed of this request's own random generator (same seed, same output)."""
    stop: Sequence[str] = field(default_factory=tuple)
    """Strings that end the output; the stop string itself is not returned."""
    logprobs: bool = False
    """Record the log-prob of each sampled token (`Request.logprobs`), from the logits it was
    drawn from: log_softmax(logits / temperature), or log_softmax(logits) when greedy; top_k
    and top_p are not applied. For the Python API (rollouts); the HTTP API does not offer it."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 keeps all tokens), got {self.top_k!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64
        ):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be True or False, got {self.logprobs!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop holds {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are accepted")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {list(self.stop)!r}")
        longest = max(len(s) for s in self.stop) if self.stop else 0
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"stop holds a string of {longest} characters; at most {MAX_STOP_CHARS} are accepted")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """The next token of every row. logits: (batch, vocab); returns (batch,) int64.

    Greedy rows take the argmax. Sampled rows divide by their temperature, keep their
    top_k tokens and their top_p nucleus (the most likely token always survives) and
    draw from what is left with their own generator.

    Raises ValueError, before any row draws, when a row's logits hold NaN or +inf: no token
    can be chosen from them (greedy decoding would silently pick token 0).
    """
    if bool((logits.isnan() | logits.isposinf()).any()):
        raise ValueError(
            "the model's next-token scores hold NaN or infinite values (an adapter or base weights that "
            "overflow in this precision), so no token can be chosen"
        )
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    device = logits.device
    index = torch.tensor(rows, device=device)
    scaled = logits[index].float() / torch.tensor([params[i].temperature for i in rows], device=device).unsqueeze(1)
    vocab = logits.shape[-1]
    if all(params[i].top_p >= 1 and not 0 < params[i].top_k < vocab for i in rows):
        # Nothing is cut: draw from the whole distribution, unsorted (the sort of a large
        # vocabulary costs several times the draw; RL rollouts sample this way).
        probs = scaled.softmax(dim=-1)
        for j, i in enumerate(rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
        return tokens
    ordered, order = scaled.sort(dim=-1, descending=True)  # (n, vocab)
    # A top_k past the vocabulary keeps all of it (and past 2**63 would not fit a tensor).
    top_k = torch.tensor([min(params[i].top_k or vocab, vocab) for i in rows], device=device).unsqueeze(1)
    rank = torch.arange(vocab, device=device).unsqueeze(0)
    drop = rank >= top_k
    probs = ordered.masked_fill(drop, -math.inf).softmax(dim=-1)
    top_p = torch.tensor([params[i].top_p for i in rows], device=device).unsqueeze(1)
    # Drop a token when the tokens ranked above it already reach top_p.
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p
    drop[:, 0] = False
    probs = ordered.masked_fill(drop, -math.inf).softmax(dim=-1)
    for j, i in enumerate(rows):
        pick = torch.multinomial(probs[j], 1, generator=generators[i])
        tokens[i] = order[j, pick[0]]
    return tokens


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
) -> list[float | None] | None:
    """Each row's log-prob of its token, for the rows whose params ask (`logprobs`), else None;
    None when no row asks, so rows that do not ask cost nothing.

    logits: (batch, vocab), tokens: (batch,). Exactly, for an asking row i with temperature T
    (T = 1 when greedy): log_softmax(logits[i] / T)[tokens[i]], in at least float32."""
    rows = [i for i, p in enumerate(params) if p.logprobs]
    if not rows:
        return None
    device = logits.device
    index = torch.tensor(rows, device=device)
    scaled = logits[index].to(torch.promote_types(logits.dtype, torch.float32))
    scaled = scaled / torch.tensor([params[i].temperature or 1.0 for i in rows], device=device,
                                   dtype=scaled.dtype).unsqueeze(1)
    values = scaled.log_softmax(dim=-1).gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()
    out: list[float | None] = [None] * len(params)
    for i, value in zip(rows, values, strict=True):
        out[i] = value
    return out


def record_logprobs(rows: Sequence, values: Sequence[float | None] | None) -> None:
    """Append each asking row's new log-prob to its `logprobs` (rows: the engine's requests)."""
    if values is None:
        return
    for row, value in zip(rows, values, strict=True):
        if value is not None and row.logprobs is not None:
            row.logprobs.append(value)


REPLACEMENT = "\ufffd"
"""What a decoder gives for bytes that are not (yet) a whole UTF-8 character."""
STUCK_TOKENS = 8
"""Tokens a decoding window may wait for its text to end in a whole character: twice the
longest UTF-8 sequence (4 bytes, so at most 4 byte tokens). A window still waiting after
that holds bytes no later token completes (ids the tokenizer cannot name, stray bytes) and
is handed out as it decodes, so no window grows with the output."""
_PROBE = "a , b"
"""A text whose decoding `clean_up_tokenization` would change (it drops the space before a comma)."""


Decoding = tuple[Callable[[list[int]], str], Callable[[int], object] | None]
"""(the text decoder, the id namer or None): what a Detokenizer needs of its tokenizer."""


def decoding_for(tokenizer) -> Decoding:
    """`text_decoder` and `_namer` of `tokenizer`: both probe it, so a caller decoding many
    requests with one tokenizer works them out once."""
    return text_decoder(tokenizer), _namer(tokenizer)


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)` as a function, calling the Rust
    `tokenizers` decoder directly where that returns exactly the same text: a transformers
    fast tokenizer that overrides none of its decoding steps. Every running row decodes
    twice a step, and transformers' per-call argument conversion costs several times the
    decoding itself: at a hundred rows that is milliseconds a step.

    With `clean_up_tokenization_spaces` set, transformers may or may not clean up (recent
    versions skip it for BPE models, Llama 3's among them); one decoding of a text that
    cleanup changes tells which, and the direct path then applies the same cleanup or none.
    A tokenizer whose answer matches neither keeps `tokenizer.decode`."""
    slow = functools.partial(tokenizer.decode, skip_special_tokens=True)
    if not _backend_decodes(tokenizer):
        return slow
    direct = functools.partial(tokenizer.backend_tokenizer.decode, skip_special_tokens=True)
    if not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return direct
    probe = tokenizer.backend_tokenizer.encode(_PROBE, add_special_tokens=False).ids
    raw = direct(probe)
    clean = tokenizer.clean_up_tokenization
    cleaned = clean(raw)
    if cleaned == raw:  # this vocabulary cannot show whether decode cleans up
        return slow
    got = slow(probe)
    if got == raw:
        return direct
    if got == cleaned:
        return functools.partial(_cleaned, direct, clean)
    return slow


def _cleaned(decode: Callable[[list[int]], str], clean: Callable[[str], str], ids: list[int]) -> str:
    return clean(decode(ids))


def _backend_decodes(tokenizer) -> bool:
    """Whether `tokenizer.decode` is the Rust decoder's text, cleaned up or not: a transformers
    fast tokenizer that overrides neither decoding step."""
    from transformers import PreTrainedTokenizerFast

    cls = type(tokenizer)
    return (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerFast.decode
        and cls._decode is PreTrainedTokenizerFast._decode
    )


def _namer(tokenizer) -> Callable[[int], str | None] | None:
    """The Rust tokenizer's id -> token lookup, where it decodes: its decoder drops an id this
    gives None for, wherever the id stands."""
    return tokenizer.backend_tokenizer.id_to_token if _backend_decodes(tokenizer) else None


class Detokenizer:
    """Incremental decoding of one request's output, holding back what a stop string
    or an unfinished multi-byte character might still change.

    Each step decodes a short window (the last few tokens) instead of the whole
    output, and a window that ends inside a character waits for the next token, at
    most `STUCK_TOKENS` of them. Ids the tokenizer cannot name decode to nothing
    wherever they stand, so they never enter a window. Decoding work is a bounded
    number of tokens per token, whatever the tokenizer and the ids.
    """

    def __init__(self, tokenizer, stop: Sequence[str], decoding: Decoding | None = None) -> None:
        """`decoding`: `decoding_for(tokenizer)`, worked out once by a caller that decodes many
        requests (the engine) rather than once a request."""
        self.decode, self._name = decoding or decoding_for(tokenizer)
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self._window: list[int] = []  # the ids being decoded; earlier ones are dropped
        self._read = 0  # window[:_read] is text already taken in, kept as context
        self._before = ""  # decode(window[:_read])
        self._start = 0  # where the stop search starts: text before it was searched already

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string has appeared (the text is cut before it)."""
        self.ids.append(token)
        if self._name is not None and self._name(token) is None:
            return False
        self._window.append(token)
        after = self.decode(self._window)
        if len(after) > len(self._before) and not after.endswith(REPLACEMENT):
            self._take(after, keep_context=True)
        elif len(self._window) - self._read > STUCK_TOKENS:
            # No later token will finish this window's text: hand it out as it decodes. Its
            # last character may be a replacement, which must not be context for the next.
            self._take(after, keep_context=not after.endswith(REPLACEMENT))
        else:
            return False
        return self._find_stop()

    def _take(self, after: str, keep_context: bool) -> None:
        """Take in the window's new text; its newest tokens become the next window's context."""
        self._start = max(0, len(self.text) - self.hold)
        self.text += after[len(self._before) :]
        if keep_context:
            del self._window[: self._read]
            self._before = after if self._read == 0 else self.decode(self._window)
        else:
            self._window.clear()
            self._before = ""
        self._read = len(self._window)

    def _find_stop(self) -> bool:
        if self.stop:
            found = (self.text.find(s, self._start) for s in self.stop)
            cut = min((i for i in found if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                return True
        return False

    def flush(self) -> None:
        """At the end: take in whatever the last window holds, unfinished character or not."""
        if self._read < len(self._window):
            self.text += self.decode(self._window)[len(self._before) :]
            self._read = len(self._window)

    def delta(self, final: bool) -> str:
        """Text not handed out yet and safe to hand out (everything, once final)."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        piece = self.text[self.sent : end]
        self.sent = end
        return piece
