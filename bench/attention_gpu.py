"""The decode path's Triton attention kernel (`serve/decode/attention.py`) on a CUDA GPU: its
output against the PyTorch definition, and its time beside the PyTorch path it replaces
(`fused.attend` with a mask: two batched matmuls and a softmax over every key of the bucket),
for the decoding steps of a 1B and an 8B Llama (8 K/V heads, 4 query heads each).

    PYTHONPATH=src python bench/attention_gpu.py [--out attention.jsonl]

Each step reads a (rows, 8, L, D) view of a slot cache whose rows sit at positions spread
over [L/2, L), as the serving suite's rows do (128-token prompts, up to 128 new tokens, key
bucket 256). One JSON line per check and per timing (microseconds, each a CUDA graph of 50
launches replayed); exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

from bgmv_gpu import timed
from lorakit.serve.decode.fused import attend
from lorakit.serve.decode.ops.attention import available, launch
from lorakit.serve.decode.ops.reference import attention_reference as reference

SHAPES = {"1b": 64, "8b": 128}  # head dim; both have 8 K/V heads and 32 query heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    failed = False

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    emit({"check": "available", "ok": available(device), "device": torch.cuda.get_device_name(device)})
    g = torch.Generator(device=device).manual_seed(0)
    for size, head_dim in SHAPES.items():
        for rows, length in ((1, 256), (32, 256), (32, 512), (128, 256)):
            kv_heads, group = 8, 4
            cache = torch.randn(2, rows + 3, kv_heads, 512, head_dim, generator=g, device=device, dtype=torch.bfloat16)
            keys, values = cache[0, :rows, :, :length], cache[1, :rows, :, :length]
            q = torch.randn(rows, kv_heads, group, head_dim, generator=g, device=device, dtype=torch.bfloat16)
            positions = torch.randint(length // 2, length, (rows,), generator=g, device=device)
            scaling = head_dim**-0.5
            got = launch(q, keys, values, positions, scaling)
            want = reference(q.double(), keys.double(), values.double(), positions, scaling)
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            ok = err < 2e-2
            failed |= not ok
            case = {"size": size, "rows": rows, "keys": length}
            emit({"check": "kernel vs reference (bf16)", **case, "max_rel_err": err, "ok": ok})
            # the PyTorch path as a decoding step runs it: q as (rows, 1, heads, D), a boolean mask
            q_steps = q.reshape(rows, 1, kv_heads * group, head_dim)
            allowed = torch.arange(length, device=device) <= positions.view(rows, 1, 1)  # (rows, 1, L)
            mask = allowed.unsqueeze(1).expand(rows, 1, group, length)

            pytorch = functools.partial(attend, q_steps, keys, values, mask, scaling)
            kernel = functools.partial(attend, q_steps, keys, values, None, scaling, positions=positions)
            same = (kernel().float() - pytorch().float()).abs().max().item()
            emit({"timing": "decode attention", **case, "pytorch_us": round(timed(pytorch), 2),
                  "kernel_us": round(timed(kernel), 2), "max_abs_diff_vs_pytorch": same})
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
