"""The decoding step's attention (one query per row) over the slot cache as a Triton kernel,
for CUDA.

    q: (rows, kv heads, group, D)        query head h = kv_head * group + g (repeat_kv order)
    keys, values: (rows, kv heads, L, D) views of the cache, `cache.keys[layer][:rows, :, :L]`
    positions: (rows,) int64             row i attends to keys 0..positions[i] (< L)

    scores[i, h, g, j] = (q[i, h, g] . keys[i, h, j]) * scaling      for j <= positions[i]
    out[i, h, g] = softmax_j(scores[i, h, g, :]) @ values[i, h]      (rows, kv heads, group, D)

The PyTorch path (`fused.attend`) reads all L cache positions of every row, L being a bucket
above the longest row, and masks most of them away; here a row reads only the blocks up to
its own position, once for all the query heads that share a K/V head. One program takes a
(row, kv head): its query heads are a tile padded to 16 rows (tl.dot's smallest on some
Triton versions; the cost is in the K/V stream, not the products). Scores and the online
softmax are float32; the weights meet V in q's dtype, as in flash attention. When rows * kv
heads would leave multiprocessors idle (a few rows), each (row, kv head) is split along L
over several programs (flash-decoding) whose partial softmaxes a second kernel merges.

`decode_attention` is a PyTorch custom op (`lorakit::decode_attention`), so `torch.compile`
keeps it whole and a CUDA graph captures its launches. Triton is imported only where the
kernels run; the CPU tests run them through Triton's interpreter against `reference.attention_reference`.
"""

from __future__ import annotations

import functools
import math

import torch

from lorakit.serve.decode.ops.launch import multiprocessors, next_power_of_two, pdl, triton_device
from lorakit.serve.decode.ops.reference import attention_reference


def available(device: torch.device) -> bool:
    """Whether the kernels run on `device`: CUDA, Triton installed, and a small launch there
    gives the reference's numbers (checked once per device; a GPU or a Triton build that
    cannot run them leaves the decode path on its PyTorch attention instead of failing requests)."""
    cuda = triton_device(device)
    return cuda is not None and _works(cuda)


@functools.cache
def _works(device: torch.device) -> bool:
    g = torch.Generator().manual_seed(0)
    # K/V x (slots, kv heads, max length, D), read as views of 3 slots' first 90 positions
    cache = torch.randn(2, 7, 2, 100, 64, generator=g).to(torch.bfloat16)
    q = torch.randn(3, 2, 4, 64, generator=g).to(torch.bfloat16)
    keys, values = cache[0, :3, :, :90], cache[1, :3, :, :90]
    positions = torch.tensor([0, 89, 40])
    want = attention_reference(q.double(), keys.double(), values.double(), positions, 0.125)
    try:
        cache, q, positions = cache.to(device), q.to(device), positions.to(device)
        keys, values = cache[0, :3, :, :90], cache[1, :3, :, :90]
        got = [launch(q, keys, values, positions, 0.125, splits=s).cpu() for s in (1, 2)]
    except Exception:
        return False
    return all(bool(torch.allclose(x.double(), want, rtol=2e-2, atol=2e-2)) for x in got)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl
    import triton.language.extra.cuda  # noqa: F401  (tl.extra.cuda.gdc_wait)

    @triton.jit
    def partial(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        out_ptr,
        kn_ptr,
        vn_ptr,
        cos_ptr,
        sin_ptr,
        q_row,
        kn_row,
        vn_row,
        m_ptr,
        l_ptr,
        acc_ptr,
        kv_heads,
        group,
        length,
        head_dim,
        qk_scale,
        blocks_per_split,
        k_row,
        k_head,
        k_pos,
        k_dim,
        v_row,
        v_head,
        v_pos,
        v_dim,
        GP: tl.constexpr,
        DP: tl.constexpr,
        BLOCK_L: tl.constexpr,
        SPLIT: tl.constexpr,
        DOT: tl.constexpr,
        PRECISION: tl.constexpr,
        ROPE: tl.constexpr,
        WRITE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # the online softmax of one (row, kv head)'s query heads over this split's key blocks;
        # scores are in log2 units (qk_scale = scaling * log2(e)) so that exp2 does the work.
        # PDL: launched as the programmatic dependent of the kernel before it, waited for here
        # before anything is read; the kernel after it may launch once every program started.
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        live_d = d < head_dim
        pair = row * kv_heads + head
        q_tile = (pair * group + g[:, None]) * head_dim + d[None, :]  # (GP, DP), in out
        q_heads = q_ptr + row * q_row + (head * group + g[:, None]) * head_dim
        live = (g[:, None] < group) & live_d[None, :]
        q = tl.load(q_heads + d[None, :], mask=live, other=0.0)
        if ROPE:  # in float32, rounded once to q's dtype (as the compiled layers do)
            half = head_dim // 2
            partner = tl.where(d < half, d + half, d - half)  # rotate_half: (-x2, x1)
            sign = tl.where(d < half, -1.0, 1.0)
            cos = tl.load(cos_ptr + row * head_dim + d, mask=live_d, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + row * head_dim + d, mask=live_d, other=0.0).to(tl.float32)
            q_half = tl.load(q_heads + partner[None, :], mask=live, other=0.0).to(tl.float32)
            q = (q.to(tl.float32) * cos[None, :] + sign[None, :] * q_half * sin[None, :]).to(q_ptr.dtype.element_ty)
        q = q.to(DOT)
        end = tl.minimum(tl.maximum(tl.load(pos_ptr + row), 0), length - 1) + 1  # keys 0..end-1
        lo = split * blocks_per_split * BLOCK_L
        hi = tl.minimum(lo + blocks_per_split * BLOCK_L, end)  # lo >= hi: an empty split
        k_base = k_ptr + row * k_row + head * k_head
        v_base = v_ptr + row * v_row + head * v_head
        at = end - 1  # this step's own position, whose K/V a writing call brings
        if WRITE:
            k_at = tl.load(kn_ptr + row * kn_row + head * head_dim + d, mask=live_d, other=0.0)
            v_at = tl.load(vn_ptr + row * vn_row + head * head_dim + d, mask=live_d, other=0.0)
            if ROPE:
                k_half = tl.load(kn_ptr + row * kn_row + head * head_dim + partner, mask=live_d, other=0.0)
                k_at = k_at.to(tl.float32) * cos + sign * k_half.to(tl.float32) * sin
            k_at = k_at.to(k_ptr.dtype.element_ty)
            v_at = v_at.to(v_ptr.dtype.element_ty)
            # one split writes; `at` as a vector (Triton 3.9's interpreter refuses a store mask
            # combined from a scalar condition)
            here = at + 0 * d
            mine = live_d & (here >= lo) & (here < lo + blocks_per_split * BLOCK_L)
            tl.store(k_base + at * k_pos + d * k_dim, k_at, mask=mine)
            tl.store(v_base + at * v_pos + d * v_dim, v_at, mask=mine)
        m = tl.full((GP,), float("-inf"), tl.float32)
        total = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, DP), tl.float32)
        start = lo
        while start < hi:  # not range(lo, hi): Triton's interpreter rejects tensor bounds there
            j = start + tl.arange(0, BLOCK_L)
            inside = j < hi
            kv_live = inside[:, None] & live_d[None, :]
            k = tl.load(k_base + j[:, None] * k_pos + d[None, :] * k_dim, mask=kv_live, other=0.0).to(DOT)
            v = tl.load(v_base + j[:, None] * v_pos + d[None, :] * v_dim, mask=kv_live, other=0.0).to(DOT)
            if WRITE:  # the key at `at` from registers: another split may not have stored it yet
                k = tl.where((j == at)[:, None], k_at.to(DOT)[None, :], k)
                v = tl.where((j == at)[:, None], v_at.to(DOT)[None, :], v)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (GP, BLOCK_L)
            s = tl.where(inside[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block holds a key < end
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION)
            m = m_new
            start += BLOCK_L
        if SPLIT:
            base = (pair * tl.num_programs(2) + split) * GP + g
            tl.store(m_ptr + base, m)
            tl.store(l_ptr + base, total)
            tl.store(acc_ptr + base[:, None] * DP + d[None, :], acc, mask=g[:, None] < group)
        else:
            tl.store(out_ptr + q_tile, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def combine(
        m_ptr, l_ptr, acc_ptr, out_ptr, group, head_dim, SPLITS: tl.constexpr, GP: tl.constexpr, DP: tl.constexpr
    ):
        # merges the splits' partial softmaxes, starting from split 0: it always holds key 0, so
        # the running max is finite and an empty split (max -inf) weighs exp2(-inf) = 0, no NaN
        pair = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        base = pair * SPLITS * GP + g
        m = tl.load(m_ptr + base)
        total = tl.load(l_ptr + base)
        real = g[:, None] < group  # the padding's rows were never stored
        acc = tl.load(acc_ptr + base[:, None] * DP + d[None, :], mask=real, other=0.0)
        for s in tl.static_range(1, SPLITS):
            at = base + s * GP
            m_s = tl.load(m_ptr + at)
            m_new = tl.maximum(m, m_s)
            alpha = tl.exp2(m - m_new)
            beta = tl.exp2(m_s - m_new)
            total = total * alpha + tl.load(l_ptr + at) * beta
            acc = (
                acc * alpha[:, None]
                + tl.load(acc_ptr + at[:, None] * DP + d[None, :], mask=real, other=0.0) * beta[:, None]
            )
            m = m_new
        live = real & (d[None, :] < head_dim)
        out = (pair * group + g[:, None]) * head_dim + d[None, :]
        tl.store(out_ptr + out, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=live)

    return partial, combine


def _splits(pairs: int, blocks: int, processors: int) -> int:
    """Programs per (row, kv head): one while rows * kv heads fill the GPU, else enough for
    about two programs per multiprocessor (at most one per key block, and 32)."""
    if pairs >= processors:
        return 1
    return max(1, min(blocks, 32, -(-2 * processors // pairs)))


def launch(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    *,
    block_l: int | None = None,
    splits: int | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernels on q (rows, kv heads, group, D), keys/values (rows, kv heads, L, D) read
    in place through their strides, positions (rows,); (rows, kv heads, group, D) in q's
    dtype. block_l: keys per iteration (a power of two >= 16; None: 64); splits: programs
    per (row, kv head) along L (None: `_splits`'s choice for this GPU).

    k_new, v_new (rows, kv heads, D): this step's K/V, which the kernel writes into keys and
    values at each row's position before attending (the cache needs no separate write).
    cos, sin (rows, D): q (and k_new) arrive without RoPE, which the kernel applies as
    transformers' rotate_half does. q, k_new and v_new may be row-strided views (a
    projection group's output); within a row they must be contiguous, or they are copied."""
    if q.dim() != 4 or keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(
            f"decode attention: q {tuple(q.shape)} must be (rows, kv heads, group, D) and keys "
            f"{tuple(keys.shape)}, values {tuple(values.shape)} the same (rows, kv heads, L, D)"
        )
    rows, kv_heads, group, head_dim = q.shape
    length = keys.shape[2]
    if (keys.shape[0], keys.shape[1], keys.shape[3]) != (rows, kv_heads, head_dim) or length < 1:
        raise ValueError(
            f"decode attention: q {tuple(q.shape)} and keys {tuple(keys.shape)} do not agree on "
            "rows, kv heads and D (or L is 0)"
        )
    if positions.shape != (rows,):
        raise ValueError(
            f"decode attention: positions {tuple(positions.shape)} must be ({rows},), one per row of q {tuple(q.shape)}"
        )
    block_l = block_l or 64
    if block_l < 16 or block_l & (block_l - 1):
        raise ValueError(f"decode attention: block_l must be a power of two >= 16, got {block_l}")
    write = k_new is not None or v_new is not None
    if write and (k_new is None or v_new is None or k_new.shape != (rows, kv_heads, head_dim)
                  or v_new.shape != k_new.shape):
        raise ValueError(
            f"decode attention: k_new {None if k_new is None else tuple(k_new.shape)} and v_new "
            f"{None if v_new is None else tuple(v_new.shape)} must both be ({rows}, {kv_heads}, {head_dim})"
        )
    rope = cos is not None or sin is not None
    if rope and (cos is None or sin is None or cos.shape != (rows, head_dim) or sin.shape != cos.shape
                 or head_dim % 2):
        raise ValueError(
            f"decode attention: cos {None if cos is None else tuple(cos.shape)} and sin "
            f"{None if sin is None else tuple(sin.shape)} must both be ({rows}, {head_dim}), D even"
        )
    partial, combine = _kernels()
    import triton.language as tl

    q = _rows_strided(q)
    k_new = _rows_strided(k_new) if k_new is not None else q
    v_new = _rows_strided(v_new) if v_new is not None else q
    cos = cos.contiguous() if cos is not None else q
    sin = sin.contiguous() if sin is not None else q
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if rows * kv_heads * group == 0:
        return out
    gp, dp = max(16, next_power_of_two(group)), max(16, next_power_of_two(head_dim))
    blocks = -(-length // block_l)
    splits = max(1, min(splits or _splits(rows * kv_heads, blocks, multiprocessors(q.device)), blocks))
    per_split = -(-blocks // splits)
    splits = -(-blocks // per_split)  # no split starts past L
    work = (rows, kv_heads, splits, gp)
    m = torch.empty(work if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    total = torch.empty_like(m)
    acc = torch.empty((*work, dp) if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    # Products in q's dtype (tensor cores for 16-bit caches), except in Triton's interpreter
    # (the kernels on the CPU), whose tl.dot multiplies bfloat16's raw bits: float32 there.
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(q.dtype, tl.float32)
    if q.device.type != "cuda" and dot == tl.bfloat16:
        dot = tl.float32
    precision = "ieee" if dot == tl.float32 else "tf32"  # only float32 products read it
    dependent = pdl(q.device)
    partial[(rows, kv_heads, splits)](
        q,
        keys,
        values,
        positions,
        out,
        k_new,
        v_new,
        cos,
        sin,
        q.stride(0),
        k_new.stride(0),
        v_new.stride(0),
        m,
        total,
        acc,
        kv_heads,
        group,
        length,
        head_dim,
        scaling * math.log2(math.e),
        per_split,
        *keys.stride(),
        *values.stride(),
        GP=gp,
        DP=dp,
        BLOCK_L=block_l,
        SPLIT=splits > 1,
        DOT=dot,
        PRECISION=precision,
        ROPE=rope,
        WRITE=write,
        PDL=dependent,
        num_warps=4,
        launch_pdl=dependent,
    )
    if splits > 1:
        combine[(rows, kv_heads)](m, total, acc, out, group, head_dim, SPLITS=splits, GP=gp, DP=dp, num_warps=4)
    return out


def _rows_strided(x: torch.Tensor) -> torch.Tensor:
    """x itself when each row is contiguous (any stride between rows), else a contiguous copy."""
    inner = x[0].is_contiguous() if x.shape[0] else True
    return x if inner and x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("lorakit::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scaling: float
) -> torch.Tensor:
    """`launch` as an op that `torch.compile` and CUDA graphs keep whole."""
    return launch(q, keys, values, positions, scaling)


@decode_attention.register_fake
def _(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scaling: float
) -> torch.Tensor:
    return q.new_empty(q.shape)
