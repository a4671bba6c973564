"""`lorakit train` tokens/s on a CPU with and without one competing busy process.

    .venv/bin/python bench/cpu_contention.py [--steps 8] [--limit-s 120] [--rounds 1]

Each case runs `lorakit train` on the bundled SmolLM2-135M-Instruct and the bundled demo
task (batch 4, r=16, all-linear, --log-every 1) in its own process and reads the per-step
tokens/s from its metrics.jsonl (the first step, a warm-up, is left out; the median of the
rest is reported). A case that has not finished after --limit-s seconds is stopped, and the
steps it logged so far count.

    default    OMP_NUM_THREADS = the CPU count: PyTorch's default pool, no adaptation
    adaptive   lorakit's choice (lorakit.threads: probe, then re-probe as steps slow down)
    one        LORAKIT_THREADS=1

Each runs idle and then beside one busy process (a Python loop spinning on one core), the
cases alternating so that load from anything else on the machine hits them alike. The
report gives each case's tokens/s and its ratio to the same setting idle, with the load
average before each case (other processes on a shared machine show up there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src" / "lorakit" / "demo" / "train.jsonl"
CASES = ("default", "adaptive", "one")


def environment(case: str, cpus: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LORAKIT_THREADS")}
    env["PYTHONPATH"] = str(ROOT / "src")
    if case == "default":
        env["OMP_NUM_THREADS"] = str(cpus)
    elif case == "one":
        env["LORAKIT_THREADS"] = "1"
    return env


def run_case(case: str, cpus: int, steps: int, limit_s: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "lorakit", "train", "--data", str(DATA), "--output", out,
                   "--max-steps", str(steps), "--batch-size", "4", "--log-every", "1",
                   "--save-every", str(steps * 10), "--eval-every", str(steps * 10)]
        start = time.time()
        proc = subprocess.Popen(command, env=environment(case, cpus), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            log, _ = proc.communicate(timeout=limit_s)
            stopped = False
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
            stopped = True
        metrics = Path(out) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    rates = [r["tokens_per_s"] for r in records if r["step"] > 1]
    chosen = [line.strip() for line in log.splitlines() if "CPU threads:" in line]
    return {"case": case, "steps_logged": len(records), "stopped_at_limit": stopped,
            "tokens_per_s": statistics.median(rates) if rates else None, "per_step": rates,
            "wall_s": round(time.time() - start, 1), "threads_log": chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--limit-s", type=float, default=120.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    from lorakit.threads import available_cpus

    cpus = available_cpus()
    results = []
    for round_ in range(args.rounds):
        for contended in (False, True):
            busy = None
            if contended:
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(1)
            try:
                for case in cases:
                    load = os.getloadavg()[0]
                    result = run_case(case, cpus, args.steps, args.limit_s)
                    result.update(round=round_, contended=contended, load_before=round(load, 2))
                    results.append(result)
                    print(json.dumps(result), flush=True)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    print(f"\n{cpus} CPUs available; median tokens/s per case (ratio to the same case idle)")
    print(f"{'case':10} {'idle':>10} {'contended':>10} {'ratio':>7}")
    for case in cases:
        idle = [r["tokens_per_s"] for r in results if r["case"] == case and not r["contended"] and r["tokens_per_s"]]
        busy = [r["tokens_per_s"] for r in results if r["case"] == case and r["contended"] and r["tokens_per_s"]]
        i = statistics.median(idle) if idle else float("nan")
        b = statistics.median(busy) if busy else float("nan")
        print(f"{case:10} {i:10.1f} {b:10.1f} {b / i:7.2f}")


if __name__ == "__main__":
    main()
