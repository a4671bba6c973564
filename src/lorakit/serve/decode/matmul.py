"""A decoding step's folded projection as two Triton kernels, for CUDA: a split-K matmul for
few rows, and `bgmv`'s expand, which sums its partials.

With the LoRA shrink folded into the base matmul (`DecoderModel.fold_slots`), a projection
group's decoding step is

    partials[s] = x @ W_ext[:, K_s].T       W_ext = [W; A of every slot], K split in parts
    out = sum_s partials[s][:, :total] + each row's expand of its own slot's products

At decoding batch sizes the matmul only streams W_ext from memory, and what decides its speed
is how many multiprocessors stream at once. cuBLAS picks tiles for the output alone: for an
8B model's O projection (4,096 + the slots' columns by 4,096) its tiles gave 73 blocks on
132 multiprocessors. Here the reduction is split too, until the blocks cover the GPU about
twice (`Tiles`), and the partial sums (float32) go to the expand kernel, which reads them
anyway, so no reduction kernel is launched. Where cuBLAS measured faster (`preferred`),
the folded step keeps it.

`folded_projection` is a PyTorch custom op (`lorakit::folded_projection`): `torch.compile`
keeps it whole and a CUDA graph captures its two launches. The CPU tests run the kernels
through Triton's interpreter against the matmul and `lora.folded_lora`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .bgmv import _multiprocessors, _next_power_of_two, launch_folded


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def partials(x_ptr, w_ptr, part_ptr, rows, n, x_stride, w_stride,
                 K_SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr):
        # part[split, m, cols] = x[m, K_split] @ W[cols, K_split].T, K_split a multiple of BK
        block = tl.program_id(0)
        split = tl.program_id(1)
        cols = block * BN + tl.arange(0, BN)
        m = tl.arange(0, BM)
        kk = split * K_SPLIT + tl.arange(0, BK)
        x_tile = x_ptr + m[:, None] * x_stride + kk[None, :]
        w_tile = w_ptr + cols[:, None].to(tl.int64) * w_stride + kk[None, :]
        row_live = m[:, None] < rows
        col_live = cols[:, None] < n
        acc = tl.zeros((BM, BN), tl.float32)
        for _ in tl.range(0, K_SPLIT, BK, num_stages=STAGES):
            x = tl.load(x_tile, mask=row_live, other=0.0).to(DOT)
            w = tl.load(w_tile, mask=col_live, other=0.0).to(DOT)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            x_tile += BK
            w_tile += BK
        out = part_ptr + (split * rows + m[:, None]).to(tl.int64) * n + cols[None, :]
        tl.store(out, acc, mask=row_live & (cols[None, :] < n))

    return partials


@functools.cache
def _stream_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def stream_partials(x_ptr, w_ptr, part_ptr, rows, n, x_stride, w_stride, total,
                        PER_BLOCK: tl.constexpr, ITERS: tl.constexpr, SEGMENTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, STAGES: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
        # The (column block, reduction step) pairs, block-major, dealt out ITERS to a program:
        # program p runs pairs [p * ITERS, (p + 1) * ITERS). Each run of pairs inside one block
        # is a piece; piece j of a block (the j-th program that works on it) stores its sum at
        # part[j, :, block's columns], and the block's last piece stores zeros at the segments
        # after its own, so part summed over segments is x @ W.T.
        pid = tl.program_id(0)
        m = tl.arange(0, BM)
        row_live = m[:, None] < rows
        acc = tl.zeros((BM, BN), tl.float32)
        for i in tl.range(0, ITERS, num_stages=STAGES):
            it = pid * ITERS + i
            block = it // PER_BLOCK
            step = it - block * PER_BLOCK
            cols = block * BN + tl.arange(0, BN)
            kk = step * BK + tl.arange(0, BK)
            live = it < total
            x = tl.load(x_ptr + m[:, None] * x_stride + kk[None, :], mask=row_live & live, other=0.0).to(DOT)
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * w_stride + kk[None, :],
                        mask=(cols[:, None] < n) & live, other=0.0).to(DOT)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            ends = step == PER_BLOCK - 1
            if live & (ends | (i == ITERS - 1)):
                piece = pid - block * PER_BLOCK // ITERS
                at = part_ptr + m[:, None].to(tl.int64) * n + cols[None, :]
                mask = row_live & (cols[None, :] < n)
                tl.store(at + piece * rows * n, acc, mask=mask)
                for later in tl.static_range(1, SEGMENTS):
                    tl.store(at + later * rows * n, tl.zeros((BM, BN), tl.float32), mask=mask & ends & (later > piece))
                acc = tl.zeros((BM, BN), tl.float32)

    return stream_partials


@functools.cache
def stream_plan(n: int, k: int, bn: int, bk: int, programs: int) -> tuple[int, int, int]:
    """How the stream kernel deals out x (rows, k) @ W (n, k).T over about `programs` programs:
    (pairs per program, programs, segments), pairs being column blocks x reduction steps, and
    segments the most programs that share a block."""
    per_block = k // bk
    blocks = -(-n // bn)
    total = blocks * per_block
    iters = -(-total // max(1, min(programs, total)))
    programs = -(-total // iters)
    segments = max((b * per_block + per_block - 1) // iters - b * per_block // iters + 1 for b in range(blocks))
    return iters, programs, segments


@dataclass(frozen=True)
class Tiles:
    """How the matmul cuts the work. None: the defaults, from a sweep on an H200 (bench/
    RESULTS.md): bn output columns and bk of the reduction per iteration, and the reduction
    split in the fewest parts that give at least `programs_per_sm` blocks per multiprocessor."""

    bn: int = 64
    bk: int = 128
    splits: int | None = None
    programs_per_sm: int = 2
    stages: int = 3
    warps: int = 4
    stream: bool = False
    """Deal the (column block, reduction step) pairs out evenly over programs_per_sm programs
    per multiprocessor (`stream_plan`) instead of splitting every block's reduction alike: no
    last wave of blocks leaves multiprocessors idle."""


def splits_for(n: int, k: int, tiles: Tiles, processors: int) -> int:
    """The parts the reduction is split in: a divisor of k / bk (each part a whole number of
    iterations), the smallest that reaches `programs_per_sm` blocks per multiprocessor."""
    steps = k // tiles.bk
    if tiles.splits is not None:
        return tiles.splits
    blocks = -(-n // tiles.bn)
    want = -(-tiles.programs_per_sm * processors // blocks)
    return next((s for s in range(1, steps + 1) if steps % s == 0 and s >= want), steps)


def supported(rows: int, k: int, tiles: Tiles | None = None) -> bool:
    """Whether the kernel takes this shape: at most 128 rows, k a multiple of bk."""
    tiles = tiles or Tiles()
    return 0 < rows <= 128 and k % tiles.bk == 0


def preferred(rows: int, n: int, k: int) -> bool:
    """Whether a folded group's matmul (rows, k) x (n, k).T runs faster here than in cuBLAS.
    Measured on an H200 at 32 rows (bench/RESULTS.md): the kernel won where the matmul is
    long in one direction, a reduction longer than the output (down: 14% less time with the
    expand for an 8B model, 6% for 1B) or an output at least four times the reduction (gate/
    up: 4%, 1%), and lost or tied on Q/K/V and O, which stay with cuBLAS."""
    return supported(rows, k) and (k > n or n >= 4 * k)


TUNED: dict[tuple[int, int], Tiles | None] = {}
"""Tiles per (n, k) of a folded group's weight at decoding batch sizes (up to 64 rows) where a
measurement chose them (None: cuBLAS); other shapes take `preferred`'s choice."""


def choose(rows: int, n: int, k: int) -> Tiles | None:
    """The tiles a folded group's matmul (rows, k) x (n, k).T runs with; None: cuBLAS."""
    if not supported(rows, k):
        return None
    if rows <= 64 and (n, k) in TUNED:
        tiles = TUNED[(n, k)]
        return tiles if tiles is None or supported(rows, k, tiles) else None
    return Tiles() if preferred(rows, n, k) else None


def launch(x: torch.Tensor, weight: torch.Tensor, tiles: Tiles | None = None) -> torch.Tensor:
    """The split-K partial sums of x (rows, k) @ weight (n, k).T: (splits, rows, n) float32.
    Both must be contiguous along k; `supported` says which shapes. tiles None: `choose`'s,
    else the defaults."""
    rows, k = x.shape
    n = weight.shape[0]
    tiles = tiles or choose(rows, n, k) or Tiles()
    if weight.shape[1] != k or not supported(rows, k, tiles) or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"split-K matmul: x {tuple(x.shape)} and weight {tuple(weight.shape)} (want at most 128 rows, "
                         f"a shared k that is a multiple of {tiles.bk}, both contiguous along k)")
    import triton.language as tl

    # 16-bit inputs multiply on the tensor cores; float32 exactly (ieee). Triton's interpreter
    # (the kernels on the CPU) multiplies bfloat16's raw bits in tl.dot: float32 there.
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(x.dtype, tl.float32)
    if x.device.type != "cuda":
        dot = tl.float32
    precision = "ieee" if dot == tl.float32 else "tf32"
    bm = max(16, _next_power_of_two(rows))
    if tiles.stream:
        iters, programs, segments = stream_plan(n, k, tiles.bn, tiles.bk,
                                                tiles.programs_per_sm * _multiprocessors(x.device))
        part = torch.empty((segments, rows, n), dtype=torch.float32, device=x.device)
        _stream_kernel()[(programs,)](
            x, weight, part, rows, n, x.stride(0), weight.stride(0), -(-n // tiles.bn) * (k // tiles.bk),
            PER_BLOCK=k // tiles.bk, ITERS=iters, SEGMENTS=segments, BM=bm, BN=tiles.bn, BK=tiles.bk, STAGES=tiles.stages, DOT=dot, PRECISION=precision,
            num_warps=tiles.warps,
        )
        return part
    splits = splits_for(n, k, tiles, _multiprocessors(x.device))
    if (k // tiles.bk) % splits:
        raise ValueError(f"split-K matmul: {splits} splits do not divide k {k} in whole {tiles.bk}-wide steps")
    part = torch.empty((splits, rows, n), dtype=torch.float32, device=x.device)
    _kernel()[(-(-n // tiles.bn), splits)](
        x, weight, part, rows, n, x.stride(0), weight.stride(0), K_SPLIT=k // splits,
        BM=bm, BN=tiles.bn, BK=tiles.bk, STAGES=tiles.stages, DOT=dot, PRECISION=precision,
        num_warps=tiles.warps,
    )
    return part


@torch.library.custom_op("lorakit::folded_projection", mutates_args=())
def folded_projection(x: torch.Tensor, weight: torch.Tensor, b: torch.Tensor, index: torch.Tensor,
                      sizes: list[int], residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """A folded projection group's decoding step, (rows, sum(sizes)) in x's dtype: the split-K
    matmul of x (rows, k) with weight = [W; A of every slot], then `bgmv.launch_folded` on its
    partials (`lora.folded_lora`'s semantics), with its epilogue (residual, glu)."""
    return launch_folded(launch(x, weight), b, index, sizes, dtype=x.dtype, residual=residual, glu=glu)


@folded_projection.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, b: torch.Tensor, index: torch.Tensor, sizes: list[int],
      residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    return x.new_empty((x.shape[0], b.shape[2] // 2 if glu else b.shape[2]))
