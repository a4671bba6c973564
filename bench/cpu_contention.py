"""`lorakit train` tokens/s on a CPU with and without one competing busy process.

    PYTHONPATH=src .venv/bin/python bench/cpu_contention.py [--steps 8] [--limit-s 120] [--rounds 3]

Each case runs `lorakit train` on the bundled SmolLM2-135M-Instruct and the bundled demo
task (batch 4, r=16, all-linear, --log-every 1) in its own process and reads the per-step
tokens/s from its metrics.jsonl (the first step, a warm-up, is left out; the median of the
rest is reported). A case that has not finished after --limit-s seconds is stopped, and the
steps it logged so far count.

    default    OMP_NUM_THREADS = the CPU count: PyTorch's default pool, no adaptation
    adaptive   lorakit's choice (lorakit.base.threads: PyTorch's pool when idle, a probe when
               another process competes or the steps slow down)
    one        LORAKIT_THREADS=1

Each round runs every case idle and then every case beside one busy process (a Python
loop spinning on one core); the order of the cases turns by one each round, so that a
drift in the machine's speed hits them alike. The report gives each case's median tokens/s
idle and contended, its ratio to the same case idle and to the default idle, and, since a
shared machine's speed drifts between rounds, the median over rounds of the ratio of
adaptive to default within the same round (idle speed unchanged: about 1.0; the
contention bar: contended adaptive at least 0.40 of idle default). The load average
before each case shows other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    from lorakit.base.threads import available_cpus

    cpus = available_cpus()
    results = []
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
          f"{cpus} CPUs available; load average {os.getloadavg()[0]:.2f}", flush=True)
    for round_ in range(args.rounds):
        order = cases[round_ % len(cases):] + cases[:round_ % len(cases)]
        for contended in (False, True):
            busy = None
            if contended:
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(1)
            try:
                for case in order:
                    load = os.getloadavg()[0]
                    result = run_case(case, cpus, args.steps, args.limit_s)
                    result.update(round=round_, contended=contended, load_before=round(load, 2))
                    results.append(result)
                    print(json.dumps(result), flush=True)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    summary(results, cases, cpus, args.rounds)


def rate(results: list[dict], case: str, contended: bool, round_: int | None = None) -> float:
    values = [r["tokens_per_s"] for r in results if r["case"] == case and r["contended"] == contended
              and r["tokens_per_s"] and (round_ is None or r["round"] == round_)]
    return statistics.median(values) if values else float("nan")


def summary(results: list[dict], cases: list[str], cpus: int, rounds: int) -> None:
    print(f"\n{cpus} CPUs available, {rounds} round(s); median tokens/s per case")
    base = rate(results, "default", False) if "default" in cases else float("nan")
    print(f"{'case':10} {'idle':>10} {'contended':>10} {'contended/idle':>15} {'idle/default idle':>18} "
          f"{'contended/default idle':>23}")
    for case in cases:
        i, b = rate(results, case, False), rate(results, case, True)
        print(f"{case:10} {i:10.1f} {b:10.1f} {b / i:15.2f} {i / base:18.2f} {b / base:23.2f}")
    if "default" in cases and "adaptive" in cases:
        for contended, what in ((False, "idle"), (True, "contended")):
            ratios = [rate(results, "adaptive", contended, r) / rate(results, "default", False, r) for r in range(rounds)]
            shown = ", ".join(f"{x:.2f}" for x in ratios)
            print(f"adaptive {what} / default idle, within each round: {shown} (median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
