"""The GPU serving suite: the engine's fast decode path against the generic path,
transformers and PEFT, side by side in one invocation (`bench/serve.py --suite gpu`).

Cases, in this order (each result is appended to --out as one JSON line as soon as it
exists, so a run cut short keeps what it measured):

    fast-1b-b32-1 / fast-1b-b32-32   offline throughput, 1B, batch 32, 1 adapter / 32 distinct
    agreement-1b                     greedy first 32 tokens of 32 requests (each its own
                                     adapter): fast path vs the generic path, and vs
                                     transformers + PEFT generate with the same adapter;
                                     the generic path vs PEFT too, as the control (random
                                     weights give near-flat logits: bf16 rounding flips ties)
    agreement-1b-fp32                the same three comparisons with an fp32 1B model
    online-1b                        Poisson arrivals at 80% of fast-1b-b32-32's capacity:
                                     p50/p99 time to first token and time per output token
    fast-1b-b128-pool256             batch 128, 128 distinct adapters of a pool of 256
    hf-static-peft-1b / hf-static-1b transformers generate, static cache (compiled), one
                                     PEFT adapter / the base; batch 32
    peft-mixed-1b                    PEFT generate(adapter_names=...) with 32 adapters
    fast-1b-b32-32-nf4               the 1B base quantized to NF4 on the fast path, 32 adapters
    fast-8b-b32-32 / hf-static-8b    8B, batch 32, 32 distinct adapters / the base, static cache

On a machine with two GPUs or more the suite runs as two processes, one a GPU: the fp32
agreement, NF4 and 8B cases (SECOND_GPU) on the second GPU while the others run on the
first, so the whole suite fits in half the time; no case shares its GPU with another.

Offline cases submit every request at once: 128-token prompts, 128 new tokens, random
weights (bf16), end-of-sequence ignored, rank 16 on all seven projections.
Each timed case, the engine's and transformers' alike, reports the median of three runs
after a warm-up; PEFT's mixed-adapter generate (about half a minute a run) runs once.
"""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lorakit.adapters.files import AdapterFiles
from lorakit.serve import Engine, SamplingParams

CASES = (
    "fast-1b-b32-1", "fast-1b-b32-32", "agreement-1b", "online-1b", "fast-1b-b128-pool256",
    "hf-static-peft-1b", "peft-mixed-1b", "hf-static-1b", "agreement-1b-fp32", "fast-1b-b32-32-nf4",
    "fast-8b-b32-32", "hf-static-8b",
)
SECOND_GPU = ("agreement-1b-fp32", "fast-1b-b32-32-nf4", "fast-8b-b32-32", "hf-static-8b")
"""Cases a second GPU runs, when there is one (`Suite.spread`); the first runs FIRST_GPU."""
FIRST_GPU = tuple(c for c in CASES if c not in SECOND_GPU)


class Suite:
    def __init__(self, args, build_model, byte_tokenizer, make_adapters) -> None:
        self.args = args
        self.build_model = build_model
        self.tok = byte_tokenizer()
        self.make_adapters = make_adapters
        self.out = Path(args.out) if args.out else None
        self.start = time.perf_counter()
        self.results: dict[str, dict] = {}
        self.device = torch.device(args.device)
        # On a CPU (a quick check of this script) the small model stands in for 1B and 8B.
        self.sizes = ("1b", "8b") if self.device.type == "cuda" else (args.size, args.size)

    def record(self, case: str, **values) -> None:
        values = {"case": case, "elapsed_s": round(time.perf_counter() - self.start, 1), **values}
        self.results[case] = values
        print(json.dumps(values), flush=True)
        if self.out is not None:
            with self.out.open("a") as f:
                f.write(json.dumps(values) + "\n")

    def prompts(self, count: int, vocab: int, seed: int = 0) -> list[list[int]]:
        rng = random.Random(seed)
        return [[rng.randrange(1, vocab) for _ in range(self.args.prompt_tokens)] for _ in range(count)]

    def adapters(self, model, count: int) -> dict[str, AdapterFiles]:
        """`count` adapters with distinct random weights: one made through lorakit, the rest
        the same tensors' shapes filled with other random numbers (quick for a pool of 256)."""
        first = self.make_adapters(model, 1, self.args.rank)["a0"]
        out = {"a0": first}
        g = torch.Generator(device=self.device).manual_seed(1)
        for i in range(1, count):
            tensors = {}
            for key, t in first.tensors.items():
                scale = 0.01 if "lora_B" in key else 1.0 / t.shape[1] ** 0.5
                tensors[key] = torch.randn(t.shape, generator=g, device=self.device, dtype=t.dtype) * scale
            out[f"a{i}"] = AdapterFiles(Path(f"<memory>/a{i}"), first.config, first.raw_config, tensors)
        return out

    def engine(self, model, adapters: dict, *, batch: int, path: str = "fast") -> Engine:
        engine = Engine(model, self.tok, max_batch=batch, max_queue=100000, max_adapters_on_device=max(len(adapters), 1),
                        context_length=512, decode_path=path)
        engine.eos_ids = set()  # random weights: decode exactly max_tokens
        for name, files in adapters.items():
            engine.load_adapter(name, files)
        return engine

    def offline(self, engine: Engine, prompts, names, max_tokens: int, repeats: int = 3) -> dict:
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        engine.generate(prompts[: len(prompts)], names, SamplingParams(max_tokens=4, temperature=0))  # warm-up, graphs
        runs = []
        for _ in range(repeats):
            self.sync()
            t = time.perf_counter()
            outs = engine.generate(prompts, names, params)
            seconds = time.perf_counter() - t
            runs.append(sum(o.completion_tokens for o in outs) / seconds)
        error = _compile_error(engine)
        if error is not None:  # the layers fell back to eager: these would not be the fast path's figures
            raise RuntimeError(f"the fast path's layers did not compile, so the suite stops: {error}")
        return {"tokens_per_s": sorted(runs)[len(runs) // 2], "runs": [round(r) for r in runs],
                "path": engine.decode_path, "graph_error": getattr(engine.decoder, "graph_error", None),
                "compile_error": error,
                "graph_step_ms": self.graph_steps(engine)}

    def graph_steps(self, engine: Engine) -> dict[str, float]:
        """Each captured decoding graph replayed alone, its rows at the last 20 positions of the
        key bucket: the device's time per step, without the engine's host work (what the
        engine's tokens/s is to be compared with)."""
        graphs = getattr(engine.decoder, "_graphs", None) or {}
        out = {}
        for (rows, keys, greedy), graph in sorted(graphs.items()):
            # every row at the end of the bucket, whatever the last run left: each replay moves the
            # positions on, and decode attention reads each row's keys only up to its position
            graph.ints[1].fill_(max(keys - 21, 0))
            self.sync()
            t = time.perf_counter()
            for _ in range(20):
                graph.graph.replay()
            self.sync()
            out[f"rows{rows}-keys{keys}-{'greedy' if greedy else 'sampled'}"] = round((time.perf_counter() - t) / 20 * 1e3, 3)
        return out

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wanted(self, case: str) -> bool:
        return case in self.args.cases and time.perf_counter() - self.start < self.args.budget_s

    # ---------------------------------------------------------------------------------

    def run(self) -> None:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.record("setup", device=name, torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        child = self.spread()
        try:
            if any(self.wanted(c) for c in FIRST_GPU):
                self.one_b()
            if self.wanted("agreement-1b-fp32"):
                self.record("agreement-1b-fp32", **self.agreement(torch.float32))
            if self.wanted("fast-1b-b32-32-nf4"):
                self.nf4()
            if self.wanted("fast-8b-b32-32") or self.wanted("hf-static-8b"):
                self.eight_b()
        finally:
            if child is not None:
                self.join(*child)

    def spread(self) -> tuple[subprocess.Popen, Path] | None:
        """On a machine with two GPUs or more, hand the SECOND_GPU cases to a child process of
        this script on the second GPU; they run while this process runs the rest on the first.
        Each GPU runs its cases alone, so no figure shares a device; the child's lines join
        --out when it ends (`join`)."""
        mine = [c for c in self.args.cases if c not in SECOND_GPU]
        theirs = [c for c in self.args.cases if c in SECOND_GPU]
        if self.device.type != "cuda" or torch.cuda.device_count() < 2 or not mine or not theirs:
            return None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        second = visible.split(",")[1] if visible else "1"
        out = Path(tempfile.mkstemp(suffix=".jsonl")[1])
        args = self.args
        command = [sys.executable, str(Path(__file__).with_name("serve.py")), "--suite", "gpu", "--device", "cuda",
                   "--cases", ",".join(theirs), "--out", str(out), "--rank", str(args.rank), "--new-tokens",
                   str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens), "--peft-tokens", str(args.peft_tokens),
                   "--budget-s", str(args.budget_s)]
        child = subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": second})
        self.args.cases = mine
        return child, out

    def join(self, child: subprocess.Popen, out: Path) -> None:
        """Wait for the second GPU's process and record its results here, in its order."""
        code = child.wait()
        for line in out.read_text().splitlines():
            values = json.loads(line)
            case = values.pop("case")
            values.pop("elapsed_s", None)
            self.record("setup-second-gpu" if case == "setup" else case, **values)
        out.unlink()
        if code != 0:
            self.record("second-gpu-failed", returncode=code)

    def one_b(self) -> None:
        """The 1B bf16 cases: the fast path's offline and online runs, agreement, and the
        transformers / PEFT anchors on the same model."""
        model = self.build_model(self.sizes[0], self.device, self.dtype)
        vocab = model.config.vocab_size
        pool = 256 if self.wanted("fast-1b-b128-pool256") else 32
        adapters = self.adapters(model, pool)
        names = list(adapters)
        prompts = self.prompts(128, vocab)
        first32 = {n: adapters[n] for n in names[:32]}
        fast_tokens = None
        engine = self.engine(model, first32, batch=32)
        with engine:
            for case, distinct in (("fast-1b-b32-1", 1), ("fast-1b-b32-32", 32)):
                if self.wanted(case):
                    rows = [names[i % distinct] for i in range(32)]
                    self.record(case, **self.offline(engine, prompts[:32], rows, self.args.new_tokens))
            if self.wanted("agreement-1b"):
                outs = engine.generate(prompts[:32], names[:32], SamplingParams(max_tokens=32, temperature=0))
                fast_tokens = [o.token_ids for o in outs]
            if self.wanted("online-1b") and "fast-1b-b32-32" in self.results:
                capacity = self.results["fast-1b-b32-32"]["tokens_per_s"]
                self.record("online-1b", **self.online(engine, prompts, names[:32], capacity))
        _unload(engine, first32)
        torch.cuda.empty_cache()
        if self.wanted("fast-1b-b128-pool256"):
            engine = self.engine(model, adapters, batch=128)
            with engine:
                rows = [names[(7 * i) % 256] for i in range(128)]  # 128 distinct of the 256
                self.record("fast-1b-b128-pool256", **self.offline(engine, prompts[:128], rows, self.args.new_tokens))
            _unload(engine, adapters)
            torch.cuda.empty_cache()
        del adapters
        slow = None
        if fast_tokens is not None:
            generic = self.engine(model, first32, batch=32, path="generic")
            with generic:
                slow = [o.token_ids for o in generic.generate(prompts[:32], names[:32], SamplingParams(max_tokens=32, temperature=0))]
            _unload(generic, first32)
        import lorakit

        base = lorakit.unload(model) if hasattr(model, "lora_state") else model
        ids = torch.tensor(prompts[:32], device=self.device)
        with torch.no_grad():
            peft = self.peft_model(base, first32)
            if fast_tokens is not None and slow is not None:
                peft_tokens = self.peft_greedy(peft, prompts[:32])
                self.record("agreement-1b", vs_generic=_agree(fast_tokens, slow), vs_peft=_agree(fast_tokens, peft_tokens),
                            generic_vs_peft=_agree(slow, peft_tokens))
            if self.wanted("hf-static-peft-1b"):
                peft.set_adapter("a0")
                self.record("hf-static-peft-1b", **self.timed_generate(peft, ids, self.args.new_tokens, cache_implementation="static"))
            if self.wanted("peft-mixed-1b"):
                timed = self.timed_generate(peft, ids, self.args.peft_tokens, repeats=1, adapter_names=names[:32])  # ~30 s a run
                self.record("peft-mixed-1b", **timed, new_tokens=self.args.peft_tokens)
            base = peft.unload()  # the plain base again
            if self.wanted("hf-static-1b"):
                self.record("hf-static-1b", **self.timed_generate(base, ids, self.args.new_tokens, cache_implementation="static"))
        del peft, base, model, first32
        gc.collect()
        torch.cuda.empty_cache()

    def agreement(self, dtype: torch.dtype) -> dict:
        """Greedy first 32 tokens of 32 requests, each with its own adapter: the fast path,
        the generic path and PEFT's generate on one model of `dtype`."""
        import lorakit

        model = self.build_model(self.sizes[0], self.device, dtype)
        prompts = self.prompts(32, model.config.vocab_size, seed=3)
        adapters = self.adapters(model, 32)
        names, params = list(adapters), SamplingParams(max_tokens=32, temperature=0)
        tokens = {}
        for path in ("fast", "generic"):
            engine = self.engine(model, adapters, batch=32, path=path)
            with engine:
                tokens[path] = [o.token_ids for o in engine.generate(prompts, names, params)]
            _unload(engine, adapters)
            del engine
        base = lorakit.unload(model) if hasattr(model, "lora_state") else model
        with torch.no_grad():
            peft_tokens = self.peft_greedy(self.peft_model(base, adapters), prompts)
        del model, base, adapters
        gc.collect()
        torch.cuda.empty_cache()
        return {"dtype": str(dtype), "vs_generic": _agree(tokens["fast"], tokens["generic"]),
                "vs_peft": _agree(tokens["fast"], peft_tokens), "generic_vs_peft": _agree(tokens["generic"], peft_tokens)}

    def nf4(self) -> None:
        """The 1B base quantized to NF4 (bitsandbytes), 32 distinct adapters, on the fast path."""
        from lorakit.base import quant

        model = quant.quantize_model(self.build_model(self.sizes[0], self.device, self.dtype), "nf4")
        prompts = self.prompts(32, model.config.vocab_size)
        adapters = self.adapters(model, 32)
        engine = self.engine(model, adapters, batch=32)
        with engine:
            self.record("fast-1b-b32-32-nf4", **self.offline(engine, prompts, list(adapters), self.args.new_tokens))
        _unload(engine, adapters)
        del engine, adapters, model
        gc.collect()
        torch.cuda.empty_cache()

    def online(self, engine: Engine, prompts, names, capacity: float) -> dict:
        """Poisson arrivals at 80% of `capacity` tokens/s: TTFT and TPOT percentiles."""
        rate = 0.8 * capacity / self.args.new_tokens  # requests per second
        rng = random.Random(1)
        params = SamplingParams(max_tokens=self.args.new_tokens, temperature=0)
        lock, done = threading.Lock(), threading.Event()
        arrived, first, last, counts = {}, {}, {}, {}

        def listener(i: int):
            def notify(event) -> None:
                now = time.perf_counter()
                with lock:
                    first.setdefault(i, now)
                    if event.finish_reason is not None:
                        last[i], counts[i] = now, event.completion_tokens
                        if len(last) == len(prompts):
                            done.set()
            return notify

        due = time.perf_counter()
        for i, ids in enumerate(prompts):
            due += rng.expovariate(rate)
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            arrived[i] = time.perf_counter()
            engine.submit(ids, names[i % len(names)], params, listener(i))
        done.wait(300)
        ttft = sorted(first[i] - arrived[i] for i in arrived)
        tpot = sorted((last[i] - first[i]) / max(counts[i] - 1, 1) for i in arrived)
        return {"rate_req_s": rate, "requests": len(prompts), "ttft_p50_s": pick(ttft, 50), "ttft_p99_s": pick(ttft, 99),
                "tpot_p50_s": pick(tpot, 50), "tpot_p99_s": pick(tpot, 99)}

    def peft_model(self, base, adapters: dict):
        from peft import LoraConfig as PeftConfig
        from peft import get_peft_model, set_peft_model_state_dict

        names = list(adapters)
        config = PeftConfig(r=self.args.rank, lora_alpha=2 * self.args.rank, target_modules=_TARGETS, lora_dropout=0.0)
        peft = get_peft_model(base, config, adapter_name=names[0])
        for name in names[1:]:
            peft.add_adapter(name, config)
        for name, files in adapters.items():
            set_peft_model_state_dict(peft, files.tensors, adapter_name=name)
        return peft.eval()

    def peft_greedy(self, peft, prompts, stop: bool = False) -> list[list[int]]:
        """Each prompt alone through PEFT's generate with its own adapter (a0, a1, ...): 32
        new tokens, or fewer where stop=True and the model ends its turn."""
        out = []
        for i, ids in enumerate(prompts):
            peft.set_adapter(f"a{i}")
            x = torch.tensor([ids], device=self.device)
            y = peft.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=32,
                              min_new_tokens=None if stop else 32, do_sample=False)
            out.append(y[0, len(ids):].tolist())
        return out

    def timed_generate(self, model, ids, new_tokens: int, repeats: int = 3, **kwargs) -> dict:
        """transformers' generate after a warm-up (which compiles for the static cache): the
        median tokens/s of `repeats` runs, as the engine's cases report theirs, every run, and
        the fastest (what `bars` divides by: a baseline is taken at its best)."""
        mask = torch.ones_like(ids)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
        runs = []
        for _ in range(repeats):
            self.sync()
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
            self.sync()
            runs.append((out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - t))
        return {"tokens_per_s": sorted(runs)[len(runs) // 2], "runs": [round(r) for r in runs], "best": max(runs)}

    def eight_b(self) -> None:
        model = self.build_model(self.sizes[1], self.device, self.dtype)
        prompts = self.prompts(32, model.config.vocab_size)
        if self.wanted("fast-8b-b32-32"):
            adapters = self.adapters(model, 32)
            engine = self.engine(model, adapters, batch=32)
            with engine:
                self.record("fast-8b-b32-32", **self.offline(engine, prompts, list(adapters), self.args.new_tokens))
            _unload(engine, adapters)
            del engine, adapters
            torch.cuda.empty_cache()
        if self.wanted("hf-static-8b"):
            import lorakit

            base = lorakit.unload(model) if hasattr(model, "lora_state") else model
            with torch.no_grad():
                timed = self.timed_generate(base, torch.tensor(prompts, device=self.device), self.args.new_tokens, cache_implementation="static")
            self.record("hf-static-8b", **timed)


_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _compile_error(engine: Engine) -> str | None:
    fused = getattr(getattr(engine.decoder, "decoder", None), "fused", None)
    return getattr(fused, "compile_error", None)


def _unload(engine: Engine, adapters: dict) -> None:
    for name in adapters:
        engine.unload_adapter(name)
    gc.collect()  # the engine's graphs and KV cache go before the next case allocates


def pick(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _agree(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x[:32] == y[:32] for x, y in zip(a, b, strict=True))
    first_diff = [next((t for t, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), None) for x, y in zip(a, b, strict=True)]
    return {"identical_32": same, "of": len(a), "first_difference": first_diff}


def bars(results: dict[str, dict]) -> list[str]:
    """The issue's bars, each a ratio within this run (missing cases say so)."""
    def tps(case: str) -> float | None:
        return results.get(case, {}).get("tokens_per_s")

    def baseline(case: str) -> float | None:  # a baseline's fastest run where it has several
        return results.get(case, {}).get("best", tps(case))

    lines = []

    def check(label: str, value: float | None, bar: float, unit: str = "") -> None:
        if value is None:
            lines.append(f"{label}: not measured")
        else:
            lines.append(f"{label}: {value:,.2f}{unit} (bar {bar:,}{unit}) {'PASS' if value >= bar else 'FAIL'}")

    f32, f1, peft1, static1 = tps("fast-1b-b32-32"), tps("fast-1b-b32-1"), baseline("hf-static-peft-1b"), tps("hf-static-1b")
    check("1B b32 32 adapters tokens/s", f32, 10000)
    check("1B b32 32 adapters / transformers+1 PEFT adapter (static, its fastest run)", f32 / peft1 if f32 and peft1 else None, 2.0, "x")
    check("1B b128 pool 256 tokens/s", tps("fast-1b-b128-pool256"), 25000)
    f8, s8 = tps("fast-8b-b32-32"), baseline("hf-static-8b")
    check("8B b32 32 adapters tokens/s", f8, 4500)
    check("8B b32 32 adapters / transformers base (static, its fastest run)", f8 / s8 if f8 and s8 else None, 1.8, "x")
    check("32 adapters / 1 adapter, 1B b32", f32 / f1 if f32 and f1 else None, 0.9)
    online = results.get("online-1b", {}).get("ttft_p99_s")
    lines.append(f"online 1B p99 TTFT: {online:.3f} s (bar <= 0.25 s) {'PASS' if online <= 0.25 else 'FAIL'}" if online is not None
                 else "online 1B p99 TTFT: not measured")
    for case in ("agreement-1b", "agreement-1b-fp32"):
        agreement = results.get(case)
        if agreement:
            for ref in ("vs_generic", "vs_peft"):
                got = agreement[ref]["identical_32"]
                lines.append(f"{case} {ref}: {got}/32 identical first 32 tokens (bar 30) {'PASS' if got >= 30 else 'FAIL'}")
            got = agreement["generic_vs_peft"]["identical_32"]
            lines.append(f"{case} control, generic path vs PEFT: {got}/32")
    nf4 = tps("fast-1b-b32-32-nf4")
    if nf4:
        lines.append(f"(report) NF4 1B b32 32 adapters: {nf4:,.0f} tokens/s")
    if static1:
        lines.append(f"(anchor) transformers static cache, 1B base: {static1:,.0f} tokens/s")
    return lines
