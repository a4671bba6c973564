"""The decoding step's Triton attention (`serve/decode/attention.py`), run on the CPU through
Triton's interpreter against its PyTorch definition in float64; and that definition against
the PyTorch attention it replaces (`fused.attend`). The interpreter is switched on by an
environment variable read when Triton compiles, so the kernel checks run in a child process."""

from __future__ import annotations

import textwrap

import torch

from conftest import run_in_triton_interpreter
from lorakit.serve.decode.fused import attend
from lorakit.serve.decode.ops.reference import attention_reference as reference

CHECK = textwrap.dedent(
    """
    import torch
    from lorakit.serve.decode.ops.attention import _works, available, decode_attention, launch
    from lorakit.serve.decode.ops.reference import attention_reference as reference

    g = torch.Generator().manual_seed(0)
    cases = [
        # (slots, max length, kv heads, group, D, L, positions, dtype, block_l, splits to run)
        # group 3 and D 40 pad to the tiles; row 0 sees key 0 only, so its later splits are
        # empty; 63/64 end a block's last key and a new block's first
        (6, 160, 3, 3, 40, 150, [0, 149, 63, 64, 100], torch.float32, None, (1, 3, None)),
        # GQA at D 64; the last row's position is past L: it reads all L keys and no further
        (5, 140, 2, 4, 64, 130, [0, 129, 17, 80, 140], torch.bfloat16, 64, (1, 2)),
        # MHA at D 32 with 16-key blocks: up to 7 blocks, 4 splits of 2 (the last one short)
        (4, 128, 3, 1, 32, 100, [99, 0, 31], torch.float16, 16, (1, 4)),
    ]
    for slots, max_length, kv_heads, group, dim, length, positions, dtype, block_l, splits in cases:
        rows = len(positions)
        cache = torch.randn(2, slots, kv_heads, max_length, dim, generator=g).to(dtype)
        q = (2 * torch.randn(rows, kv_heads, group, dim + 8, generator=g)).to(dtype)[..., :dim]
        positions = torch.tensor(positions)
        want = reference(q.double(), cache[0, :rows, :, :length].double(), cache[1, :rows, :, :length].double(),
                         positions, dim**-0.5)
        # what lies past a row's position is never read: NaN there would reach the output
        after = torch.arange(max_length) > positions[:, None]  # (rows, max length)
        cache[:, :rows].masked_fill_(after[None, :, None, :, None], float("nan"))
        keys, values = cache[0, :rows, :, :length], cache[1, :rows, :, :length]  # views, as the decode path reads
        assert not keys.is_contiguous()
        bound = 1e-5 if dtype == torch.float32 else 1e-2
        errors = []
        for s in splits:
            got = launch(q, keys, values, positions, dim**-0.5, block_l=block_l, splits=s)
            assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous(), (got.dtype, got.shape)
            errors.append(((got.double() - want).abs().max() / want.abs().max()).item())
            assert errors[-1] < bound, (group, dim, dtype, s, errors[-1])
        err = max(errors)
        print("ok", group, dim, dtype, splits, f"{err:.1e}")
    # the call a decoding step makes: q and the step's k, v arrive without RoPE as views of one
    # projection output; the kernel rotates them, writes k, v at each row's position (NaN
    # there before) and attends over the keys it wrote
    from lorakit.serve.decode.fused import rotate
    for slots, max_length, kv_heads, group, dim, length, positions, dtype, block_l, splits in (cases[0], cases[2]):
        rows = len(positions)
        positions = torch.tensor(positions)
        heads = kv_heads * group
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim + 5, generator=g).to(dtype)  # a group's output, padded
        q = qkv[:, : heads * dim].view(rows, kv_heads, group, dim)
        k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim : (heads + 2 * kv_heads) * dim].view(rows, kv_heads, dim)
        angles = positions[:, None].double() * 0.9 ** torch.arange(dim // 2).double()
        cos, sin = torch.cat([angles.cos()] * 2, dim=1).to(dtype), torch.cat([angles.sin()] * 2, dim=1).to(dtype)
        q_rot = rotate(q.double(), cos.double()[:, None, None], sin.double()[:, None, None])
        k_rot = rotate(k.double(), cos.double()[:, None], sin.double()[:, None])
        clean = torch.randn(2, slots, kv_heads, max_length, dim, generator=g).to(dtype)
        after = torch.arange(max_length) >= positions[:, None]  # the row's own position too
        start = clean.clone()
        start[:, :rows].masked_fill_(after[None, :, None, :, None], float("nan"))
        expect = clean[:, :rows, :, :length].double().clone()
        expect[0, torch.arange(rows), :, positions] = k_rot
        expect[1, torch.arange(rows), :, positions] = v.double()
        want = reference(q_rot, expect[0], expect[1], positions, dim**-0.5)
        bound = 1e-5 if dtype == torch.float32 else 1e-2
        for s in splits:
            cache = start.clone()
            keys, values = cache[0, :rows, :, :length], cache[1, :rows, :, :length]
            got = launch(q, keys, values, positions, dim**-0.5, block_l=block_l, splits=s, k_new=k, v_new=v, cos=cos, sin=sin)
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert err < bound, ("write", group, dim, dtype, s, err)
            k_written = cache[0, torch.arange(rows), :, positions]  # (rows, kv heads, D)
            v_written = cache[1, torch.arange(rows), :, positions]
            assert (k_written.double() - k_rot).abs().max() <= bound * k_rot.abs().max(), ("k written", s)
            assert torch.equal(v_written, v), ("v written", s)
            untouched = torch.ones(max_length, dtype=torch.bool).expand(2, slots, kv_heads, -1).clone()
            untouched[:, torch.arange(rows), :, positions] = False
            assert torch.equal(cache.isnan()[untouched], start.isnan()[untouched])
            assert torch.equal(cache.nan_to_num()[untouched], start.nan_to_num()[untouched])
        print("ok", "rope and write", group, dim, dtype, splits)
    for kw in ({"k_new": torch.zeros(2, 2, 32)}, {"k_new": torch.zeros(2, 2, 32), "v_new": torch.zeros(2, 1, 32)},
               {"cos": torch.zeros(2, 32)}, {"cos": torch.zeros(2, 32), "sin": torch.zeros(2, 16)}):
        try:
            launch(torch.zeros(2, 2, 4, 32), torch.zeros(2, 2, 50, 32), torch.zeros(2, 2, 50, 32),
                   torch.zeros(2, dtype=torch.long), 1.0, **kw)
        except ValueError as err:
            assert str(err).startswith("decode attention") and "(2, " in str(err), err
        else:
            raise AssertionError(f"mismatched step inputs were accepted: {sorted(kw)}")
    print("ok", "mismatched step inputs rejected")
    for q, keys, values, positions in [
        (torch.zeros(2, 2, 4, 32), torch.zeros(2, 2, 50, 64), torch.zeros(2, 2, 50, 64), torch.zeros(2, dtype=torch.long)),
        (torch.zeros(2, 2, 4, 32), torch.zeros(3, 2, 50, 32), torch.zeros(3, 2, 50, 32), torch.zeros(2, dtype=torch.long)),
        (torch.zeros(2, 2, 4, 32), torch.zeros(2, 2, 50, 32), torch.zeros(2, 2, 40, 32), torch.zeros(2, dtype=torch.long)),
        (torch.zeros(2, 2, 4, 32), torch.zeros(2, 2, 50, 32), torch.zeros(2, 2, 50, 32), torch.zeros(3, dtype=torch.long)),
    ]:
        try:
            launch(q, keys, values, positions, 1.0)
        except ValueError as err:
            assert str(err).startswith("decode attention") and str(tuple(q.shape)) in str(err), err
        else:
            raise AssertionError(f"mismatched shapes were accepted: {q.shape}, {keys.shape}, {values.shape}")
    print("ok", "mismatched shapes rejected")
    # as `torch.compile` sees it in a layer function: one opaque op whose registered fake
    # gives the output's shape and dtype for any batch (dynamic shapes)
    cache = torch.randn(2, 6, 2, 96, 32, generator=g)

    def attention(q, keys, values, positions):
        return decode_attention(q, keys, values, positions, 0.2) * 2

    compiled = torch.compile(attention, backend="aot_eager", dynamic=True, fullgraph=True)
    for rows, length in ((3, 80), (5, 90)):
        q = torch.randn(rows, 2, 4, 32, generator=g)
        keys, values = cache[0, :rows, :, :length], cache[1, :rows, :, :length]
        positions = torch.randint(0, length, (rows,), generator=g)
        got = compiled(q, keys, values, positions)
        assert got.shape == q.shape and torch.equal(got, 2 * launch(q, keys, values, positions, 0.2)), rows
    print("ok", "compiled")
    # the start-up self-check that `available` runs on a GPU, here on the interpreter
    assert _works(torch.device("cpu")) and not available(torch.device("cpu"))
    print("ok", "self-check")
    """
)


def test_decode_attention_kernel_equals_the_reference_in_the_interpreter() -> None:
    ok = run_in_triton_interpreter(CHECK)
    assert len(ok) == 9, ok


def test_reference_equals_the_pytorch_decode_attention() -> None:
    g = torch.Generator().manual_seed(0)
    rows, kv_heads, group, dim, length = 4, 2, 3, 16, 40
    q = torch.randn(rows, kv_heads, group, dim, generator=g, dtype=torch.float64)
    keys = torch.randn(6, kv_heads, 50, dim, generator=g, dtype=torch.float64)[:rows, :, :length]
    values = torch.randn(6, kv_heads, 50, dim, generator=g, dtype=torch.float64)[:rows, :, :length]
    positions = torch.tensor([0, 39, 12, 25])
    # attend's inputs as the decode path builds them: heads h = kv_head * group + g, one step
    allowed = torch.arange(length) <= positions[:, None]  # (rows, L)
    mask = allowed[:, None, None, :].expand(rows, 1, group, length)
    want = attend(q.reshape(rows, 1, -1, dim), keys, values, mask, 0.3)  # (rows, 1, heads * D)
    got = reference(q, keys, values, positions, 0.3)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.reshape(rows, 1, kv_heads * group * dim), want, rtol=1e-12, atol=1e-12)
