"""A 4-bit base under FSDP2, loaded shard by shard: each process quantizes and keeps only its share.

CPU, gloo, torchrun. The shares must hold exactly the bytes one process's quantization holds,
each process only its own codes, and the run must end with the single-process QLoRA adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_llama_for_tokenizer
from lorakit.adapters import qweights
from lorakit.base import quant
from lorakit.train import distributed, sharded_quant
from lorakit.train.distributed import DistEnv
from test_distributed import free_port, rows, tensors


@pytest.mark.parametrize(("out", "inn", "world"), [(16, 32, 3), (96, 128, 3), (33, 64, 2), (20, 96, 4)])
def test_shares_quantize_to_the_whole_weights_bytes(out: int, inn: int, world: int) -> None:
    """Whole-row, whole-block shares (uneven, some narrower than a block) give the codes and the
    double-quantized statistics bitsandbytes gives the whole weight, bit for bit."""
    weight = torch.randn(out, inn, generator=torch.Generator().manual_seed(out))
    whole = qweights.quantize(weight, "nf4")
    k = sharded_quant.rows_per_unit(inn)
    shares = [sharded_quant.quantize_share(weight[a * k : b * k])
              for a, b in sharded_quant.unit_ranges(out // k, world)]
    assert sum(codes.numel() for codes, _ in shares) == whole.data.numel()
    state = sharded_quant.whole_state(torch.cat([absmax for _, absmax in shares]), (out, inn), torch.float32)
    assert torch.equal(torch.cat([codes for codes, _ in shares]), whole.data.reshape(-1))
    reference = whole.quant_state
    for field in ("absmax", "offset", "code"):
        assert torch.equal(getattr(state, field), getattr(reference, field)), field
    assert torch.equal(state.state2.absmax, reference.state2.absmax)
    assert (state.shape, state.dtype, state.blocksize) == (reference.shape, reference.dtype, reference.blocksize)


def test_fill_in_chunks_stores_one_process_quantization(tmp_path) -> None:
    """The packed layers a sharded build makes, filled a packed row at a time, hold the bytes and
    statistics of the single-process load, and compute the same outputs."""
    from lorakit.adapters.config import LoraConfig
    from lorakit.adapters.inject import inject
    from lorakit.train import sharded

    model, tok = tiny_llama_for_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    weights = {name: p.detach() for name, p in model.named_parameters()}
    built, _ = sharded.build_meta(str(tmp_path), torch.float32, "nf4")
    inject(built, LoraConfig(r=2, target_modules="all-linear"))
    built.to_empty(device="cpu")
    packed = sharded_quant.packed_layers(built)
    assert len(packed) == 14
    reference = quant.load_quantized(tmp_path, "nf4")
    x = torch.randn(3, 64)
    for name, layer in packed.items():
        weight = weights[name]
        chunks = []

        def read(first: int, stop: int, weight=weight, chunks=chunks) -> torch.Tensor:
            chunks.append(stop - first)
            return weight[first:stop]

        units = layer.weight.shape[0]
        kept = sharded_quant.fill(layer, layer.weight, read, (0, units), DistEnv(), chunk_values=64)
        assert kept == weight.numel() // 2 and len(chunks) == units  # one packed row per chunk
        whole = reference.get_submodule(name.removesuffix(".weight")).weight
        assert torch.equal(layer.weight.reshape(-1), whole.data.reshape(-1)), name
        assert torch.equal(layer.base_quant_state.absmax, whole.quant_state.absmax), name
        inputs = x[:, : layer.in_features]
        torch.testing.assert_close(layer.base_forward(inputs), qweights.matmul_4bit(inputs, whole, None, torch.float32),
                                   rtol=0, atol=0)


def test_fast_path_is_reported_off_under_fsdp2() -> None:
    """Under FSDP2 every decoder layer runs transformers' forward, and the recipe says so."""
    assert "every layer runs transformers' forward" in distributed.fast_path_blocked(DistEnv(0, 2, 0, "fsdp"))
    assert distributed.fast_path_blocked(DistEnv(0, 2, 0, "ddp")) is None
    assert distributed.fast_path_blocked(DistEnv()) is None


def test_int8_and_layers_without_adapters_load_whole(tmp_path) -> None:
    from lorakit.adapters.config import LoraConfig
    from lorakit.train import sharded

    model, tok = tiny_llama_for_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert "int8 keeps its codes and row scales in bitsandbytes' layer state" in sharded.unsupported(
        str(tmp_path), LoraConfig(r=2), "int8")
    assert "model.layers.0.self_attn.k_proj gets no adapter" in sharded.unsupported(
        str(tmp_path), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "nf4")
    assert sharded.unsupported(str(tmp_path), LoraConfig(r=2, target_modules="all-linear"), "nf4") is None


# the torchrun run ---------------------------------------------------------------------------

PROBE = """
import json, os, sys, torch
from lorakit.train import distributed, fastpath, sharded

original = sharded.materialize

def recorded(model, source, env, device, adapter):
    held = original(model, source, env, device, adapter)
    layers = {path: m for path, m in model.named_modules() if getattr(m, "base_quant_state", None) is not None}
    codes = stats = whole_codes = 0
    gathered, states = {}, {}
    for path, layer in layers.items():
        local = layer.weight.to_local()
        codes += local.numel() * local.element_size()
        state = layer.base_quant_state
        # The per-weight statistics (the 16- and 256-entry lookup tables are constants).
        stats += sum(t.numel() * t.element_size() for t in (state.absmax, state.offset, state.state2.absmax))
        shell_weight = layer._base_shell[0].weight
        if shell_weight.device.type != "meta":  # codes kept anywhere else on this process
            whole_codes += shell_weight.numel() * shell_weight.element_size()
        gathered[path] = layer.weight.full_tensor().reshape(-1)
        states[path] = (state.absmax, state.offset, state.state2.absmax)
    record = {"codes": codes, "stats": stats, "elsewhere": whole_codes, "layers": len(layers),
              "fast_path_supported": fastpath.supported(model), "fast_path_blocked": distributed.fast_path_blocked(env)}
    out = os.environ["PROBE_OUT"]
    with open(f"{out}/rank-{env.rank}.json", "w") as f:
        json.dump(record, f)
    torch.save({"codes": gathered, "states": states}, f"{out}/storage-{env.rank}.pt")
    return held

sharded.materialize = recorded
from lorakit.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded-quant")
    model, tok = tiny_llama_for_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(32, 0)))
    (root / "probe.py").write_text(PROBE)
    return root


def run_probe(root, output, nproc: int) -> subprocess.CompletedProcess:
    args = [
        "train", "--model", str(root / "model"), "--data", str(root / "train.jsonl"), "--output", str(output),
        "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--batch-size", "4", "--max-steps", "4",
        "--log-every", "1", "--seq-len", "48", "--device", "cpu", "--keep-checkpoints", "0",
        "--precision", "fp32", "--quantize", "nf4", "--strategy", "fsdp" if nproc > 1 else "auto",
    ]  # fmt: skip
    output.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PROBE_OUT": str(output)}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    result = subprocess.run([*launcher, str(root / "probe.py"), *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_fsdp_nf4_each_process_quantizes_its_share_and_trains_like_one(setup_dir) -> None:
    single, sharded = setup_dir / "one", setup_dir / "two"
    run_probe(setup_dir, single, 1)
    run_probe(setup_dir, sharded, 2)
    records = []
    for rank in range(2):
        path = sharded / f"rank-{rank}.json"
        assert path.exists(), "the 4-bit base was not loaded shard by shard"
        records.append(json.loads(path.read_text()))

    # One process's storage: the layer-by-layer load the single-process run uses.
    reference = quant.load_quantized(setup_dir / "model", "nf4", compute_dtype=torch.float32)
    whole_codes = whole_stats = 0
    expected = {}
    for path, layer in reference.named_modules():
        if qweights.kind_of(getattr(layer, "weight", None)) == "nf4":
            state = layer.weight.quant_state
            whole_codes += layer.weight.data.numel()
            whole_stats += sum(t.numel() * t.element_size() for t in (state.absmax, state.offset, state.state2.absmax))
            expected[path] = (layer.weight.data.reshape(-1), (state.absmax, state.offset, state.state2.absmax))
    assert len(expected) == 14  # 7 projections x 2 layers

    for rank, record in enumerate(records):
        assert record["layers"] == len(expected)
        # Each process keeps exactly its half of the codes (every weight splits evenly here) and
        # no whole copy anywhere; the statistics are whole on each, about 1/32 of the codes.
        assert record["codes"] == whole_codes // 2
        assert record["elsewhere"] == 0
        assert record["stats"] == whole_stats
        assert (record["codes"] + record["stats"]) / (whole_codes + whole_stats) < 0.55
        # The decoder's own check and the recipe's message agree: no fast path on sharded layers.
        assert "sharded (FSDP2)" in record["fast_path_supported"]
        assert record["fast_path_blocked"] is not None
        # The gathered codes and each process's statistics are one process's, bit for bit.
        storage = torch.load(sharded / f"storage-{rank}.pt")
        for path, (codes, state) in expected.items():
            assert torch.equal(storage["codes"][path], codes), path
            for got, want in zip(storage["states"][path], state, strict=True):
                assert torch.equal(got, want), path

    # The trained adapter is the single-process QLoRA adapter (fp32 rounding of the split batch).
    ours, want = tensors(sharded), tensors(single)
    assert ours.keys() == want.keys()
    assert any(v.abs().max() > 1e-3 for k, v in want.items() if "lora_B" in k)
    for key, value in want.items():
        torch.testing.assert_close(ours[key], value, atol=2e-5, rtol=1e-3)
