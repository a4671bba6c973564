"""The decoding step's attention kernel, writing K/V and applying RoPE, split along the keys
or not: `attention.launch` at 32 rows for 1B and 8B head shapes (a diagnostic).

    python bench/attention_splits_gpu.py --out attention_splits.json

Rows at random positions 128..255 ("mid") or all at 255 ("end") of 256 keys; splits None is
the kernel's own choice (`attention._splits`). Microseconds per call, from 50 replays of a
CUDA graph.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from lorakit.serve.decode.ops import attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bgmv_gpu import timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    results = {}
    for size, dim in (("8b", 128), ("1b", 64)):
        rows, kv, group, length = 32, 8, 4, 256
        cache = torch.randn(2, rows, kv, 512, dim, device=device, dtype=torch.bfloat16)
        qkv = torch.randn(rows, (kv * group + 2 * kv) * dim, device=device, dtype=torch.bfloat16)
        q = qkv[:, : kv * group * dim].view(rows, kv, group, dim)
        k = qkv[:, kv * group * dim : (kv * group + kv) * dim].view(rows, kv, dim)
        v = qkv[:, (kv * group + kv) * dim :].view(rows, kv, dim)
        cos = torch.randn(rows, dim, device=device, dtype=torch.bfloat16)
        sin = torch.randn(rows, dim, device=device, dtype=torch.bfloat16)
        for label, positions in (("mid", torch.randint(128, 256, (rows,), generator=generator)),
                                 ("end", torch.full((rows,), 255))):
            positions = positions.to(device)
            keys, values = cache[0, :, :, :length], cache[1, :, :, :length]
            for splits in (None, 1, 2, 4):
                call = functools.partial(attention.launch, q, keys, values, positions, 0.1, splits=splits, k_new=k,
                                         v_new=v, cos=cos, sin=sin)
                results[f"{size}-{label}-{splits}"] = round(timed(call), 2)
    print(json.dumps(results))
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
