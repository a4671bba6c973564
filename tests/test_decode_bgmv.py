"""The decoding step's Triton LoRA kernels (`serve/decode/bgmv.py`), run on the CPU through
Triton's interpreter against the per-row loop. The interpreter is switched on by an
environment variable read when Triton compiles, so the checks run in a child process."""

from __future__ import annotations

import textwrap

from conftest import run_in_triton_interpreter

CHECK = textwrap.dedent(
    """
    import torch
    from lorakit.serve.decode.ops.bgmv import _works, available, launch
    from lorakit.serve.decode.ops.reference import batched_lora_reference

    g = torch.Generator().manual_seed(0)
    cases = [
        # (rows, slots, rank padded to r, ranks written, d_in, sizes, dtype)
        (5, 4, 16, 16, 200, (300, 70, 70), torch.float32),   # Q/K/V: three projections, blocks across them
        (3, 3, 8, 8, 130, (260, 260), torch.bfloat16),        # gate/up
        (40, 6, 16, 4, 700, (90,), torch.float32),            # one projection, a rank-4 adapter zero-padded
        (1, 2, 16, 16, 64, (17,), torch.float16),             # one row: d_in split over several programs
    ]
    for rows, slots, r, written, d_in, sizes, dtype in cases:
        a = torch.zeros(slots, len(sizes) * r, d_in, dtype=dtype)
        b = torch.zeros(slots, r, sum(sizes), dtype=dtype)
        for j in range(len(sizes)):
            a[: slots - 1, j * r : j * r + written] = torch.randn(slots - 1, written, d_in, generator=g).to(dtype)
        b[: slots - 1, :written] = torch.randn(slots - 1, written, sum(sizes), generator=g).to(dtype)
        x = torch.randn(rows, d_in, generator=g).to(dtype)
        index = torch.randint(0, slots, (rows,), generator=g)
        index[0] = slots - 1  # the zero slot: exactly no update
        got = launch(x, a, b, index, list(sizes))
        want = batched_lora_reference(x.double(), a.double(), b.double(), sizes, index)
        assert got.dtype == torch.float32 and got.shape == (rows, sum(sizes)), (got.dtype, got.shape)
        assert not got[0].any()
        err = ((got.double() - want).abs() / (want.abs().max() + 1e-30)).max().item()
        assert err < 1e-5, (rows, sizes, dtype, err)
        print("ok", rows, sizes, dtype, f"{err:.1e}")
    # the expand alone, after a base matmul that also ran every slot's A (the folded shrink)
    from lorakit.serve.decode.ops import matmul
    from lorakit.serve.decode.tuning import WIDE_MATMUL, MatmulTiles
    from lorakit.serve.decode.ops.bgmv import launch_folded
    from lorakit.serve.decode.lora import folded_lora

    def folded_case(rows, slots, r, d_in, sizes, dtype):
        # x, the joined weight [W; A of every slot] and B, the last slot all zeros
        a = torch.randn(slots, len(sizes) * r, d_in, generator=g).to(dtype)
        b = torch.randn(slots, r, sum(sizes), generator=g).to(dtype)
        a[-1], b[-1] = 0, 0
        x, w = torch.randn(rows, d_in, generator=g).to(dtype), torch.randn(sum(sizes), d_in, generator=g).to(dtype)
        return x, torch.cat([w, a.reshape(-1, d_in)]), b

    for rows, slots, r, d_in, sizes, dtype, tol in [(5, 4, 16, 200, (300, 70, 70), torch.float32, 1e-5),
                                                    (3, 3, 8, 130, (260, 260), torch.bfloat16, 1e-2),
                                                    (6, 2, 4, 256, (17,), torch.float16, 2e-3)]:
        total, width = sum(sizes), len(sizes) * r
        x, joined, b = folded_case(rows, slots, r, d_in, sizes, dtype)
        y = (x.double() @ joined.double().T).to(dtype)
        index = torch.randint(0, slots, (rows,), generator=g)
        index[0] = slots - 1
        h = y[:, total:].reshape(rows, slots, width)[torch.arange(rows), index].double()
        bounds = [0] + [sum(sizes[: j + 1]) for j in range(len(sizes))]
        delta = torch.cat([torch.einsum("ir,irn->in", h[:, j * r : (j + 1) * r], b[index][:, :, bounds[j] : bounds[j + 1]].double())
                           for j in range(len(sizes))], dim=1)
        want = y[:, :total].double() + delta
        got = launch_folded(y, b, index, list(sizes))
        assert torch.equal(got[0], y[0, :total])  # the zero slot: the base output exactly
        # the same from x and the joined weight: PyTorch, cuBLAS (here F.linear) + the expand
        # kernel, and the split-K kernel whose partials the expand kernel sums
        # (the split-K kernel takes the last case: k a multiple of 128 and longer than the output)
        assert matmul.preferred(rows, joined.shape[0], d_in) == (d_in == 256)
        for mode in (None, "folded", "folded-kernel", "folded-split-k"):
            if mode is not None:
                got = folded_lora(x, joined, b, sizes, index, mode)
            assert got.dtype == dtype and got.shape == (rows, total), (mode, got.dtype, got.shape)
            err = ((got.double() - want).abs() / (want.abs().max() + 1e-30)).max().item()
            assert err < tol, (mode, rows, sizes, dtype, err)
    print("ok", "folded expand")
    # the expand kernel's epilogues, against the same expand without them in float64: a gate/up
    # group's silu(gate) * up, and a residual added to one projection's output (both after the
    # projections' outputs are rounded to the dtype); every fold mode, split-K included
    import torch.nn.functional as F
    for rows, slots, r, d_in, sizes, dtype, tol in [(5, 3, 8, 256, (70, 70), torch.float32, 1e-5),
                                                    (4, 3, 8, 256, (100, 100), torch.bfloat16, 1e-2),
                                                    (6, 3, 16, 256, (90,), torch.float32, 1e-5),
                                                    (3, 2, 4, 256, (120,), torch.float16, 2e-3)]:
        total = sum(sizes)
        x, joined, b = folded_case(rows, slots, r, d_in, sizes, dtype)
        index = torch.randint(0, slots, (rows,), generator=g)
        plain = launch_folded((x.double() @ joined.double().T).to(dtype), b, index, list(sizes)).double()
        glu = len(sizes) == 2
        residual = None if glu else torch.randn(rows, total, generator=g).to(dtype)
        want = F.silu(plain[:, : sizes[0]]) * plain[:, sizes[0] :] if glu else residual.double() + plain
        assert matmul.preferred(rows, joined.shape[0], d_in)
        for mode in ("folded", "folded-kernel", "folded-split-k"):
            got = folded_lora(x, joined, b, sizes, index, mode, residual, glu)
            assert got.dtype == dtype and got.shape == (rows, sizes[0]), (mode, got.dtype, got.shape)
            err = ((got.double() - want).abs() / (want.abs().max() + 1e-30)).max().item()
            assert err < tol, (mode, sizes, dtype, err)
        # as the compiled layer functions hold them: the ops' fakes give the epilogue's shape
        step = torch.compile(folded_lora, backend="aot_eager", fullgraph=True)
        for mode in ("folded-kernel", "folded-split-k"):
            assert torch.equal(step(x, joined, b, sizes, index, mode, residual, glu),
                               folded_lora(x, joined, b, sizes, index, mode, residual, glu)), mode
    y = torch.zeros(2, 10 + 2 * 3 * 4)
    for sizes, residual, glu, message in [([4, 3, 3], None, True, "glu takes a gate/up group of two equal projections"),
                                          ([6, 4], None, True, "glu takes a gate/up group of two equal projections"),
                                          ([5, 5], torch.zeros(2, 10), True, "and a residual"),
                                          ([4, 3, 3], torch.zeros(2, 9), False, "the residual (2, 9) must be (2, 10)")]:
        try:
            launch_folded(y if len(sizes) == 3 else torch.zeros(2, 10 + 2 * len(sizes) * 4), torch.zeros(2, 4, 10),
                          torch.tensor([0, 1]), sizes, residual=residual, glu=glu)
        except ValueError as err:
            assert message in str(err), err
        else:
            raise AssertionError(f"an epilogue was accepted: sizes {sizes}, glu {glu}")
    print("ok", "expand epilogues")
    # the split-K matmul alone: partial sums over whole bk-wide parts of k, any split
    for rows, n, k, dtype, tiles in [(5, 300, 256, torch.float32, MatmulTiles(bn=64, bk=64)),
                                     (3, 200, 512, torch.bfloat16, MatmulTiles(bn=32, bk=128, splits=2)),
                                     (1, 70, 128, torch.float16, MatmulTiles(bn=32, bk=32, splits=4))]:
        x, w = torch.randn(rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
        parts = matmul.launch(x, w, tiles)
        assert parts.dtype == torch.float32 and parts.shape[1:] == (rows, n), parts.shape
        assert tiles.splits is None or parts.shape[0] == tiles.splits
        want = x.double() @ w.double().T
        err = ((parts.sum(0).double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-6, (rows, n, k, dtype, err)
    # the weight's tile first (swap), and the tiles loaded through tensor descriptors: rows and
    # columns past the ends read as zeros; an x whose base is not 16-byte aligned (a view one
    # element in) goes through pointers with the same tiles; the partials start as NaN
    for rows, n, k, dtype, tiles in [(5, 300, 256, torch.bfloat16, WIDE_MATMUL),
                                     (3, 200, 512, torch.float32, MatmulTiles(bn=32, bk=64, splits=2, swap=True, tma=True)),
                                     (7, 90, 256, torch.float16, MatmulTiles(bn=32, bk=128, swap=True)),
                                     (2, 70, 256, torch.bfloat16, MatmulTiles(bn=64, bk=128, tma=True))]:
        x, w = torch.randn(rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
        shifted = torch.empty(rows * k + 1, dtype=dtype)[1:].view(rows, k)
        shifted.copy_(x)
        want = x.double() @ w.double().T
        for xin in (x, shifted):
            real_empty = torch.empty
            torch.empty = lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan"))
            try:
                parts = matmul.launch(xin, w, tiles)
            finally:
                torch.empty = real_empty
            err = ((parts.sum(0).double() - want).abs().max() / want.abs().max()).item()
            assert err < 1e-6, (rows, n, k, dtype, tiles, xin.data_ptr() % 16, err)
    # which tiles a folded group gets: WIDE only for 16-bit `wide` shapes on a Hopper GPU, so
    # on the CPU the shape rule alone (`preferred`), and cuBLAS (None) elsewhere
    assert [matmul.wide(n, k) for n, k in [(7728, 4096), (4624, 14336), (29728, 4096), (4656, 2048), (2576, 8192),
                                           (17440, 2048), (1024, 4096), (4096, 1024)]] == [True] * 5 + [False] * 3
    assert matmul.choose(torch.zeros(32, 4096, dtype=torch.bfloat16), 29728) == MatmulTiles()
    assert matmul.choose(torch.zeros(32, 4096, dtype=torch.bfloat16), 4624) is None
    assert matmul.choose(torch.zeros(32, 256), 17) == MatmulTiles()
    print("ok", "swap and descriptors")
    for x, w, tiles in [(torch.zeros(2, 100), torch.zeros(8, 100), None), (torch.zeros(200, 128), torch.zeros(8, 128), None),
                        (torch.zeros(2, 128), torch.zeros(8, 256), None),
                        (torch.zeros(2, 256), torch.zeros(8, 256), MatmulTiles(splits=3))]:
        try:
            matmul.launch(x, w, tiles)
        except ValueError as err:
            assert str(err).startswith("split-K matmul"), err
        else:
            raise AssertionError(f"split-K matmul took x {tuple(x.shape)}, weight {tuple(w.shape)}, {tiles}")
    print("ok", "split-K matmul")
    try:
        launch_folded(torch.zeros(2, 30), torch.zeros(2, 4, 10), torch.tensor([0, 1]), [10])
    except ValueError as err:
        assert "rows, 10 + 2 slots x 4)" in str(err), err
    else:
        raise AssertionError("a folded output of the wrong width was accepted")
    try:
        launch(torch.zeros(1, 8), torch.zeros(2, 32, 8), torch.zeros(2, 16, 5), torch.tensor([0]), [5])
    except ValueError as err:
        assert "do not agree" in str(err), err
        print("ok", "mismatched shapes rejected")
    else:
        raise AssertionError("a mismatched A was accepted")
    # as `torch.compile` sees it in the decode path's layer functions: one opaque op whose
    # registered fake gives the output's shape and dtype for any batch (dynamic shapes)
    from lorakit.serve.decode.lora import batched_lora
    a, b = torch.randn(3, 32, 40, generator=g), torch.randn(3, 16, 50, generator=g)

    def delta(x, index):
        return batched_lora(x, a, b, (30, 20), index, "kernel") * 2

    compiled = torch.compile(delta, backend="aot_eager", dynamic=True, fullgraph=True)
    for rows in (3, 5):
        x, index = torch.randn(rows, 40, generator=g), torch.randint(0, 3, (rows,), generator=g)
        got, want = compiled(x, index), 2 * batched_lora_reference(x, a, b, (30, 20), index)
        assert got.shape == (rows, 50) and torch.allclose(got, want.float(), rtol=1e-5, atol=1e-4), rows
    print("ok", "compiled")
    # a decoding step of a tiny Llama through the kernels, against lorakit's generic mixed batch
    import lorakit
    from transformers import LlamaConfig, LlamaForCausalLM
    from lorakit.serve.decode.kv import SlotCache
    from lorakit.serve.decode.model import DecoderModel
    from lorakit.serve.decode.tuning import DecodeTuning
    from lorakit.serve.decode.lora import AdapterSlots

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    for name in ("p", "q"):
        lorakit.add_adapter(model, name, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f".{name}." in pname and "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    rows, lengths = ["q", None, "p"], [5, 3, 4]
    seqs = [torch.randint(0, 64, (n + 2,), generator=g) for n in lengths]
    with torch.no_grad():
        want = [lorakit.forward_mixed(model, [n], s.unsqueeze(0)).logits[0] for n, s in zip(rows, seqs)]
    # decoding steps through the LoRA kernels (the shrink its own kernel, then folded into the
    # base matmul: cuBLAS, then the split-K kernel), then through the folded LoRA and the
    # attention kernel that writes K/V
    for kernels in ({"lora_kernel": True, "fold": False}, {"lora_kernel": True, "split_k": False},
                    {"lora_kernel": True}, {"lora_kernel": True, "attention_kernel": True}):
      with torch.no_grad():
        tuning = DecodeTuning(fold=kernels.get("fold"), split_k=kernels.get("split_k", True))
        decoder = DecoderModel(model, fused=True, lora_kernel=kernels["lora_kernel"],
                               attention_kernel=kernels.get("attention_kernel"), tuning=tuning)
        cache = SlotCache(2, 3, 2, 16, decoder.head_dim, dtype=torch.float32, device="cpu")
        lora = AdapterSlots(decoder.layers, 2, torch.float32, torch.device("cpu"))
        lora.sync({"p": 1, "q": 2})
        index = torch.tensor(lora.index(rows))
        slots = torch.tensor([cache.allocate() for _ in rows])
        ids = torch.zeros(3, max(lengths), dtype=torch.long)
        for i, n in enumerate(lengths):
            ids[i, :n] = seqs[i][:n]
        positions = torch.arange(max(lengths)).expand(3, -1)
        decoder.forward(ids, positions, cache, slots, max(lengths), lora, index)
        step_mode = {False: "kernel"}.get(kernels.get("fold"), "folded-split-k" if decoder.split_k else "folded-kernel")
        assert decoder.lora_mode(3, 1, False, lora) == step_mode and decoder.lora_mode(3, 4, True, lora) == "gather"
        # two rows' worth of slots per row at most: one row against three slots keeps the kernel
        assert decoder.lora_mode(1, 1, False, lora) == "kernel"
        for step in range(2):
            tokens = torch.tensor([[int(s[n + step])] for s, n in zip(seqs, lengths)])
            positions = torch.tensor([[n + step] for n in lengths])
            out = decoder.logits(decoder.forward(tokens, positions, cache, slots, max(lengths) + step + 1, lora, index,
                                                 gathered=False))
            for i, n in enumerate(lengths):
                torch.testing.assert_close(out[i, 0], want[i][n + step], rtol=1e-4, atol=1e-4)
      print("ok", "decoding steps", sorted(kernels))
    # the start-up self-check that `available` runs on a GPU, here on the interpreter
    assert _works(torch.device("cpu")) and not available(torch.device("cpu"))
    # programmatic dependent launch only on a Hopper (or later) GPU, and only while PDL is on
    from lorakit.serve.decode.ops import launch as launch_module
    assert not launch_module.pdl(torch.device("cpu"))
    print("ok", "self-check")
    """
)


def test_bgmv_kernels_equal_the_per_row_loop_in_the_interpreter() -> None:
    ok = run_in_triton_interpreter(CHECK)
    assert len(ok) == 15, ok
