"""The folded matmuls as a decoding step meets them: a chain of every layer's four groups,
weights cold in L2, each way of running them side by side.

    python bench/matmul_chain_gpu.py --sizes 8b,1b --out chain.jsonl [--rows 32] [--sweep]

For a 1B or 8B Llama shape with the LoRA A of 33 adapter slots (rank 16) folded under each
base weight, it builds 32 layers' weights (8B: 15 GB, far past the 60 MB L2, as a decoding
step reads each weight once) and replays from one CUDA graph the 128 matmuls of a step
(Q/K/V, O, gate/up, down of every layer, each group also alone), through:

    cublas     F.linear
    split-k    `matmul.launch` with the default tiles (pointer loads, x's tile first)
    wide       `matmul.launch` with `tuning.WIDE_MATMUL` (tensor descriptors, the weight's tile first)
    folded     what a folded decoding step runs now (`matmul.choose`; cuBLAS where it says None)

with the expand left out (the same for every way). A read kernel that sums every weight once
gives the bandwidth these matmuls can reach. --sweep adds, per group, the grid of tiles that
`WIDE_MATMUL` was chosen from. Every kernel's result is checked against F.linear's in float64.

--expand times the other half of a folded group, `bgmv.launch_folded`'s expand, the same way:
every layer's own B for the 33 slots (cold in L2), the partials of the group's matmul as
`matmul.choose` shapes them (just written, so warm), the group's epilogue (SwiGLU after
gate/up, the residual after O and down), over a grid of expand tiles (columns per program,
warps); each result is checked against the default tiles'.

--pdl times whole folded projections (`matmul.folded_projection`, the matmul and the expand
with its epilogue) the same way, with the expand launched as the matmul's programmatic
dependent (`DecodeTuning.pdl`) and without, twice each, and checks that both give equal outputs.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.serve.decode.ops import matmul
from lorakit.serve.decode.tuning import WIDE_MATMUL, ExpandTiles, MatmulTiles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bgmv_gpu import groups, json_lines  # noqa: E402

LAYERS, SLOTS, RANK = 32, 33, 16


def _read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read(w_ptr, out_ptr, numel, BLOCK: tl.constexpr, PER: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros((BLOCK,), tl.float32)
        base = pid.to(tl.int64) * PER * BLOCK
        for i in tl.range(0, PER, num_stages=STAGES):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc))

    return read, triton.cdiv


def graph_us(fns, replays: int = 7) -> float:
    """Median microseconds of one replay of a CUDA graph of fns, in order."""
    for f in fns:
        f()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def sweep():
    for swap, tma, bn, bk, stages, pps in itertools.product((True, False), (True, False), (64, 128), (128, 256), (3, 4, 6),
                                                           (1, 2)):
        yield MatmulTiles(bn=bn, bk=bk, stages=stages, programs_per_sm=pps, swap=swap, tma=tma)


def run_size(size: str, rows: int, do_sweep: bool, budget_s: float, emit) -> None:
    device = torch.device("cuda")
    shapes = {}
    for name, (k, sizes) in groups(size).items():
        shapes[name] = (k, sum(sizes) + SLOTS * len(sizes) * RANK)
    weights = {name: [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
               for name, (k, n) in shapes.items()}
    xs = {name: torch.randn(rows, k, device=device, dtype=torch.bfloat16) for name, (k, n) in shapes.items()}
    mb = {name: n * k * 2 / 1e6 for name, (k, n) in shapes.items()}
    want = {name: xs[name].double() @ weights[name][0].double().T for name in shapes}

    read, cdiv = _read_kernel()
    sink = torch.empty(1 << 20, device=device)
    flat = [w for ws in weights.values() for w in ws]
    us = graph_us([lambda w=w: read[(cdiv(w.numel(), 4096 * 8),)](w, sink, w.numel(), BLOCK=4096, PER=8, STAGES=3,
                                                                  num_warps=8) for w in flat])
    emit(size=size, kind="read", us_per_layer=round(us / LAYERS, 2), tb_per_s=round(sum(mb.values()) * LAYERS / us, 2))

    def make(way: str, name: str, x: torch.Tensor, w: torch.Tensor, tiles: MatmulTiles | None = None):
        if way == "cublas" or (way == "folded" and matmul.choose(x, w.shape[0]) is None):
            return lambda: F.linear(x, w)
        if way == "folded":
            tiles = matmul.choose(x, w.shape[0])
        elif tiles is None:
            tiles = {"split-k": MatmulTiles(), "wide": WIDE_MATMUL}[way]
        return lambda: matmul.launch(x, w, tiles)

    def chain(way: str, names: list[str], tiles: MatmulTiles | None = None) -> dict:
        fns = [make(way, name, xs[name], weights[name][layer], tiles) for layer in range(LAYERS) for name in names]
        us = graph_us(fns)
        err = 0.0
        for name in names:
            got = make(way, name, xs[name], weights[name][0], tiles)()
            got = (got.sum(0) if got.dim() == 3 else got).double()
            err = max(err, ((got - want[name]).abs().max() / want[name].abs().max()).item())
        total = sum(mb[name] for name in names)
        return dict(us_per_layer=round(us / LAYERS, 2), tb_per_s=round(total * LAYERS / us, 2), rel_err=round(err, 5))

    order = list(shapes)
    for names in [[name] for name in order] + [order]:
        label = names[0] if len(names) == 1 else "layer"
        for way in ("cublas", "split-k", "wide", "folded"):
            if way != "cublas" and not all(matmul.supported(rows, shapes[name][0]) for name in names):
                continue
            emit(size=size, group=label, kind=way, **chain(way, names))
    if not do_sweep:
        return
    stop = time.time() + budget_s
    for name in order:
        for tiles in sweep():
            if time.time() > stop:
                return
            record = dict(size=size, group=name, kind="sweep", bn=tiles.bn, bk=tiles.bk, stages=tiles.stages,
                          pps=tiles.programs_per_sm, swap=tiles.swap, tma=tiles.tma)
            try:
                emit(**record, **chain("sweep", [name], tiles))
            except Exception as e:  # a tile too large for shared memory
                emit(**record, error=str(e)[:120])


def _folded_groups(size: str):
    """(name, reduction, projection sizes, total output, columns with the 33 slots' A folded in)
    for each of a layer's four groups."""
    for name, (k, sizes) in groups(size).items():
        total = sum(sizes)
        yield name, k, sizes, total, total + SLOTS * len(sizes) * RANK


def _adapter_side(name: str, total: int, rows: int, device: torch.device, gen: torch.Generator):
    """A group's B for 33 slots in every layer, the rows' slots (distinct), whether it is gate/up
    (SwiGLU after it) and the residual the O and down groups add."""
    bs = [torch.randn(SLOTS, RANK, total, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
          for _ in range(LAYERS)]
    index = torch.randperm(SLOTS - 1, device=device)[:rows]
    residual = torch.randn(rows, total, device=device, dtype=torch.bfloat16) if name in ("o", "down") else None
    return bs, index, name == "gate_up", residual


def run_expand(size: str, rows: int, emit) -> None:
    from lorakit.serve.decode.ops import bgmv

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    cases = {}
    for name, k, sizes, total, n in _folded_groups(size):
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        tiles = matmul.choose(x, n)
        parts = matmul.launch(x, w, tiles) if tiles is not None else F.linear(x, w)
        bs, index, glu, residual = _adapter_side(name, total, rows, device, gen)
        cases[name] = (parts, bs, index, list(sizes), residual, glu, SLOTS * RANK * total * 2 / 1e6)
        del w

    def chain(names, tiles):
        fns = [lambda c=cases[nm], layer=layer: bgmv.launch_folded(c[0], c[1][layer], c[2], c[3], tiles, torch.bfloat16,
                                                                     c[4], c[5])
               for layer in range(LAYERS) for nm in names]
        us = graph_us(fns)
        err = 0.0
        for nm in names:
            c = cases[nm]
            want = bgmv.launch_folded(c[0], c[1][0], c[2], c[3], None, torch.bfloat16, c[4], c[5]).float()
            got = bgmv.launch_folded(c[0], c[1][0], c[2], c[3], tiles, torch.bfloat16, c[4], c[5]).float()
            err = max(err, ((got - want).abs().max() / want.abs().max()).item())
        read = sum(cases[nm][6] * rows / SLOTS for nm in names)  # the rows' own B
        return dict(us_per_layer=round(us / LAYERS, 2), b_tb_per_s=round(read * LAYERS / us, 2), rel_err=round(err, 4))

    order = list(cases)
    grid = [None] + [ExpandTiles(bn=bn, expand_warps=wp) for bn in (128, 256, 512, 1024) for wp in (1, 2, 4, 8)]
    for tiles in grid:
        label = dict(bn=None, warps=None) if tiles is None else dict(bn=tiles.bn, warps=tiles.expand_warps)
        for names in [[nm] for nm in order] + [order]:
            try:
                emit(size=size, kind="expand", group=names[0] if len(names) == 1 else "layer", **label,
                     **chain(names, tiles))
            except Exception as e:
                emit(size=size, kind="expand", group=names[0], **label, error=str(e)[:120])


def run_pdl(size: str, rows: int, emit) -> None:
    """Whole folded projections (`matmul.folded_projection`: the matmul, then the expand with its
    epilogue) over 32 layers, each layer's weight and B cold in L2, with the expand launched as
    the matmul's programmatic dependent (`DecodeTuning.pdl`) and without; the outputs must be equal."""
    from lorakit.serve.decode import tuning


    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    cases = {}
    for name, k, sizes, total, n in _folded_groups(size):
        ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(LAYERS)]
        bs, index, glu, residual = _adapter_side(name, total, rows, device, gen)
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=gen)
        cases[name] = (x, ws, bs, index, list(sizes), residual, glu)

    def call(c, layer):
        x, ws, bs, index, sizes, residual, glu = c
        return matmul.folded_projection(x, ws[layer], bs[layer], index, sizes, residual, glu)

    order = list(cases)
    for names in [[nm] for nm in order] + [order]:
        record = dict(size=size, kind="pdl", group=names[0] if len(names) == 1 else "layer")
        outs = {}
        for on in (False, True, False, True):
            tuning.install(tuning.DecodeTuning(pdl=on))
            try:
                fns = [lambda c=cases[nm], layer=layer: call(c, layer) for layer in range(LAYERS) for nm in names]
                record.setdefault("us_per_layer_pdl" if on else "us_per_layer", []).append(round(graph_us(fns) / LAYERS, 2))
                outs[on] = [call(cases[nm], 0) for nm in names]
            finally:
                tuning.install(tuning.DecodeTuning())
        record["equal"] = all(torch.equal(a, b) for a, b in zip(outs[False], outs[True], strict=True))
        emit(**record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8b")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--expand", action="store_true", help="time the expand over its tiles instead")
    parser.add_argument("--pdl", action="store_true", help="time whole folded projections with and without PDL instead")
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop a size's sweep after this")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    emit = json_lines(args.out)

    emit(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    for size in args.sizes.split(","):
        if args.pdl:
            run_pdl(size, args.rows, emit)
        elif args.expand:
            run_expand(size, args.rows, emit)
        else:
            run_size(size, args.rows, args.sweep, args.budget_s, emit)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
