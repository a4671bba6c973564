"""Which Llama and Qwen shapes `lorakit plan` predicts to train on a 24, 48 and 80 GiB card, at
2k and 8k tokens a sequence: the markdown tables in docs/training.md.

    PYTHONPATH=src python bench/plan_table.py
    PYTHONPATH=src python bench/plan_table.py --gpus 24,48,80,141 --seq-lens 2048,8192,32768

The shapes are the published configs' sizes, written here as config.json dicts (no download,
no weights: plan builds each model on the meta device). Every cell is a prediction of
`lorakit plan --model DIR --gpu G --seq-len S` with its defaults (rank 16 on every linear layer,
8,192 tokens a micro-batch asked, the base in bf16 if it fits, else NF4); none was checked by a
run on such a card.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
         "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 32768,
         "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
QWEN3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "head_dim": 128,
         "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}


def shape(family: dict, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, *,
          tied: bool, **extra) -> dict:
    return {**family, "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "tie_word_embeddings": tied, **extra}


SHAPES = {
    "Llama-3.2-1B": shape(LLAMA, 16, 2048, 8192, 32, 8, tied=True, head_dim=64),
    "Llama-3.2-3B": shape(LLAMA, 28, 3072, 8192, 24, 8, tied=True, head_dim=128),
    "Llama-3.1-8B": shape(LLAMA, 32, 4096, 14336, 32, 8, tied=False),
    "Llama-3.1-70B": shape(LLAMA, 80, 8192, 28672, 64, 8, tied=False),
    "Qwen2.5-0.5B": shape(QWEN2, 24, 896, 4864, 14, 2, tied=True, vocab_size=151936),
    "Qwen2.5-1.5B": shape(QWEN2, 28, 1536, 8960, 12, 2, tied=True, vocab_size=151936),
    "Qwen2.5-3B": shape(QWEN2, 36, 2048, 11008, 16, 2, tied=True, vocab_size=151936),
    "Qwen2.5-7B": shape(QWEN2, 28, 3584, 18944, 28, 4, tied=False, vocab_size=152064),
    "Qwen2.5-14B": shape(QWEN2, 48, 5120, 13824, 40, 8, tied=False, vocab_size=152064),
    "Qwen2.5-32B": shape(QWEN2, 64, 5120, 27648, 40, 8, tied=False, vocab_size=152064),
    "Qwen2.5-72B": shape(QWEN2, 80, 8192, 29568, 64, 8, tied=False, vocab_size=152064),
    "Qwen3-0.6B": shape(QWEN3, 28, 1024, 3072, 16, 8, tied=True),
    "Qwen3-1.7B": shape(QWEN3, 28, 2048, 6144, 16, 8, tied=True),
    "Qwen3-4B": shape(QWEN3, 36, 2560, 9728, 32, 8, tied=True),
    "Qwen3-8B": shape(QWEN3, 36, 4096, 12288, 32, 8, tied=False),
    "Qwen3-14B": shape(QWEN3, 40, 5120, 17408, 40, 8, tied=False),
    "Qwen3-32B": shape(QWEN3, 64, 5120, 25600, 64, 8, tied=False),
}
"""name -> config.json of the published model's sizes (parameters in size order within a family)."""


def write_config(name: str, directory: Path) -> Path:
    """A model directory holding only the config.json of shape `name`."""
    path = directory / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(SHAPES[name], indent=1))
    return path


def predict(names: list[str], gpus: list[str], seq_lens: list[int]) -> dict:
    """{(name, gpu, seq_len): plan's result}, each model built once on the meta device."""
    from lorakit.train.plan import PlanArgs, meta_model, plan

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            directory = str(write_config(name, Path(tmp)))
            model = meta_model(PlanArgs(model=directory))
            for gpu in gpus:
                for seq_len in seq_lens:
                    results[name, gpu, seq_len] = plan(PlanArgs(model=directory, gpu=gpu, seq_len=seq_len), model)
    return results


def cell(result: dict) -> str:
    if not result["fits"]:
        return "no"
    base = "NF4" if result["base"] == "nf4" else result["base"]
    return f"{base}, ~{result['tokens_per_s']:,.0f}/s"


def longest_any_base(result: dict) -> int:
    """The longest sequence that fits with the base plan picked or, where that is bf16, with NF4."""
    return max(result["longest_seq"], result.get("longest_seq_nf4", 0))


def tokens_text(n: int) -> str:
    return "-" if n == 0 else f"{n:,}" if n < 1024 else f"{n // 1024}k"


def tables(results: dict, names: list[str], gpus: list[str], seq_lens: list[int]) -> str:
    from lorakit.train.plan import speed_card

    families = {"Llama": [n for n in names if n.startswith("Llama")], "Qwen": [n for n in names if n.startswith("Qwen")]}
    out = ["| card (GiB) | sequence | " + " | ".join(f"largest {f} (predicted)" for f in families) + " |",
           "|---|---:|" + "---|" * len(families)]
    for gpu in gpus:
        card = speed_card(gpu)[0]
        for seq_len in seq_lens:
            row = [f"{gpu} ({card})", f"{seq_len:,}"]
            for members in families.values():
                fitting = [n for n in members if results[n, gpu, seq_len]["fits"]]
                biggest = max(fitting, key=lambda n: results[n, gpu, seq_len]["params"], default=None)
                best = results[biggest, gpu, seq_len] if biggest else None
                row.append("none" if best is None else f"{biggest}, {best['params'] / 1e9:.1f}B ({cell(best)})")
            out.append("| " + " | ".join(row) + " |")
    out += ["", "| shape (predicted) | " + " | ".join(f"{g} GiB, {s // 1024}k" for g in gpus for s in seq_lens)
            + " | longest sequence on " + " / ".join(gpus) + " GiB (either base) |",
            "|---|" + "---|" * (len(gpus) * len(seq_lens)) + "---:|"]
    for name in names:
        cells = [cell(results[name, g, s]) for g in gpus for s in seq_lens]
        longest = " / ".join(tokens_text(longest_any_base(results[name, g, seq_lens[0]])) for g in gpus)
        out.append(f"| {name} | " + " | ".join(cells) + f" | {longest} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default="24,48,80", help="memory sizes in GiB (or GPU names), comma-separated")
    parser.add_argument("--seq-lens", default="2048,8192", help="tokens a sequence, comma-separated")
    parser.add_argument("--models", default=",".join(SHAPES), help="shapes, comma-separated: " + ", ".join(SHAPES))
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"--models: unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    gpus, seq_lens = args.gpus.split(","), [int(s) for s in args.seq_lens.split(",")]
    print(tables(predict(names, gpus, seq_lens), names, gpus, seq_lens))


if __name__ == "__main__":
    main()
