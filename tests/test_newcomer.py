"""What a newcomer ran into: export's silence and file modes, plan's speed for a small model, two
runs on one output directory, DoRA refusals that did not name convert, and the bundled base."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lorakit
from conftest import adapter_on_tiny_base
from lorakit.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def base_dir(tiny_base_dir):
    return tiny_base_dir


def _adapter(directory, base_dir, **config):
    model, tok = adapter_on_tiny_base(base_dir, **config)
    path = lorakit.save_adapter(model, directory)
    tok.save_pretrained(path)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# 1. export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_export_prints_each_file_and_writes_it_with_the_umask_mode(tmp_path, base_dir, capsys, mask):
    adapter = _adapter(tmp_path / "plain", base_dir, r=4, alpha=8)
    out = tmp_path / "plain.gguf"
    old = os.umask(mask)
    try:
        assert main(["export", str(adapter), "--format", "gguf-lora", "--output", str(out)]) == 0
    finally:
        os.umask(old)
    printed = capsys.readouterr().out
    size = out.stat().st_size
    assert f"wrote {out} ({size:,} bytes" in printed
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_adapter_and_compare_report_files_get_the_umask_mode(tmp_path, base_dir, mask):
    # every file lorakit writes through a temporary name (adapter files, reports) is an ordinary
    # file afterwards, not mkstemp's private 0600
    from lorakit.adapters.files import atomic_write

    old = os.umask(mask)
    try:
        adapter = _adapter(tmp_path / "plain", base_dir, r=4, alpha=8)
        report = tmp_path / "report.json"
        atomic_write(report, lambda tmp: open(tmp, "w").write("{}"))
    finally:
        os.umask(old)
    for path in (adapter / "adapter_config.json", adapter / "adapter_model.safetensors", report):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


# 2. plan -------------------------------------------------------------------------------------


def test_plan_speed_for_a_135m_shape_is_credible():
    from lorakit.train.memory import Shape
    from lorakit.train.plan import tokens_per_second

    shape = Shape(layers=30, hidden=576, intermediate=1536, q_dim=576, kv_dim=192, vocab=49152)
    params = 30 * (576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536)
    rate = tokens_per_second(shape, params, 30, 1024, 989.0, tokens_per_step=8192)
    assert 20_000 < rate < 500_000  # the peak-FLOPs model alone said about 953,000


def test_plan_command_says_a_small_models_speed_is_extrapolated(tiny_model_dir, capsys):
    assert main(["plan", "--model", str(tiny_model_dir), "--gpu", "H100", "--tokens-per-batch", "256",
                 "--seq-len", "128"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("speed:"))
    rate = int(line.split("about ")[1].split(" tokens/s")[0].replace(",", ""))
    assert rate < 2_000_000
    assert "extrapolated" in line


# 3. one run per output directory -------------------------------------------------------------


def _holder(output: Path) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import sys, types
        from lorakit.train.rundir import prepare_output
        args = types.SimpleNamespace(output={str(output)!r}, resume=False, overwrite=False)
        prepare_output(args)
        print("locked", flush=True)
        sys.stdin.read()
    """)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_run_on_the_same_output_fails_at_once(tmp_path):
    import types

    from lorakit.train import rundir
    from lorakit.train.rundir import prepare_output

    output = tmp_path / "run"
    args = types.SimpleNamespace(output=str(output), resume=False, overwrite=False)
    child = _holder(output)
    try:
        with pytest.raises(ValueError, match=rf"another lorakit run is writing to {output} \(pid {child.pid}\)"):
            prepare_output(args)
    finally:
        child.communicate("", timeout=60)
    # the holder has exited: the directory is free, and this process may take it again and again
    assert prepare_output(args)[0] is None
    assert prepare_output(args)[0] is None
    rundir.release_output(output)


# 4. DoRA refusals point to convert -----------------------------------------------------------


def test_dora_refusals_name_convert_and_max_error(tmp_path, base_dir, capsys):
    adapter = _adapter(tmp_path / "dora", base_dir, r=4, alpha=8, use_dora=True)
    expected = f"lorakit convert {adapter} --to plain-lora --output {adapter}-plain"
    assert main(["check", str(adapter), "--target", "llama.cpp"]) == 1
    out = capsys.readouterr().out
    assert expected in out and "--max-error" in out
    assert main(["export", str(adapter), "--format", "gguf-lora", "--output", str(tmp_path / "d.gguf")]) == 1
    err = capsys.readouterr().err
    assert expected in err and "--max-error" in err


# 5. the bundled base is dequantized ----------------------------------------------------------


def test_check_says_the_bundled_base_is_dequantized_from_q4_1(tmp_path, base_dir, capsys):
    from lorakit.base.models import DEFAULT_HUB_ID
    from lorakit.export.check import check, format_verdicts, read_files

    adapter = _adapter(tmp_path / "plain", base_dir, r=4, alpha=8)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = DEFAULT_HUB_ID
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    text = format_verdicts(check(read_files(adapter), ["peft"]))
    assert "SmolLM2-135M-Instruct dequantized from a Q4_1 GGUF" in text
    assert "original fp16/bf16 weights" in text
