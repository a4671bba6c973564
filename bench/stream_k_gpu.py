"""A folded decoding step's matmul as the decoding step meets it: weights cold in L2.

    python bench/stream_k_gpu.py --sizes 8b,1b --out stream_k.jsonl --tuned tuned.json

For the four projection groups of a 1B or 8B Llama shape with the LoRA A of 33 adapter
slots (rank 16) folded under each base weight, at 32 rows, it times in CUDA graphs each way
of running the matmul followed by `bgmv.launch_folded`'s expand: cuBLAS, the split-K kernel
with its defaults, and the stream kernel (`matmul.Tiles(stream=True)`) over a grid of tiles.
Each call reads another copy of the weights, enough copies that they do not fit the GPU's
L2 together, as a decoding step reads each layer's weights once (`split_k_gpu.py` reuses one
copy, which favours shapes that fit the L2). Every result is checked against cuBLAS's.
--tuned writes the fastest way per shape as `matmul.TUNED` entries (`serve_variants.py
--tuned` reads them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.serve.decode import matmul
from lorakit.serve.decode.bgmv import launch_folded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bgmv_gpu import groups  # noqa: E402

L2_BYTES = 60e6


def rotated(fn, copies: int, repeats: int) -> float:
    """Microseconds per call of fn(i), i cycling over the copies, replayed from a CUDA graph."""
    for i in range(copies):
        fn(i)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for i in range(copies):
                fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (repeats * copies) * 1000)
    return sorted(times)[len(times) // 2]


def grid():
    for bn, bk, pps, stages in itertools.product((64, 32, 128), (128, 256), (2, 1, 3, 4), (3, 4)):
        yield matmul.Tiles(bn=bn, bk=bk, programs_per_sm=pps, stages=stages, warps=8 if bn == 128 else 4, stream=True)


def shape(size: str, name: str, k: int, sizes: list[int], rows: int, budget: float, emit) -> dict:
    device = torch.device("cuda")
    slots, r = 33, 16
    total, width = sum(sizes), len(sizes) * r
    n = total + slots * width
    mb = n * k * 2 / 1e6
    copies = max(2, int(3 * L2_BYTES / (mb * 1e6)) + 1)
    repeats = max(1, 40 // copies)
    ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    b = torch.randn(slots, r, total, device=device, dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    index = torch.randperm(slots - 1, device=device)[:rows]
    want = launch_folded(F.linear(x, ws[0]), b, index, sizes).float()
    common = dict(size=size, shape=name, rows=rows, n=n, k=k, weight_mb=round(mb, 1), copies=copies)

    def record(kind: str, fn, tiles: matmul.Tiles | None = None) -> dict:
        got = fn(0).float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        us = rotated(fn, copies, repeats)
        rec = dict(common, kind=kind, us=round(us, 2), gbps=round(mb / us * 1e3), rel_err=round(err, 5))
        if tiles is not None:
            rec.update(bn=tiles.bn, bk=tiles.bk, pps=tiles.programs_per_sm, stages=tiles.stages, warps=tiles.warps)
            if tiles.stream:
                rec["plan"] = matmul.stream_plan(n, k, tiles.bn, tiles.bk, tiles.programs_per_sm * 132)
        emit(**rec)
        return rec

    results = [record("cublas", lambda i: launch_folded(F.linear(x, ws[i]), b, index, sizes))]
    if matmul.supported(rows, k):
        results.append(record("split-k", lambda i: launch_folded(matmul.launch(x, ws[i], matmul.Tiles()), b, index, sizes),
                              matmul.Tiles()))
    stop = time.time() + budget
    for tiles in grid():
        if time.time() > stop or not matmul.supported(rows, k, tiles):
            continue
        try:
            rec = record("stream", lambda i, t=tiles: launch_folded(matmul.launch(x, ws[i], t), b, index, sizes), tiles)
        except Exception as e:  # a tile too large for shared memory
            emit(**common, kind="stream", bn=tiles.bn, bk=tiles.bk, pps=tiles.programs_per_sm, stages=tiles.stages,
                 err=str(e)[:100])
            continue
        if rec["rel_err"] < 2e-2:
            results.append(rec)
    best = min(results, key=lambda r: r["us"])
    emit(**common, best=True, kind=best["kind"], us=best["us"], gbps=best["gbps"],
         cublas_us=results[0]["us"], **{key: best[key] for key in ("bn", "bk", "pps", "stages", "warps") if key in best})
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8b")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=40.0, help="stop a shape's tile grid after this")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tuned", help="write the fastest way per (n, k) here, as JSON")
    args = parser.parse_args()
    out = open(args.out, "a")

    def emit(**record) -> None:
        print(json.dumps(record), flush=True)
        out.write(json.dumps(record) + "\n")
        out.flush()

    emit(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    tuned = []
    for size in args.sizes.split(","):
        for name, (k, sizes) in groups(size).items():
            best = shape(size, name, k, list(sizes), args.rows, args.budget_s, emit)
            tiles = None if best["kind"] == "cublas" else {key: best[key] for key in ("bn", "bk", "stages", "warps")}
            if tiles is not None:
                tiles.update(programs_per_sm=best["pps"], stream=best["kind"] == "stream")
            tuned.append({"n": best["n"], "k": best["k"], "tiles": tiles})
            torch.cuda.empty_cache()
    if args.tuned:
        Path(args.tuned).write_text(json.dumps(tuned, indent=1))


if __name__ == "__main__":
    main()
