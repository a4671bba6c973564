"""The decoding step's Triton LoRA kernels (`serve/decode/bgmv.py`), run on the CPU through
Triton's interpreter against the per-row loop. The interpreter is switched on by an
environment variable read when Triton compiles, so the checks run in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

CHECK = textwrap.dedent(
    """
    import torch
    from lorakit.serve.decode.bgmv import launch
    from lorakit.serve.decode.lora import batched_lora_reference

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
    try:
        launch(torch.zeros(1, 8), torch.zeros(2, 32, 8), torch.zeros(2, 16, 5), torch.tensor([0]), [5])
    except ValueError as err:
        assert "do not agree" in str(err), err
        print("ok", "mismatched shapes rejected")
    else:
        raise AssertionError("a mismatched A was accepted")
    """
)


def test_bgmv_kernels_equal_the_per_row_loop_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok") == 5, done.stdout
