"""How many threads PyTorch should use on a CPU that other processes may be using too.

PyTorch's intra-op pool splits every matrix product across all its threads and waits
for the slowest. When another busy process holds one of the cores, the thread that
shares that core runs only part of the time, and every product waits for it: a pool
sized to the machine can run many times slower than a single thread.

`available_cpus` counts the CPUs this process may actually run on (affinity and cgroup
quota). `ThreadTuner` leaves an idle machine alone: when no other process is ready to run
(the kernel's run queue, `runnable_elsewhere`) and PyTorch's own count fits the available
CPUs, it keeps PyTorch's pool exactly as it started, never probing or resetting it, so an
idle run is PyTorch's default run. Once another process competes for the CPUs (or the
steps slow down, or the run queue cannot be read) it measures instead of guessing: it
times a short matrix-product probe at each candidate thread count, uses the fastest,
measures again every `interval_s` seconds while the contention lasts, and goes back to
PyTorch's count when the other processes stop. Each probe takes a few tens of milliseconds.
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


def runnable_elsewhere(samples: int = 3) -> int | None:
    """Threads of other processes ready to run now: the kernel's run queue (`procs_running`
    in /proc/stat) less this process's own running threads, the least of a few readings so
    that a passing blip does not count. None where /proc does not say (not Linux)."""
    counts = []
    for _ in range(samples):
        try:
            stat = Path("/proc/stat").read_text()
            total = int(next(line.split()[1] for line in stat.splitlines() if line.startswith("procs_running ")))
            own = 0
            for task in os.scandir("/proc/self/task"):
                try:
                    # The state follows the ")" that closes the thread's name.
                    own += Path(task.path, "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
                except (OSError, IndexError):
                    continue  # the thread ended meanwhile
        except (OSError, StopIteration, ValueError, IndexError):
            return None
        counts.append(max(0, total - own))
    return min(counts)


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
    if threads != before:
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
        if threads != before:
            torch.set_num_threads(before)


class ThreadTuner:
    """Chooses torch's intra-op thread count: PyTorch's own on an idle machine, by
    measurement under contention, and keeps choosing.

    Call `start()` once, then `after_step(tokens, seconds)` after each training step. The
    probe, the run-queue reader, the clock and the thread setter are parameters so the
    decision logic can be tested with fakes.
    """

    def __init__(
        self,
        cpus: int | None = None,
        *,
        interval_s: float = 30.0,
        check_s: float = 1.0,
        slowdown: float = 0.6,
        probe: Callable[[int], float] = matmul_probe,
        busy: Callable[[], int | None] = runnable_elsewhere,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] | None = None,
        fixed: int | None = None,
        default: int | None = None,
    ) -> None:
        self.cpus = cpus or available_cpus()
        self.fixed = fixed  # a count the user pinned: set once, never probed
        self._original = default or torch.get_num_threads()  # PyTorch's own count
        self.candidates = candidates(self.cpus)
        self.interval_s = interval_s
        self.check_s = check_s
        self.slowdown = slowdown
        self._probe, self._busy, self._set, self._clock, self._log = probe, busy, set_threads, clock, log
        self.threads = 0
        self.decisions: list[tuple[int, dict[int, float]]] = []  # (chosen, probe rates)
        self._last_probe = -math.inf
        self._last_check = -math.inf
        self._best_rate: float | None = None  # tokens/s of the steps since the last probe
        # Why the count is being watched: None (idle), "queue" (other processes in the run
        # queue), "slowdown" (steps slowed down) or "unknown" (the run queue cannot tell).
        self.contended: str | None = None

    def start(self) -> int:
        """The first choice: PyTorch's pool untouched when the machine is idle, else `choose`."""
        self._last_check = self._clock()
        if self.fixed is not None or self._original != self.cpus:
            self.contended = "unknown"
            return self.choose()
        others = self._busy()
        if others is None or others > 0:
            self.contended = "unknown" if others is None else "queue"
            reason = "start; the run queue cannot be read" if others is None else \
                f"start; {others} other thread{'s' if others > 1 else ''} ready to run"
            return self.choose(reason)
        self.threads = self._original
        self._best_rate = None
        if self._log is not None:
            self._log(f"CPU threads: {self.threads} of {self.cpus} available (start; no other process is running: "
                      "PyTorch's own pool, unchanged)")
        return self.threads

    def choose(self, reason: str = "start") -> int:
        """Probe every candidate and switch to the fastest; returns the thread count."""
        if self.fixed is not None:
            if self.fixed != self._original:
                self._set(self.fixed)
            self.threads = self.fixed
            if self._log is not None:
                self._log(f"CPU threads: {self.fixed} (set by the environment)")
            return self.fixed
        rates = {n: self._probe(n) for n in self.candidates}
        best = max(rates, key=lambda n: (rates[n], -n))  # ties go to fewer threads
        # The probes leave torch's count as they found it; set it only when it changes (each
        # torch.set_num_threads also drops oneDNN's cached kernels).
        changed = best != (self.threads or self._original)
        if changed:
            self._set(best)
        self.threads = best
        self._last_probe = self._clock()
        self._best_rate = None
        self.decisions.append((best, rates))
        if self._log is not None and (changed or reason.startswith("start")):
            top = max(rates.values()) or 1.0
            shown = ", ".join(f"{n}: {rates[n] / top:.2f}" for n in self.candidates)
            self._log(f"CPU threads: {best} of {self.cpus} available ({reason}; probe speed by thread count {shown})")
        return best

    def after_step(self, tokens: int, seconds: float) -> None:
        """Look at the run queue every `check_s`: probe when other processes appear, go back to
        PyTorch's count when they leave, re-probe every `interval_s` while they stay; probe at
        once when steps run `slowdown` times slower than before, whatever the run queue says."""
        if seconds <= 0 or self.fixed is not None:
            return
        rate = tokens / seconds
        if self._best_rate is not None and rate < self.slowdown * self._best_rate:
            self.contended = "slowdown"  # contention the run queue may not show (another VM, say)
            self.choose("steps slowed down")
            return
        self._best_rate = max(rate, self._best_rate or 0.0)
        now = self._clock()
        if now - self._last_check < self.check_s:
            return
        self._last_check = now
        others = self._busy() if self._original == self.cpus else None
        if others == 0 and self.contended in (None, "queue"):
            if self.threads != self._original:
                self.threads = self._original
                self._set(self._original)
                self._best_rate = None
                if self._log is not None:
                    self._log(f"CPU threads: {self.threads} of {self.cpus} available (no other process is "
                              "running any more: PyTorch's own count)")
            self.contended = None
        elif others and self.contended is None:
            self.contended = "queue"
            self.choose(f"{others} other thread{'s' if others > 1 else ''} ready to run")
        elif self.contended is not None and now - self._last_probe >= self.interval_s:
            self.choose("periodic check")
            if others == 0 and self.threads == self._original:
                self.contended = None

    def close(self) -> None:
        """Give torch back the thread count it had before."""
        if self.threads not in (0, self._original):
            self._set(self._original)
            self.threads = self._original


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
    tuner.start()
    return tuner


def serving_threads(log: Callable[[str], None] | None = None) -> int:
    """The thread count for a CPU serving engine: PyTorch's own on an idle machine, else a probe at start."""
    return ThreadTuner(log=log).start()
