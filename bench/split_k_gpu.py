"""The folded decoding step's matmul: `matmul.py`'s split-K kernel against cuBLAS, per shape.

    python bench/split_k_gpu.py --size 8b --out split_k_8b.jsonl [--rows 32] [--budget-s 170]

For the four projection groups of a 1B or 8B Llama shape, with the LoRA A of 33 adapter
slots (rank 16) folded under each base weight, it times in CUDA graphs (50 replays): cuBLAS
(`F.linear`) alone and followed by `bgmv.launch_folded`'s expand, and the split-K kernel's
partials alone and followed by the expand that sums them, over a grid of tiles (columns per
block, reduction per iteration, blocks per multiprocessor, pipeline stages). Each kernel
result is checked against the cuBLAS one. The best tiles per shape, and the defaults, close
each shape's records.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.serve.decode.ops import matmul
from lorakit.serve.decode.ops.bgmv import launch_folded
from lorakit.serve.decode.tuning import MatmulTiles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bgmv_gpu import SHAPES, groups, json_lines, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=170.0, help="stop sweeping a shape's tiles after this")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    emit = json_lines(args.out)

    device = torch.device("cuda")
    slots, r, rows = 33, 16, args.rows
    stop = time.time() + args.budget_s
    for name, (k, sizes) in groups(args.size).items():
        sweep_shape(name, list(sizes), k, slots, r, rows, stop, device, emit)


def sweep_shape(name: str, sizes: list[int], k: int, slots: int, r: int, rows: int, stop: float, device, emit) -> None:
    total, width = sum(sizes), len(sizes) * r
    w = torch.randn(total + slots * width, k, device=device, dtype=torch.bfloat16) * 0.02
    b = torch.randn(slots, r, total, device=device, dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    index = torch.randperm(slots - 1, device=device)[:rows]
    mb = w.numel() * 2 / 1e6

    def kernel(tiles: MatmulTiles) -> torch.Tensor:
        return launch_folded(matmul.launch(x, w, tiles), b, index, sizes, dtype=x.dtype)

    cublas = timed(lambda: F.linear(x, w))
    cublas_all = timed(lambda: launch_folded(F.linear(x, w), b, index, sizes))
    want = launch_folded(F.linear(x, w), b, index, sizes).float()
    emit(shape=name, rows=rows, kind="cublas", gemm_us=round(cublas, 2), all_us=round(cublas_all, 2),
         gemm_gbps=round(mb / cublas * 1e3), weight_mb=round(mb, 1))
    best = None
    for bn, bk, pps, stages in itertools.product((32, 64, 128), (128, 256), (1, 2, 4), (3, 5)):
        if time.time() > stop:
            break
        tiles = MatmulTiles(bn=bn, bk=bk, programs_per_sm=pps, stages=stages, warps=8 if bn == 128 else 4)
        try:
            gemm = timed(functools.partial(matmul.launch, x, w, tiles))
            both = timed(functools.partial(kernel, tiles))
            got = kernel(tiles).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
        except Exception as e:  # a tile too large for shared memory
            emit(shape=name, bn=bn, bk=bk, pps=pps, stages=stages, err=str(e)[:120])
            continue
        record = dict(shape=name, rows=rows, kind="splitk", bn=bn, bk=bk, pps=pps, stages=stages,
                      splits=matmul.splits_for(w.shape[0], k, tiles, 132), gemm_us=round(gemm, 2),
                      all_us=round(both, 2), gemm_gbps=round(mb / gemm * 1e3), rel_err=round(err, 5))
        emit(**record)
        if best is None or both < best["all_us"]:
            best = record
    emit(best=True, **(best or {}), cublas_all_us=round(cublas_all, 2))
    emit(shape=name, default=True, all_us=round(timed(functools.partial(kernel, MatmulTiles())), 2))

if __name__ == "__main__":
    main()
