import torch

import lorakit

model, tokenizer = lorakit.load_model()  # the bundled SmolLM2-135M-Instruct, CPU, fp32
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
with torch.no_grad():
    base = model(ids).logits
lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
print(lorakit.trainable_parameters(model))  # only A and B train; B starts at zero
with torch.no_grad():
    print(tokenizer.decode(model(ids).logits[0, -1].argmax()))  # adapted forward: " Paris"
    with lorakit.disable_adapters(model):
        assert torch.equal(model(ids).logits, base)  # adapter off: the base model, bit for bit
lorakit.save_adapter(model, "out/my-adapter")  # adapter_config.json + adapter_model.safetensors
