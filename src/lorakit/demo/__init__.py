"""The bundled demo task: sales notes to JSON, and `python -m lorakit.demo` to fine-tune on it."""
