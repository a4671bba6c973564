"""`python -m lorakit.demo.make_reference`: write the bundled model's continuations of the general
prompts at `lorakit compare`'s default settings (fp32 on the CPU), the copy lorakit ships
(`lorakit.evaluation.measure.BUNDLED_REFERENCE`), so that `compare` and the demo need not generate
them on every run. `--check` generates them again and says whether the shipped copy is the same."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def generate() -> dict:
    from lorakit.base.models import load_model
    from lorakit.compare.command import CompareArgs
    from lorakit.evaluation.measure import (
        bundled_model_key,
        general_prompts,
        generated_continuations,
        reference_settings,
    )

    defaults = CompareArgs(adapter=["unused"])
    model, tokenizer = load_model(None, device="cpu", dtype=None)
    prompts = general_prompts(defaults.prompts)
    settings = reference_settings(prompts, defaults.max_new_tokens, defaults.sampled, 1.0, defaults.seed,
                                  defaults.batch_size)
    continuations = generated_continuations(model, tokenizer, prompts, defaults.max_new_tokens, defaults.sampled,
                                            1.0, defaults.seed, defaults.batch_size)
    return {"model": bundled_model_key(), "settings": settings, "continuations": continuations}


def main(argv: list[str] | None = None) -> int:
    from lorakit.evaluation.measure import BUNDLED_REFERENCE

    parser = argparse.ArgumentParser(prog="python -m lorakit.demo.make_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare a fresh generation with the shipped copy")
    parser.add_argument("--output", default=str(BUNDLED_REFERENCE))
    opts = parser.parse_args(argv)
    fresh = generate()
    if opts.check:
        shipped = json.loads(Path(opts.output).read_text())
        same = json.loads(json.dumps(fresh)) == shipped
        print("the shipped reference equals a fresh generation" if same else "the shipped reference differs")
        return 0 if same else 1
    out = Path(opts.output)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(fresh, separators=(",", ":")) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
