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


def launch(x: torch.Tensor, weight: torch.Tensor, tiles: Tiles | None = None) -> torch.Tensor:
    """The split-K partial sums of x (rows, k) @ weight (n, k).T: (splits, rows, n) float32.
    Both must be contiguous along k; `supported` says which shapes."""
    tiles = tiles or Tiles()
    rows, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or not supported(rows, k, tiles) or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"split-K matmul: x {tuple(x.shape)} and weight {tuple(weight.shape)} (want at most 128 rows, "
                         f"a shared k that is a multiple of {tiles.bk}, both contiguous along k)")
    splits = splits_for(n, k, tiles, _multiprocessors(x.device))
    if (k // tiles.bk) % splits:
        raise ValueError(f"split-K matmul: {splits} splits do not divide k {k} in whole {tiles.bk}-wide steps")
    part = torch.empty((splits, rows, n), dtype=torch.float32, device=x.device)
    import triton.language as tl

    # 16-bit inputs multiply on the tensor cores; float32 exactly (ieee). Triton's interpreter
    # (the kernels on the CPU) multiplies bfloat16's raw bits in tl.dot: float32 there.
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(x.dtype, tl.float32)
    if x.device.type != "cuda":
        dot = tl.float32
    precision = "ieee" if dot == tl.float32 else "tf32"
    _kernel()[(-(-n // tiles.bn), splits)](
        x, weight, part, rows, n, x.stride(0), weight.stride(0), K_SPLIT=k // splits,
        BM=max(16, _next_power_of_two(rows)), BN=tiles.bn, BK=tiles.bk, STAGES=tiles.stages, DOT=dot, PRECISION=precision,
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
