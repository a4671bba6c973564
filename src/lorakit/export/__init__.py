"""Adapters that travel: what other servers accept (`check`), and files for llama.cpp and
Ollama (`gguf_lora`, `gguf_model`, `ollama`), written through the `gguf` library."""
