"""The fast decode path's tuning knobs as one config object, `DecodeTuning`.

An engine takes one (`Engine(..., tuning=DecodeTuning(pdl=False))`, `FastDecoder(tuning=...)`)
and installs it while it builds its decoder; the kernels read the installed one (`active`)
when they launch, and CUDA graphs and compiled layers keep what they captured. One engine's
tuning holds at a time in a process: the latest fast decoder built sets it. The defaults
are the fastest settings measured (bench/RESULTS.md); benchmarks pass other values to
compare them (bench/serve_variants.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpandTiles:
    """How the two kernels cut the work. None: the defaults, the fastest of a sweep on an
    H200 (`bench/bgmv_gpu.py --sweep`, bench/RESULTS.md): a decoding step's kernels are small,
    so what matters is many loads in flight. The shrink splits d_in over up to `max_splits`
    programs per row (and at least `programs_per_sm` programs per multiprocessor in all), 8
    warps each; the expand gives each program a wide run of columns (up to 1024) with 2
    warps, while its grid still covers every multiprocessor twice."""

    bk: int | None = None  # d_in per shrink iteration (None: 128 for up to 64 products, 256 below)
    max_splits: int = 16
    programs_per_sm: int = 8
    shrink_warps: int = 8
    bn: int | None = None  # output columns per expand program (None: the widest that fills the GPU)
    expand_warps: int = 2


@dataclass(frozen=True)
class MatmulTiles:
    """How the matmul cuts the work. None: the defaults, from a sweep on an H200 (bench/
    RESULTS.md): bn output columns and bk of the reduction per iteration, and the reduction
    split in the fewest parts that give at least `programs_per_sm` blocks per multiprocessor."""

    bn: int = 64
    bk: int = 128
    splits: int | None = None
    programs_per_sm: int = 2
    stages: int = 3
    warps: int = 4
    swap: bool = False
    """The weight's tile as the tensor cores' first operand (`partials`' SWAP)."""
    tma: bool = False
    """Tiles loaded through tensor descriptors (Hopper's copy engine); where x or the weight is
    not aligned for it (16-byte base and row stride), `launch` loads through pointers."""


FOLDED_EXPAND = ExpandTiles(bn=128, expand_warps=1)
"""The expand's tiles after a folded matmul (`launch_folded`'s default): 128 columns per
program, one warp. With every layer's B cold in L2 (`bench/matmul_chain_gpu.py --expand`) it
was the fastest of the grid on every group of a 1B and an 8B layer at 32 rows, 20-23% less
time a layer than the defaults (which were chosen with B partly in L2). """

WIDE_MATMUL = MatmulTiles(bn=64, bk=128, programs_per_sm=1, stages=4, swap=True, tma=True)
"""The tiles for the 16-bit matmuls of `wide` shapes at up to 32 rows on Hopper: the fastest
single setting of a sweep over tiles, stages, swap and descriptors on an H200. With weights
cold in L2 it beat cuBLAS and the pointer kernel on all four groups of an 8B layer and on
three of a 1B layer's; on the 1B gate/up group (17,440 x 2,048) it lost to both (bench/
RESULTS.md). """


@dataclass(frozen=True)
class DecodeTuning:
    """How the fast decode path runs a step. Every default is the fastest measured."""

    fold: bool | None = None
    """Fold the LoRA shrink into the base matmul while adapter slots allow (None: where the
    Triton kernels run)."""
    attention_writes: bool = True
    """The attention kernel writes the step's K/V into the cache itself."""
    split_k: bool = True
    """The split-K Triton matmul for the folded groups where `matmul.preferred`."""
    dynamic: bool | None = None
    """torch.compile's `dynamic` for the fused layers (None: sizes turn symbolic only once they
    change between calls; True: every size symbolic from the start)."""
    wide: MatmulTiles | None = WIDE_MATMUL
    """The matmul's tiles for 16-bit `matmul.wide` shapes at up to 32 rows on Hopper (None:
    those shapes go by `matmul.preferred` too)."""
    folded_expand: ExpandTiles | None = FOLDED_EXPAND
    """The expand's tiles after a folded matmul (None: `ExpandTiles()`)."""
    pdl: bool = True
    """On Hopper (and later) GPUs, a decoding step's kernels here (`matmul`'s split-K matmul, the
    expand after a folded matmul, the attention kernel) launch as programmatic dependents of the
    kernel before them (`launch.pdl`): a kernel's programs start while the previous kernel's
    last ones run, and wait for it before reading what it writes; the expand loads B before it
    waits. False: each kernel launches after the previous one ends."""


_active = DecodeTuning()


def active() -> DecodeTuning:
    """The tuning the kernels launch with now."""
    return _active


def install(tuning: DecodeTuning) -> None:
    """Make `tuning` the one the kernels launch with (a fast decoder does this as it is built)."""
    global _active
    if not isinstance(tuning, DecodeTuning):
        raise TypeError(f"tuning must be a DecodeTuning, got {type(tuning).__name__}")
    _active = tuning
