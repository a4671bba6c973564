"""Incremental detokenization: the streamed text is transformers' `tokenizer.decode` of the
whole output, and the decoding work per token stays bounded, for tokenizers of every kind:
byte-level BPE, word-level, byte-fallback pieces, ids the tokenizer cannot name."""

from __future__ import annotations

import random

import pytest

from conftest import tiny_tokenizer
from lorakit.serve.sampling import Detokenizer, text_decoder

N = 2000
"""Tokens of output per check."""
WORK_PER_TOKEN = 16
"""Most ids decoded, summed over every decode call, per token of output."""
MODEL_VOCAB = 128_256
"""A Llama-3-sized output layer: the model may emit any of these ids."""
TEXT = (
    "Hello, world! The café's menu: crème brûlée (€7.50) — naïve façade. "
    "中文的文本，日本語のテキスト、한국어 텍스트. Emoji 🙂🎉👍🏽 and maths ∑∫√ ≤ ≥. "
    "Ελληνικά, русский текст, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢; ąęółżź?  Spaces   and\ttabs\nnew lines. "
)


def byte_level_257():
    """The ByteLevel alphabet and no merges, plus one special: 257 of a model's 128,256 ids have names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


WORDS = ["hello", "world", "the", "a", "cat", "sat", ",", ".", "!", "?", "é", "naïve", "中文", "🙂", "b"]


def word_level():
    """A word-level tokenizer naming every id, joining words with spaces and cleaning them up
    (transformers drops the space before punctuation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS + ["[UNK]"])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", clean_up_tokenization_spaces=True)


def byte_fallback():
    """SentencePiece's shape: "▁" for spaces, a few pieces, and `<0xE2>`-style byte pieces for the rest."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for piece in ["▁the", "▁Hello", "▁world", "e", "a", "t", "s", "n", "o", "r", "▁", "l", "i", "c", "h", ",", "."]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e")]
    vocab.update({"▁t": len(vocab), "▁th": len(vocab) + 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def smollm2():
    """The bundled SmolLM2-135M-Instruct's tokenizer, read from its GGUF file (offline)."""
    from transformers import AutoTokenizer

    from lorakit.base.models import default_gguf_path

    gguf = default_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


TOKENIZERS = {
    "tiny-byte-level": tiny_tokenizer,
    "word-level": word_level,
    "byte-level-257": byte_level_257,
    "byte-fallback": byte_fallback,
    "smollm2": smollm2,
}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def named(request):
    return request.param, TOKENIZERS[request.param]()


def text_output(name: str, tok, seed: int = 0) -> list[int]:
    """N tokens a model could write: the tokenizer's own encoding of real text, with ids it
    cannot name (byte-level-257) or special tokens (tiny) scattered through it."""
    rng = random.Random(seed)
    words = TEXT.split(" ") if name != "word-level" else WORDS
    ids: list[int] = []
    while len(ids) < N:
        if name == "word-level":
            piece = " ".join(rng.choice(WORDS) for _ in range(8))
        else:
            piece = " ".join(rng.sample(words, 6)) + " "
        ids += tok(piece, add_special_tokens=False)["input_ids"]
        if name == "byte-level-257":
            ids += [rng.randrange(300, MODEL_VOCAB) for _ in range(rng.randrange(0, 40))]
        elif name == "tiny-byte-level" and rng.random() < 0.3:
            ids += tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    return ids[:N]


def random_output(tok, vocab: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(N)]


def stream(tok, ids: list[int], stop=()) -> tuple[Detokenizer, list[str], int]:
    """Feed `ids` one at a time as the engine does; returns the detokenizer, the streamed pieces and
    the ids decoded in all (the sum of the lengths of every list handed to the decode function)."""
    detok = Detokenizer(tok, stop)
    decode, work = detok.decode, [0]

    def counted(window):
        work[0] += len(window)
        return decode(window)

    detok.decode = counted
    pieces = []
    for token in ids:
        if detok.add(token):
            break
        pieces.append(detok.delta(final=False))
    else:
        detok.flush()
    pieces.append(detok.delta(final=True))
    return detok, pieces, work[0]


@pytest.mark.parametrize("output", ["text", "random ids"])
def test_stream_is_decode_of_the_whole_output_at_bounded_work(named, output) -> None:
    """The streamed pieces add up to `tokenizer.decode` of the whole output, and the decode calls
    behind them see at most WORK_PER_TOKEN ids per token. Random ids over a model's whole output
    layer are mostly ids a small tokenizer cannot name, or bytes that form no character."""
    name, tok = named
    vocab = MODEL_VOCAB if name == "byte-level-257" else len(tok)
    ids = text_output(name, tok) if output == "text" else random_output(tok, vocab)
    detok, pieces, work = stream(tok, ids)
    assert work <= WORK_PER_TOKEN * N, (work, N)
    assert "".join(pieces) == detok.text
    want = tok.decode(ids, skip_special_tokens=True)
    if output == "text":
        assert len(want) > N // 4  # real text came out, not only replacement characters
        assert detok.text == want
    elif name != "byte-fallback":
        # Random bytes: a run of more stray bytes than STUCK_TOKENS that still ends inside a
        # character may differ from the whole decode; none does here. (Byte-fallback decoders
        # turn a whole run of byte pieces holding one bad byte into replacements, so random
        # byte pieces decode differently window by window, and are not compared.)
        assert detok.text == want


def test_ids_without_names_between_the_bytes_of_a_character() -> None:
    """Ids the tokenizer cannot name decode to nothing, so however many stand between the
    three bytes of "€", the character comes out whole, as in the decode of the whole output."""
    tok = byte_level_257()
    euro = tok("€", add_special_tokens=False)["input_ids"]
    assert len(euro) == 3
    ids = tok("price: ", add_special_tokens=False)["input_ids"] + euro[:1] + list(range(1000, 1100))
    ids += euro[1:2] + list(range(5000, 5050)) + euro[2:] + tok(" each", add_special_tokens=False)["input_ids"]
    detok, pieces, work = stream(tok, ids)
    assert detok.text == tok.decode(ids, skip_special_tokens=True) == "price: € each"
    assert work <= WORK_PER_TOKEN * len(ids)


def test_stray_bytes_come_out_as_replacement_characters() -> None:
    """A byte-fallback run that never becomes a character is handed out once it is longer than
    any UTF-8 sequence, as the whole output decodes it."""
    tok = byte_fallback()
    stray = tok.convert_tokens_to_ids(["<0x80>"]) * 30  # continuation bytes with no lead byte
    ids = tok("Hello", add_special_tokens=False)["input_ids"] + stray
    detok, pieces, work = stream(tok, ids)
    assert detok.text == tok.decode(ids, skip_special_tokens=True) == "Hello" + "\ufffd" * 30
    assert len("".join(pieces[:-1])) >= 20  # streamed as they came, not held to the end
    assert work <= WORK_PER_TOKEN * len(ids)


def test_stop_string_across_a_window_still_waiting_for_bytes() -> None:
    tok = byte_level_257()
    ids = tok("one 🙂 two; three", add_special_tokens=False)["input_ids"]
    ids[5:5] = list(range(2000, 2500))  # nameless ids inside the emoji's bytes
    detok, pieces, work = stream(tok, ids, stop=("🙂 tw",))
    assert detok.text == "".join(pieces) == "one "
    assert work <= WORK_PER_TOKEN * len(ids)


def test_cleanup_of_spaces_takes_the_direct_decoder_where_it_is_exact(monkeypatch) -> None:
    """With `clean_up_tokenization_spaces` on (Llama 3's config, many others), the detokenizer
    decodes without transformers' `decode` and gives the same text: for a BPE tokenizer, which
    transformers does not clean up, for a word-level one, which it does, and for one that
    cleans up its own way."""

    class Tidy(type(word_level())):
        def clean_up_tokenization(self, text: str) -> str:
            return text.replace(" ,", ";")

    tidy = Tidy(tokenizer_object=word_level().backend_tokenizer, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    assert tidy.decode(tidy("hello , world .")["input_ids"]) == "hello; world ."
    for tok in (byte_level_257(), word_level(), tidy):
        tok.clean_up_tokenization_spaces = True
        calls = [0]
        decode = tok.decode

        def counted(*args, _decode=decode, _calls=calls, **kwargs):
            _calls[0] += 1
            return _decode(*args, **kwargs)

        monkeypatch.setattr(tok, "decode", counted)
        rng = random.Random(2)
        direct = text_decoder(tok)
        words = ["hello", ",", "world", ".", "a", "!", "b", "?"]
        for _ in range(100):
            ids = tok(" ".join(rng.choice(words) for _ in range(rng.randrange(1, 9))), add_special_tokens=False)[
                "input_ids"
            ]
            assert direct(ids) == decode(ids, skip_special_tokens=True), ids
        ids = tok(" ".join(rng.choice(words) for _ in range(N)), add_special_tokens=False)["input_ids"][:N]
        calls[0] = 0
        detok, _, _ = stream(tok, ids)
        assert detok.text == decode(ids, skip_special_tokens=True)
        assert calls[0] <= 1  # one call over 2,000 tokens, to ask whether it cleans up
