"""`lorakit plan`: the meta-device prediction against the real model's bytes, its speed model
against the H200 measurements, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.base.quant import memory_report
from lorakit.cli import main
from lorakit.train.memory import GiB, Shape
from lorakit.train.plan import PlanArgs, plan, report, tokens_per_second


def _tiny_model_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_plan_counts_the_bytes_the_loaded_model_holds(tmp_path, quantize):
    """Base, adapter and optimizer bytes from the meta device equal the real model's, loaded
    in bf16 (and quantized as lorakit train --quantize does), with an AdamW step taken."""
    if quantize:
        pytest.importorskip("bitsandbytes")
    directory = _tiny_model_dir(tmp_path)
    predicted = plan(PlanArgs(model=str(directory), gpu="H100", quantize=quantize, rank=8))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    model.requires_grad_(False)
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    if quantize:
        from lorakit.base.quant import quantize_model

        quantize_model(model, quantize, compute_dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    measured = memory_report(model, optimizer)
    assert predicted["trainable"] == sum(p.numel() for p in params)
    assert predicted["adapter_gib"] * GiB == pytest.approx(measured.adapter_bytes, rel=1e-9)
    assert predicted["base_gib"] * GiB == pytest.approx(measured.base_bytes, rel=0.01)
    # AdamW's two moments (measured) plus the fp32 gradients (ADAM_BYTES = 12 per parameter)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    assert predicted["optimizer_gib"] * GiB == pytest.approx(measured.optimizer_bytes + grads, rel=0.01)


def test_plan_speed_model_matches_the_h200_measurements():
    shape = Shape(layers=32, hidden=4096, intermediate=14336, q_dim=4096, kv_dim=1024, vocab=128256)
    params = 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336)
    # bench/RESULTS.md: 8B long-tailed packed at keep_layers 7, 13,561 tokens/s (median example
    # about 258 tokens); fixed 4 x 2048 at keep_layers 18, 13,759 tokens/s
    packed = tokens_per_second(shape, params, 7, 512, 989.0)
    fixed = tokens_per_second(shape, params, 18, 2048, 989.0)
    assert abs(packed / 13_561 - 1) < 0.10
    assert abs(fixed / 13_759 - 1) < 0.10


def test_plan_command_reports_what_fits(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = ["word " * (i + 1) for i in range(10)]
    data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    assert main(["plan", "--model", str(tiny_model_dir), "--gpu", "L4", "--tokens-per-batch", "256",
                 "--data", str(data), "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fits: yes: bf16 base, no layer recomputed, 256 tokens a micro-batch (sequences up to 128)")
    assert "tokens/s on an L4;" in out and "on L4 (planning for 20.2 GiB)" in out
    tokens = sum(len(r) + 1 for r in rows)  # one byte-level token per character, and EOS
    assert f"data: 10 examples, {tokens:,} tokens" in out and "s per epoch" in out


def test_plan_says_when_nothing_fits(tmp_path):
    directory = _tiny_model_dir(tmp_path)
    result = plan(PlanArgs(model=str(directory), gpu="0.001", tokens_per_batch=4096, seq_len=4096))
    assert result["fits"] is False
    assert "is too small" in result["why"]
    assert "tokens_per_s" not in result  # a memory size alone gives no speed


@pytest.mark.parametrize(
    "options,message",
    [
        (["--gpu", "H300"], "--gpu must be one of H100, H200, A100-80, L4 or a memory size in GiB, got 'H300'"),
        (["--gpu", "-4"], "--gpu must be one of H100, H200, A100-80, L4 or a memory size in GiB, got '-4'"),
        (["--gpu", "12x"], "--gpu must be one of H100, H200, A100-80, L4 or a memory size in GiB, got '12x'"),
        (["--quantize", "fp8"], "--quantize must be nf4, int8 or bf16 (or omitted: bf16 if it fits, else nf4), "
                                "got 'fp8'"),
        (["--tokens-per-batch", "0"], "--tokens-per-batch must be a positive integer, got 0"),
    ],
)
def test_plan_refuses_bad_options_by_name(options, message, capsys):
    with pytest.raises(SystemExit):
        main(["plan", *options])
    assert message in capsys.readouterr().err


def test_plan_refuses_a_model_directory_without_config(tmp_path, capsys):
    (tmp_path / "weights-only").mkdir()
    assert main(["plan", "--model", str(tmp_path / "weights-only"), "--gpu", "24"]) != 0
    assert (f"--model {tmp_path / 'weights-only'}: the directory has no config.json; expected a transformers "
            "model directory") in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "missing"), "--gpu", "24"]) != 0
    assert f"--model {tmp_path / 'missing'}: no such directory; expected a transformers model directory" in \
        capsys.readouterr().err


# what fits on a card: published shapes as config.json only (bench/plan_table.py), on the meta device


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """name -> (model directory, its meta model), built once for the module."""
    from lorakit.train.plan import meta_model

    table = _bench_module("plan_table")
    root = tmp_path_factory.mktemp("shapes")
    out = {}
    for name in ("Llama-3.1-8B", "Llama-3.1-70B", "Qwen3-0.6B"):
        directory = str(table.write_config(name, root))
        out[name] = directory, meta_model(PlanArgs(model=directory))
    return out


def _plan(shapes, name, gpu, **kw):
    directory, model = shapes[name]
    return plan(PlanArgs(model=directory, gpu=gpu, **kw), model)


def _fixed(shapes, name, base):
    """Weights, adapter and optimizer bytes of a shape with a base, as memory.py's choose takes them."""
    from lorakit.train.memory import ADAM_BYTES
    from lorakit.train.plan import weight_bytes

    base_bytes, adapter = weight_bytes(shapes[name][1], base)
    return base_bytes + adapter + ADAM_BYTES * adapter // 4


def _one_sequence_peak(shapes, name, base, tokens):
    """memory.py's peak of a micro-batch of `tokens` with every layer recomputed."""
    from lorakit.train.memory import activation_bytes, transient_bytes

    shape = Shape.of(shapes[name][1].config)
    return _fixed(shapes, name, base) + activation_bytes(shape, tokens, 0) + transient_bytes(shape, tokens)


def _allowed(gpu: str) -> float:
    from lorakit.train.memory import HEADROOM
    from lorakit.train.plan import USABLE, gpu_spec

    return HEADROOM * int(USABLE * gpu_spec(gpu)[0] * GiB)


def test_plan_picks_bf16_where_it_fits_and_nf4_where_it_does_not(shapes):
    from lorakit.train.plan import weight_bytes

    small = _plan(shapes, "Llama-3.1-8B", "80", seq_len=2048)
    assert small["fits"] and small["base"] == "bf16"
    assert small["base_gib"] * GiB == weight_bytes(shapes["Llama-3.1-8B"][1], None)[0]
    large = _plan(shapes, "Llama-3.1-70B", "80", seq_len=2048)
    assert _one_sequence_peak(shapes, "Llama-3.1-70B", "bf16", 2048) > _allowed("80")  # bf16 really does not fit
    assert large["fits"] and large["base"] == "nf4"
    assert large["base_gib"] * GiB == weight_bytes(shapes["Llama-3.1-70B"][1], "nf4")[0]
    assert large["peak_gib"] * GiB <= _allowed("80")
    assert large["base_why"].startswith("a bf16 base needs ")
    assert report(large).startswith(f"fits: yes: NF4 base, recompute all but the last {large['keep_layers']} of 80 "
                                    "layers, 8,192 tokens a micro-batch (sequences up to 2,048)\n  peak ")
    # an explicit --quantize is respected either way
    assert _plan(shapes, "Llama-3.1-8B", "80", seq_len=2048, quantize="nf4")["base"] == "nf4"
    forced = _plan(shapes, "Llama-3.1-70B", "80", seq_len=2048, quantize="bf16")
    assert forced["fits"] is False and forced["base"] == "bf16"


def test_plan_says_by_how_much_a_70b_shape_misses_a_24_gib_card(shapes, capsys):
    result = _plan(shapes, "Llama-3.1-70B", "24", seq_len=2048)
    need = _one_sequence_peak(shapes, "Llama-3.1-70B", "nf4", 2048)
    assert result["fits"] is False and result["base"] == "nf4"
    assert result["short_gib"] * GiB == pytest.approx(need - _allowed("24"))
    assert result["longest_seq"] == 0  # the NF4 weights alone are over the budget
    directory = shapes["Llama-3.1-70B"][0]
    assert main(["plan", "--model", directory, "--gpu", "24", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fits: no: even with an NF4 base and every layer recomputed, 2,048 tokens a micro-batch "
                          f"need {need / GiB:.1f} GiB, {(need - _allowed('24')) / GiB:.1f} GiB more than the "
                          f"{_allowed('24') / GiB:.1f} GiB the plan allows on 24 GiB")
    assert "longest sequence that fits: none" in out


@pytest.mark.parametrize("name,gpu,quantize", [("Llama-3.1-70B", "80", None), ("Llama-3.1-70B", "48", None),
                                               ("Llama-3.1-8B", "24", None), ("Llama-3.1-8B", "24", "nf4")])
def test_the_longest_sequence_fits_and_one_step_longer_does_not(shapes, name, gpu, quantize):
    from lorakit.train.plan import SEQUENCE_STEP

    result = _plan(shapes, name, gpu, seq_len=2048, quantize=quantize)
    longest, base = result["longest_seq"], result["base"]
    assert 0 < longest < result["seq_limit"]  # inside the search, not at its ends
    assert _one_sequence_peak(shapes, name, base, longest) <= _allowed(gpu)
    assert _one_sequence_peak(shapes, name, base, longest + SEQUENCE_STEP) > _allowed(gpu)


def test_the_longest_sequence_stops_at_the_model_context(shapes):
    result = _plan(shapes, "Qwen3-0.6B", "80")
    assert result["longest_seq"] == result["seq_limit"] == shapes["Qwen3-0.6B"][1].config.max_position_embeddings


@pytest.mark.parametrize("name", ["Llama-3.1-8B", "Llama-3.1-70B"])
def test_a_larger_gpu_never_gives_a_shorter_longest_sequence(shapes, name):
    sizes = ["16", "24", "40", "48", "80", "141"]
    for quantize in ("bf16", "nf4"):
        longest = [_plan(shapes, name, gpu, quantize=quantize)["longest_seq"] for gpu in sizes]
        assert longest == sorted(longest), (quantize, longest)
    either = [max(r["longest_seq"], r.get("longest_seq_nf4", 0)) for r in
              (_plan(shapes, name, gpu) for gpu in sizes)]
    assert either == sorted(either) and either[-1] > either[0]


def test_the_docs_table_is_what_bench_plan_table_prints():
    """Rows of docs/training.md's table, predicted again (two shapes, to stay fast)."""
    from pathlib import Path

    table = _bench_module("plan_table")
    names, gpus, seq_lens = ["Llama-3.1-70B", "Qwen3-0.6B"], ["24", "48", "80"], [2048, 8192]
    rows = table.tables(table.predict(names, gpus, seq_lens), names, gpus, seq_lens).splitlines()[-2:]
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    for row in rows:
        assert row in docs


def test_a_memory_size_is_timed_as_a_named_card_of_its_class(shapes):
    """--gpu in GiB: the time of the class's card (24 -> L4, 48 -> L40S, 80 -> H100); a named GPU
    keeps its own speed, as before."""
    from lorakit.train.plan import GPUS, base_params

    model = shapes["Llama-3.1-8B"][1]
    shape, params = Shape.of(model.config), base_params(model)
    for gpu, card, tflops in [("24", "L4-class", 121.0), ("48", "L40S-class", 362.0), ("80", "H100-class", 989.0),
                              ("H100", "H100", GPUS["H100"][1]), ("L4", "L4", GPUS["L4"][1])]:
        result = _plan(shapes, "Llama-3.1-8B", gpu, seq_len=2048)
        assert result["speed_gpu"] == card
        assert result["tokens_per_s"] == tokens_per_second(shape, params, result["keep_layers"], 2048, tflops,
                                                           tokens_per_step=result["tokens"])


# the CPU plan ---------------------------------------------------------------------------------


def _saved_bytes(model, batch, bf16: bool) -> int:
    """Bytes autograd keeps for the backward of the recipe's loss (distinct storages, weights excluded)."""
    from lorakit.train.objectives.sft import compute_loss

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    vocab = model.config.vocab_size
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and vocab not in t.shape:  # the logits are counted apart
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            compute_loss(model, batch)
    return sum(saved.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dims", [(64, 4, 2, 24, 160, 4), (48, 6, 3, 8, 96, 8)], ids=["q-wider", "q-narrower"])
def test_generic_activation_bytes_equal_what_autograd_saves(bf16, dims):
    """The per-token, per-layer formula of lorakit.train.memory against autograd's own saved tensors, as a
    layer's difference (three layers less two), for transformers' Llama layers with adapters on all
    seven projections, in fp32 and under bf16 autocast with attention in fp32 (as lorakit train on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.train.memory import generic_activation_bytes
    from lorakit.train.precision import attention_in_fp32

    hidden, heads, kv_heads, head_dim, intermediate, rank = dims
    tokens = 24

    def build(layers):
        config = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             head_dim=head_dim, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16 if bf16 else torch.float32)
        model.requires_grad_(False)
        lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
        if bf16:
            assert attention_in_fp32(model)
        return model.train()

    ids = torch.randint(0, 300, (1, tokens), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(tokens)[None]}
    one_layer = _saved_bytes(build(3), batch, bf16) - _saved_bytes(build(2), batch, bf16)
    model = build(1)
    if bf16:  # autocast's bf16 copies of the adapter weights, once a layer: counted apart (plan's "casts")
        one_layer -= 2 * sum(p.numel() for p in model.model.layers[0].parameters() if p.requires_grad)
    shape = Shape.of(model.config)
    shape_one = Shape(1, shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.vocab, shape.heads)
    assert generic_activation_bytes(shape_one, tokens, 7 * rank, bf16) == one_layer


def _bench_module(name: str = "plan_cpu"):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_plan_matches_the_peak_rss_of_lorakit_train_on_the_bundled_model(tmp_path):
    """Two real `lorakit train --device cpu` runs of the bundled model (two steps, pieces of 512 tokens,
    precision auto), each in its own process, side by side: one with an allocator that returns freed
    memory at once (its peak RSS is the peak of live memory, what plan predicts, as CUDA's
    max_memory_allocated is on the GPU), one with glibc's malloc as it comes.

    Tolerances: the live peaks (training, and loading where the checkpoint is converted) within
    10%, the GPU's bar; with the default allocator the peak lies between 0.9x the prediction and
    the prediction plus plan's stated allowance for freed memory glibc keeps in its heaps (which
    depends on the order of allocations: 0.7x-1.8x the activations measured, bench/RESULTS.md)."""
    import platform
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from lorakit.train.plan import CPU_RUNTIME

    if platform.system() != "Linux" or not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS is read from /proc (Linux)")
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the returning allocator is glibc's MALLOC_MMAP_THRESHOLD_")
    bench = _bench_module()
    bench.write_data(tmp_path / "text.jsonl", rows=16)
    with ThreadPoolExecutor(2) as pool:  # the two runs side by side, each in its own process
        returning, default = pool.map(
            lambda allocator: bench.measure("auto", 512, allocator, batch_size=2, seq_len=256, steps=2,
                                            workdir=tmp_path),
            ["returning", "default"])
    expected = bench.predict("auto", 512, batch_size=2, seq_len=256)
    predicted = expected["predicted_train_mib"]
    assert abs(returning["train_peak_mib"] / predicted - 1) < 0.10, (returning, expected)
    if expected["predicted_load_mib"]:  # bf16 from the fp32 checkpoint: both mapped at once
        assert abs(returning["load_peak_mib"] / expected["predicted_load_mib"] - 1) < 0.10, (returning, expected)
    else:  # fp32: the weights are the checkpoint's pages, read by the first step
        assert returning["load_peak_mib"] < 2 * CPU_RUNTIME / 2**20, (returning, expected)
    assert 0.9 * predicted <= default["train_peak_mib"] <= predicted + expected["retention_mib"], (default, expected)
    assert default["train_peak_mib"] > returning["train_peak_mib"]  # glibc did keep some


@pytest.mark.parametrize(
    "options,message",
    [
        (["--device", "tpu"], "--device must be cuda or cpu, got 'tpu'"),
        (["--device", "cpu", "--precision", "fp16"], "--precision must be one of auto, fp32, bf16, got 'fp16'"),
        (["--device", "cpu", "--quantize", "nf4"], "--quantize nf4 with --device cpu: the CPU plan covers a "
                                                    "full-precision base only"),
        (["--device", "cpu", "--max-tokens", "0"], "--max-tokens must be a positive integer, got 0"),
        (["--device", "cpu", "--data", "d.jsonl"], "--data d.jsonl with --device cpu: the time per epoch is "
                                                   "predicted for GPUs only"),
    ],
)
def test_cpu_plan_refuses_bad_options_by_name(options, message, capsys):
    with pytest.raises(SystemExit):
        main(["plan", *options])
    assert message in capsys.readouterr().err


def test_cpu_plan_counts_pieces_as_lorakit_train_splits_them(tiny_model_dir):
    """Rows of --seq-len per piece of --max-tokens (at least one row, at most --batch-size), and the
    precision lorakit train would pick: fp32 activations cost twice bf16's for the MLP's values."""
    from lorakit.train.plan import PlanArgs

    def piece(**kw):
        return plan(PlanArgs(model=str(tiny_model_dir), device="cpu", precision="fp32", **kw))["piece_tokens"]

    assert piece(batch_size=8, seq_len=64) == 256  # lorakit train's default pieces of 256 tokens
    assert piece(batch_size=8, seq_len=64, max_tokens=100) == 64
    assert piece(batch_size=8, seq_len=512) == 512  # a row is never split
    assert piece(batch_size=2, seq_len=64, max_tokens=4096) == 128
    fp32 = plan(PlanArgs(model=str(tiny_model_dir), device="cpu", precision="fp32"))
    bf16 = plan(PlanArgs(model=str(tiny_model_dir), device="cpu", precision="bf16"))
    assert fp32["parts_gib"]["base"] == 2 * bf16["parts_gib"]["base"]
    assert fp32["parts_gib"]["activations"] > bf16["parts_gib"]["activations"]
    assert bf16["parts_gib"]["casts"] > 0 == fp32["parts_gib"]["casts"]


def test_cpu_plan_refuses_a_model_that_is_not_llama_shaped(tmp_path):
    from transformers import GPT2Config

    from lorakit.train.plan import PlanArgs

    GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError) as err:
        plan(PlanArgs(model=str(tmp_path / "gpt2"), device="cpu"))
    assert str(err.value) == ("--device cpu plans Llama-family decoders (model.layers of attention and a gated "
                              "MLP); GPT2LMHeadModel is not one")
