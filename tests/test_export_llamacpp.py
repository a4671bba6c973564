"""A real llama.cpp run (through llama-cpp-python) of `lorakit export --format gguf-lora`: the
bundled SmolLM2 GGUF plus the fine-tuned demo adapter gives lorakit's greedy output on the
demo's held-out notes, and the base without the adapter does not.

llama-cpp-python is built from source (PyPI ships no wheel for this platform), which takes long
on a small machine, so it is not part of `make test`: `make test-llamacpp` builds it and runs
this file. The demo adapter is trained once (about a minute on an idle 2-core CPU) and kept in
lorakit's cache; LORAKIT_DEMO_ADAPTER=DIR uses an adapter trained by `python -m lorakit.demo`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed; `make test-llamacpp` builds it and runs this test"
)

NOTES = 4
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def demo_adapter() -> Path:
    """The demo adapter: $LORAKIT_DEMO_ADAPTER, else trained once (the demo's settings) into
    lorakit's cache and reused by later runs."""
    given = os.environ.get("LORAKIT_DEMO_ADAPTER")
    if given:
        return Path(given)
    from lorakit.base.models import cache_dir
    from lorakit.demo.__main__ import EVAL, TRAIN
    from lorakit.train.recipe import TrainArgs, train

    out = cache_dir() / "test-demo-adapter"
    if (out / "adapter_model.safetensors").is_file():
        return out
    staging = Path(tempfile.mkdtemp(prefix=".test-demo-adapter.", dir=cache_dir()))
    try:
        train(TrainArgs(data=str(TRAIN), eval_data=str(EVAL), output=str(staging), max_steps=30, lr=1e-3,
                        batch_size=8, seq_len=512, rank=16, alpha=32, device="cpu"))
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def test_llama_cpp_runs_the_exported_adapter_like_lorakit(demo_adapter, tmp_path):
    from lorakit.adapters.files import load_adapter
    from lorakit.base.models import default_gguf_path, load_model
    from lorakit.base.templates import use_adapter_template
    from lorakit.cli import main
    from lorakit.demo.__main__ import EVAL

    exported = tmp_path / "demo.gguf"
    assert main(["export", str(demo_adapter), "--format", "gguf-lora", "--output", str(exported)]) == 0

    rows = [json.loads(line) for line in EVAL.read_text().splitlines() if line.strip()][:NOTES]
    model, tokenizer = load_model(device="cpu", dtype=torch.float32)
    load_adapter(model, demo_adapter)
    use_adapter_template(tokenizer, demo_adapter)
    prompts = [tokenizer(tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for r in rows]
    stop = tokenizer.eos_token_id

    def lorakit_greedy(ids: list[int]) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        tokens = out[0, len(ids):].tolist()
        return tokens[: tokens.index(stop)] if stop in tokens else tokens

    def llama_greedy(llm, ids: list[int]) -> list[int]:
        llm.reset()
        tokens = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if token == stop or len(tokens) == NEW_TOKENS:
                break
            tokens.append(token)
        return tokens

    base_gguf = str(default_gguf_path())
    with_adapter = llama_cpp.Llama(model_path=base_gguf, lora_path=str(exported), n_ctx=1024, n_threads=1,
                                   seed=0, verbose=False)
    without = llama_cpp.Llama(model_path=base_gguf, n_ctx=1024, n_threads=1, seed=0, verbose=False)
    ours = [lorakit_greedy(p) for p in prompts]
    theirs = [llama_greedy(with_adapter, p) for p in prompts]
    plain = [llama_greedy(without, p) for p in prompts]
    texts = [(tokenizer.decode(a), tokenizer.decode(b)) for a, b in zip(ours, theirs, strict=True)]
    matches = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"llama.cpp + adapter == lorakit on {matches}/{NOTES} held-out notes; "
          f"llama.cpp base alone == lorakit + adapter on {sum(a == b for a, b in zip(ours, plain, strict=True))}/{NOTES}")
    assert matches == NOTES, texts
    assert all(a != b for a, b in zip(ours, plain, strict=True))
    # The merged GGUF (lorakit's own writer: llama metadata, tokenizer, template) runs in llama.cpp too.
    merged = tmp_path / "demo-f16.gguf"
    assert main(["export", str(demo_adapter), "--format", "gguf", "--dtype", "f16", "--output", str(merged)]) == 0
    merged_llm = llama_cpp.Llama(model_path=str(merged), n_ctx=1024, n_threads=1, seed=0, verbose=False)
    assert merged_llm.tokenize(b"call w/ Dana Reyes", add_bos=False, special=False) == \
        tokenizer("call w/ Dana Reyes", add_special_tokens=False)["input_ids"]
    merged_matches = sum(a == llama_greedy(merged_llm, p) for a, p in zip(ours, prompts, strict=True))
    print(f"llama.cpp on the merged F16 GGUF == lorakit on {merged_matches}/{NOTES} held-out notes")
    for llm in (with_adapter, without, merged_llm):
        llm.close()  # now, not in a finaliser at interpreter exit
    assert merged_matches == NOTES
    # And the adapter did learn the task: its output parses as the notes' JSON.
    assert sum(json.loads(r["messages"][-1]["content"]) == _json(t) for r, (t, _) in zip(rows, texts, strict=True)) >= NOTES // 2


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
