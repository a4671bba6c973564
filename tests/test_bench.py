"""The GPU benchmark script refuses case names it does not know before it runs anything."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "train_gpu.py"


def test_train_gpu_names_unknown_cases(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--cases", "8b-peft,8b-lorakit-keep99,profile:check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "unknown case(s) 8b-lorakit-keep99, profile:check; known: all" in proc.stderr
    assert "8b-lorakit-keep14" in proc.stderr  # the accepted names are listed
    assert not (tmp_path / "train_gpu.jsonl").exists()  # nothing ran


def test_serve_gpu_suite_names_unknown_cases():
    script = Path(__file__).resolve().parent.parent / "bench" / "serve.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--suite", "gpu", "--cases", "fast-1b-b32-32,fast-2b"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown case(s) fast-2b; known: fast-1b-b32-1, fast-1b-b32-32," in proc.stderr


def _train_gpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bucket_width_is_the_smallest_bucket_that_holds_the_batch():
    import pytest

    bench = _train_gpu()
    buckets = bench.BUCKETS
    assert [bench.bucket_width(n, buckets) for n in (1, 511, 512, 513, 2048, 2049, 4096)] == [
        512, 512, 512, 1024, 2048, 4096, 4096]
    with pytest.raises(ValueError, match=r"a batch of 4097 tokens is longer than the largest bucket \(4096\)"):
        bench.bucket_width(4097, buckets)


def test_length_grouped_batches_hold_every_example_once_and_pad_less():
    """transformers' group_by_length, as the bucketed compiled baseline batches: every example once,
    each group of MEGABATCH batches sorted longest first, a function of the seed; on the timed
    long-tailed examples it pads less at four bucket widths (four compiles) than random batches
    padded to a multiple of 256 (the other compiled case, which compiles for every width)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import longtail
    finally:
        sys.path.remove(str(SCRIPT.parent))
    bench = _train_gpu()
    lengths = [p + r for p, r in longtail.lengths(300, bench.DATA_SEED, 4096)][60:300]  # the timed draw
    batches = bench.length_grouped(lengths, 4, bench.DATA_SEED)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) == 4 for b in batches)  # one batch shape: nothing compiles while timed
    size = bench.MEGABATCH * 4
    for start in range(0, len(lengths), size):
        flat = [lengths[i] for b in batches for i in b][start : start + size]
        assert flat == sorted(flat, reverse=True)
    assert batches == bench.length_grouped(lengths, 4, bench.DATA_SEED)
    assert batches != bench.length_grouped(lengths, 4, bench.DATA_SEED + 1)
    widths = [bench.bucket_width(max(lengths[i] for i in b), bench.BUCKETS) for b in batches]
    bucketed = sum(lengths) / sum(4 * w for w in widths)
    plain = [lengths[i : i + 4] for i in range(0, len(lengths), 4)]
    multiple = sum(lengths) / sum(4 * -(-max(b) // 256) * 256 for b in plain)
    assert bucketed > multiple
    assert round(bucketed, 2) == 0.50 and round(multiple, 2) == 0.46  # the figures BUCKETS' docstring states
    assert len(set(widths)) <= len(bench.BUCKETS)


def test_serve_gpu_bars_divide_by_a_baselines_fastest_run():
    """The suite's ratios take each transformers baseline at its best run, not its median."""
    spec = importlib.util.spec_from_file_location("serve_gpu", SCRIPT.parent / "serve_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = {
        "fast-1b-b32-32": {"tokens_per_s": 12000.0}, "fast-1b-b32-1": {"tokens_per_s": 12500.0},
        "hf-static-peft-1b": {"tokens_per_s": 5000.0, "runs": [4000, 5000, 6500], "best": 6500.0},
        "fast-8b-b32-32": {"tokens_per_s": 4600.0},
        "hf-static-8b": {"tokens_per_s": 2500.0},  # one run: its figure is its best
    }
    lines = module.bars(results)
    assert "1B b32 32 adapters / transformers+1 PEFT adapter (static, its fastest run): 1.85x (bar 2.0x) FAIL" in lines
    assert "8B b32 32 adapters / transformers base (static, its fastest run): 1.84x (bar 1.8x) PASS" in lines
    assert "1B b128 pool 256 tokens/s: not measured" in lines
