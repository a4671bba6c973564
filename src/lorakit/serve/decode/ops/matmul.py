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
twice (`MatmulTiles`), and the partial sums (float32) go to the expand kernel, which reads them
anyway, so no reduction kernel is launched. Where cuBLAS measured faster (`preferred`),
the folded step keeps it. On Hopper, the shapes of `wide` take `DecodeTuning.wide`'s tiles: loaded by the
copy engine through tensor descriptors, with the weight's tile as the tensor cores' first
operand (64 of its columns by the 32 rows), which streamed an 8B layer's weights in 6% less
time than the pointer loads and 10% less than cuBLAS (`choose` picks). On Hopper both kernels
launch as programmatic dependents (`DecodeTuning.pdl`): the expand's programs start while the
matmul's last blocks run and read their B before they wait for its partial sums, which took
an 8B decoding step from 5.73 to 5.60 ms (bench/history/2026-11-30-gpu-run-10-pdl.md).

`folded_projection` is a PyTorch custom op (`lorakit::folded_projection`): `torch.compile`
keeps it whole and a CUDA graph captures its two launches. The CPU tests run the kernels
through Triton's interpreter against the matmul and `lora.folded_lora`.
"""

from __future__ import annotations

import functools

import torch

from lorakit.serve.decode.ops.bgmv import launch_folded
from lorakit.serve.decode.ops.launch import hopper, multiprocessors, next_power_of_two, pdl
from lorakit.serve.decode.tuning import MatmulTiles, active


@functools.cache
def _kernel():
    import triton
    import triton.language as tl
    import triton.language.extra.cuda  # noqa: F401  (tl.extra.cuda.gdc_launch_dependents)

    @triton.jit
    def partials(x_src, w_src, part_ptr, rows, n, x_stride, w_stride,
                 K_SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, SWAP: tl.constexpr,
                 DEPENDENTS: tl.constexpr):
        # part[split, m, cols] = x[m, K_split] @ W[cols, K_split].T, K_split a multiple of BK.
        # TMA: x_src and w_src are tensor descriptors (Hopper's copy engine loads the tiles,
        # out-of-range rows and columns read as zeros), else plain pointers. SWAP: the tensor
        # cores multiply W's tile by x's (BN, BM) rather than x's by W's (BM, BN), so the weight
        # tile is the operand with the larger side (Hopper's warpgroup products start at 64).
        # DEPENDENTS: launched as the programmatic dependent of the kernel before it (waits for
        # it here, before reading x), and the kernel after it (the expand) may start once every
        # block has started.
        if DEPENDENTS:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        block = tl.program_id(0)
        split = tl.program_id(1)
        col0 = block * BN
        k0 = split * K_SPLIT
        cols = col0 + tl.arange(0, BN)
        m = tl.arange(0, BM)
        if not TMA:
            kk = k0 + tl.arange(0, BK)
            x_tile = x_src + m[:, None] * x_stride + kk[None, :]
            w_tile = w_src + cols[:, None].to(tl.int64) * w_stride + kk[None, :]
            row_live = m[:, None] < rows
            col_live = cols[:, None] < n
        if SWAP:
            acc = tl.zeros((BN, BM), tl.float32)
        else:
            acc = tl.zeros((BM, BN), tl.float32)
        for step in tl.range(0, K_SPLIT, BK, num_stages=STAGES):
            if TMA:
                x = x_src.load([0, k0 + step]).to(DOT)
                w = w_src.load([col0, k0 + step]).to(DOT)
            else:
                x = tl.load(x_tile, mask=row_live, other=0.0).to(DOT)
                w = tl.load(w_tile, mask=col_live, other=0.0).to(DOT)
                x_tile += BK
                w_tile += BK
            if SWAP:
                acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        if SWAP:  # acc[col, row]
            out = part_ptr + (split * rows + m[None, :]).to(tl.int64) * n + cols[:, None]
            tl.store(out, acc, mask=(m[None, :] < rows) & (cols[:, None] < n))
        else:
            out = part_ptr + (split * rows + m[:, None]).to(tl.int64) * n + cols[None, :]
            tl.store(out, acc, mask=(m[:, None] < rows) & (cols[None, :] < n))

    return partials


def wide(n: int, k: int) -> bool:
    """The shapes `DecodeTuning.wide` measured faster on: both sides at least 2,048, and a reduction of at
    least 4,096 or an output of at most 8,192."""
    return n >= 2048 and k >= 2048 and (k >= 4096 or n <= 8192)


def splits_for(n: int, k: int, tiles: MatmulTiles, processors: int) -> int:
    """The parts the reduction is split in: a divisor of k / bk (each part a whole number of
    iterations), the smallest that reaches `programs_per_sm` blocks per multiprocessor."""
    steps = k // tiles.bk
    if tiles.splits is not None:
        return tiles.splits
    blocks = -(-n // tiles.bn)
    want = -(-tiles.programs_per_sm * processors // blocks)
    return next((s for s in range(1, steps + 1) if steps % s == 0 and s >= want), steps)


def supported(rows: int, k: int, tiles: MatmulTiles | None = None) -> bool:
    """Whether the kernel takes this shape: at most 128 rows, k a multiple of bk."""
    tiles = tiles or MatmulTiles()
    return 0 < rows <= 128 and k % tiles.bk == 0


def preferred(rows: int, n: int, k: int) -> bool:
    """Whether a folded group's matmul (rows, k) x (n, k).T runs faster here than in cuBLAS.
    Measured on an H200 at 32 rows (bench/RESULTS.md): the kernel won where the matmul is
    long in one direction, a reduction longer than the output (down: 14% less time with the
    expand for an 8B model, 6% for 1B) or an output at least four times the reduction (gate/
    up: 4%, 1%), and lost or tied on Q/K/V and O, which stay with cuBLAS."""
    return supported(rows, k) and (k > n or n >= 4 * k)


def choose(x: torch.Tensor, n: int) -> MatmulTiles | None:
    """The tiles for a folded group's matmul of x (rows, k) with a weight (n, k) on x's device,
    or None where cuBLAS runs it: `DecodeTuning.wide` for 16-bit `wide` shapes at up to 32 rows on a Hopper
    GPU (or later), else the defaults where `preferred`."""
    rows, k = x.shape
    wide_tiles = active().wide
    if (wide_tiles is not None and x.dtype in (torch.float16, torch.bfloat16) and rows <= 32 and wide(n, k)
            and supported(rows, k, wide_tiles) and hopper(x.device)):
        return wide_tiles
    return MatmulTiles() if preferred(rows, n, k) else None


def _aligned(t: torch.Tensor) -> bool:
    """Whether a tensor descriptor can cover t: a 16-byte base and row stride."""
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def launch(x: torch.Tensor, weight: torch.Tensor, tiles: MatmulTiles | None = None) -> torch.Tensor:
    """The split-K partial sums of x (rows, k) @ weight (n, k).T: (splits, rows, n) float32.
    Both must be contiguous along k; `supported` says which shapes."""
    tiles = tiles or MatmulTiles()
    rows, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or not supported(rows, k, tiles) or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"split-K matmul: x {tuple(x.shape)} and weight {tuple(weight.shape)} (want at most 128 rows, "
                         f"a shared k that is a multiple of {tiles.bk}, both contiguous along k)")
    splits = splits_for(n, k, tiles, multiprocessors(x.device))
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
    bm = max(16, next_power_of_two(rows))
    x_src, w_src = x, weight
    if tiles.tma and _aligned(x) and _aligned(weight):
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_src = TensorDescriptor.from_tensor(x, [bm, tiles.bk])
        w_src = TensorDescriptor.from_tensor(weight, [tiles.bn, tiles.bk])
    dependent = pdl(x.device)
    _kernel()[(-(-n // tiles.bn), splits)](
        x_src, w_src, part, rows, n, x.stride(0), weight.stride(0), K_SPLIT=k // splits,
        BM=bm, BN=tiles.bn, BK=tiles.bk, STAGES=tiles.stages, DOT=dot, PRECISION=precision,
        TMA=x_src is not x, SWAP=tiles.swap, DEPENDENTS=dependent, num_warps=tiles.warps, launch_pdl=dependent,
    )
    return part


@torch.library.custom_op("lorakit::folded_projection", mutates_args=())
def folded_projection(x: torch.Tensor, weight: torch.Tensor, b: torch.Tensor, index: torch.Tensor,
                      sizes: list[int], residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """A folded projection group's decoding step, (rows, sum(sizes)) in x's dtype: the split-K
    matmul of x (rows, k) with weight = [W; A of every slot], then `bgmv.launch_folded` on its
    partials (`lora.folded_lora`'s semantics), with its epilogue (residual, glu). The tiles are
    `choose`'s (the defaults where it names cuBLAS)."""
    tiles = choose(x, weight.shape[0]) or MatmulTiles()
    return launch_folded(launch(x, weight, tiles), b, index, sizes, dtype=x.dtype, residual=residual, glu=glu)


@folded_projection.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, b: torch.Tensor, index: torch.Tensor, sizes: list[int],
      residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    return x.new_empty((x.shape[0], b.shape[2] // 2 if glu else b.shape[2]))
