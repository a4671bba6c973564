"""Preference tuning (DPO, ORPO) through `lorakit train` on CUDA, each part against a reference run.

    PYTHONPATH=src python bench/pref_gpu.py              # one or two GPUs; JSON lines in $OUT/pref_gpu.jsonl
    PYTHONPATH=src python bench/pref_gpu.py --dry-run    # a tiny model on the CPU, gloo under torchrun

The model is `bench/cli_gpu.py`'s random-init Llama (hidden 512, 8 layers, a byte-level tokenizer)
saved as a model directory; the data are synthetic preference pairs (a sum preferred to a near miss,
after prompts of varied length) in JSONL files. Every check compares runs of this invocation:

1. `--objective dpo` and `orpo` with the CUDA defaults (bf16, the GPU fast path: chosen and
   rejected rows through the fused layers and head) against `--fast-path false` (same seed):
   per-step loss and reward margin, bf16 tolerance. The defaults also against `--precision fp32` on
   CUDA (bf16 tolerance), and CUDA fp32 against the CPU in fp32 (the setting of the TRL parity
   tests; fp32 tolerance).
2. `--quantize nf4` DPO: at step 1 the policy is its own reference (rewards exactly 0, loss log 2),
   and the loss falls over the run.
3. `--resume`: a run interrupted in the middle of step N/2 (KeyboardInterrupt between micro-batches,
   as Ctrl-C does), then resumed, ends with the adapter of an uninterrupted run, bit for bit; once
   on the fast path (dropout 0, the default) and once with LoRA dropout 0.1 (the generic path, which
   draws random numbers: the CUDA RNG state must come back too). When it differs, a second
   uninterrupted run says whether the run itself is reproducible, and if not, the runs are repeated
   under `torch.use_deterministic_algorithms`.
4. torchrun on 2 GPUs: DDP and FSDP2 against one process with the same global batch, in fp32 (tight)
   and with the defaults (bf16). Fewer than 2 GPUs: a recorded skip.

The models are small, so runs share the GPUs: two single-GPU runs at a time on each GPU
(CUDA_VISIBLE_DEVICES), the torchrun runs one after another beside them, the CPU references beside
those. Every run and every check is a JSON line in $OUT/pref_gpu.jsonl as soon as it is known, each
run's console output in $OUT/pref_gpu_logs/. The end prints PASS / FAIL / SKIP per check and exits 1
when a check failed. Optional runs (the deterministic retry, the torchrun runs) that would end after
--budget-s seconds are skipped and recorded rather than started.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import cli_gpu  # noqa: E402  (bench/: the GPU model directory and metrics reader)

# |run - reference| <= atol + rtol * |reference| at every logged step, for each compared key.
FP32 = (1e-3, 1e-4)
"""(rtol, atol), both runs in fp32: only summation order and kernels differ (about 1e-6 relative per
value); Adam turns that into slightly different updates, so a few steps on, 1e-3 still holds with room."""
BF16 = (3e-2, 1.5e-2)
"""(rtol, atol), a bf16 run against another precision or path: bf16 keeps 8 mantissa bits (0.4% per
rounding) in activations and logits, the log-probabilities are summed over answers of a few tokens,
and the reward margins start at 0 (hence the absolute part). Measured so far: on a CPU with native
bf16, this script's DPO run in bf16 against fp32 (same model and data) used at most 0.062 of it (the
margin at step 2); on an H200, SFT's fast path against the generic path (bench/cli_gpu.py, same
model, lr 2e-3) drifted to 1.3e-2 relative by step 40. CUDA's bf16 attention and fused kernels are
not that CPU's, hence the room; a wrong reference or normalisation is off by far more."""
KEYS = ("loss", "rewards/margins", "eval_loss", "eval_rewards/margins")
STEPS = 12
"""Optimizer steps of the compared runs (log every step, evaluate at 6 and 12)."""
RESUME_STEPS, STOP_STEP = 8, 4
"""The resume check: 8 steps, interrupted in the middle of step index 4 (its second micro-batch)."""
SECONDS_PER_RUN = 40
"""What one `lorakit train` process is budgeted at (start-up, CUDA init, compiling the fast path's
kernels, the steps), to skip optional runs in time."""
LANES_PER_GPU = 2
"""Single-GPU runs at a time on one GPU: the model is small, a run is bound by start-up and launches."""


@dataclass
class Run:
    name: str
    rc: int
    wall_s: float
    output: Path
    records: list[dict] = field(default_factory=list)
    fast_path: str = ""
    """The line `lorakit train` printed about the GPU fast path ('' when none, e.g. on the CPU)."""
    tail: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and bool(self.records)

    @property
    def fast(self) -> bool:
        return self.fast_path.startswith("GPU fast path: ")


def pair_rows(n: int, seed: int) -> list[dict]:
    """The right sum preferred to a near miss, after a prompt of 0-8 filler words (varied lengths, so
    chosen and rejected rows pad differently)."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "paper", "light", "green", "quiet", "north", "table"]
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        filler = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        wrong = rng.choice([str(a + b + rng.randint(1, 9)), f"{a + b} or so", f"about {a + b - rng.randint(1, 5)}"])
        rows.append({"prompt": f"{filler} {a}+{b}=".lstrip(), "chosen": str(a + b), "rejected": wrong})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tiny_model(directory: Path) -> None:
    """The dry run's model: the tests' tokenizer-sized tiny Llama (hidden 32, 2 layers)."""
    from conftest import tiny_llama_for_tokenizer

    model, tok = tiny_llama_for_tokenizer()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


def compare(reference: Run, run: Run, tol: tuple[float, float], keys: tuple[str, ...] = KEYS) -> tuple[bool, dict]:
    """Whether `run`'s logged values stay within `tol` of `reference`'s at every logged step."""
    rtol, atol = tol
    ref = {r["step"]: r for r in reference.records}
    got = {r["step"]: r for r in run.records}
    if sorted(ref) != sorted(got):
        return False, {"why": f"logged steps differ: {sorted(ref)} vs {sorted(got)}"}
    worst: dict[str, dict] = {}
    missing = []
    for step in sorted(ref):
        for key in keys:
            if (key in ref[step]) != (key in got[step]):
                missing.append(f"{key}@{step}")
                continue
            if key not in ref[step]:
                continue
            diff = abs(got[step][key] - ref[step][key])
            excess = diff / (atol + rtol * abs(ref[step][key]))
            if key not in worst or excess > worst[key]["of_allowed"]:
                worst[key] = {"step": step, "abs_diff": diff, "of_allowed": round(excess, 4),
                              "reference": ref[step][key], "run": got[step][key]}
    detail = {"tolerance": f"|d| <= {atol:g} + {rtol:g}*|reference| per logged step", "worst": worst,
              "loss": {"reference": [ref[s].get("loss") for s in sorted(ref)],
                       "run": [got[s].get("loss") for s in sorted(got)]}}
    if missing:
        detail["missing"] = missing
    ok = not missing and bool(worst) and all(w["of_allowed"] <= 1 for w in worst.values())
    return ok, detail


def adapters(a: Path, b: Path) -> tuple[bool, float]:
    """(every adapter tensor bit-identical, the largest |difference|)."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if set(x) != set(y):
        return False, math.inf
    equal = all(torch.equal(x[k], y[k]) for k in x)
    return equal, max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


class Bench:
    """Runs `lorakit train` processes on lanes of the GPUs and on the CPU, and records as it goes."""

    def __init__(self, out: Path, work: Path, dry_run: bool, gpus: int, budget_s: float) -> None:
        self.out, self.work, self.dry_run, self.gpus, self.budget_s = out, work, dry_run, gpus, budget_s
        self.logs = out / "pref_gpu_logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.checks: list[dict] = []
        self.slots: queue.Queue[str] = queue.Queue()  # "0", "1", "0", "1": lanes, alternating GPUs
        for lane in range(1 if dry_run else LANES_PER_GPU * gpus):
            self.slots.put("cpu" if dry_run else str(lane % gpus))
        self.cpu = ThreadPoolExecutor(1)  # the CPU references, beside the GPU runs

    # recording ------------------------------------------------------------------------------

    def write(self, row: dict) -> None:
        with self.lock, (self.out / "pref_gpu.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    def check(self, name: str, status: str, reason: str, **detail) -> None:
        row = {"check": name, "status": status, "reason": reason, "elapsed_s": round(self.elapsed(), 1), **detail}
        self.write(row)
        with self.lock:
            self.checks.append(row)
        print(f"[{self.elapsed():6.1f}s] {status:4s} {name}: {reason}", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def affordable(self, runs: int = 1) -> bool:
        return self.elapsed() + runs * SECONDS_PER_RUN <= self.budget_s

    # running --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def gpu(self) -> Iterator[str]:
        """A lane of one GPU (CUDA_VISIBLE_DEVICES) for a run or a chain of runs ('cpu' in a dry run)."""
        slot = self.slots.get()
        try:
            yield slot
        finally:
            self.slots.put(slot)

    def env(self, slot: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}  # COLUMNS: the console's lines unwrapped
        if slot is not None:  # one GPU of our own, or none at all for a CPU reference
            env["CUDA_VISIBLE_DEVICES"] = "" if slot == "cpu" else slot
        if self.dry_run or slot == "cpu":
            # One thread count for every CPU run: a CPU run is bit-reproducible at a fixed count only.
            env["LORAKIT_THREADS"] = "1" if self.dry_run else str(max(1, min(8, (os.cpu_count() or 2) // 2)))
        env.update(extra or {})
        return env

    def train(self, name: str, args: list[str], slot: str | None, *, output: Path | None = None,
              launcher: list[str] | None = None, extra_env: dict[str, str] | None = None) -> Run:
        """`lorakit train ARGS --output OUTPUT` on `slot` (a GPU index, 'cpu', or None: all GPUs, for
        torchrun), through `launcher` (default `python -m lorakit`); the run is recorded."""
        output = output or self.work / name
        device = [] if slot is None else ["--device", "cpu" if slot == "cpu" else "cuda"]
        precision = ["--precision", "fp32"] if self.dry_run and "--precision" not in args else []
        command = [*(launcher or [sys.executable, "-m", "lorakit"]), "train", *args, *device, *precision,
                   "--output", str(output)]
        timeout = max(90.0, self.budget_s - self.elapsed() + 60)  # a hung run (NCCL) ends; a slow one finishes
        t0 = time.monotonic()
        print(f"[{self.elapsed():6.1f}s] run  {name} on {slot or 'all GPUs'}", flush=True)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=self.env(slot, extra_env), start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's whole group (torchrun's workers too)
            text, _ = proc.communicate()
            text += f"\n[killed after {timeout:.0f}s]"
            rc = 124
        wall = time.monotonic() - t0
        (self.logs / f"{name}.log").write_text(" ".join(command) + "\n\n" + text)
        lines = text.splitlines()
        fast = next((ln.strip() for ln in lines if ln.strip().startswith("GPU fast path")), "")
        records = cli_gpu.losses(output) if (output / "metrics.jsonl").exists() else []
        run = Run(name, rc, wall, output, records, fast, "\n".join(lines[-15:]))
        self.write({"run": name, "rc": rc, "wall_s": round(wall, 2), "slot": slot or "all", "fast_path": fast,
                    "command": " ".join(command[command.index("train"):]), "metrics": records,
                    **({"tail": run.tail} if rc else {})})
        return run

    def failed(self, name: str, *runs: Run) -> bool:
        """Record `name` as failed when a run it needs did not complete; True then."""
        bad = [r for r in runs if not r.ok]
        for r in bad:
            last = r.tail.strip().splitlines()[-1] if r.tail.strip() else "no output"
            self.check(name, "FAIL", f"run {r.name} did not complete (exit {r.rc}): {last[:200]}",
                       log=str(self.logs / f"{r.name}.log"))
            return True
        return False


# the checks ---------------------------------------------------------------------------------


def common_args(data: dict[str, Path], objective: str, steps: int = STEPS, batch: int = 8,
                evaluate: bool = True) -> list[str]:
    """`lorakit train` options of the compared runs: 8 pairs a step, evaluated at steps 6 and 12."""
    held = ["--eval-data", str(data["eval"]), "--eval-every", "6"] if evaluate else []
    return ["--model", str(data["model"]), "--data", str(data["train"]), *held, "--objective", objective,
            "--beta", "0.1", "--rank", "8", "--alpha", "16", "--lr", "2e-3", "--batch-size", str(batch),
            "--max-steps", str(steps), "--log-every", "1", "--seq-len", "256", "--seed", "0"]


def reference_at_step1(bench: Bench, name: str, run: Run) -> None:
    """DPO from a fresh adapter (B = 0): the policy is its reference before the first update, so
    every reward is exactly 0 and the loss is -log sigmoid(0) = log 2 (fp32 rounding only)."""
    first = run.records[0]
    rewards = (first.get("rewards/chosen"), first.get("rewards/rejected"))
    loss_ok = abs(first["loss"] - math.log(2)) <= 1e-6
    ok = rewards == (0.0, 0.0) and loss_ok
    bench.check(name, "PASS" if ok else "FAIL",
                f"step 1: rewards chosen/rejected {rewards[0]!r}/{rewards[1]!r} (exactly 0 expected), "
                f"loss {first['loss']:.7f} (log 2 = {math.log(2):.7f} within 1e-6 expected)", run=run.name)


def objective_chain(bench: Bench, data: dict[str, Path], objective: str) -> dict[str, Run]:
    """Check 1 for one objective: CUDA defaults vs the generic path vs fp32 on CUDA vs fp32 on the CPU."""
    args = common_args(data, objective)
    cpu: Future[Run] = bench.cpu.submit(bench.train, f"{objective}-cpu-fp32", [*args, "--precision", "fp32"], "cpu")
    with bench.gpu() as slot:
        default = bench.train(f"{objective}-cuda-default", args, slot)
        generic = None
        if default.ok and default.fast:
            generic = bench.train(f"{objective}-cuda-generic", [*args, "--fast-path", "false"], slot)
        fp32 = bench.train(f"{objective}-cuda-fp32", [*args, "--precision", "fp32", "--fast-path", "false"], slot)
    name = f"{objective}: fast path vs --fast-path false (bf16)"
    if generic is not None:
        if not bench.failed(name, default, generic):
            ok, detail = compare(generic, default, BF16)
            bench.check(name, "PASS" if ok else "FAIL", f"fast path on ({default.fast_path}); "
                        f"worst {_worst(detail)}", **detail)
    elif not bench.failed(name, default):
        said = default.fast_path or "lorakit train printed no fast-path line (not on CUDA)"
        bench.check(name, "SKIP", f"the fast path did not run, so there is nothing to compare: {said}")
    name = f"{objective}: CUDA defaults vs CUDA fp32"
    if not bench.failed(name, default, fp32):
        ok, detail = compare(fp32, default, BF16)
        bench.check(name, "PASS" if ok else "FAIL", f"worst {_worst(detail)}", **detail)
    if objective == "dpo" and default.ok:
        reference_at_step1(bench, "dpo: reference at step 1 (CUDA defaults)", default)
    reference = cpu.result()
    name = f"{objective}: CUDA fp32 vs CPU fp32"
    if not bench.failed(name, fp32, reference):
        ok, detail = compare(reference, fp32, FP32)
        _, largest = adapters(reference.output, fp32.output)
        bench.check(name, "PASS" if ok else "FAIL", f"worst {_worst(detail)}; final adapters max |d| {largest:.2e}",
                    adapter_max_abs_diff=largest, **detail)
    return {"default": default, "fp32": fp32}


def _worst(detail: dict) -> str:
    if "why" in detail:
        return detail["why"]
    return ", ".join(f"{k} {w['abs_diff']:.2e} ({w['of_allowed']:.2f} of allowed, step {w['step']})"
                     for k, w in detail["worst"].items())


def nf4_chain(bench: Bench, data: dict[str, Path]) -> None:
    """Check 2: DPO on a 4-bit NormalFloat base."""
    with bench.gpu() as slot:
        run = bench.train("dpo-nf4", [*common_args(data, "dpo"), "--quantize", "nf4"], slot)
    name = "dpo --quantize nf4: runs on a 4-bit base"
    if bench.failed(name, run):
        return
    formats = {r.get("mem_base_format") for r in run.records if "mem_base_format" in r}
    bench.check(name, "PASS" if formats == {"nf4"} else "FAIL",
                f"base format logged: {sorted(map(str, formats))}; {run.fast_path or 'no fast-path line'}")
    reference_at_step1(bench, "dpo --quantize nf4: reference at step 1", run)
    curve = [r["loss"] for r in run.records if "loss" in r]
    late = sum(curve[-3:]) / 3
    bench.check("dpo --quantize nf4: the loss falls", "PASS" if late < curve[0] else "FAIL",
                f"step 1 loss {curve[0]:.4f}, mean of the last 3 steps {late:.4f}", losses=curve)


def resume_chain(bench: Bench, data: dict[str, Path], prefix: str, dropout: float) -> None:
    """Check 3: interrupted in the middle of a step, resumed: the adapter of an uninterrupted run."""
    args = [*common_args(data, "dpo", RESUME_STEPS, batch=4, evaluate=False), "--grad-accum", "2",
            "--dropout", str(dropout), "--save-every", "3"]
    name = f"{prefix}: interrupted mid-step + --resume == uninterrupted, bit for bit"
    with bench.gpu() as slot:  # every run of the chain on the same GPU
        whole = bench.train(f"{prefix}-whole", args, slot)
        result = interrupted_and_resumed(bench, name, prefix, args, slot, whole)
        if result is None or result[0]:
            return  # recorded: a run failed, or bit for bit
        again = bench.train(f"{prefix}-whole-again", args, slot)  # is the run itself reproducible?
        if bench.failed(name, again):
            return
        same, noise = adapters(whole.output, again.output)
        reproducible = same and losses(whole) == losses(again)
        bench.check(name, "FAIL", f"{result[1]}; two uninterrupted runs "
                    + ("are identical" if reproducible else f"differ too (adapters by {noise:.2e})"),
                    run_to_run_max_abs_diff=noise)
        if reproducible:
            return
        name = f"{prefix} under torch.use_deterministic_algorithms: bit for bit"
        if not bench.affordable(3):
            bench.check(name, "SKIP", f"time budget: {bench.elapsed():.0f}s of {bench.budget_s:.0f}s used")
            return
        det = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        dwhole = bench.train(f"{prefix}-det-whole", args, slot, launcher=wrapper(deterministic=True), extra_env=det)
        result = interrupted_and_resumed(bench, name, f"{prefix}-det", args, slot, dwhole, det)
        if result is not None and not result[0]:
            bench.check(name, "FAIL", result[1])


def losses(run: Run) -> list[float | None]:
    return [r.get("loss") for r in run.records]


def wrapper(stop_step: int | None = None, deterministic: bool = False) -> list[str]:
    """A launcher: this script's `lorakit` mode (see `as_lorakit`)."""
    return [sys.executable, str(Path(__file__).resolve()), "lorakit",
            *(["--stop-step", str(stop_step)] if stop_step is not None else []),
            *(["--deterministic"] if deterministic else []), "--"]


def interrupted_and_resumed(bench: Bench, name: str, prefix: str, args: list[str], slot: str, whole: Run,
                            extra_env: dict[str, str] | None = None) -> tuple[bool, str] | None:
    """Interrupt a run in step STOP_STEP, resume it, compare with `whole`: PASS is recorded as `name`;
    returns (bit for bit, what differs), or None when a run failed (recorded)."""
    deterministic = extra_env is not None
    cut_dir = bench.work / f"{prefix}-cut"
    cut = bench.train(f"{prefix}-cut", args, slot, output=cut_dir,
                      launcher=wrapper(STOP_STEP, deterministic), extra_env=extra_env)
    checkpoint = cut_dir / f"checkpoint-{STOP_STEP}"
    if cut.rc != 130 or not checkpoint.is_dir():
        found = sorted(p.name for p in cut_dir.glob("checkpoint-*"))
        bench.check(name, "FAIL", f"the interrupted run: expected exit 130 and {checkpoint.name}; got exit {cut.rc}, "
                    f"checkpoints {found}", tail=cut.tail)
        return None
    resumed = bench.train(f"{prefix}-resumed", [*args, "--resume"], slot, output=cut_dir,
                          launcher=wrapper(None, True) if deterministic else None, extra_env=extra_env)
    if bench.failed(name, whole, resumed):
        return None
    same, largest = adapters(whole.output, cut_dir)
    same_losses = losses(whole) == losses(resumed)
    if same and same_losses:
        bench.check(name, "PASS", f"adapters and the {len(whole.records)} logged losses identical "
                    f"(fast path: {resumed.fast_path or 'none'})")
        return True, ""
    return False, (f"the resumed adapter differs by up to {largest:.2e}" if not same else "adapters identical") + (
        "" if same_losses else f"; losses {losses(resumed)} vs {losses(whole)}")


def torchrun_chain(bench: Bench, data: dict[str, Path], references: Future[dict[str, Run]]) -> None:
    """Check 4: DDP and FSDP2 on 2 processes against one, the same global batch of 8 pairs."""
    precisions = ("fp32",) if bench.dry_run else ("fp32", "default")
    for precision in precisions:
        for strategy in ("ddp", "fsdp"):
            name = f"torchrun 2 x {'CPU (gloo)' if bench.dry_run else 'GPU'}: {strategy} vs 1 process ({precision})"
            if not bench.dry_run and bench.gpus < 2:
                bench.check(name, "SKIP", f"needs 2 GPUs, this machine has {bench.gpus}")
                continue
            if not bench.affordable(1.5):
                bench.check(name, "SKIP", f"time budget: {bench.elapsed():.0f}s of {bench.budget_s:.0f}s used")
                continue
            args = common_args(data, "dpo")
            if precision == "fp32":
                args += ["--precision", "fp32", "--fast-path", "false"]
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "lorakit"]
            run = bench.train(f"dpo-{strategy}-{precision}", [*args, "--strategy", strategy],
                              "cpu" if bench.dry_run else None, launcher=launcher,
                              extra_env={"OMP_NUM_THREADS": "1"})
            reference = references.result().get(precision)  # the single-process run, same options
            if reference is None or bench.failed(name, reference, run):
                continue
            ok, detail = compare(reference, run, FP32 if precision == "fp32" else BF16)
            _, largest = adapters(reference.output, run.output)
            bench.check(name, "PASS" if ok else "FAIL", f"worst {_worst(detail)}; final adapters max |d| {largest:.2e}",
                        adapter_max_abs_diff=largest, **detail)


# the script ---------------------------------------------------------------------------------


def as_lorakit(argv: list[str]) -> int:
    """`pref_gpu.py lorakit [--stop-step S] [--deterministic] -- train ...`: `lorakit` in this process,
    with a KeyboardInterrupt raised at the second micro-batch of step S (after the first one's
    backward), the way Ctrl-C lands mid-step; --deterministic: torch.use_deterministic_algorithms."""
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="pref_gpu.py lorakit")
    parser.add_argument("--stop-step", type=int)
    parser.add_argument("--deterministic", action="store_true")
    opts = parser.parse_args(argv[:split])
    from lorakit.cli import main as cli_main
    from lorakit.train.objectives import preference as objectives

    if opts.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if opts.stop_step is not None:
        seen = {"steps": 0, "forwards": 0}
        real_batches, real_forward = objectives.step_batches, objectives.PreferenceLoss.forward

        def step_batches(*args, **kwargs):
            seen["steps"] += 1
            return real_batches(*args, **kwargs)

        def forward(self, batch):
            if self.model.training and seen["steps"] == opts.stop_step + 1:
                seen["forwards"] += 1
                if seen["forwards"] == 2:
                    raise KeyboardInterrupt
            return real_forward(self, batch)

        objectives.step_batches = step_batches
        objectives.PreferenceLoss.forward = forward
    return cli_main(argv[split + 1 :])


def preflight(bench: Bench) -> bool:
    """`lorakit train --help` runs here (every package the command needs imports), or one FAIL says why."""
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "--help"], capture_output=True, text=True,
                          env=bench.env(None), timeout=120)
    if done.returncode == 0:
        return True
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    bench.check("lorakit train --help", "FAIL", f"exit {done.returncode}: {last[:300]}", tail=done.stderr[-3000:])
    return False


def environment(dry_run: bool, gpus: int) -> dict:
    import transformers

    info = {"event": "start", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]), "dry_run": dry_run, "gpus": gpus,
            "devices": [torch.cuda.get_device_name(i) for i in range(gpus)], "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError as err:
        info["bitsandbytes"] = f"unavailable: {err}"
    return info


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "lorakit":
        return as_lorakit(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, gloo under torchrun: checks the script")
    parser.add_argument("--budget-s", type=float, default=230.0,
                        help="wall seconds for the whole invocation: runs that would end later are skipped (recorded)")
    opts = parser.parse_args()
    gpus = min(torch.cuda.device_count(), 2)
    if not opts.dry_run and gpus == 0:
        print("pref_gpu.py needs a CUDA GPU; --dry-run tries the script on the CPU", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", "bench/out"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench = Bench(out, work, opts.dry_run, gpus, opts.budget_s)
        bench.write(environment(opts.dry_run, gpus))
        data = {"model": work / "model", "train": write_jsonl(work / "pairs.jsonl", pair_rows(96, 0)),
                "eval": write_jsonl(work / "pairs_eval.jsonl", pair_rows(16, 1))}
        (build_tiny_model if opts.dry_run else cli_gpu.build_model)(data["model"])
        if preflight(bench):
            with ThreadPoolExecutor(6) as pool:  # single-GPU chains wait for a lane (Bench.gpu)
                chains = {"dpo": pool.submit(objective_chain, bench, data, "dpo"),
                          "orpo": pool.submit(objective_chain, bench, data, "orpo"),
                          "resume": pool.submit(resume_chain, bench, data, "resume", 0.0),
                          "resume-dropout": pool.submit(resume_chain, bench, data, "resume-dropout", 0.1),
                          "nf4": pool.submit(nf4_chain, bench, data)}
                chains["torchrun"] = pool.submit(torchrun_chain, bench, data, chains["dpo"])
                for name, future in chains.items():
                    try:
                        future.result()
                    except Exception as exc:  # one broken chain must not hide the others' results
                        bench.check(f"{name}: the script itself", "FAIL", f"{type(exc).__name__}: {exc}"[:300])
        bench.cpu.shutdown()
    counts = {s: sum(c["status"] == s for c in bench.checks) for s in ("PASS", "FAIL", "SKIP")}
    bench.write({"event": "summary", "wall_s": round(bench.elapsed(), 1), **counts,
                 "checks": {c["check"]: c["status"] for c in bench.checks}})
    print(f"\n{'status':6s} check")
    for c in bench.checks:
        print(f"{c['status']:6s} {c['check']}" + ("" if c["status"] == "PASS" else f"\n       {c['reason'][:300]}"))
    print(f"\nPASS {counts['PASS']}  FAIL {counts['FAIL']}  SKIP {counts['SKIP']}  in {bench.elapsed():.0f}s; "
          f"details in {out / 'pref_gpu.jsonl'}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
