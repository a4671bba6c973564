"""`compare` reads the bundled model's shipped continuations only when they are the ones it
would generate: the same weights and the same settings."""

import json

import torch

from conftest import tiny_llama_for_tokenizer
from lorakit.base.models import DEFAULT_MODEL_NAME
from lorakit.evaluation.measure import (
    bundled_model_key,
    general_prompts,
    generated_continuations,
    generated_reference,
    reference_settings,
    shipped_reference,
)


def test_shipped_continuations_are_used_only_for_the_same_weights_and_settings(tmp_path, monkeypatch) -> None:
    model, tok = tiny_llama_for_tokenizer()
    cache = tmp_path / "cache"
    model.save_pretrained(cache / DEFAULT_MODEL_NAME)
    tok.save_pretrained(cache / DEFAULT_MODEL_NAME)
    monkeypatch.setenv("LORAKIT_CACHE", str(cache))
    prompts = general_prompts(3)
    settings = reference_settings(prompts, 8, 1, 1.0, 0, 8)
    with torch.no_grad():
        continuations = generated_continuations(model, tok, prompts, 8, 1, 1.0, 0, 8)
        want = generated_reference(model, tok, prompts, 8, 1, 1.0, 0, 8)
    path = tmp_path / "shipped.json"
    path.write_text(json.dumps({"model": bundled_model_key(), "settings": settings, "continuations": continuations}))

    got = shipped_reference(tok, settings, path)
    assert got is not None
    assert [r.input_ids for r in got.rows] == [r.input_ids for r in want.rows]
    assert [r.labels for r in got.rows] == [r.labels for r in want.rows]
    assert got.continuations == want.continuations and got.how == want.how
    # other settings, or other weights: generate instead
    assert shipped_reference(tok, reference_settings(prompts, 16, 1, 1.0, 0, 8), path) is None
    assert shipped_reference(tok, reference_settings(prompts, 8, 1, 1.0, 1, 8), path) is None
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(cache / DEFAULT_MODEL_NAME)
    assert shipped_reference(tok, settings, path) is None
    assert shipped_reference(tok, settings, tmp_path / "missing.json") is None
