"""How many threads PyTorch should use on a CPU that other processes may be using too.

PyTorch's intra-op pool splits every matrix product across all its threads and waits
for the slowest. When another busy process holds one of the cores, the thread that
shares that core runs only part of the time, and every product waits for it: a pool
sized to the machine can run many times slower than a single thread.

`available_cpus` counts the CPUs this process may actually run on (affinity and cgroup
quota). `ThreadTuner` then measures instead of guessing: it times a short matrix-product
probe at each candidate thread count, uses the fastest, and measures again every
`interval_s` seconds, or at once when the training steps slow down, so it follows
contention that comes and goes. Each probe takes a few tens of milliseconds.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch


def available_cpus() -> int:
    """CPUs this process can use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def candidates(cpus: int) -> list[int]:
    """Thread counts worth trying: 1, the full count, and halvings between them."""
    counts = {1, cpus}
    n = cpus
    while n > 2:
        n //= 2
        counts.add(n)
    return sorted(counts)


def matmul_probe(threads: int, budget_s: float = 0.05) -> float:
    """Products per second of a (128, 512) @ (512, 512) float32 matmul with `threads` threads,
    timed over about `budget_s` seconds (the shapes of a small model's LoRA training GEMMs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(128, 512), torch.randn(512, 512)
        a @ b  # warm the pool at this size
        count, start = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s:
                return count / elapsed
    finally:
        torch.set_num_threads(before)


class ThreadTuner:
    """Chooses torch's intra-op thread count by measurement, and keeps choosing.

    Call `after_step(tokens, seconds)` after each training step. The probe, the clock and
    the thread setter are parameters so the decision logic can be tested with fakes.
    """

    def __init__(
        self,
        cpus: int | None = None,
        *,
        interval_s: float = 30.0,
        slowdown: float = 0.6,
        probe: Callable[[int], float] = matmul_probe,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] | None = None,
        fixed: int | None = None,
    ) -> None:
        self.cpus = cpus or available_cpus()
        self.fixed = fixed  # a count the user pinned: set once, never probed
        self._original = torch.get_num_threads()
        self.candidates = candidates(self.cpus)
        self.interval_s = interval_s
        self.slowdown = slowdown
        self._probe, self._set, self._clock, self._log = probe, set_threads, clock, log
        self.threads = 0
        self.decisions: list[tuple[int, dict[int, float]]] = []  # (chosen, probe rates)
        self._last_probe = -math.inf
        self._best_rate: float | None = None  # tokens/s of the steps since the last probe

    def choose(self, reason: str = "start") -> int:
        """Probe every candidate and switch to the fastest; returns the thread count."""
        if self.fixed is not None:
            self.threads = self.fixed
            self._set(self.fixed)
            if self._log is not None:
                self._log(f"CPU threads: {self.fixed} (set by the environment)")
            return self.fixed
        rates = {n: self._probe(n) for n in self.candidates}
        best = max(rates, key=lambda n: (rates[n], -n))  # ties go to fewer threads
        changed = best != self.threads
        self.threads = best
        self._set(best)
        self._last_probe = self._clock()
        self._best_rate = None
        self.decisions.append((best, rates))
        if self._log is not None and (changed or reason == "start"):
            top = max(rates.values()) or 1.0
            shown = ", ".join(f"{n}: {rates[n] / top:.2f}" for n in self.candidates)
            self._log(f"CPU threads: {best} of {self.cpus} available ({reason}; probe speed by thread count {shown})")
        return best

    def after_step(self, tokens: int, seconds: float) -> None:
        """Re-probe every `interval_s`, or at once when steps run `slowdown` times slower than before."""
        if seconds <= 0 or self.fixed is not None:
            return
        rate = tokens / seconds
        now = self._clock()
        if now - self._last_probe >= self.interval_s:
            self.choose("periodic check")
        elif self._best_rate is not None and rate < self.slowdown * self._best_rate:
            self.choose("steps slowed down")
        else:
            self._best_rate = max(rate, self._best_rate or 0.0)


    def close(self) -> None:
        """Give torch back the thread count it had before."""
        self._set(self._original)


def tuner_for(device: torch.device, distributed: bool, log: Callable[[str], None]) -> ThreadTuner | None:
    """A started tuner for a single-process CPU run (None for GPU runs and torchrun). A count
    pinned with LORAKIT_THREADS or OMP_NUM_THREADS is used as it is, and never changed.

    The thread count changes how a float sum is split, so only a pinned count makes two runs
    (an interrupted one and its resumption, say) agree to the last bit."""
    if device.type != "cpu" or distributed:
        return None
    pinned = os.environ.get("LORAKIT_THREADS")
    if pinned is not None and (not pinned.isdigit() or int(pinned) < 1):
        raise ValueError(f"LORAKIT_THREADS must be a positive integer, got {pinned!r}")
    fixed = int(pinned) if pinned else (torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else None)
    tuner = ThreadTuner(log=log, fixed=fixed)
    tuner.choose()
    return tuner


def serving_threads(log: Callable[[str], None] | None = None) -> int:
    """The thread count for a CPU serving engine, from a probe at start."""
    return ThreadTuner(log=log).choose()
