"""A short tour of the lorakit API on a tiny random-init Llama (runs in seconds on CPU)."""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

torch.manual_seed(0)
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
)
ids = torch.randint(0, 256, (4, 16))
with torch.no_grad():
    base_logits = model(ids).logits

lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
print(lorakit.trainable_parameters(model))

# A few optimizer steps: only the adapter learns.
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
for step in range(20):
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 5 == 0:
        print(f"step {step:2d}  loss {loss.item():.3f}")

with torch.no_grad(), lorakit.disable_adapters(model):
    assert torch.equal(model(ids).logits, base_logits)
print("disabled adapters give the base model's logits exactly")

with tempfile.TemporaryDirectory() as tmp:
    lorakit.save_adapter(model, tmp)
    lorakit.add_adapter(model, "second", lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        out = lorakit.forward_mixed(model, ["default", "second", None, "default"], ids)
    print("mixed batch logits:", tuple(out.logits.shape))
    lorakit.merge(model, "default")
    lorakit.unmerge(model)
print("done")
