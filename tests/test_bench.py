"""The GPU benchmark script refuses case names it does not know before it runs anything."""

from __future__ import annotations

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
