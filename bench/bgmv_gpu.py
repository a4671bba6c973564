"""The decode path's Triton LoRA kernels (`serve/decode/bgmv.py`) on a CUDA GPU: their output
against the per-row loop, and their time beside the two PyTorch ways (`gather`, `dense`) of
`batched_lora`, on the projection groups of a 1B and an 8B Llama at rank 16.

    PYTHONPATH=src python bench/bgmv_gpu.py [--out bgmv.jsonl] [--sweep]

One JSON line per check and per timing; exit 1 when a check fails. `--sweep` first times the
kernels' tile choices (`tuning.ExpandTiles`) on three groups (8B gate/up and Q/K/V at 32 rows, 1B
gate/up at 128 rows of 256 slots): the shrink's choices with the default expand, then the
expand's with the best shrink; the defaults are the winners of that sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys

import torch

from lorakit.serve.decode.lora import batched_lora
from lorakit.serve.decode.ops.bgmv import launch
from lorakit.serve.decode.ops.reference import batched_lora_reference
from lorakit.serve.decode.tuning import ExpandTiles as Tiles

SHAPES = {  # hidden, intermediate, kv width
    "1b": (2048, 8192, 512),
    "8b": (4096, 14336, 1024),
}


def groups(size: str) -> dict[str, tuple[int, tuple[int, ...]]]:
    hidden, inter, kv = SHAPES[size]
    return {"qkv": (hidden, (hidden, kv, kv)), "o": (hidden, (hidden,)), "gate_up": (hidden, (inter, inter)),
            "down": (inter, (hidden,))}


def json_lines(path: str | None):
    """emit(**record): the record as one JSON line on stdout and, with a path, appended there."""
    out = open(path, "a") if path else None

    def emit(**record) -> None:
        print(json.dumps(record), flush=True)
        if out:
            out.write(json.dumps(record) + "\n")
            out.flush()

    return emit


def timed(fn, repeats: int = 50) -> float:
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1000  # microseconds


def sweep(emit, device: torch.device, g: torch.Generator, rank: int = 16) -> None:
    for label, rows, slots, d_in, sizes in (
        ("8b-gate_up", 32, 33, 4096, (14336, 14336)),
        ("8b-qkv", 32, 33, 4096, (4096, 1024, 1024)),
        ("1b-gate_up", 128, 257, 2048, (8192, 8192)),
    ):
        a = torch.randn(slots, len(sizes) * rank, d_in, device=device, generator=g, dtype=torch.bfloat16)
        b = torch.randn(slots, rank, sum(sizes), device=device, generator=g, dtype=torch.bfloat16)
        x = torch.randn(rows, d_in, device=device, generator=g, dtype=torch.bfloat16)
        index = torch.randperm(slots - 1, device=device, generator=g)[:rows]
        nbytes = rows * (a[0].numel() + b[0].numel()) * 2
        best: tuple[float, Tiles] | None = None
        shrink = [Tiles(bk=bk, programs_per_sm=p, shrink_warps=w, max_splits=64)
                  for bk, p, w in itertools.product((128, 256), (2, 4, 8), (4, 8))]
        for stage, choices in (("shrink", shrink), ("expand", None)):
            if choices is None:
                assert best is not None
                choices = [dataclasses.replace(best[1], bn=bn, expand_warps=w)
                           for bn, w in itertools.product((128, 256, 512, 1024), (2, 4, 8))]
            for tiles in choices:
                us = timed(functools.partial(launch, x, a, b, index, list(sizes), tiles))
                emit(sweep=label, stage=stage, tiles=dataclasses.asdict(tiles), us=round(us, 2),
                     gbps=round(nbytes / us / 1e3, 1))
                if best is None or us < best[0]:
                    best = (us, tiles)
        assert best is not None
        default = timed(functools.partial(launch, x, a, b, index, list(sizes)))
        emit(sweep=label, best=dataclasses.asdict(best[1]), best_us=round(best[0], 2), default_us=round(default, 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", action="store_true", help="time the kernels' tile choices first")
    args = parser.parse_args()
    failed = 0
    emit = json_lines(args.out)

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    rank = 16
    if args.sweep:
        sweep(emit, device, g, rank)
    for size in SHAPES:
        for rows, slots in ((32, 33), (128, 257), (32, 2)):
            for name, (d_in, sizes) in groups(size).items():
                if size == "8b" and slots > 33:
                    continue
                a = torch.randn(slots, len(sizes) * rank, d_in, device=device, generator=g, dtype=torch.bfloat16) * 0.02
                b = torch.randn(slots, rank, sum(sizes), device=device, generator=g, dtype=torch.bfloat16) * 0.02
                a[-1].zero_()
                b[-1].zero_()
                x = torch.randn(rows, d_in, device=device, generator=g, dtype=torch.bfloat16)
                index = torch.randperm(slots - 1, device=device, generator=g)[:rows] if slots - 1 >= rows else \
                    torch.randint(0, slots, (rows,), device=device, generator=g)
                got = batched_lora(x, a, b, sizes, index, "kernel")
                want = batched_lora_reference(x.double(), a.double(), b.double(), sizes, index)
                err = ((got.double() - want).abs().max() / want.abs().max()).item()
                ok = err < 1e-4
                failed += not ok
                times = {mode: round(timed(functools.partial(batched_lora, x, a, b, sizes, index, mode)), 2)
                         for mode in ("kernel", "gather", "dense")}
                traffic = min(rows, slots) * (a[0].numel() + b[0].numel()) * 2  # each adapter read once
                emit(case=f"{size}-{name}-rows{rows}-slots{slots}", check="PASS" if ok else "FAIL", rel_err=err,
                     us=times, adapter_mb=round(traffic / 1e6, 2),
                     kernel_gbps=round(traffic / times["kernel"] / 1e3, 1))
    emit(summary="FAIL" if failed else "PASS", failed=failed, device=torch.cuda.get_device_name(), torch=torch.__version__)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
