"""The decoding step's multi-adapter LoRA as two Triton kernels (Punica's BGMV, in the
manner of its shrink and expand), for CUDA.

One token per row, each row with its own adapter slot (see `lora.batched_lora` for the
op's exact semantics, which these kernels compute):

    shrink   h[i] = x[i] @ A[index[i]].T       a row's G*r products, split along d_in over
                                               several programs (partial sums, no atomics)
    expand   y[i, cols_j] = h[i, j*r:(j+1)*r] @ B[index[i]][:, cols_j]
                                               every projection of the group in one launch

Each row reads only its own adapter's A and B, once: at a batch of 128 rows drawn from a
pool of 256 adapters that is half the traffic of reading every slot (the dense way), and
at 32 rows it replaces a dozen small matmuls, split-K reductions and masks per projection
group with two launches. Rows that share an adapter read it again, from L2. Products and
sums are float32; y comes back in float32.

`bgmv` is a PyTorch custom op (`lorakit::bgmv`), so `torch.compile` keeps it whole inside
the compiled layer functions and a CUDA graph captures its two launches. Triton is needed
only where it runs: the rest of lorakit never imports it. The CPU tests run these kernels
through Triton's interpreter against the per-row loop.
"""

from __future__ import annotations

import functools

import torch

from lorakit.serve.decode.ops.launch import multiprocessors, next_power_of_two, pdl, triton_device
from lorakit.serve.decode.ops.reference import batched_lora_reference
from lorakit.serve.decode.tuning import ExpandTiles, active


def available(device: torch.device) -> bool:
    """Whether the kernels run on `device`: CUDA, Triton installed, and a small launch there
    gives the per-row loop's numbers (checked once per device; a GPU or a Triton build that
    cannot run them leaves the decode path on its PyTorch ops instead of failing requests)."""
    cuda = triton_device(device)
    return cuda is not None and _works(cuda)


@functools.cache
def _works(device: torch.device) -> bool:
    g = torch.Generator().manual_seed(0)
    sizes = [40, 24]
    a = torch.randn(3, 2 * 8, 96, generator=g)
    b = torch.randn(3, 8, sum(sizes), generator=g)
    x = torch.randn(4, 96, generator=g)
    index = torch.tensor([2, 0, 1, 0])
    try:
        got = launch(x.to(device), a.to(device), b.to(device), index.to(device), sizes).cpu()
    except Exception:
        return False
    want = batched_lora_reference(x.double(), a.double(), b.double(), sizes, index)
    return bool(torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4))


@functools.cache
def _kernels():
    import triton
    import triton.language as tl
    import triton.language.extra.cuda  # noqa: F401  (tl.extra.cuda.gdc_wait)

    @triton.jit
    def shrink(x_ptr, a_ptr, index_ptr, part_ptr, rows, d_in, x_stride,
               W: tl.constexpr, WP: tl.constexpr, BK: tl.constexpr, K_SPLIT: tl.constexpr):
        # part[split, row, :W] = x[row, K_split] @ A[index[row], :, K_split].T
        row = tl.program_id(0)
        split = tl.program_id(1)
        slot = tl.load(index_ptr + row).to(tl.int64)
        w = tl.arange(0, WP)
        acc = tl.zeros((WP,), dtype=tl.float32)
        a_rows = a_ptr + slot * W * d_in + w[:, None].to(tl.int64) * d_in
        start = split * K_SPLIT
        for offset in range(0, K_SPLIT, BK):
            k = start + offset + tl.arange(0, BK)
            inside = k < d_in
            x = tl.load(x_ptr + row * x_stride + k, mask=inside, other=0.0).to(tl.float32)
            a = tl.load(a_rows + k[None, :], mask=(w[:, None] < W) & inside[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(part_ptr + (split * rows + row) * WP + w, acc)

    @triton.jit
    def expand(part_ptr, b_ptr, index_ptr, out_ptr, base_ptr, res_ptr, rows, total, r, bound1, bound2,
               split_stride, row_stride, slot_stride, base_stride, res_stride,
               SPLITS: tl.constexpr, WP: tl.constexpr, G: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr,
               ADD: tl.constexpr, EPILOGUE: tl.constexpr, PDL: tl.constexpr):
        # out[row, n] = h[row, j(n)*r : j(n)*r + r] @ B[index[row], :, n] (+ base[row, n] when ADD),
        # h = the sum of the row's partials at part + split * split_stride + row * row_stride
        # + index[row] * slot_stride (a folded shrink: the row's own slot's products), and base
        # likewise the sum over splits at base + split * split_stride + row * base_stride.
        # EPILOGUE 1 (a gate/up group, G == 2, bound1 columns each): out[row, n] =
        # silu(gate) * up of the two projections' outputs, each rounded to out's dtype first;
        # EPILOGUE 2: out[row, n] = res[row, n] + the output rounded to out's dtype.
        # PDL: launched as a programmatic dependent of the matmul that writes part and base:
        # what that matmul does not write (index, B, res) is loaded before waiting for it; the
        # kernel after this one may launch once every program has started.
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        block = tl.program_id(1)
        slot = tl.load(index_ptr + row).to(tl.int64)
        rr = tl.arange(0, RP)
        live = rr < r
        b_rows = b_ptr + slot * r * total + rr[:, None] * total
        n = block * BLOCK + tl.arange(0, BLOCK)
        if EPILOGUE == 1:
            inside = n < bound1
            both = live[:, None] & inside[None, :]
            b_gate = tl.load(b_rows + n[None, :], mask=both, other=0.0).to(tl.float32)
            b_up = tl.load(b_rows + bound1 + n[None, :], mask=both, other=0.0).to(tl.float32)
        else:
            inside = n < total
            b = tl.load(b_rows + n[None, :], mask=live[:, None] & inside[None, :], other=0.0).to(tl.float32)
            if EPILOGUE == 2:
                res = tl.load(res_ptr + row * res_stride + n, mask=inside, other=0.0).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
        h0 = tl.zeros((RP,), dtype=tl.float32)
        h1 = tl.zeros((RP,), dtype=tl.float32)
        h2 = tl.zeros((RP,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            at = part_ptr + s * split_stride + row * row_stride + slot * slot_stride
            h0 += tl.load(at + rr, mask=live, other=0.0).to(tl.float32)
            if G > 1:
                h1 += tl.load(at + r + rr, mask=live, other=0.0).to(tl.float32)
            if G > 2:
                h2 += tl.load(at + 2 * r + rr, mask=live, other=0.0).to(tl.float32)
        if EPILOGUE == 1:
            gate = tl.sum(h0[:, None] * b_gate, axis=0)
            up = tl.sum(h1[:, None] * b_up, axis=0)
            for s in tl.static_range(SPLITS):
                at = base_ptr + s * split_stride + row * base_stride + n
                gate += tl.load(at, mask=inside, other=0.0).to(tl.float32)
                up += tl.load(at + bound1, mask=inside, other=0.0).to(tl.float32)
            gate = gate.to(out_ptr.dtype.element_ty).to(tl.float32)
            up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
            y = gate * tl.sigmoid(gate) * up
            tl.store(out_ptr + row * bound1 + n, y.to(out_ptr.dtype.element_ty), mask=inside)
        else:
            h = tl.broadcast_to(h0[:, None], (RP, BLOCK))
            if G > 1:
                h = tl.where((n >= bound1)[None, :], h1[:, None], h)
            if G > 2:
                h = tl.where((n >= bound2)[None, :], h2[:, None], h)
            y = tl.sum(h * b, axis=0)
            if ADD:
                for s in tl.static_range(SPLITS):
                    y += tl.load(base_ptr + s * split_stride + row * base_stride + n, mask=inside, other=0.0).to(tl.float32)
            if EPILOGUE == 2:
                y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
                y += res
            tl.store(out_ptr + row * total + n, y.to(out_ptr.dtype.element_ty), mask=inside)

    return shrink, expand


def launch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, sizes: list[int],
           tiles: ExpandTiles | None = None) -> torch.Tensor:
    """The two kernels on x (rows, d_in), A (slots, G*r, d_in), B (slots, r, sum(sizes)),
    index (rows,); (rows, sum(sizes)) float32. Shapes as `lora.batched_lora` states them."""
    shrink, expand = _kernels()
    tiles = tiles or ExpandTiles()
    rows, d_in = x.shape
    slots, width, _ = a.shape
    groups = len(sizes)
    r = b.shape[1]
    total = b.shape[2]
    if width != groups * r or sum(sizes) != total or groups > 3:
        raise ValueError(f"bgmv: A {tuple(a.shape)}, B {tuple(b.shape)} and sizes {sizes} do not agree (at most 3 projections)")
    x = x.contiguous()
    a, b, index = a.contiguous(), b.contiguous(), index.contiguous()
    processors = multiprocessors(x.device)
    wp = max(16, next_power_of_two(width))
    bk = tiles.bk or (128 if wp >= 64 else 256)
    blocks = -(-d_in // bk)
    splits = max(1, min(blocks, tiles.max_splits, -(-tiles.programs_per_sm * processors // max(rows, 1))))
    k_per_split = -(-blocks // splits) * bk
    splits = -(-d_in // k_per_split)
    bn = _expand_block(rows, total, processors, tiles)
    part = torch.empty((splits, rows, wp), dtype=torch.float32, device=x.device)
    out = torch.empty((rows, total), dtype=torch.float32, device=x.device)
    if rows == 0:
        return out
    shrink[(rows, splits)](x, a, index, part, rows, d_in, x.stride(0), W=width, WP=wp, BK=bk, K_SPLIT=k_per_split,
                           num_warps=tiles.shrink_warps)
    bounds = [sum(sizes[: j + 1]) for j in range(groups)] + [total, total]
    expand[(rows, -(-total // bn))](
        part, b, index, out, part, part, rows, total, r, bounds[0], bounds[1], rows * wp, wp, 0, 0, 0,
        SPLITS=splits, WP=wp, G=groups, RP=max(16, next_power_of_two(r)), BLOCK=bn, num_warps=tiles.expand_warps,
        ADD=False, EPILOGUE=0, PDL=False,
    )
    return out


def _expand_block(rows: int, total: int, processors: int, tiles: ExpandTiles) -> int:
    return tiles.bn or next((n for n in (1024, 512, 256) if rows * -(-total // n) >= 2 * processors), 128)


def launch_folded(y: torch.Tensor, b: torch.Tensor, index: torch.Tensor, sizes: list[int],
                  tiles: ExpandTiles | None = None, dtype: torch.dtype | None = None,
                  residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """The expand alone, when the shrink was folded into the base matmul: y (rows, total +
    slots * G*r) is x times [W; A of slot 0; A of slot 1; ...] transposed, so y[:, :total] is the
    base output and row i's own products sit at total + index[i] * G*r; or y (splits, rows, ...)
    holds that matmul's split-K partial sums (`matmul.partials`), which are summed here.
    Returns (rows, total) in dtype (None: y's): the base output plus each row's update,
    summed in float32.

    What reads the output can run in the same kernel (`lora.epilogue`'s semantics):
    glu=True (a gate/up group, two projections of equal size) returns silu(gate) * up,
    (rows, total / 2); residual (rows, total) returns residual + the output. The projections'
    outputs are rounded to dtype first, as they would be if returned. tiles None: the active `DecodeTuning.folded_expand`.
    Where `pdl`, the kernel launches as the programmatic dependent of the kernel before it,
    which wrote y."""
    _, expand = _kernels()
    tiles = tiles or active().folded_expand or ExpandTiles()
    slots, r, total = b.shape
    groups = len(sizes)
    width = groups * r
    parts = y if y.dim() == 3 else y.unsqueeze(0)
    if (y.dim() not in (2, 3) or y.shape[-1] != total + slots * width or sum(sizes) != total or groups > 3
            or parts.stride(2) != 1 or parts.stride(0) % parts.stride(1)):
        raise ValueError(f"bgmv: the folded output {tuple(y.shape)}, B {tuple(b.shape)} and sizes {sizes} do not agree "
                         f"(want ([splits,] rows, {total} + {slots} slots x {width}), at most 3 projections)")
    splits, rows = parts.shape[:2]
    if glu and (groups != 2 or sizes[0] != sizes[1] or residual is not None):
        raise ValueError(f"bgmv: glu takes a gate/up group of two equal projections and no residual, got sizes {sizes}"
                         f"{' and a residual' if residual is not None else ''}")
    if residual is not None and (residual.shape != (rows, total) or residual.stride(-1) != 1):
        raise ValueError(f"bgmv: the residual {tuple(residual.shape)} must be ({rows}, {total}), contiguous along {total}")
    b, index = b.contiguous(), index.contiguous()
    columns = total // 2 if glu else total
    out = torch.empty((rows, columns), dtype=dtype or y.dtype, device=y.device)
    if rows == 0:
        return out
    bn = _expand_block(rows, columns, multiprocessors(y.device), tiles)
    bounds = [sum(sizes[: j + 1]) for j in range(groups)] + [total, total]
    row = parts.stride(1)
    dependent = pdl(y.device)
    expand[(rows, -(-columns // bn))](
        parts[:, :, total:], b, index, out, parts, parts if residual is None else residual, rows, total, r, bounds[0],
        bounds[1], parts.stride(0) if splits > 1 else 0, row, width, row, 0 if residual is None else residual.stride(0),
        SPLITS=splits, WP=max(16, next_power_of_two(width)), G=groups, RP=max(16, next_power_of_two(r)), BLOCK=bn,
        num_warps=tiles.expand_warps, ADD=True, EPILOGUE=1 if glu else 2 if residual is not None else 0,
        PDL=dependent, launch_pdl=dependent,
    )
    return out


@torch.library.custom_op("lorakit::bgmv", mutates_args=())
def bgmv(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """`launch` as an op that `torch.compile` and CUDA graphs keep whole."""
    return launch(x, a, b, index, sizes)


@bgmv.register_fake
def _(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return x.new_empty((x.shape[0], b.shape[2]), dtype=torch.float32)


@torch.library.custom_op("lorakit::bgmv_folded", mutates_args=())
def bgmv_folded(y: torch.Tensor, b: torch.Tensor, index: torch.Tensor, sizes: list[int],
                residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """`launch_folded` as an op that `torch.compile` and CUDA graphs keep whole."""
    return launch_folded(y, b, index, sizes, residual=residual, glu=glu)


@bgmv_folded.register_fake
def _(y: torch.Tensor, b: torch.Tensor, index: torch.Tensor, sizes: list[int],
      residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    return y.new_empty((y.shape[-2], b.shape[2] // 2 if glu else b.shape[2]))
