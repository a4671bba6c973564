"""The tokenizer and chat template an adapter was trained with, saved beside it.

`lorakit train` writes the tokenizer files (`tokenizer_config.json`, `tokenizer.json`,
`chat_template.jinja`) into the adapter directory, so the template travels with the adapter:
`generate`, `serve`, `eval`, `merge` and `export` use it, and warn when the base model they
are given renders conversations differently.

It also holds the one way conversations and prompts become token ids, for training and serving
alike (`render_chat`, `encode_chat`, `encode_text`): special-token text inside a message or a
prompt is plain text unless the caller allows it, and the assistant turns of a conversation are
located in one rendering (`assistant_spans`).
"""

from __future__ import annotations

import bisect
import os
import re
import secrets
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"

END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
"""Special tokens that chat templates of common model families put at the end of a turn."""


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike) -> list[Path]:
    """Write the tokenizer's files into `directory`, each renamed into place whole."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=directory))
    try:
        tokenizer.save_pretrained(staging)
        written = []
        for item in sorted(staging.iterdir()):
            os.replace(item, directory / item.name)
            written.append(directory / item.name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def saved_chat_template(directory: str | os.PathLike) -> str | None:
    """The chat template saved in an adapter (or model) directory, or None when there is none."""
    directory = Path(directory)
    path = directory / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    config = directory / TOKENIZER_CONFIG
    if config.is_file():
        import json

        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        return template if isinstance(template, str) else None
    return None


def template_warning(tokenizer: Any, adapter_dir: str | os.PathLike) -> str | None:
    """A warning when the adapter's saved chat template differs from the base tokenizer's
    (None when they agree or the adapter saved none): the adapter learned its template's
    turn markers, and another one at serving time makes a model ramble or never stop."""
    template = saved_chat_template(adapter_dir)
    if template is None:
        return None
    base = getattr(tokenizer, "chat_template", None)
    where = Path(adapter_dir) / TEMPLATE_FILE
    if base is None:
        return f"the base model has no chat template; using the one saved with the adapter ({where})"
    if base.strip() != template.strip():
        return (
            f"the base model's chat template differs from the one the adapter was trained with; "
            f"using the adapter's ({where})"
        )
    return None


def use_adapter_template(tokenizer: Any, adapter_dir: str | os.PathLike) -> str | None:
    """Give `tokenizer` the chat template saved with the adapter, when there is one; returns
    `template_warning`'s warning."""
    warning = template_warning(tokenizer, adapter_dir)
    template = saved_chat_template(adapter_dir)
    if template is not None:
        tokenizer.chat_template = template
    return warning


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids that end a turn: EOS, and known end-of-turn specials the chat template uses."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN_MARKERS:
        if marker in template and marker in vocab:
            ids.add(int(vocab[marker]))
    return ids


def end_of_turn_strings(template: str, tokenizer: Any | None = None) -> list[str]:
    """The end-of-turn markers a template uses (and EOS), as text, for stop parameters."""
    found = [m for m in END_OF_TURN_MARKERS if m in template]
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if isinstance(eos, str) and eos and eos not in found:
        found.append(eos)
    return found


# rendering and tokenizing conversations ---------------------------------------------------
#
# Training and serving turn messages into token ids through the functions below, so both treat
# message text the same way: special-token text typed into a message (`<|im_start|>`, say) is
# tokenized as plain text unless `special_tokens_in_content` is set, so a user cannot forge
# turns; only the template's own markers become control tokens.


class TemplateError(ValueError):
    """Messages that cannot be rendered or tokenized as asked; the message says why."""


@dataclass
class ChatText:
    """A conversation rendered by a chat template.

    `content[i]` is the character span of message i's content in `text`; `content` is None when
    the template changes, drops or repeats message content, so it cannot be told apart from the
    template's own text.
    """

    text: str
    content: list[tuple[int, int]] | None


@dataclass
class Encoding:
    """Token ids of a text; `offsets[t]` its character span (when asked for); `special_text`:
    whether the content held special-token text (tokenized as text unless allowed)."""

    ids: list[int]
    offsets: list[tuple[int, int]] | None
    special_text: bool


def _apply(tokenizer: Any, messages: list[dict], generation_prompt: bool, chat_template: str | None) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _sentinels(count: int, messages: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    """A nonce and (open, close) markers per message, in Unicode private-use characters that no
    message holds, so they survive a template unchanged and never match content."""
    while True:
        nonce = secrets.token_hex(6)
        if not any(nonce in m["content"] for m in messages):
            return nonce, [(f"\ue000{nonce}:{i}\ue001", f"\ue002{nonce}:{i}\ue003") for i in range(count)]


def _split_marked(marked: str, nonce: str, count: int) -> tuple[list[str], list[str]] | None:
    """Template pieces T_0..T_n and contents C_0..C_n-1 of a rendering with sentinels around each
    content; None unless every sentinel appears once, in order."""
    pattern = re.compile(f"\ue000{nonce}:(\\d+)\ue001|\ue002{nonce}:(\\d+)\ue003")
    pieces, contents, pos, expected = [], [], 0, 0
    for match in pattern.finditer(marked):
        opening = match.group(1) is not None
        index = int(match.group(1) if opening else match.group(2))
        if index != expected // 2 or opening != (expected % 2 == 0):
            return None
        (pieces if opening else contents).append(marked[pos : match.start()])
        pos, expected = match.end(), expected + 1
    if expected != 2 * count:
        return None
    pieces.append(marked[pos:])
    return pieces, contents


def _marked(tokenizer: Any, messages: list[dict], generation_prompt: bool,
            chat_template: str | None) -> tuple[list[str], list[str]] | None:
    nonce, marks = _sentinels(len(messages), messages)
    wrapped = [{**m, "content": f"{a}{m['content']}{b}"} for m, (a, b) in zip(messages, marks, strict=True)]
    try:
        marked = _apply(tokenizer, wrapped, generation_prompt, chat_template)
    except Exception:  # a template may inspect content; then content cannot be located
        return None
    return _split_marked(marked, nonce, len(messages))


def render_chat(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool,
                chat_template: str | None = None) -> ChatText:
    """`messages` rendered by the chat template (transformers' `apply_chat_template`, unchanged),
    with the span of each message's content located in two renderings: the plain one and one
    with sentinels around each content. Linear in the conversation's length."""
    text = _apply(tokenizer, messages, add_generation_prompt, chat_template)
    split = _marked(tokenizer, messages, add_generation_prompt, chat_template)
    if split is None:
        return ChatText(text, None)
    pieces, contents = split
    spans: list[tuple[int, int]] = []
    if not text.startswith(pieces[0]):
        return ChatText(text, None)
    pos = len(pieces[0])
    for inner, after in zip(contents, pieces[1:], strict=True):
        # A template may trim content (`content | trim`); the sentinels kept it whole.
        for candidate in dict.fromkeys((inner, inner.strip())):
            end = pos + len(candidate)
            if text.startswith(candidate, pos) and text.startswith(after, end):
                break
        else:
            return ChatText(text, None)
        spans.append((end - len(candidate), end))
        pos = end + len(after)
    return ChatText(text, spans if pos == len(text) else None)


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of the special added tokens: those text can spell and `split_special_tokens` turns off."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids = {int(i) for i, token in decoder.items() if getattr(token, "special", False)}
    return ids or set(getattr(tokenizer, "all_special_ids", []))


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool, split_special: bool,
              offsets: bool) -> tuple[list[int], list[tuple[int, int]]]:
    out = tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=split_special,
                    return_offsets_mapping=offsets)
    return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]] if offsets else []


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool = True,
                special_tokens_in_content: bool = False, offsets: bool = False) -> Encoding:
    """Token ids of plain text (a text row, a prompt, a completion). Special-token text in it
    (`<|im_start|>`) is tokenized as text unless `special_tokens_in_content`; the tokenizer's own
    additions (BOS) stay control tokens either way."""
    if not getattr(tokenizer, "is_fast", True):  # no offsets: compare with the text-only tokenization
        ids, _ = _tokenize(tokenizer, text, add_special_tokens, False, False)
        as_text, _ = _tokenize(tokenizer, text, add_special_tokens, True, False)
        forged = as_text != ids
        return Encoding(ids if special_tokens_in_content else as_text, None, forged)
    ids, spans = _tokenize(tokenizer, text, add_special_tokens, False, True)
    special = _special_ids(tokenizer)
    forged = any(t in special and b > a for t, (a, b) in zip(ids, spans, strict=True))
    if forged and not special_tokens_in_content:
        ids, spans = _tokenize(tokenizer, text, add_special_tokens, True, True)
    return Encoding(ids, spans if offsets else None, forged)


def encode_chat(tokenizer: Any, chat: ChatText, *, special_tokens_in_content: bool = False,
                offsets: bool = False) -> Encoding:
    """Token ids of a rendered conversation: the template's markers as control tokens, and
    special-token text inside a message's content as plain text unless `special_tokens_in_content`.

    A conversation whose content holds no special-token text is tokenized whole, exactly as
    `tokenizer(chat.text, add_special_tokens=False)`. Otherwise the contents that hold some are
    tokenized apart, with special tokens split into text.
    """
    ids, spans = _tokenize(tokenizer, chat.text, False, False, True)
    special = _special_ids(tokenizer)
    positions = [a for (a, b), t in zip(spans, ids, strict=True) if t in special and b > a]
    if not positions:
        return Encoding(ids, spans if offsets else None, False)
    if chat.content is None:
        if special_tokens_in_content:
            return Encoding(ids, spans if offsets else None, True)
        raise TemplateError(
            "the chat template changes message content, so the special-token text in it cannot be kept "
            "apart from the template's own markers; remove it from the messages, or allow it as control "
            "tokens (--special-tokens-in-content)"
        )
    starts = [a for a, _ in chat.content]
    forged = set()
    for position in positions:
        j = bisect.bisect_right(starts, position) - 1
        if j >= 0 and position < chat.content[j][1]:
            forged.add(j)
    if not forged or special_tokens_in_content:
        return Encoding(ids, spans if offsets else None, bool(forged))
    ids, spans, pos = [], [], 0
    for j in sorted(forged):
        a, b = chat.content[j]
        for start, end, split in ((pos, a, False), (a, b, True)):
            if end > start:
                piece_ids, piece_spans = _tokenize(tokenizer, chat.text[start:end], False, split, True)
                ids += piece_ids
                spans += [(x + start, y + start) for x, y in piece_spans]
        pos = b
    if pos < len(chat.text):
        piece_ids, piece_spans = _tokenize(tokenizer, chat.text[pos:], False, False, True)
        ids += piece_ids
        spans += [(x + pos, y + pos) for x, y in piece_spans]
    return Encoding(ids, spans if offsets else None, True)


# The loss mask of a chat row: what each assistant turn adds after the generation prompt, up to
# and including its end-of-turn marker. Rendering every prefix of the conversation finds these
# spans for any template but takes time quadratic in the number of messages; the shape of one
# assistant turn, read from two-message probes, finds them in one pass, checked at every turn.


@dataclass
class _TurnShape:
    generation_prompt: str  # what add_generation_prompt appends after a user turn
    header: str  # the template's text before an assistant's content
    suffix: str  # and after it, when it ends the conversation


_shapes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _turn_shape(tokenizer: Any, chat_template: str | None) -> _TurnShape | None:
    try:
        cache = _shapes.setdefault(tokenizer, {})
    except TypeError:
        cache = {}
    key = chat_template or getattr(tokenizer, "chat_template", None)
    if key not in cache:
        cache[key] = _probe_turn_shape(tokenizer, chat_template)
    return cache[key]


def _probe_turn_shape(tokenizer: Any, chat_template: str | None) -> _TurnShape | None:
    user = [{"role": "user", "content": "u"}]
    pair = user + [{"role": "assistant", "content": "a"}]
    alone, prompted, both = (_marked(tokenizer, m, g, chat_template) for m, g in ((user, False), (user, True), (pair, False)))
    if alone is None or prompted is None or both is None:
        return None
    user_suffix = alone[0][1]
    if not (prompted[0][1].startswith(user_suffix) and both[0][1].startswith(user_suffix)):
        return None
    shape = _TurnShape(prompted[0][1][len(user_suffix):], both[0][1][len(user_suffix):], both[0][2])
    return shape if shape.header.startswith(shape.generation_prompt) else None


def assistant_spans(tokenizer: Any, messages: list[dict], chat: ChatText,
                    chat_template: str | None = None) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns in `chat` (rendered without a generation prompt):
    from the end of the generation prompt to the end of the turn's end-of-turn text, as rendering
    each prefix with and without the generation prompt finds them. None when the template does not
    render every assistant turn the way the probes show (the caller may render prefixes then)."""
    shape = _turn_shape(tokenizer, chat_template)
    if chat.content is None or shape is None:
        return None
    text, spans = chat.text, []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = chat.content[i]
        if not (text.startswith(shape.suffix, end) and text.endswith(shape.header, 0, start)):
            return None
        spans.append((0 if i == 0 else start - len(shape.header) + len(shape.generation_prompt), end + len(shape.suffix)))
    return spans


def prefix_spans(tokenizer: Any, messages: list[dict], chat: ChatText,
                 chat_template: str | None = None) -> list[tuple[int, int]] | None:
    """`assistant_spans` by rendering each prefix (quadratic: for short conversations only);
    None when the template does not render conversations prefix by prefix."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply(tokenizer, messages[:i], True, chat_template) if i else ""
        upto = _apply(tokenizer, messages[: i + 1], False, chat_template)
        if not (chat.text.startswith(before) and chat.text.startswith(upto)):
            return None
        spans.append((len(before), len(upto)))
    return spans
