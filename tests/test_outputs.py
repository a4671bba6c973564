"""Every command that writes files follows one rule (lorakit.adapters.outputs): an existing output
it did not write is refused unless --overwrite, --overwrite replaces only what the command writes,
an output is never an input nor holds one, and a killed run leaves no half-written output and no
temporary the next run trips over. Also: absurd numbers and non-float adapter tensors, refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from conftest import adapter_on_tiny_base, chat_rows, make_serve_adapter
from lorakit.cli import main, parse

SRC = Path(__file__).resolve().parents[1] / "src"
MARKER = ".lorakit-output.json"  # what marks a directory as a command's own output


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with its content hash."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def hidden(directory: Path) -> list[str]:
    """Temporaries and other dot-files beside an output (the marker excepted)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name != MARKER)


@pytest.fixture
def base_copy(tmp_path, tiny_base_dir) -> Path:
    """A private copy of the tiny base: a test that fails must not damage the shared one."""
    return Path(shutil.copytree(tiny_base_dir, tmp_path / "base"))


def make_adapter(directory: Path, base: Path) -> Path:
    model, tok = adapter_on_tiny_base(base, r=4)
    path = lorakit.save_adapter(model, directory)
    tok.save_pretrained(path)
    return path


def run_killed(code: str, tmp_path: Path) -> None:
    """Run `code` in a child process that kills itself with SIGKILL part-way (the code does it)."""
    script = textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{Path(__file__).parent}"}
    child = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]


# convert ------------------------------------------------------------------------------------


def test_convert_into_the_folder_holding_the_adapter_is_refused_and_deletes_nothing(tmp_path, base_copy, capsys):
    work = tmp_path / "work"
    adapter = make_adapter(work / "adapter", base_copy)
    (work / "notes.txt").write_text("a week of notes\n")
    before = snapshot(work)
    for extra in ([], ["--overwrite"]):
        assert main(["convert", str(adapter), "--output", str(work), *extra]) == 1
        err = capsys.readouterr().err
        assert f"--output {work} contains the adapter's directory ({adapter})" in err
        assert snapshot(work) == before


def test_convert_replaces_its_own_output_and_only_its_files(tmp_path, base_copy, capsys):
    adapter = make_adapter(tmp_path / "adapter", base_copy)
    out = tmp_path / "plain"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "adapter_config.json").write_text('{"someone": "else"}\n')
    before = snapshot(out)
    # An existing directory convert did not write: refused, untouched.
    assert main(["convert", str(adapter), "--output", str(out)]) == 1
    assert "already exists and is not the output of an earlier `lorakit convert`; pass --overwrite" in \
        capsys.readouterr().err
    assert snapshot(out) == before
    # --overwrite replaces what convert writes and leaves the rest.
    assert main(["convert", str(adapter), "--output", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine\n"
    assert lorakit.read_adapter(out).config.r == 4
    # Now it is convert's own output: a second run replaces it without --overwrite.
    (out / "adapter_model.safetensors").write_bytes(b"stale")
    assert main(["convert", str(adapter), "--output", str(out)]) == 0
    assert lorakit.read_adapter(out).config.r == 4 and (out / "notes.txt").read_text() == "mine\n"
    assert hidden(out) == [] and hidden(tmp_path) == []


# export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,victim", [("gguf-lora", "adapter_model.safetensors"), ("gguf", "model.safetensors")])
def test_export_never_writes_onto_the_adapter_or_base_files(tmp_path, base_copy, capsys, fmt, victim):
    adapter = make_adapter(tmp_path / "adapter", base_copy)
    target = (adapter if victim.startswith("adapter") else base_copy) / victim
    before = target.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(adapter), "--format", fmt, "--output", str(target), *extra]) == 1
        assert f"--output {target} is {victim} in the " in capsys.readouterr().err
        assert target.read_bytes() == before


def test_export_refuses_a_foreign_file_and_replaces_its_own(tmp_path, base_copy, capsys):
    import gguf

    adapter = make_adapter(tmp_path / "adapter", base_copy)
    out = tmp_path / "out.gguf"
    out.write_bytes(b"someone's file")
    assert main(["export", str(adapter), "--format", "gguf-lora", "--output", str(out)]) == 1
    assert "is not the output of an earlier `lorakit export --format gguf-lora`; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"someone's file"
    assert main(["export", str(adapter), "--format", "gguf-lora", "--output", str(out), "--overwrite"]) == 0
    assert gguf.GGUFReader(out).get_field("adapter.type").contents() == "lora"
    # Its own output: replaced again without --overwrite, no temporaries left beside it.
    assert main(["export", str(adapter), "--format", "gguf-lora", "--output", str(out), "--dtype", "f16"]) == 0
    assert gguf.GGUFReader(out).get_field("general.file_type").contents() == 1  # MOSTLY_F16
    assert hidden(tmp_path) == []


def test_a_killed_export_leaves_no_output_and_no_temporary_after_the_next_run(tmp_path, base_copy):
    adapter = make_adapter(tmp_path / "adapter", base_copy)
    out = tmp_path / "lora.gguf"
    run_killed(f"""
        import os, signal, gguf
        from lorakit.cli import main
        def die(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        gguf.GGUFWriter.write_tensors_to_file = die
        main(["export", {str(adapter)!r}, "--format", "gguf-lora", "--output", {str(out)!r}])
    """, tmp_path)
    assert not out.exists()
    assert main(["export", str(adapter), "--format", "gguf-lora", "--output", str(out)]) == 0
    assert out.is_file() and hidden(tmp_path) == []


def test_ollama_overwrite_keeps_the_users_files(tmp_path, base_copy, capsys):
    adapter = make_adapter(tmp_path / "adapter", base_copy)
    out = tmp_path / "ollama"
    out.mkdir()
    (out / "README").write_text("notes\n")
    assert main(["export", str(adapter), "--format", "ollama", "--output", str(out)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err and not (out / "Modelfile").exists()
    assert main(["export", str(adapter), "--format", "ollama", "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "Modelfile", "README", "model.gguf"])


# merge --------------------------------------------------------------------------------------


def test_merge_onto_an_existing_file_is_refused_not_reported_as_written(tmp_path, tiny_model_dir, capsys):
    adapter = make_serve_adapter(tmp_path / "a", seed=1)
    out = tmp_path / "merged"
    out.write_text("a file\n")
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(out)]) == 1
    captured = capsys.readouterr()
    assert "merged model written" not in captured.out
    assert f"--output {out} is a file; `lorakit merge` writes a directory" in captured.err
    assert out.read_text() == "a file\n"


def test_merge_into_a_folder_holding_its_inputs_is_refused(tmp_path, tiny_model_dir, capsys):
    adapter = make_serve_adapter(tmp_path / "a", seed=1)
    before = snapshot(tmp_path)
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(tmp_path),
                 "--overwrite"]) == 1
    assert f"--output {tmp_path} contains the " in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_a_killed_merge_leaves_no_model_without_its_tokenizer(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    adapter = make_serve_adapter(tmp_path / "a", seed=1)
    out = tmp_path / "merged"
    run_killed(f"""
        import os, signal
        from transformers import PreTrainedTokenizerBase
        from lorakit.cli import main
        def die(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        PreTrainedTokenizerBase.save_pretrained = die
        main(["merge", "--model", {str(tiny_model_dir)!r}, "--adapter", {str(adapter)!r}, "--output", {str(out)!r}])
    """, tmp_path)
    assert not out.exists()
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(out)]) == 0
    assert f"merged model written to {out}" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(out)("3+4")["input_ids"]
    assert (out / "model.safetensors").is_file() and hidden(tmp_path) == []
    # The same command again replaces its own output without --overwrite.
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(out)]) == 0


# train and compare --------------------------------------------------------------------------


def test_train_refuses_an_output_that_is_its_init_adapter(tmp_path, tiny_model_dir, capsys):
    import json

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(8)))
    adapter = make_serve_adapter(tmp_path / "sft", seed=1)
    before = snapshot(adapter)
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(adapter),
                 "--init-adapter", str(adapter), "--overwrite", "--max-steps", "1", "--device", "cpu"]) == 1
    assert f"--output {adapter} is --init-adapter {adapter}" in capsys.readouterr().err
    assert snapshot(adapter) == before


def test_compare_refuses_to_replace_a_report_it_did_not_write(tmp_path, tiny_model_dir, capsys):
    adapter = make_serve_adapter(tmp_path / "a", seed=1)
    (adapter / "report.json").write_text('{"mine": true}\n')
    assert main(["compare", "--adapter", str(adapter), "--model", str(tiny_model_dir), "--prompts", "1",
                 "--sampled", "0", "--max-new-tokens", "2", "--show", "0", "--device", "cpu"]) == 1
    assert f"--output {adapter} holds a report.json that lorakit compare did not write" in capsys.readouterr().err
    assert (adapter / "report.json").read_text() == '{"mine": true}\n'


# numbers and tensors ------------------------------------------------------------------------


@pytest.mark.parametrize("gpu", ["1e308", "inf"])
def test_plan_refuses_an_absurd_gpu_size_by_name(gpu, tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--model", str(tiny_model_dir), "--gpu", gpu])
    assert f"--gpu must be one of H100, H200, A100-80, L4 or a memory size in GiB, got {gpu!r}" in \
        capsys.readouterr().err


@pytest.mark.parametrize("value", ["-5", "0"])
def test_data_refuses_a_seq_len_that_is_not_positive(value, capsys):
    with pytest.raises(SystemExit):
        parse(["data", "--data", "rows.jsonl", "--seq-len", value])
    assert f"--seq-len must be a positive integer, got {int(value)}; at most 2,147,483,647 accepted" in \
        capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_an_adapter_tensor_that_is_not_floating_point_is_refused(tmp_path, dtype):
    path = make_serve_adapter(tmp_path / "a", seed=1)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, weights)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"{key} has dtype {name}; adapter tensors must be floating point "
                                         r"\(float32, float16, bfloat16, float64\)"):
        lorakit.read_adapter(path)
